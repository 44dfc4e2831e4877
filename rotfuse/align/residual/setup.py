"""The residual stream of a pair as the search sees it: norm gains folded where allowed, the kind
of map each stream admits, and the gains an aligned copy is expressed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rotfuse.align.options import MatchOptions
from rotfuse.align.pair import OpenedModel, counterpart
from rotfuse.align.residual.scores import StreamSide
from rotfuse.archs.residual import GainSource
from rotfuse.core.errors import InputError, UsageError
from rotfuse.symmetry.names import RESIDUAL
from rotfuse.symmetry.residual import StreamMap


@dataclass
class ResidualSetup:
    """Both checkpoints as the residual-stream search sees them (gains folded where allowed)."""

    model: StreamSide
    anchor: StreamSide
    notes: list[str] = field(default_factory=list)

    def orthogonal(self, stack: str) -> bool:
        return self.model.plans[stack].orthogonal

    def solve(self, stack: str, scores: torch.Tensor) -> StreamMap:
        """The best map of the kind the stack admits."""
        from rotfuse.align.residual.scores import solve_stream_map

        plan = self.model.plans[stack]
        return solve_stream_map(scores, plan.orthogonal, plan.keeps_ones)

    def describe(self, options: MatchOptions) -> dict[str, Any]:
        plans = self.model.plans
        kinds = {
            stack or "stream": (
                "permutation" if not p.orthogonal else "orthogonal, keeping the ones" if p.keeps_ones else "orthogonal"
            )
            for stack, p in plans.items()
        }
        return {
            "method": "activations" if options.data else "weights",
            "maps": kinds,
            "gains_folded": any(p.orthogonal for p in plans.values()),
            "distances": (
                "norm gains folded into their readers, on both sides"
                if any(p.folds for p in plans.values())
                else "as stored"
            ),
            "output_gains": "the anchor's" if any(p.folds for p in plans.values()) else "unchanged",
            "untied": [name for p in plans.values() for name in p.added],
            "notes": self.notes,
        }


def gains_from(model: OpenedModel, source: OpenedModel, sides: StreamSide) -> tuple[GainSource, list[str]]:
    """What expresses a moved copy of MODEL in SOURCE's norm gains (the anchor's, or the model's
    own for a scrambled copy), read once up front, and notes. A gain with a zero entry cannot be
    unfolded into: that norm stays folded (gain 1), and a note says so."""
    gains: dict[str, torch.Tensor | None] = {}
    notes = []
    for fold in (fold for plan in sides.plans.values() for fold in plan.folds):
        other = counterpart(fold.gain, model, source)
        value = source.checkpoint.get(other).double()
        usable = bool((value + fold.offset != 0).all()) and bool(torch.isfinite(value).all())
        gains[fold.gain] = value if usable else None
        if not usable:
            notes.append(
                f"{source.folder}: {other!r} has zero entries, so the output keeps that norm folded "
                "(gain 1) instead of taking its gains"
            )
    return gains.get, notes


def prepare_residual(anchor: OpenedModel, model: OpenedModel, options: MatchOptions) -> ResidualSetup | None:
    if RESIDUAL not in options.symmetries or RESIDUAL in model.bound.disabled:
        return None  # a spec restriction that switches the map off says why in the report
    from rotfuse.archs.residual import outputs_the_stream, residual_plans

    if outputs_the_stream(model.bound, model.checkpoint.config) and not options.allow_stream_output:
        raise UsageError(
            f"{model.folder}: {', '.join(model.checkpoint.config['architectures'])} has no head, so its outputs "
            "are the residual stream itself and a residual map would change them (x -> x Q; cosine "
            "similarities and norms are kept); pass --allow-stream-output to accept that"
        )
    mine = residual_plans(model.bound, model.checkpoint, options.allow_untie)
    theirs = residual_plans(anchor.bound, anchor.checkpoint, options.allow_untie)
    for stack, plan in mine.items():
        other = theirs.get(stack)
        if other is None or other.orthogonal != plan.orthogonal:
            why = "; ".join((other.notes if plan.orthogonal else plan.notes) if other is not None else [])
            raise InputError(
                f"{model.folder}: its residual stream{' ' + stack if stack else ''} can move by "
                f"{'orthogonal maps' if plan.orthogonal else 'permutations only'} but the anchor's cannot "
                f"({why or 'tied embeddings on one side only?'}); with tied embeddings pass --allow-untie"
            )
    notes = [note for plan in mine.values() for note in plan.notes]
    return ResidualSetup(
        StreamSide.unmoved(model.checkpoint, mine), StreamSide.unmoved(anchor.checkpoint, theirs), notes
    )
