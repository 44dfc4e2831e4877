"""The merge-method registry: every `rotfuse merge --method NAME` there is.

A method is one module in this package that defines a `MergeMethod` subclass (base.py), plus one
registration line below naming that class. The registry is all the CLI and the engine know of
methods: they validate, dispatch and report through it. Importing this package imports neither
torch nor a method module (`rotfuse merge --help` stays fast); `method_class` imports one on use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from rotfuse.core.errors import UsageError

if TYPE_CHECKING:
    from rotfuse.merge.methods.base import MergeMethod

# name -> "module:class"; one line per method
REGISTRY: dict[str, str] = {
    "simple": "rotfuse.merge.methods.simple:Simple",
    "fisher": "rotfuse.merge.methods.fisher:Fisher",
    "regmean": "rotfuse.merge.methods.regmean:RegMean",
    "task-arithmetic": "rotfuse.merge.methods.task_arithmetic:TaskArithmetic",
    "ties": "rotfuse.merge.methods.ties:Ties",
    "dare-linear": "rotfuse.merge.methods.dare_linear:DareLinear",
    "dare-ties": "rotfuse.merge.methods.dare_ties:DareTies",
    "slerp": "rotfuse.merge.methods.slerp:Slerp",
    "model-stock": "rotfuse.merge.methods.model_stock:ModelStock",
}


# name -> the kind of statistics (`rotfuse stats --kind`) each model needs, or None: what the CLI
# checks before it imports torch; tests/cli/test_merge_early.py checks it against each class's `stats`
STATS: dict[str, str | None] = {
    "simple": None,
    "fisher": "fisher",
    "regmean": "regmean",
}


def check_statistics(name: str, given: int) -> None:
    """A usage error, before any import of torch or of the method, for an unknown method or a
    statistics method without --stats (saying how to compute them)."""
    if name not in REGISTRY:
        raise UsageError(f"unknown merge method {name!r} (use one of {', '.join(REGISTRY)})")
    kind = STATS.get(name)
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
    module, _, attribute = target.partition(":")
    cls: type[MergeMethod] = getattr(import_module(module), attribute)
    return cls
