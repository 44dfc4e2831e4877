"""Architecture specs: what rotfuse knows about a model family, loaded from YAML.

A spec names, relative to a per-layer prefix, the tensors that form each layer's attention (Q, K,
V, O, or a fused QKV) and FFN (input projections that share the neuron index, output
projection), says where the sizes come from in config.json, and lists config values under which a
symmetry stops being exact. Adding a model family that fits these patterns needs a YAML file, not
Python. The schema is documented in configs/archs/README.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rotfuse.errors import InputError

# Every symmetry rotfuse can apply, per module. CLI names map onto these (see symmetry_set).
ALL_SYMMETRIES = frozenset({"qk.rot", "qk.scale", "vo.rot", "vo.scale", "ffn.perm"})
CLI_SYMMETRIES = {
    "perm": frozenset({"ffn.perm"}),
    "rot": frozenset({"qk.rot", "vo.rot"}),
    "scale": frozenset({"qk.scale", "vo.scale"}),
}
LAYOUTS = ("out_in", "in_out")  # torch Linear [out, in]; GPT-2 style Conv1D [in, out]
FUSABLE_ROLES = ("q", "k", "v")


@dataclass(frozen=True)
class LinearRef:
    """A linear layer's tensors, names relative to the layer prefix. A bias is used when present."""

    weight: str
    bias: str | None = None
    layout: str = "out_in"


@dataclass(frozen=True)
class FusedRef:
    """One tensor holding several projections stacked along its output axis (e.g. GPT-2 c_attn)."""

    weight: str
    order: tuple[str, ...]
    bias: str | None = None
    layout: str = "out_in"


@dataclass(frozen=True)
class AttentionSpec:
    o: LinearRef
    q: LinearRef | None = None
    k: LinearRef | None = None
    v: LinearRef | None = None
    qkv: FusedRef | None = None


@dataclass(frozen=True)
class FfnSpec:
    inputs: tuple[LinearRef, ...]  # all share the neuron index (plain: [in]; gated: [gate, up])
    output: LinearRef


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embeddings on Q and K: restricts the QK rotation to maps that commute with them."""

    style: str = "rotate_half"
    partial_factor_key: str | None = "partial_rotary_factor"


@dataclass(frozen=True)
class DimKeys:
    """config.json keys (first present wins) for each size; head_dim defaults to hidden/heads."""

    num_layers: tuple[str, ...]
    num_heads: tuple[str, ...]
    hidden_size: tuple[str, ...]
    num_kv_heads: tuple[str, ...] = ()
    head_dim: tuple[str, ...] = ()


@dataclass(frozen=True)
class StackSpec:
    """A stack of identical transformer layers (most models have one; CLIP has two towers)."""

    name: str
    layer: str  # layer prefix pattern with {i}
    dims: DimKeys
    attention: AttentionSpec
    ffn: FfnSpec
    config_section: str | None = None  # e.g. "vision_config" for a nested config
    rope: RopeSpec | None = None


@dataclass(frozen=True)
class Restriction:
    """Symmetries to turn off when config.json has one of the listed values."""

    when: dict[str, tuple[Any, ...]]
    disable: frozenset[str]
    reason: str


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    prefixes: tuple[str, ...]
    stacks: tuple[StackSpec, ...]
    restrictions: tuple[Restriction, ...] = ()
    description: str = ""
    source: str = ""


@dataclass(frozen=True)
class Dims:
    """The sizes of one stack, read from a checkpoint's config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rotary_dim: int = 0  # leading head dims under RoPE (0: none)


@dataclass(frozen=True)
class LayerId:
    stack: str
    index: int

    def __str__(self) -> str:
        return f"{self.stack}.{self.index}" if self.stack else str(self.index)


@dataclass
class BoundArch:
    """A spec bound to one checkpoint: its key prefix, sizes and active restrictions."""

    spec: ArchSpec
    prefix: str
    dims: dict[str, Dims]
    disabled: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)

    def layers(self) -> list[LayerId]:
        return [LayerId(s.name, i) for s in self.spec.stacks for i in range(self.dims[s.name].num_layers)]

    def stack(self, name: str) -> StackSpec:
        return next(s for s in self.spec.stacks if s.name == name)

    def full_name(self, layer: LayerId, relative: str) -> str:
        return self.prefix + self.stack(layer.stack).layer.format(i=layer.index) + relative


# ---------------------------------------------------------------------- loading


def builtin_spec_dir() -> Path:
    return Path(str(resources.files("rotfuse.configs") / "archs"))


def builtin_specs() -> dict[str, ArchSpec]:
    """Every spec shipped with rotfuse, by name."""
    specs = {}
    for path in sorted(builtin_spec_dir().glob("*.yaml")):
        spec = load_spec_file(path)
        specs[spec.name] = spec
    return specs


def load_spec_file(path: Path) -> ArchSpec:
    raw = _read_yaml(path)
    base = raw.pop("extends", None)
    if base is not None:
        parent = Path(path).parent / f"{base}.yaml"
        if not parent.exists():
            parent = builtin_spec_dir() / f"{base}.yaml"
        if not parent.exists():
            raise InputError(f"{path}: extends unknown spec {base!r}")
        merged = _read_yaml(parent)
        merged.pop("extends", None)
        merged.update(raw)
        raw = merged
    try:
        return _parse_spec(raw, str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: invalid architecture spec ({exc})") from exc


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read architecture spec ({exc})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{path}: architecture spec must be a YAML mapping")
    return copy.deepcopy(raw)


def _parse_spec(raw: dict[str, Any], source: str) -> ArchSpec:
    if "stacks" in raw:
        stacks = tuple(_parse_stack(s, s.get("name", "")) for s in raw["stacks"])
    else:
        stacks = (_parse_stack(raw, ""),)
    if len({s.name for s in stacks}) != len(stacks):
        raise ValueError("stack names must be distinct")
    restrictions = tuple(_parse_restriction(r) for r in raw.get("restrictions") or ())
    return ArchSpec(
        name=str(raw["name"]),
        model_types=tuple(raw.get("model_types") or (raw["name"],)),
        prefixes=tuple(raw.get("prefixes") or ("",)),
        stacks=stacks,
        restrictions=restrictions,
        description=str(raw.get("description", "")),
        source=source,
    )


def _keys(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _parse_stack(raw: dict[str, Any], name: str) -> StackSpec:
    layout = raw.get("layout", "out_in")
    dims = raw["dims"]
    attention = raw["attention"]
    ffn = raw["ffn"]
    rope = raw.get("rope")
    return StackSpec(
        name=name,
        layer=str(raw["layer"]),
        dims=DimKeys(
            num_layers=_keys(dims["num_layers"]),
            num_heads=_keys(dims["num_heads"]),
            hidden_size=_keys(dims["hidden_size"]),
            num_kv_heads=_keys(dims.get("num_kv_heads")),
            head_dim=_keys(dims.get("head_dim")),
        ),
        attention=AttentionSpec(
            o=_linear(attention["o"], layout),
            q=_linear(attention["q"], layout) if "q" in attention else None,
            k=_linear(attention["k"], layout) if "k" in attention else None,
            v=_linear(attention["v"], layout) if "v" in attention else None,
            qkv=_fused(attention["qkv"], layout) if "qkv" in attention else None,
        ),
        ffn=FfnSpec(
            inputs=tuple(_linear(r, layout) for r in ffn["inputs"]),
            output=_linear(ffn["output"], layout),
        ),
        config_section=raw.get("config_section"),
        rope=RopeSpec(**rope) if isinstance(rope, dict) else (RopeSpec() if rope else None),
    )


def _linear(raw: dict[str, Any], layout: str) -> LinearRef:
    ref = LinearRef(weight=str(raw["weight"]), bias=raw.get("bias"), layout=raw.get("layout", layout))
    if ref.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {ref.layout!r}")
    return ref


def _fused(raw: dict[str, Any], layout: str) -> FusedRef:
    order = tuple(raw["order"])
    if sorted(order) != sorted(FUSABLE_ROLES):
        raise ValueError(f"qkv order must list q, k and v once each, got {list(order)}")
    ref = FusedRef(weight=str(raw["weight"]), order=order, bias=raw.get("bias"), layout=raw.get("layout", layout))
    if ref.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {ref.layout!r}")
    return ref


def _parse_restriction(raw: dict[str, Any]) -> Restriction:
    disable = frozenset(raw["disable"])
    unknown = disable - ALL_SYMMETRIES
    if unknown:
        raise ValueError(f"restriction disables unknown symmetries {sorted(unknown)}")
    when = {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in raw["when"].items()}
    return Restriction(when=when, disable=disable, reason=" ".join(str(raw.get("reason", "")).split()))


# ---------------------------------------------------------------------- choosing and binding


def select_spec(config: dict[str, Any], arch: str | None = None, spec_file: Path | None = None,
                where: str = "config.json") -> ArchSpec:
    """The spec for a checkpoint: a user's file, a named built-in, or detected from model_type."""
    if spec_file is not None:
        return load_spec_file(spec_file)
    specs = builtin_specs()
    if arch is not None:
        if arch not in specs:
            raise InputError(f"unknown --arch {arch!r} (known: {', '.join(sorted(specs))})")
        return specs[arch]
    model_type = config.get("model_type")
    for spec in specs.values():
        if model_type in spec.model_types:
            return spec
    raise InputError(
        f"{where}: model_type {model_type!r} is not supported (known: {', '.join(sorted(specs))}); "
        "add a spec with --arch-spec FILE (see configs/archs/README.md) or pick one with --arch"
    )


def bind(spec: ArchSpec, config: dict[str, Any], names: set[str] | Any, where: str) -> BoundArch:
    """Resolve a spec against one checkpoint's config and tensor names."""
    prefix = _detect_prefix(spec, config, names, where)
    dims = {stack.name: _read_dims(stack, config, where) for stack in spec.stacks}
    disabled: set[str] = set()
    notes: list[str] = []
    for restriction in spec.restrictions:
        for key, values in restriction.when.items():
            value = _config_value(config, key)
            if value in values:
                disabled |= restriction.disable
                reason = restriction.reason.replace("{value}", str(value))
                notes.append(f"{', '.join(sorted(restriction.disable))} off: {reason}")
    return BoundArch(spec, prefix, dims, frozenset(disabled), notes)


def _detect_prefix(spec: ArchSpec, config: dict[str, Any], names: Any, where: str) -> str:
    stack = spec.stacks[0]
    attention = stack.attention
    probe = (attention.qkv or attention.q).weight  # type: ignore[union-attr]
    relative = stack.layer.format(i=0) + probe
    for prefix in spec.prefixes:
        if prefix + relative in names:
            return prefix
    tried = ", ".join(repr(p + relative) for p in spec.prefixes)
    raise InputError(f"{where}: does not look like a {spec.name} checkpoint (none of {tried} found)")


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _read_dims(stack: StackSpec, config: dict[str, Any], where: str) -> Dims:
    section = config
    if stack.config_section:
        section = _config_value(config, stack.config_section)
        if not isinstance(section, dict):
            raise InputError(f"{where}: config has no {stack.config_section!r} section")

    def get(keys: tuple[str, ...], what: str, required: bool = True) -> int | None:
        for key in keys:
            value = _config_value(section, key)
            if value is not None:
                if not isinstance(value, int) or value <= 0:
                    raise InputError(f"{where}: {key} = {value!r} is not a positive integer")
                return value
        if required:
            raise InputError(f"{where}: none of {list(keys)} found in config (needed for {what})")
        return None

    num_layers = get(stack.dims.num_layers, "the number of layers")
    num_heads = get(stack.dims.num_heads, "the number of heads")
    hidden = get(stack.dims.hidden_size, "the hidden size")
    num_kv = get(stack.dims.num_kv_heads, "", required=False) or num_heads
    head_dim = get(stack.dims.head_dim, "", required=False)
    assert num_layers and num_heads and hidden and num_kv
    if head_dim is None:
        if hidden % num_heads:
            raise InputError(f"{where}: hidden size {hidden} is not divisible by {num_heads} heads")
        head_dim = hidden // num_heads
    if num_heads % num_kv:
        raise InputError(f"{where}: {num_heads} query heads are not divisible into {num_kv} key/value heads")
    rotary_dim = 0
    if stack.rope is not None:
        factor = _config_value(section, stack.rope.partial_factor_key) if stack.rope.partial_factor_key else None
        rotary_dim = int(head_dim * float(factor)) if factor is not None else head_dim
        if rotary_dim % 2:
            raise InputError(f"{where}: rotary dimension {rotary_dim} is odd")
    return Dims(num_layers, num_heads, num_kv, head_dim, hidden, rotary_dim)


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
            from rotfuse.errors import UsageError

            known = sorted(CLI_SYMMETRIES) + sorted(ALL_SYMMETRIES)
            raise UsageError(f"unknown symmetry {item!r} in --symmetries (known: {', '.join(known)}, all, none)")
    return frozenset(chosen)
