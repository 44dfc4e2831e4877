"""The progress callback every long-running step reports through: `progress(done, total)`."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]
