"""Matching one layer: solve every enabled symmetry against the anchor and apply it.

Pure functions on `LayerWeights`; the layer pool (pool.py) feeds them layer by layer. Each
module (attn.qk, attn.vo, ffn) is solved on its own -- their tensors are disjoint -- and its
distance to the anchor is measured before and after on the tensors it touches. A solve that would
increase a module's distance (possible only through float rounding, since every group contains
the identity) is dropped, so the report is monotone by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rotfuse.core.tensors import all_finite, sq_distance
from rotfuse.symmetry.circuit import CircuitTransform, solve_circuit
from rotfuse.symmetry.experts import (
    expert_pair_scores,
    neuron_permutation,
    permute_expert_neurons,
    permute_experts,
    random_experts,
)
from rotfuse.symmetry.heads import PairProducts, ScoredCircuit, group_permutation, pair_products, permute_groups
from rotfuse.symmetry.linear import random_linear, solve_linear
from rotfuse.symmetry.names import EXPERTS
from rotfuse.symmetry.permutation import (
    best_assignment,
    neuron_pairs,
    permute_ffn,
    random_permutation,
    solve_permutation,
)
from rotfuse.symmetry.rotation import random_rotation
from rotfuse.symmetry.scaling import random_scale
from rotfuse.symmetry.weights import (
    Attention,
    Circuit,
    Experts,
    Ffn,
    LayerWeights,
    circuit_sq_distance,
    qk_circuit,
    vo_circuit,
    with_qk,
    with_vo,
)

NONFINITE = "non-finite values (NaN or Inf): left as it is"
CIRCUITS = {"qk": (qk_circuit, with_qk), "vo": (vo_circuit, with_vo)}


@dataclass(frozen=True)
class LayerSettings:
    symmetries: frozenset[str]
    rotary_dim: int = 0  # QK rotations restricted to maps that commute with RoPE on these dims
    tie_qk_groups: bool = False  # one QK transform shared by every head
    max_rounds: int = 20
    may_be_nonfinite: bool = True  # False when the loader already refused NaN/Inf: skip the checks


@dataclass
class ModuleResult:
    module: str  # attn.qk, attn.vo, ffn or moe.experts
    before: float  # Frobenius distance to the anchor over the tensors this module's symmetries touch
    after: float
    applied: list[str] = field(default_factory=list)
    rounds: int | None = None
    reverted: bool = False
    skipped: str | None = None  # why nothing was solved (e.g. non-finite values)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the head permutation applied

    @property
    def reduction(self) -> float:
        return 0.0 if self.before == 0 else 1.0 - self.after / self.before


def match_layer(
    src: LayerWeights, anchor: LayerWeights, settings: LayerSettings
) -> tuple[LayerWeights, list[ModuleResult]]:
    attention, results = _match_attention(src.attention, anchor.attention, settings)
    ffn = None
    if src.ffn is not None and anchor.ffn is not None:  # None: attention only, or experts without a shared one
        ffn, ffn_result = _match_ffn(src.ffn, anchor.ffn, settings)
        results.append(ffn_result)
    experts = None
    if src.experts is not None and anchor.experts is not None:
        experts, experts_result = _match_experts(src.experts, anchor.experts, settings)
        results.append(experts_result)
    return LayerWeights(attention, ffn, experts), results


def _match_attention(
    src: Attention, anchor: Attention, settings: LayerSettings
) -> tuple[Attention, list[ModuleResult]]:
    """Head permutation (when on), then per-group rotation and scale of the QK and VO circuits.

    The permutation is kept only if neither circuit ends up farther from the anchor than it
    started; otherwise the circuits are solved without it (each of those solves is monotone).
    """
    circuits = {key: (pack(src), pack(anchor)) for key, (pack, _) in CIRCUITS.items()}
    before = {key: circuit_sq_distance(s, a) for key, (s, a) in circuits.items()}
    if settings.may_be_nonfinite and not _finite(*(t for pair in circuits.values() for c in pair for t in c.tensors())):
        return src, [
            ModuleResult(f"attn.{key}", math.sqrt(d), math.sqrt(d), skipped=NONFINITE) for key, d in before.items()
        ]

    def rotary(key: str) -> int:
        return settings.rotary_dim if key == "qk" else 0

    perm = None
    exact: PairProducts = {}  # the group pairs' products the permutation's proof computed
    if "heads.perm" in settings.symmetries and src.num_kv_heads > 1:
        perm = group_permutation(
            [ScoredCircuit(s, a, f"{key}.rot" in settings.symmetries, rotary(key)) for key, (s, a) in circuits.items()],
            exact,
        )
        if torch.equal(perm, torch.arange(len(perm))):
            perm = None

    for candidate in [perm, None] if perm is not None else [None]:
        moved: dict[str, Circuit] = {}
        results: list[ModuleResult] = []
        for index, (key, (s, a)) in enumerate(circuits.items()):
            rotate, scale = f"{key}.rot" in settings.symmetries, f"{key}.scale" in settings.symmetries
            linear = f"{key}.linear" in settings.symmetries
            start = s if candidate is None else permute_groups(s, candidate)
            tie = settings.tie_qk_groups and key == "qk"
            products = pair_products(exact, candidate, index, src.num_kv_heads)
            solution = solve_circuit(
                start,
                a,
                rotate,
                scale,
                rotary_dim=rotary(key),
                tie_groups=tie,
                max_rounds=settings.max_rounds,
                products=products,
            )
            transform = solution.transform
            condition = None
            if linear:  # refines the rotation + scale solution over the whole invertible group
                first = transform.maps()[0] if transform.rotation is not None else None
                found = solve_linear(start, a, rotary(key), start=first, tie_groups=tie)
                transform = CircuitTransform(linear=found.linear, rotary_dim=rotary(key))
                condition = found.condition
            moved[key] = transform.apply(start)
            after = circuit_sq_distance(moved[key], a)
            applied = (["heads"] if candidate is not None else []) + [
                n for n, on in (("rot", rotate), ("scale", scale), ("linear", linear)) if on
            ]
            result = ModuleResult(f"attn.{key}", math.sqrt(before[key]), math.sqrt(after), applied, solution.rounds)
            if candidate is not None:
                result.extra["head_permutation"] = candidate.tolist()
            if condition is not None:
                result.extra["linear_condition"] = condition
            if after > before[key]:
                result.after, result.reverted, moved[key] = result.before, True, s
            results.append(result)
        if candidate is None or not any(r.reverted for r in results):
            break

    attention = src
    for (key, (_, unpack)), result in zip(CIRCUITS.items(), results):
        if result.applied and not result.reverted:
            attention = unpack(attention, moved[key])
    return attention, results


def _ffn_pairs(src: Ffn, anchor: Ffn) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tensors FFN permutation moves, paired with the anchor's."""
    pairs = [(s.weight, a.weight) for s, a in zip(src.inputs, anchor.inputs)]
    pairs += [(s.bias, a.bias) for s, a in zip(src.inputs, anchor.inputs) if s.bias is not None and a.bias is not None]
    return pairs + [(src.output.weight, anchor.output.weight)]


def _match_ffn(src: Ffn, anchor: Ffn, settings: LayerSettings) -> tuple[Ffn, ModuleResult]:
    """FFN tensors may come in their stored dtype (bf16): measuring and permuting are exact in
    any dtype, and the scores are accumulated in float32 or wider. With the permutation on, the
    distance before is measured on the neuron rows as they are built (`neuron_pairs`), in the pass
    that also gives the solve their norms."""
    pairs = _ffn_pairs(src, anchor)
    rows = neuron_pairs(src, anchor) if "ffn.perm" in settings.symmetries else None
    paired = None if rows is None else rows[2]  # the distance from the pass over the rows
    before = paired.sq_distance if paired is not None else sum(sq_distance(s, a) for s, a in pairs)
    result = ModuleResult("ffn", math.sqrt(before), math.sqrt(before))
    # a finite distance has finite terms only: the element-wise check where it is not
    if settings.may_be_nonfinite and not (math.isfinite(before) or _finite(*(t for pair in pairs for t in pair))):
        result.skipped = NONFINITE
        return src, result
    if rows is None:
        return src, result
    src_rows, anchor_rows, paired = rows
    perm = solve_permutation(src_rows, anchor_rows, paired)
    result.applied = ["perm"]
    if torch.equal(perm, torch.arange(len(perm), device=perm.device)):  # a fine-tune's neurons stay put
        return src, result  # the very tensors read: written back as their bytes, not rebuilt
    moved = permute_ffn(src, perm, src_rows)
    after = sum(sq_distance(s, a) for s, a in _ffn_pairs(moved, anchor))
    if after > before:
        result.reverted = True
        return src, result
    result.after = math.sqrt(after)
    return moved, result


def _experts_pairs(src: Experts, anchor: Experts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tensors the MoE symmetries move (router and every expert's FFN), paired with the anchor's."""
    pairs = [(src.router.weight, anchor.router.weight)]
    if src.router.bias is not None and anchor.router.bias is not None:
        pairs.append((src.router.bias, anchor.router.bias))
    return pairs + [pair for s, a in zip(src.ffns, anchor.ffns, strict=True) for pair in _ffn_pairs(s, a)]


def _match_experts(src: Experts, anchor: Experts, settings: LayerSettings) -> tuple[Experts, ModuleResult]:
    """Whole experts with their router rows (`experts.perm`), then each expert's neurons
    (`ffn.perm`) against the anchor expert it was paired with: one assignment over the E x E pair
    scores, each the best neuron-permutation score of the pair (rotfuse.symmetry.experts)."""
    pairs = _experts_pairs(src, anchor)
    before = sum(sq_distance(s, a) for s, a in pairs)
    result = ModuleResult("moe.experts", math.sqrt(before), math.sqrt(before))
    if settings.may_be_nonfinite and not _finite(*(t for pair in pairs for t in pair)):
        result.skipped = NONFINITE
        return src, result
    whole, neurons = EXPERTS in settings.symmetries, "ffn.perm" in settings.symmetries
    if not whole and not neurons:
        return src, result
    count = len(src.ffns)
    if whole:
        scores, perms = expert_pair_scores(src, anchor, neurons)
        perm = best_assignment(scores)
        neuron_perms = [perms[int(perm[j])][j] for j in range(count)]
    else:
        perm = torch.arange(count)
        neuron_perms = [neuron_permutation(s, a)[0] for s, a in zip(src.ffns, anchor.ffns, strict=True)]
    moved = permute_expert_neurons(permute_experts(src, perm), neuron_perms)
    after = sum(sq_distance(s, a) for s, a in _experts_pairs(moved, anchor))
    result.applied = (["experts"] if whole else []) + (["perm"] if neurons else [])
    if whole:
        result.extra["expert_permutation"] = perm.tolist()
    if after > before:
        result.reverted = True
        return src, result
    result.after = math.sqrt(after)
    return moved, result


def scramble_layer(src: LayerWeights, settings: LayerSettings, generator: torch.Generator) -> LayerWeights:
    """Apply a random member of the enabled symmetry group: the function is unchanged."""
    attention = src.attention
    groups, dh = attention.num_kv_heads, attention.head_dim
    head_perm = random_permutation(groups, generator) if "heads.perm" in settings.symmetries else None
    for key, (pack, unpack) in CIRCUITS.items():
        rotary_dim = settings.rotary_dim if key == "qk" else 0
        tied = settings.tie_qk_groups and key == "qk"
        count = 1 if tied else groups
        transform = CircuitTransform(
            random_rotation(count, dh, rotary_dim, generator).expand(groups, dh, dh)
            if f"{key}.rot" in settings.symmetries
            else None,
            random_scale(count, generator).expand(groups) if f"{key}.scale" in settings.symmetries else None,
            random_linear(count, dh, rotary_dim, generator).expand(groups, dh, dh)
            if f"{key}.linear" in settings.symmetries
            else None,
            rotary_dim=rotary_dim,
        )
        circuit = pack(attention) if head_perm is None else permute_groups(pack(attention), head_perm)
        attention = unpack(attention, transform.apply(circuit))
    ffn = src.ffn
    if ffn is not None and "ffn.perm" in settings.symmetries:
        ffn = permute_ffn(ffn, random_permutation(ffn.width, generator))
    experts = src.experts
    if experts is not None:
        experts = random_experts(experts, generator, EXPERTS in settings.symmetries, "ffn.perm" in settings.symmetries)
    return LayerWeights(attention, ffn, experts)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(all_finite(t) for t in tensors)


__all__ = ["Circuit", "LayerSettings", "ModuleResult", "match_layer", "scramble_layer"]
