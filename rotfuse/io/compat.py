"""When two checkpoints hold "the same tensors": the one pair rule every command checks.

`compare_tensors(reference, other, rule)` walks `other`'s tensors, finds each one's twin in
`reference` (`rule.rename`: key prefixes may differ, e.g. `bert.` in a task model and none in the
bare one), and refuses a twin of another shape with one line naming the tensor, both shapes and
both folders. What may differ beyond shapes is the rule's business, and each command says it
explicitly:
- `match`: the model may hold tensors the anchor lacks (reported as unpaired, copied as is);
- `merge`: every tensor of the first model must be in every other one (excluded heads apart), and
  tensors only the others hold are left out of the output (reported);
- `interpolate`: exactly the same tensors on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rotfuse.core.errors import InputError

if TYPE_CHECKING:
    from rotfuse.io.checkpoint import Checkpoint


def _same(name: str) -> str:
    return name


def _never(name: str) -> bool:
    return False


@dataclass(frozen=True)
class PairRule:
    """What may differ between `reference` and `other` beyond the tensors they share."""

    rename: Callable[[str], str] = _same  # other's tensor name -> reference's name for it
    skip: Callable[[str], bool] = _never  # reference tensors not compared at all (merge's --exclude)
    extra_ok: bool = False  # other may hold tensors without a twin in reference
    missing_ok: bool = False  # reference may hold tensors without a twin in other
    hint: str = ""  # appended to a shape mismatch: what the user can do about it
    missing_hint: str = ""  # appended when a reference tensor is missing from other


@dataclass
class PairDiff:
    extra: list[str] = field(default_factory=list)  # other's tensors without a twin in reference
    missing: list[str] = field(default_factory=list)  # reference's tensors without a twin in other


def compare_tensors(reference: Checkpoint, other: Checkpoint, rule: PairRule = PairRule()) -> PairDiff:
    """Check `other` against `reference` under `rule`; InputError on the first difference it forbids."""
    diff = PairDiff()
    twins: set[str] = set()
    for name in other.names():
        twin = rule.rename(name)
        if twin not in reference:
            if not rule.extra_ok:
                raise InputError(f"{other.folder}: has tensor {name!r}, absent from {reference.folder}")
            diff.extra.append(name)
            continue
        twins.add(twin)
        if rule.skip(twin):
            continue
        mine, theirs = other.entry(name).shape, reference.entry(twin).shape
        if mine != theirs:
            named = repr(name) if twin == name else f"{name!r} ({twin!r} there)"
            raise InputError(
                f"{other.folder}: tensor {named} has shape {list(mine)} but {list(theirs)} in "
                f"{reference.folder}{rule.hint}"
            )
    for name in reference.names():
        if name not in twins and not rule.skip(name):
            if not rule.missing_ok:
                raise InputError(f"{other.folder}: tensor {name!r} of {reference.folder} not found{rule.missing_hint}")
            diff.missing.append(name)
    return diff
