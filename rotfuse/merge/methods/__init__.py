"""The merge-method registry: every `rotfuse merge --method NAME` there is.

A method is one module in this package that defines a `MergeMethod` subclass (base.py), plus one
registration line below naming that class. The registry is all the CLI and the engine know of
methods: they validate, dispatch and report through it. Importing this package imports neither
torch nor a method module (`rotfuse merge --help` stays fast); `method_class` imports one on use.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

from rotfuse.core.errors import UsageError

if TYPE_CHECKING:
    from rotfuse.merge.methods.base import MergeMethod


@dataclass(frozen=True)
class Registration:
    """Where a method's class lives, and the statistics kind (`rotfuse stats --kind`) each model
    needs, if any: what the CLI checks before it imports torch (tests check it against the class)."""

    target: str  # "module:Class"
    stats: str | None = None


# name -> its registration; one line per method
REGISTRY: dict[str, Registration] = {
    "simple": Registration("rotfuse.merge.methods.simple:Simple"),
    "fisher": Registration("rotfuse.merge.methods.fisher:Fisher", stats="fisher"),
    "regmean": Registration("rotfuse.merge.methods.regmean:RegMean", stats="regmean"),
    "task-arithmetic": Registration("rotfuse.merge.methods.task_arithmetic:TaskArithmetic"),
    "ties": Registration("rotfuse.merge.methods.ties:Ties"),
    "dare-linear": Registration("rotfuse.merge.methods.dare_linear:DareLinear"),
    "dare-ties": Registration("rotfuse.merge.methods.dare_ties:DareTies"),
    "slerp": Registration("rotfuse.merge.methods.slerp:Slerp"),
    "model-stock": Registration("rotfuse.merge.methods.model_stock:ModelStock"),
}


def check_statistics(name: str, given: int) -> None:
    """A usage error, before any import of torch or of the method, for an unknown method or a
    statistics method without --stats (saying how to compute them)."""
    if name not in REGISTRY:
        raise UsageError(f"unknown merge method {name!r} (use one of {', '.join(REGISTRY)})")
    kind = REGISTRY[name].stats
    if kind is not None and given == 0:
        raise UsageError(
            f"--method {name} needs statistics of every model: compute them with `rotfuse stats MODEL "
            f"--data FILE --kind {kind} -o MODEL_STATS/` for each, then pass --stats A_STATS/ B_STATS/ "
            "... in the models' order"
        )


def method_names() -> list[str]:
    return list(REGISTRY)


def method_class(name: str) -> type[MergeMethod]:
    """The class registered under `name` (imported now); a usage error for an unknown name."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r} (use one of {', '.join(REGISTRY)})") from None
    module, _, attribute = target.target.partition(":")
    cls: type[MergeMethod] = getattr(import_module(module), attribute)
    return cls
