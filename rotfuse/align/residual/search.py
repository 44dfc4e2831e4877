"""The residual-stream map of every stack: from activations (--data) or by weight matching,
alternated with the per-layer maps until the distance stops falling."""

from __future__ import annotations

from typing import Any, cast

import torch

from rotfuse.align.layer import match_layer
from rotfuse.align.pair import counterpart, in_layers, layer_settings
from rotfuse.align.plan import MatchPlan
from rotfuse.align.pool import Stream, transform_layers
from rotfuse.align.share import my_layers, summable_in_layer_order
from rotfuse.archs.bind import LayerId
from rotfuse.archs.layer_io import read_layer
from rotfuse.archs.residual import role_stream
from rotfuse.core import distributed
from rotfuse.core.errors import UsageError
from rotfuse.core.tensors import sq_distance
from rotfuse.symmetry.names import FFN_PERM
from rotfuse.symmetry.residual import StreamMap
from rotfuse.symmetry.weights import LayerWeights

Scores = dict[str, torch.Tensor]  # stream -> its [d, d] score matrix


def search_stream_maps(plan: MatchPlan, stream: Stream) -> tuple[dict[str, StreamMap], dict[str, Any]]:
    """The residual map of every stack: from activations with --data, else by weight matching."""
    from rotfuse.align.residual.scores import (
        layer_stream_parts,
        stream_agreement,
        stream_scores,
        to_unmoved_basis,
    )

    setup, options = plan.residual, plan.options
    assert setup is not None
    stacks = list(setup.model.plans)
    if options.data is not None:
        if len(stacks) != 1:
            raise UsageError(
                f"{plan.model.folder}: --data (activation matching) needs a model with one residual "
                f"stream; this one has {len(stacks)} (match it by weights: drop --data)"
            )
        from rotfuse.align.residual.activations import activation_scores

        stack, data = stacks[0], options.data
        scores = stream.timed(
            "activations",
            lambda: activation_scores(
                plan.model.folder,
                plan.anchor.folder,
                data,
                setup.orthogonal(stack),
                options.data_samples,
                options.data_batch_size,
                plan.device,
            ),
        )
        maps = {stack: setup.solve(stack, scores)}
        per_unit = stream_agreement(scores, maps[stack]) / setup.model.plans[stack].hidden_size
        return maps, {
            "method": "activations",
            "data": str(options.data),
            "rounds": [{"round": 1, "mean_matched_score": per_unit}],
        }

    group_of = {stream: key for key, p in setup.model.plans.items() for stream in p.streams or (key,)}

    def by_stream(layer: LayerId, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's scores by role, summed per stream (the plan each role's tensors move with)."""
        spec = plan.model.bound.stack(layer.stack)
        fused = spec.attention.qkv is not None
        out: dict[str, torch.Tensor] = {}
        for role, part in parts.items():
            key = group_of[role_stream(spec, "qkv" if fused and role in ("q", "k", "v") else role)]
            out[key] = out[key] + part if key in out else part
        return out

    layer_names = in_layers(plan.model, plan.layers)
    folded = {fold.gain for p in setup.model.plans.values() for fold in p.folds}  # all ones on both sides
    outside = [
        n
        for n in plan.model.checkpoint.names()
        if setup.model.on_stream(n) and n not in layer_names and n not in folded
    ]

    def outside_pass(maps: dict[str, StreamMap]) -> tuple[dict[str, torch.Tensor], float]:
        """Scores of the tensors outside the matched layers, and their distance under `maps`. A
        tensor on several streams (a projector) scores each with the others' maps applied: its
        other axes must be in the anchor's basis to compare."""
        scores: dict[str, torch.Tensor] = {}
        total = 0.0
        for name in outside:
            entries = setup.model.entries(name)
            src = setup.model.read(name).float()
            ref = setup.anchor.read(counterpart(name, plan.model, plan.anchor)).float()
            for entry in entries:  # (every tensor here has a stream axis: folded gains, all ones, are left out)
                others = src
                for other in entries:
                    if other is not entry:
                        others = maps[other.stack].apply(others, other.axes)
                part = stream_scores(others, ref, entry.axes)
                scores[entry.stack] = scores[entry.stack] + part if entry.stack in scores else part
            moved = src
            for entry in entries:
                moved = maps[entry.stack].apply(moved, entry.axes)
            total += sq_distance(moved, ref)
        return scores, total

    def evaluate(maps: dict[str, StreamMap]) -> tuple[float, dict[str, torch.Tensor]]:
        """Per-layer matching given the stream maps: the total distance, and C for the next maps."""
        side = setup.model.moved(maps)

        def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, tuple[Scores, float]]:
            ref = read_layer(plan.anchor.checkpoint, plan.anchor.bound, layer, plan.device, setup.anchor.view)
            settings = layer_settings(
                plan.model.bound, layer, options.symmetries, options.max_rounds, options.allow_nonfinite
            )
            new, results = match_layer(weights, ref, settings)
            return new, (by_stream(layer, layer_stream_parts(new, ref)), sum(r.after**2 for r in results))

        pass_stream = Stream()
        group = distributed.current()
        mine = (
            plan.layers if group is None else my_layers(group, plan.model, plan.layers, FFN_PERM in options.symmetries)
        )

        def run_pass() -> list[tuple[Scores, float]]:
            return transform_layers(
                plan.model, None, mine, plan.device, transform, pass_stream, None, options.workers, view=side.layer_view
            )

        extras = (
            run_pass()
            if group is None
            else summable_in_layer_order(group, plan.layers, mine, group.agree("residual pass", run_pass))
        )
        for stage, seconds in pass_stream.timings.seconds.items():
            stream.timings.add(stage, seconds)
        outside_scores, outside_distance = stream.timed("read", lambda: outside_pass(maps))
        scores = {
            s: outside_scores.get(s, 0)
            + to_unmoved_basis(cast(torch.Tensor, sum(parts[s] for parts, _ in extras if s in parts)), maps[s])
            for s in stacks
        }
        return outside_distance + sum(after for _, after in extras), scores

    def record(number: int, total: float, maps: dict[str, StreamMap], scores: dict[str, torch.Tensor]) -> None:
        agreement = sum(stream_agreement(scores[s], maps[s]) for s in stacks)
        rounds.append(
            {
                "round": number,
                "distance": total**0.5,
                "mean_matched_score": agreement / sum(setup.model.plans[s].hidden_size for s in stacks),
            }
        )

    # round 0: the identity, so adding the residual symmetry never ends farther than leaving it out
    identity = {s: StreamMap.identity(setup.model.plans[s].hidden_size) for s in stacks}
    outside_scores, _ = stream.timed("solve", lambda: outside_pass(identity))
    rounds: list[dict[str, Any]] = []
    total, scores = evaluate(identity)
    record(0, total, identity, scores)
    best: tuple[float, dict[str, StreamMap]] = (total, identity)
    # then GLMC's start: the map from the tensors outside the layers (embeddings, heads), which does
    # not depend on the per-layer maps; alternate until the distance stops falling
    maps = {s: (setup.solve(s, outside_scores[s]) if s in outside_scores else identity[s]) for s in stacks}
    previous: float | None = None
    for number in range(1, options.residual_rounds + 1):
        total, scores = evaluate(maps)
        record(number, total, maps, scores)
        if total < best[0]:
            best = (total, maps)
        if previous is not None and total >= previous * (1 - 1e-7):
            break
        previous = total
        new_maps = {s: setup.solve(s, scores[s]) for s in stacks}
        if all(_same_map(new_maps[s], maps[s]) for s in stacks):
            break
        maps = new_maps
    return best[1], {
        "method": "weights",
        "rounds": rounds,
        "chosen_round": next(
            r["round"] for r in rounds if abs(r["distance"] - best[0] ** 0.5) <= 1e-12 * max(1.0, best[0] ** 0.5)
        ),
    }


def _same_map(a: StreamMap, b: StreamMap) -> bool:
    if a.perm is not None and b.perm is not None:
        return torch.equal(a.perm, b.perm)
    return torch.allclose(a.as_matrix(), b.as_matrix(), atol=1e-9)
