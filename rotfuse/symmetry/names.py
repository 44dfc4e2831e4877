"""The names of the symmetries, as the CLI, the specs and the report spell them.

Module-qualified names say what moves: `ffn.perm` (FFN neurons), `heads.perm` (whole heads, or
KV groups with their query heads), `qk.rot` / `vo.rot` (per-head rotations), `qk.scale` /
`vo.scale` (per-head rescaling), `qk.linear` / `vo.linear` (a general invertible map per head,
GLMC's fourth class: QK `Q_h <- B Q_h, K_h <- B^-T K_h`, VO `V_h <- B V_h, O_h <- O_h B^-1`; under
RoPE the QK one is a scaled rotation per frequency pair; opt-in), `experts.perm` (whole experts
of a mixture-of-experts layer, with their router rows; each expert's own neurons move under
`ffn.perm`), `residual.map` (the residual stream, opt-in). The CLI also takes the short family
names below.
"""

from __future__ import annotations

from rotfuse.core.errors import UsageError

FFN_PERM = "ffn.perm"  # FFN neuron permutation: the dearest per-layer solve
EXPERTS = "experts.perm"  # whole experts with their router rows (mixture-of-experts layers)
RESIDUAL = "residual.map"  # one map of the whole residual stream (permutation, or orthogonal where exact)
QK_LINEAR = "qk.linear"  # invertible per-head QK map (RoPE: scaled rotation per frequency pair)
VO_LINEAR = "vo.linear"  # invertible per-head VO map
ALL_SYMMETRIES = frozenset(
    {"qk.rot", "qk.scale", "vo.rot", "vo.scale", "ffn.perm", "heads.perm", EXPERTS, RESIDUAL, QK_LINEAR, VO_LINEAR}
)
DEFAULT_SYMMETRIES = "perm,heads,experts,rot,scale"  # per-layer maps; the residual map is opt-in
CLI_SYMMETRIES = {
    "default": frozenset({"ffn.perm", "heads.perm", EXPERTS, "qk.rot", "qk.scale", "vo.rot", "vo.scale"}),
    "residual": frozenset({RESIDUAL}),
    "perm": frozenset({"ffn.perm"}),
    "heads": frozenset({"heads.perm"}),
    "experts": frozenset({EXPERTS}),
    "rot": frozenset({"qk.rot", "vo.rot"}),
    "scale": frozenset({"qk.scale", "vo.scale"}),
    "linear": frozenset({QK_LINEAR, VO_LINEAR}),  # opt-in: -s default,linear
}


def symmetry_set(text: str) -> frozenset[str]:
    """Parse --symmetries: CLI names (perm, rot, scale) or module-qualified ones (qk.rot, ...)."""
    chosen: set[str] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            chosen |= ALL_SYMMETRIES
        elif item == "none":
            continue
        elif item in CLI_SYMMETRIES:
            chosen |= CLI_SYMMETRIES[item]
        elif item in ALL_SYMMETRIES:
            chosen.add(item)
        else:
            known = sorted(CLI_SYMMETRIES) + sorted(ALL_SYMMETRIES)
            raise UsageError(f"unknown symmetry {item!r} in --symmetries (known: {', '.join(known)}, all, none)")
    return frozenset(chosen)
