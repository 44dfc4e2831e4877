"""Fixtures of the architecture tests: tiny models run faster on one thread (far faster on a
machine whose cores are busy)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers.functions import one_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield
