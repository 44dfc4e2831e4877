"""Matching one layer: solve every enabled symmetry against the anchor and apply it.

Pure functions on `LayerWeights`; the streaming loop (pipeline.py) feeds them layer by layer. Each
module (attn.qk, attn.vo, ffn) is solved on its own -- their tensors are disjoint -- and its
distance to the anchor is measured before and after on the tensors it touches. A solve that would
increase a module's distance (possible only through float rounding, since every group contains
the identity) is dropped, so the report is monotone by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rotfuse.symmetry.circuit import CircuitTransform, solve_circuit
from rotfuse.symmetry.permutation import permute_ffn, random_permutation, solve_permutation
from rotfuse.symmetry.rotation import random_rotation
from rotfuse.symmetry.scaling import random_scale
from rotfuse.symmetry.weights import (
    Circuit,
    LayerWeights,
    circuit_sq_distance,
    ffn_rows,
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


@dataclass
class ModuleResult:
    module: str  # attn.qk, attn.vo or ffn
    before: float  # Frobenius distance to the anchor over the tensors this module's symmetries touch
    after: float
    applied: list[str] = field(default_factory=list)
    rounds: int | None = None
    reverted: bool = False
    skipped: str | None = None  # why nothing was solved (e.g. non-finite values)

    @property
    def reduction(self) -> float:
        return 0.0 if self.before == 0 else 1.0 - self.after / self.before


def match_layer(src: LayerWeights, anchor: LayerWeights, settings: LayerSettings) -> tuple[LayerWeights, list[ModuleResult]]:
    attention = src.attention
    results = []
    for key, (pack, unpack) in CIRCUITS.items():
        rotate = f"{key}.rot" in settings.symmetries
        scale = f"{key}.scale" in settings.symmetries
        src_circuit, anchor_circuit = pack(attention), pack(anchor.attention)
        before = circuit_sq_distance(src_circuit, anchor_circuit)
        if not _finite(src_circuit.left, src_circuit.right, anchor_circuit.left, anchor_circuit.right):
            results.append(ModuleResult(f"attn.{key}", math.sqrt(before), math.sqrt(before), skipped=NONFINITE))
            continue
        solution = solve_circuit(
            src_circuit, anchor_circuit, rotate, scale,
            rotary_dim=settings.rotary_dim if key == "qk" else 0,
            tie_groups=settings.tie_qk_groups and key == "qk",
            max_rounds=settings.max_rounds,
        )
        moved = solution.transform.apply(src_circuit)
        after = circuit_sq_distance(moved, anchor_circuit)
        applied = [name for name, on in (("rot", rotate), ("scale", scale)) if on]
        result = ModuleResult(f"attn.{key}", math.sqrt(before), math.sqrt(after), applied, solution.rounds)
        if after > before:
            result.after, result.reverted = result.before, True
        elif applied:
            attention = unpack(attention, moved)
        results.append(result)

    ffn = src.ffn
    src_rows, anchor_rows = ffn_rows(ffn), ffn_rows(anchor.ffn)
    before = _sq(src_rows - anchor_rows)
    result = ModuleResult("ffn", math.sqrt(before), math.sqrt(before))
    if not _finite(src_rows, anchor_rows):
        result.skipped = NONFINITE
    elif "ffn.perm" in settings.symmetries:
        perm = solve_permutation(src_rows, anchor_rows)
        after = _sq(src_rows[perm.to(src_rows.device)] - anchor_rows)
        result.applied = ["perm"]
        if after > before:
            result.reverted = True
        else:
            ffn, result.after = permute_ffn(ffn, perm), math.sqrt(after)
    results.append(result)
    return LayerWeights(attention, ffn), results


def scramble_layer(src: LayerWeights, settings: LayerSettings, generator: torch.Generator) -> LayerWeights:
    """Apply a random member of the enabled symmetry group: the function is unchanged."""
    attention = src.attention
    groups, dh = attention.num_kv_heads, attention.head_dim
    for key, (pack, unpack) in CIRCUITS.items():
        rotary_dim = settings.rotary_dim if key == "qk" else 0
        tied = settings.tie_qk_groups and key == "qk"
        count = 1 if tied else groups
        transform = CircuitTransform(
            random_rotation(count, dh, rotary_dim, generator).expand(groups, dh, dh)
            if f"{key}.rot" in settings.symmetries else None,
            random_scale(count, generator).expand(groups) if f"{key}.scale" in settings.symmetries else None,
        )
        attention = unpack(attention, transform.apply(pack(attention)))
    ffn = src.ffn
    if "ffn.perm" in settings.symmetries:
        ffn = permute_ffn(ffn, random_permutation(ffn.width, generator))
    return LayerWeights(attention, ffn)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors)


def _sq(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


__all__ = ["Circuit", "LayerSettings", "ModuleResult", "match_layer", "scramble_layer"]
