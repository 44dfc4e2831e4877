"""Architecture specs: what rotfuse knows about a model family, loaded from YAML.

A spec names, relative to a per-layer prefix, the tensors that form each layer's attention (Q, K,
V, O, or a fused QKV) and FFN (input projections that share the neuron index, output
projection), says where the sizes come from in config.json, and lists config values under which a
symmetry stops being exact. Adding a model family that fits these patterns needs a YAML file, not
Python. The schema is documented in configs/archs/README.md.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rotfuse.errors import InputError
from rotfuse.symmetries import ALL_SYMMETRIES

if TYPE_CHECKING:
    from rotfuse.io.checkpoint import Checkpoint

# Symmetry names live in rotfuse.symmetries.
LAYOUTS = ("out_in", "in_out")  # torch Linear [out, in]; GPT-2 style Conv1D [in, out]
FUSABLE_ROLES = ("q", "k", "v")
ROPE_STYLES = ("rotate_half",)  # Hugging Face's layout: coordinate i pairs with i + rotary_dim/2
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: much faster


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
    """Q, K, V (separate or fused) and O; plus extra projections whose outputs are dotted with
    keys (`q_like`) or queries (`k_like`) -- e.g. DeBERTa's pos_query_proj / pos_key_proj -- which
    take the QK transform of Q or K. An extra is used where its weight is in the checkpoint."""

    o: LinearRef
    q: LinearRef | None = None
    k: LinearRef | None = None
    v: LinearRef | None = None
    qkv: FusedRef | None = None
    q_like: tuple[LinearRef, ...] = ()
    k_like: tuple[LinearRef, ...] = ()


@dataclass(frozen=True)
class FfnSpec:
    inputs: tuple[LinearRef, ...]  # all share the neuron index (plain: [in]; gated: [gate, up])
    output: LinearRef


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embeddings on Q and K: restricts the QK rotation to maps that commute with them.

    Only models whose code rotates a leading slice of each head read `partial_factor_key`
    (first present wins, else `partial_factor_default`); others rotate the whole head."""

    style: str = "rotate_half"
    partial_factor_key: tuple[str, ...] = ()
    partial_factor_default: float = 1.0


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
    passive: tuple[str, ...] = ()  # globs: layer tensors no symmetry touches (norms, output biases)
    optional: bool = False  # a checkpoint may lack this stack (e.g. CLIP's text tower)
    residual: dict[str, Any] | None = None  # the `residual:` section, as written (see rotfuse.archs.residual)

    def probe(self) -> str:
        """The tensor whose presence in layer 0 identifies the stack (and the key prefix)."""
        return (self.attention.qkv or self.attention.q).weight  # type: ignore[union-attr]

    def touched(self) -> list[str]:
        """Relative names of every tensor the symmetries may read or write (biases included)."""
        att, ffn = self.attention, self.ffn
        refs = [*ffn.inputs, *att.q_like, *att.k_like]
        refs += [att.qkv] if att.qkv else [att.q, att.k, att.v]  # type: ignore[list-item]
        with_bias = [name for ref in refs for name in (ref.weight, ref.bias) if name]
        return [att.o.weight, ffn.output.weight, *with_bias]  # O's and the FFN output's biases never move


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
    # model classes (globs on config.json `architectures`) whose main output IS the residual stream
    # (no head): a residual map moves their outputs, so it needs the user's consent
    stream_output_classes: tuple[str, ...] = ("*Model",)


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
    """A spec bound to one checkpoint: its key prefix, sizes, stacks present and active restrictions."""

    spec: ArchSpec
    prefix: str
    dims: dict[str, Dims]
    disabled: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)
    absent: frozenset[str] = frozenset()  # optional stacks this checkpoint does not have
    extras: frozenset[str] = frozenset()  # "stack/relative weight" of the q_like/k_like found in layer 0

    def layers(self) -> list[LayerId]:
        return [LayerId(s.name, i) for s in self.spec.stacks if s.name not in self.absent
                for i in range(self.dims[s.name].num_layers)]

    def stack(self, name: str) -> StackSpec:
        return next(s for s in self.spec.stacks if s.name == name)

    def full_name(self, layer: LayerId, relative: str) -> str:
        return self.prefix + self.stack(layer.stack).layer.format(i=layer.index) + relative

    def present(self, stack: str, refs: tuple[LinearRef, ...]) -> tuple[LinearRef, ...]:
        """The extra projections among `refs` that this checkpoint has (decided on layer 0)."""
        return tuple(ref for ref in refs if f"{stack}/{ref.weight}" in self.extras)


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
    raw = _resolve_extends(Path(path), [])
    try:
        return _parse_spec(raw, str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: invalid architecture spec ({exc})") from exc


def _resolve_extends(path: Path, seen: list[Path]) -> dict[str, Any]:
    """The spec's mapping with its `extends` chain merged in (top-level keys of the child win)."""
    if path.resolve() in seen:
        raise InputError(f"{path}: circular extends ({' -> '.join(p.stem for p in seen)})")
    raw = _read_yaml(path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    parent = path.parent / f"{base}.yaml"
    if not parent.exists():
        parent = builtin_spec_dir() / f"{base}.yaml"
    if not parent.exists():
        raise InputError(f"{path}: extends unknown spec {base!r}")
    merged = _resolve_extends(parent, [*seen, path.resolve()])
    merged.update(raw)
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    """A fresh copy of the spec file's mapping (parsed once per file version: parsing all
    built-in specs on every checkpoint open would dominate a small match)."""
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read architecture spec ({exc})") from exc
    return copy.deepcopy(_parse_yaml(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=256)
def _parse_yaml(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read architecture spec ({exc})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{path}: architecture spec must be a YAML mapping")
    return raw


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
        stream_output_classes=_keys(raw.get("stream_output_classes", ["*Model"])),
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
    stack = StackSpec(
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
            q_like=tuple(_linear(r, layout) for r in attention.get("q_like") or ()),
            k_like=tuple(_linear(r, layout) for r in attention.get("k_like") or ()),
        ),
        ffn=FfnSpec(
            inputs=tuple(_linear(r, layout) for r in ffn["inputs"]),
            output=_linear(ffn["output"], layout),
        ),
        config_section=raw.get("config_section"),
        rope=_parse_rope(raw.get("rope")),
        passive=_keys(raw.get("passive")),
        optional=bool(raw.get("optional", False)),
        residual=raw.get("residual"),
    )
    _check_stack(stack)
    return stack


def _check_stack(stack: StackSpec) -> None:
    """Shape errors of a spec that would otherwise surface as confusing failures at match time."""
    att = stack.attention
    separate = [ref for ref in (att.q, att.k, att.v) if ref is not None]
    if (att.qkv is None) == (len(separate) < 3) or (att.qkv is not None and separate):
        raise ValueError("attention needs either q, k and v, or a fused qkv (not both)")
    for what, ref in (("attention o", att.o), ("ffn output", stack.ffn.output)):
        if ref.bias:
            raise ValueError(f"{what} has a bias, which no symmetry touches: list it under passive instead")
    if "{i}" not in stack.layer:
        raise ValueError(f"layer pattern {stack.layer!r} must contain {{i}}")


def _parse_rope(raw: Any) -> RopeSpec | None:
    if not raw:
        return None
    if raw is True:
        return RopeSpec()
    rope = RopeSpec(
        style=str(raw.get("style", "rotate_half")),
        partial_factor_key=_keys(raw.get("partial_factor_key")),
        partial_factor_default=float(raw.get("partial_factor_default", 1.0)),
    )
    if rope.style not in ROPE_STYLES:
        raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {rope.style!r}")
    if not 0.0 < rope.partial_factor_default <= 1.0:
        raise ValueError("rope partial_factor_default must be in (0, 1]")
    return rope


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
    what = f"model_type {model_type!r} is not supported" if model_type else "no model_type in the config"
    known = sorted(t for spec in specs.values() for t in spec.model_types)
    raise InputError(
        f"{where}: {what} (known: {', '.join(known)}); describe the architecture in a YAML spec "
        "(schema: configs/archs/README.md; examples: `rotfuse archs --spec-dir`) and pass it with "
        "--arch-spec FILE, or force a built-in spec with --arch"
    )


def bind(spec: ArchSpec, config: dict[str, Any], names: Iterable[str] | Checkpoint, where: str) -> BoundArch:
    """Resolve a spec against one checkpoint's config and tensor names (an iterable of names, or
    a Checkpoint): key prefix, stacks present, sizes, coverage of every layer tensor, restrictions."""
    all_names = set(names.names() if hasattr(names, "names") else names)  # type: ignore[attr-defined]
    prefix, absent = _detect_prefix(spec, all_names, where)
    dims = {stack.name: _read_dims(stack, config, where) for stack in spec.stacks}
    for stack in spec.stacks:
        if stack.name not in absent:
            last = prefix + stack.layer.format(i=dims[stack.name].num_layers - 1) + stack.probe()
            if last not in all_names:  # (also keeps a corrupt layer count from being enumerated)
                raise InputError(f"{where}: the config gives {dims[stack.name].num_layers} layers, but tensor "
                                 f"{last!r} of the last one is not in the checkpoint")
            _check_coverage(spec, stack, prefix, dims[stack.name], all_names, where)
    disabled, notes = _restrictions(spec, config)
    notes += [f"{spec.name}: no {name!r} stack in this checkpoint (left as is)" for name in sorted(absent)]
    return BoundArch(spec, prefix, dims, frozenset(disabled), notes, frozenset(absent),
                     _present_extras(spec, prefix, all_names))


def _present_extras(spec: ArchSpec, prefix: str, names: set[str]) -> frozenset[str]:
    """"stack/weight" of every q_like/k_like projection that layer 0 has (they depend on config)."""
    return frozenset(
        f"{stack.name}/{ref.weight}"
        for stack in spec.stacks for ref in (*stack.attention.q_like, *stack.attention.k_like)
        if prefix + stack.layer.format(i=0) + ref.weight in names
    )


def _restrictions(spec: ArchSpec, config: dict[str, Any]) -> tuple[set[str], list[str]]:
    """Symmetries switched off by config values, and one note per restriction that fired."""
    disabled: set[str] = set()
    notes: list[str] = []
    for restriction in spec.restrictions:
        for key, values in restriction.when.items():
            value = _config_value(config, key)
            if value in values:
                disabled |= restriction.disable
                reason = restriction.reason.replace("{value}", str(value))
                notes.append(f"{', '.join(sorted(restriction.disable))} off: {reason}")
                break
    return disabled, notes


def _detect_prefix(spec: ArchSpec, names: set[str], where: str) -> tuple[str, set[str]]:
    """The first prefix under which a stack's layer 0 exists; and the optional stacks missing there."""
    for prefix in spec.prefixes:
        found = {s.name for s in spec.stacks if prefix + s.layer.format(i=0) + s.probe() in names}
        if not found:
            continue
        for stack in spec.stacks:
            if stack.name not in found and not stack.optional:
                missing = prefix + stack.layer.format(i=0) + stack.probe()
                raise InputError(f"{where}: tensor {missing!r} not found (the {spec.name} spec needs it)")
        return prefix, {s.name for s in spec.stacks} - found
    tried = ", ".join(repr(p + s.layer.format(i=0) + s.probe()) for p in spec.prefixes for s in spec.stacks)
    raise InputError(f"{where}: does not look like a {spec.name} checkpoint (none of {tried} found)")


def _check_coverage(spec: ArchSpec, stack: StackSpec, prefix: str, dims: Dims, names: set[str], where: str) -> None:
    """Refuse layer tensors the spec does not describe: one might read Q or K (a QK-norm, a LoRA
    adapter, a relative-position table), and a symmetry that ignores it could change the function."""
    before, after = (prefix + stack.layer).split("{i}", 1)
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"(.+)")
    touched = set(stack.touched())
    for name in sorted(names):
        found = pattern.fullmatch(name)
        if found is None:
            continue
        index, relative = int(found.group(1)), found.group(2)
        if index >= dims.num_layers:
            raise InputError(f"{where}: tensor {name!r} belongs to layer {index}, but the config has "
                             f"{dims.num_layers} layers")
        if relative not in touched and not any(fnmatch.fnmatchcase(relative, glob) for glob in stack.passive):
            raise InputError(
                f"{where}: tensor {name!r} is not described by the {spec.name} spec, so rotfuse cannot "
                "tell whether the symmetries keep it exact (list it under passive: in the spec if no "
                "symmetry affects it; see configs/archs/README.md)"
            )


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
    rotary_dim = _rotary_dim(stack.rope, section, head_dim, where) if stack.rope else 0
    return Dims(num_layers, num_heads, num_kv, head_dim, hidden, rotary_dim)


def _rotary_dim(rope: RopeSpec, section: dict[str, Any], head_dim: int, where: str) -> int:
    """Leading head coordinates under RoPE, computed as the model code does: int(head_dim * factor)."""
    factor: Any = rope.partial_factor_default
    for key in rope.partial_factor_key:
        value = _config_value(section, key)
        if value is not None:
            factor = value
            break
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise InputError(f"{where}: partial rotary factor {factor!r} is not a number in (0, 1]")
    rotary_dim = int(head_dim * float(factor))
    if rotary_dim % 2 or rotary_dim == 0:
        raise InputError(f"{where}: rotary dimension {rotary_dim} (head_dim {head_dim} x {factor}) is not a "
                         "positive even number")
    return rotary_dim
