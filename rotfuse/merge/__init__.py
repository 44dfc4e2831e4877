"""Merging checkpoints: the method registry (names and the statistics each method needs).

The math lives in one module per method (simple.py, fisher.py, regmean.py): pure functions that
receive the models' tensors for one parameter (and their statistics) and return the merged
tensor; they never open files. engine.py is the streaming loop that feeds them. This module
imports neither torch nor transformers, so `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from rotfuse.errors import UsageError


@dataclass(frozen=True)
class Method:
    name: str
    stats: str | None  # kind of statistics (`rotfuse stats --kind`) the method needs, if any
    summary: str


METHODS: dict[str, Method] = {
    "simple": Method("simple", None, "weighted average of every parameter"),
    "fisher": Method("fisher", "fisher", "per-parameter average weighted by each model's diagonal Fisher"),
    "regmean": Method("regmean", "regmean",
                      "closed-form least-squares merge of every linear layer from its input Gram matrices; "
                      "simple average for everything else"),
}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r} (use one of {', '.join(METHODS)})") from None
