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
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rotfuse.core.errors import InputError
from rotfuse.symmetry.names import ALL_SYMMETRIES

if TYPE_CHECKING:
    pass

# Symmetry names live in rotfuse.symmetry.names.
LAYOUTS = ("out_in", "in_out")  # torch Linear [out, in]; GPT-2 style Conv1D [in, out]
FUSABLE_ROLES = ("q", "k", "v")
NORM_TYPES = ("layernorm", "rmsnorm")
ROLES = ("reads", "writes", "both", "table", "norm", "free")
ROPE_STYLES = ("rotate_half",)  # Hugging Face's layout: coordinate i pairs with i + rotary_dim/2
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: much faster


@dataclass(frozen=True)
class NameLayout:
    """One naming era of a family's checkpoints: prefixes of the spec's names (after the key
    prefix, or from the root for "/..." names) and what the checkpoint calls them instead. The
    identity (no renames) is the spec's own names."""

    renames: tuple[tuple[str, str], ...] = ()  # (spec prefix, checkpoint prefix)

    def apply(self, name: str) -> str:
        """The checkpoint's name for a spec name (the longest matching spec prefix is renamed)."""
        for src, dst in sorted(self.renames, key=lambda pair: -len(pair[0])):
            if name.startswith(src):
                return dst + name[len(src) :]
        return name

    def revert(self, name: str) -> str:
        """The spec's name for a checkpoint name (the inverse of `apply` on its image)."""
        for src, dst in sorted(self.renames, key=lambda pair: -len(pair[1])):
            if name.startswith(dst):
                return src + name[len(dst) :]
        return name

    def __str__(self) -> str:
        return ", ".join(f"{src!r} -> {dst!r}" for src, dst in self.renames) or "the spec's names"


@dataclass(frozen=True)
class LinearRef:
    """A linear layer's tensors, names relative to the layer prefix. A bias is used when present."""

    weight: str
    bias: str | None = None
    layout: str = "out_in"
    optional: bool = False  # FFN inputs: used where layer 0 has it (e.g. T5's wi vs wi_0/wi_1)
    parts: int = 1  # FFN inputs only: projections stacked along the output axis (Phi-3's gate_up_proj)


@dataclass(frozen=True)
class FusedRef:
    """One tensor holding several projections stacked along its output axis (e.g. GPT-2 c_attn);
    `per_head`: stacked within each head instead ([heads, len(order), head_dim] rows, GPT-NeoX)."""

    weight: str
    order: tuple[str, ...]
    bias: str | None = None
    layout: str = "out_in"
    per_head: bool = False


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
class ExpertsSpec:
    """The routed experts of a mixture-of-experts layer (Mixtral, Qwen2-MoE, ...): `count` (config
    keys) FFNs whose tensor names hold `{e}`, the expert index, each with a neuron index of its own,
    and a router whose output row e scores expert e. Whole experts permute with the router's rows."""

    count: tuple[str, ...]
    router: LinearRef
    ffn: FfnSpec  # names with {e}

    def expert(self, index: int) -> FfnSpec:
        """Expert `index`'s FFN, names filled in."""

        def fill(ref: LinearRef) -> LinearRef:
            return LinearRef(
                ref.weight.replace("{e}", str(index)),
                ref.bias.replace("{e}", str(index)) if ref.bias else None,
                ref.layout,
            )

        return FfnSpec(tuple(fill(ref) for ref in self.ffn.inputs), fill(self.ffn.output))

    def touched(self, num_experts: int) -> list[str]:
        """Relative names of the router's and every expert's tensors (the experts' output biases
        never move: they are passive)."""
        names = [name for name in (self.router.weight, self.router.bias) if name]
        for index in range(num_experts):
            ffn = self.expert(index)
            names += [ffn.output.weight] + [n for ref in ffn.inputs for n in (ref.weight, ref.bias) if n]
        return names


@dataclass(frozen=True)
class FfnLayout:
    """An alternative to a stack's own `ffn` / `experts` for some of its layers (Qwen MoE models
    with dense layers): a layer takes the layout whose tensors it holds (bind.py)."""

    name: str
    ffn: FfnSpec | None = None
    experts: ExpertsSpec | None = None

    def probes(self) -> tuple[str, ...]:
        """The tensors whose presence in a layer identifies this layout."""
        refs = ((self.ffn.output,) if self.ffn else ()) + ((self.experts.router,) if self.experts else ())
        return tuple(ref.weight for ref in refs)


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
class ResidualRule:
    """One entry of a `residual:` list: tensor name globs and how the stream indexes them."""

    role: str  # one of ROLES
    names: tuple[str, ...]  # globs; relative to the key prefix (model) or layer prefix (layer); "/..." = root
    layout: str = "out_in"  # of reads/writes weights: torch Linear [out, in] or Conv1D [in, out]
    readers: tuple[str, ...] = ()  # role norm: the weights reading this norm's output
    bias: str = ""  # role norm: the LayerNorm's bias (it rides along as bias / gain when folded)
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # config values under which it applies
    classes: tuple[str, ...] = ()  # globs on config.json `architectures` under which it applies
    streams: tuple[str, ...] = ()  # the stacks whose streams it sits on (default: the section's `stream`)
    gain_offset: float = 0.0  # role norm: the norm scales by offset + w (Gemma's 1 + w), w the stored gain

    def applies(self, config: dict[str, Any]) -> bool:
        if self.classes:
            architectures = config.get("architectures") or ()
            if not any(fnmatch.fnmatchcase(str(a), glob) for a in architectures for glob in self.classes):
                return False
        return not self.when or any(config_value(config, key) in values for key, values in self.when.items())


@dataclass(frozen=True)
class TieRule:
    """Input embedding and output head that share one tensor when the config says so."""

    embedding: str
    head: str
    config_key: str = "tie_word_embeddings"
    default: bool = False  # when config.json lacks the key (the config class's default)
    classes: tuple[str, ...] = ()  # globs on `architectures`: the model classes that have the head
    # config keys written with their current value (the given default when config.json lacks them)
    # when untying: flags the model code derives from the tie flag (T5's scale_decoder_outputs)
    pin: dict[str, Any] = field(default_factory=dict)


# Layer-spec roles whose stream a section may place on another stack (`role_streams`)
STREAM_ROLES = ("q", "k", "v", "qkv", "o", "ffn_inputs", "ffn_output")


@dataclass(frozen=True)
class ResidualSection:
    norm: str
    model: tuple[ResidualRule, ...]
    layer: tuple[ResidualRule, ...]
    tie: TieRule | None = None
    stream: str = ""  # the stack whose stream this stack's tensors sit on ("": its own)
    role_streams: dict[str, str] = field(default_factory=dict)  # layer-spec role -> stack (cross-attention K/V)


@dataclass(frozen=True)
class StackSpec:
    """A stack of identical transformer layers (most models have one; CLIP has two towers)."""

    name: str
    layer: str  # layer prefix pattern with {i}
    dims: DimKeys
    attention: AttentionSpec
    ffn: FfnSpec | None  # None: an attention-only stack (e.g. cross-attention blocks)
    config_section: str | None = None  # e.g. "vision_config" for a nested config
    rope: RopeSpec | None = None
    passive: tuple[str, ...] = ()  # globs: layer tensors no symmetry touches (norms, output biases)
    optional: bool = False  # a checkpoint may lack this stack (e.g. CLIP's text tower)
    residual: ResidualSection | None = None  # which tensors touch the stream (rotfuse.archs.residual)
    experts: ExpertsSpec | None = None  # routed experts of a mixture-of-experts layer
    ffn_layouts: tuple[FfnLayout, ...] = ()  # per-layer alternatives to ffn / experts (chosen by tensors)
    # q / k / v -> vectors over that projection's output width that move with whole heads (and nothing else)
    moves_with_heads: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def layouts(self) -> tuple[FfnLayout, ...]:
        """The stack's own FFN layout (named "default") followed by its alternatives."""
        return (FfnLayout("default", self.ffn, self.experts), *self.ffn_layouts)

    def with_layout(self, index: int) -> StackSpec:
        """This stack with layout `index` of `layouts()` as its FFN (alternatives dropped)."""
        if not self.ffn_layouts:
            return self
        chosen = self.layouts()[index]
        return replace(self, ffn=chosen.ffn, experts=chosen.experts, ffn_layouts=())

    def layer_pattern(self, prefix: str, layout: NameLayout = NameLayout()) -> re.Pattern[str]:
        """The regex of this stack's layer tensors under `prefix` (names as `layout` gives them):
        group 1 the layer index, group 2 the name relative to the layer (the one place layer names
        are parsed)."""
        return _layer_pattern(prefix + layout.apply(self.layer))

    def probe(self) -> str:
        """The tensor whose presence in layer 0 identifies the stack (and the key prefix)."""
        return (self.attention.qkv or self.attention.q).weight  # type: ignore[union-attr]

    def touched(self, num_experts: int = 0) -> list[str]:
        """Relative names of every tensor the symmetries may read or write (biases included);
        `num_experts`: the routed experts' (BoundArch.touched passes the config's count)."""
        att, ffn = self.attention, self.ffn
        refs = [*(ffn.inputs if ffn else ()), *att.q_like, *att.k_like]
        refs += [att.qkv] if att.qkv else [att.q, att.k, att.v]  # type: ignore[list-item]
        with_bias = [name for ref in refs for name in (ref.weight, ref.bias) if name]
        outputs = [att.o.weight] + ([ffn.output.weight] if ffn else [])
        experts = self.experts.touched(num_experts) if self.experts else []
        vectors = [name for names in self.moves_with_heads.values() for name in names]
        return [*outputs, *with_bias, *experts, *vectors]  # O's and the FFN output's biases never move

    def optional_refs(self) -> tuple[LinearRef, ...]:
        """Projections used where layer 0 has them: q_like/k_like and optional FFN inputs."""
        ffn_inputs = tuple(ref for ref in self.ffn.inputs if ref.optional) if self.ffn else ()
        return (*self.attention.q_like, *self.attention.k_like, *ffn_inputs)


@dataclass(frozen=True)
class Restriction:
    """Symmetries to turn off when config.json has one of the listed values (always when `when`
    is empty), in the listed stacks (all when `stacks` is empty)."""

    when: dict[str, tuple[Any, ...]]
    disable: frozenset[str]
    reason: str
    stacks: tuple[str, ...] = ()

    def fires(self, config: dict[str, Any]) -> tuple[bool, Any]:
        """Whether it applies to this config, and the config value that triggered it (or None)."""
        if not self.when:
            return True, None
        for key, values in self.when.items():
            value = config_value(config, key)
            if value in values:
                return True, value
        return False, None


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
    # naming eras: the spec's own names first, then each `renames` entry (chosen at bind time)
    layouts: tuple[NameLayout, ...] = (NameLayout(),)


# ---------------------------------------------------------------------- loading


def builtin_spec_dir() -> Path:
    return Path(str(resources.files("rotfuse.configs") / "archs"))


def builtin_specs() -> dict[str, ArchSpec]:
    """Every spec shipped with rotfuse, by name: parsed once per version of the files (every
    checkpoint opened asks for them all)."""
    versions = []
    for path in sorted(builtin_spec_dir().glob("*.yaml")):
        try:
            stat = path.stat()
        except OSError as exc:
            raise InputError(f"{path}: cannot read architecture spec ({exc})") from exc
        versions.append((str(path), stat.st_mtime_ns, stat.st_size))
    return dict(_parsed_builtin_specs(tuple(versions)))


@functools.lru_cache(maxsize=4)
def _parsed_builtin_specs(versions: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, ArchSpec], ...]:
    """The specs of the files `versions` names (path, mtime, size), in that order, by name."""
    specs = {}
    for path, _, _ in versions:
        spec = load_spec_file(Path(path))
        specs[spec.name] = spec
    return tuple(specs.items())


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


TOP_KEYS = [
    "description",
    "extends",
    "model_types",
    "name",
    "prefixes",
    "renames",
    "restrictions",
    "stacks",
    "stream_output_classes",
]
STACK_KEYS = [
    "attention",
    "config_section",
    "dims",
    "experts",
    "ffn",
    "ffn_layouts",
    "layer",
    "layout",
    "moves_with_heads",
    "name",
    "optional",
    "passive",
    "residual",
    "rope",
]


def _parse_spec(raw: dict[str, Any], source: str) -> ArchSpec:
    if "stacks" in raw:
        _mapping(raw, set(TOP_KEYS), "the spec")
        if not isinstance(raw["stacks"], list):
            raise ValueError("stacks must be a list")
        stacks = tuple(
            _parse_stack(s, str(_mapping(s, set(STACK_KEYS), "a stack").get("name", ""))) for s in raw["stacks"]
        )
    else:
        _mapping(raw, set(TOP_KEYS) | set(STACK_KEYS), "the spec")
        stacks = (_parse_stack(raw, ""),)
    if len({s.name for s in stacks}) != len(stacks):
        raise ValueError("stack names must be distinct")
    _check_streams(stacks)
    restrictions = tuple(_parse_restriction(r) for r in raw.get("restrictions") or ())
    for restriction in restrictions:
        unknown_stacks = set(restriction.stacks) - {s.name for s in stacks}
        if unknown_stacks:
            raise ValueError(f"restriction names unknown stacks {sorted(unknown_stacks)}")
    _check_moves_with_heads(stacks, restrictions)
    return ArchSpec(
        name=str(raw["name"]),
        model_types=tuple(raw.get("model_types") or (raw["name"],)),
        prefixes=tuple(raw.get("prefixes") or ("",)),
        stacks=stacks,
        restrictions=restrictions,
        description=str(raw.get("description", "")),
        source=source,
        stream_output_classes=_names(raw.get("stream_output_classes", ["*Model"])),
        layouts=(NameLayout(), *_parse_renames(raw.get("renames"), stacks)),
    )


def _parse_renames(raw: Any, stacks: tuple[StackSpec, ...]) -> list[NameLayout]:
    """`renames`: a list of `{spec prefix: checkpoint prefix}` mappings, one per other naming era.
    Each must rename some stack's layer prefix, so that layer 0's tensors tell the eras apart."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("renames must be a list of mappings {spec prefix: checkpoint prefix}")
    layouts = []
    for entry in raw:
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"renames: each entry must be a non-empty mapping of name prefixes, got {entry!r}")
        pairs = tuple((str(k), str(v)) for k, v in entry.items())
        for src, dst in pairs:
            if not src or not dst or src == dst or "{" in src + dst:
                raise ValueError(f"renames: {src!r} -> {dst!r} is not a rename of one non-empty literal prefix")
        layout = NameLayout(pairs)
        if all(layout.apply(s.layer.format(i=0)) == s.layer.format(i=0) for s in stacks):
            raise ValueError(f"renames: {layout} renames no stack's layer prefix, so no checkpoint can be told apart")
        if any(layout.revert(layout.apply(s.layer)) != s.layer for s in stacks):
            raise ValueError(f"renames: {layout} maps two spec prefixes to one checkpoint prefix")
        layouts.append(layout)
    return layouts


def _names(value: Any) -> tuple[str, ...]:
    """A name or a list of names (YAML) -> a tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a name or a list of names, got {value!r}")
    return tuple(str(v) for v in value)


def _when(raw: Any) -> dict[str, tuple[Any, ...]]:
    """`{config.key: value or [values]}` -> key -> tuple of values."""
    if not isinstance(raw, dict):
        raise ValueError(f"when must be a mapping of config keys to values, got {raw!r}")
    return {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items()}


def _mapping(raw: Any, allowed: set[str], what: str) -> dict[str, Any]:
    """`raw` as a mapping whose keys are all in `allowed` (a misspelled key is an error)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a mapping, got {raw!r}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {what} (known: {', '.join(sorted(allowed))})")
    return raw


@functools.lru_cache(maxsize=64)
def _layer_pattern(layer_prefix: str) -> re.Pattern[str]:
    before, after = layer_prefix.split("{i}", 1)
    return re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"(.+)")


def _parse_stack(raw: dict[str, Any], name: str) -> StackSpec:
    layout = raw.get("layout", "out_in")
    dims = _mapping(raw["dims"], {"num_layers", "num_heads", "hidden_size", "num_kv_heads", "head_dim"}, "dims")
    attention = _mapping(raw["attention"], {"q", "k", "v", "o", "qkv", "q_like", "k_like"}, "attention")
    stack = StackSpec(
        name=name,
        layer=str(raw["layer"]),
        dims=DimKeys(
            num_layers=_names(dims["num_layers"]),
            num_heads=_names(dims["num_heads"]),
            hidden_size=_names(dims["hidden_size"]),
            num_kv_heads=_names(dims.get("num_kv_heads")),
            head_dim=_names(dims.get("head_dim")),
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
        ffn=_parse_ffn(raw["ffn"], layout) if raw.get("ffn") is not None else None,
        config_section=raw.get("config_section"),
        rope=_parse_rope(raw.get("rope")),
        passive=_names(raw.get("passive")),
        optional=bool(raw.get("optional", False)),
        residual=_parse_residual(raw["residual"]) if raw.get("residual") is not None else None,
        experts=_parse_experts(raw["experts"], layout) if raw.get("experts") is not None else None,
        ffn_layouts=tuple(_parse_layout(r, layout) for r in raw.get("ffn_layouts") or ()),
        moves_with_heads={
            str(side): _names(names)
            for side, names in _mapping(raw.get("moves_with_heads") or {}, {"q", "k", "v"}, "moves_with_heads").items()
        },
    )
    _check_stack(stack)
    return stack


def _check_stack(stack: StackSpec) -> None:
    """Shape errors of a spec that would otherwise surface as confusing failures at match time."""
    att = stack.attention
    separate = [ref for ref in (att.q, att.k, att.v) if ref is not None]
    if (att.qkv is None) == (len(separate) < 3) or (att.qkv is not None and separate):
        raise ValueError("attention needs either q, k and v, or a fused qkv (not both)")
    outputs = [("attention o", att.o)] + ([("ffn output", stack.ffn.output)] if stack.ffn else [])
    for what, ref in outputs:
        if ref.bias:
            raise ValueError(f"{what} has a bias, which no symmetry touches: list it under passive instead")
    if "{i}" not in stack.layer:
        raise ValueError(f"layer pattern {stack.layer!r} must contain {{i}}")
    layouts = stack.layouts()
    if stack.ffn_layouts:
        if not layouts[0].probes():
            raise ValueError("ffn_layouts are alternatives to the stack's ffn / experts, which it lacks")
        if len({layout.name for layout in layouts}) != len(layouts):
            raise ValueError("ffn_layouts names must be distinct (and not 'default')")
        counts = {layout.experts.count for layout in layouts if layout.experts}
        if len(counts) > 1:
            raise ValueError("every layout's experts must take their count from the same config keys")


def _check_moves_with_heads(stacks: tuple[StackSpec, ...], restrictions: tuple[Restriction, ...]) -> None:
    """A vector that moves with the heads is only permuted: every rotation and scale of its circuit
    must be off in its stack whatever the config (a restriction without `when`)."""
    for stack in stacks:
        fixed = [r for r in restrictions if not r.when and (not r.stacks or stack.name in r.stacks)]
        always = {name for r in fixed for name in r.disable}
        for side in stack.moves_with_heads:
            circuit = "qk" if side in ("q", "k") else "vo"
            needed = {f"{circuit}.rot", f"{circuit}.scale", f"{circuit}.linear"}
            if not needed <= always:
                raise ValueError(
                    f"moves_with_heads {side}: {circuit} rotations and scales would act on "
                    f"{list(stack.moves_with_heads[side])}; a restriction without `when` must disable "
                    f"{sorted(needed - always)}"
                )


def _parse_ffn(raw: Any, layout: str, optional_inputs: bool = True) -> FfnSpec:
    raw = _mapping(raw, {"inputs", "output"}, "ffn")
    ffn = FfnSpec(
        inputs=tuple(_linear(r, layout, ffn_input=True) for r in raw["inputs"]),
        output=_linear(raw["output"], layout),
    )
    if not optional_inputs and any(ref.optional for ref in ffn.inputs):
        raise ValueError("the FFN inputs of an ffn_layouts entry cannot be optional")
    return ffn


def _parse_layout(raw: Any, layout: str) -> FfnLayout:
    """One `ffn_layouts` entry: {name, ffn, experts}, at least one of ffn and experts."""
    raw = _mapping(raw, {"name", "ffn", "experts"}, "an ffn_layouts entry")
    result = FfnLayout(
        name=str(raw["name"]),
        ffn=_parse_ffn(raw["ffn"], layout, optional_inputs=False) if raw.get("ffn") is not None else None,
        experts=_parse_experts(raw["experts"], layout) if raw.get("experts") is not None else None,
    )
    if not result.probes():
        raise ValueError(f"ffn_layouts entry {result.name!r} needs an ffn or experts")
    return result


def _parse_experts(raw: Any, layout: str) -> ExpertsSpec:
    raw = _mapping(raw, {"count", "router", "inputs", "output"}, "experts")
    experts = ExpertsSpec(
        count=_names(raw["count"]),
        router=_linear(raw["router"], layout),
        ffn=FfnSpec(inputs=tuple(_linear(r, layout) for r in raw["inputs"]), output=_linear(raw["output"], layout)),
    )
    if not experts.count or not experts.ffn.inputs:
        raise ValueError("experts need a count (config keys) and at least one input")
    for ref in (*experts.ffn.inputs, experts.ffn.output):
        if "{e}" not in ref.weight:
            raise ValueError(f"expert tensor {ref.weight!r} must contain {{e}} (the expert index)")
    if experts.ffn.output.bias:
        raise ValueError("the experts' output has a bias, which no symmetry touches: list it under passive instead")
    return experts


def _parse_rope(raw: Any) -> RopeSpec | None:
    if not raw:
        return None
    if raw is True:
        return RopeSpec()
    raw = _mapping(raw, {"style", "partial_factor_key", "partial_factor_default"}, "rope")
    rope = RopeSpec(
        style=str(raw.get("style", "rotate_half")),
        partial_factor_key=_names(raw.get("partial_factor_key")),
        partial_factor_default=float(raw.get("partial_factor_default", 1.0)),
    )
    if rope.style not in ROPE_STYLES:
        raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {rope.style!r}")
    if not 0.0 < rope.partial_factor_default <= 1.0:
        raise ValueError("rope partial_factor_default must be in (0, 1]")
    return rope


def _linear(raw: Any, layout: str, ffn_input: bool = False) -> LinearRef:
    """A tensor reference; FFN inputs may also be `optional` (used where layer 0 has it) and stack
    several projections (`parts`)."""
    keys = {"weight", "bias", "layout"} | ({"optional", "parts"} if ffn_input else set())
    raw = _mapping(raw, keys, "a linear layer")
    ref = LinearRef(
        weight=str(raw["weight"]),
        bias=raw.get("bias"),
        layout=raw.get("layout", layout),
        optional=bool(raw.get("optional", False)),
        parts=raw.get("parts", 1),
    )
    if ref.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {ref.layout!r}")
    if isinstance(ref.parts, bool) or not isinstance(ref.parts, int) or ref.parts < 1:
        raise ValueError(f"parts must be a positive integer, got {ref.parts!r}")
    return ref


def _fused(raw: Any, layout: str) -> FusedRef:
    raw = _mapping(raw, {"weight", "order", "bias", "layout", "per_head"}, "qkv")
    order = tuple(raw["order"])
    if sorted(order) != sorted(FUSABLE_ROLES):
        raise ValueError(f"qkv order must list q, k and v once each, got {list(order)}")
    if not isinstance(raw.get("per_head", False), bool):
        raise ValueError(f"qkv per_head must be true or false, got {raw['per_head']!r}")
    ref = FusedRef(
        weight=str(raw["weight"]),
        order=order,
        bias=raw.get("bias"),
        layout=raw.get("layout", layout),
        per_head=bool(raw.get("per_head", False)),
    )
    if ref.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {ref.layout!r}")
    return ref


def _parse_restriction(raw: Any) -> Restriction:
    raw = _mapping(raw, {"when", "disable", "reason", "stacks"}, "a restriction")
    disable = frozenset(_names(raw["disable"]))
    unknown = disable - ALL_SYMMETRIES
    if unknown:
        raise ValueError(f"restriction disables unknown symmetries {sorted(unknown)}")
    if not raw.get("when") and not str(raw.get("reason", "")).strip():
        raise ValueError("a restriction without `when` (always on) needs a reason")
    return Restriction(
        when=_when(raw.get("when") or {}),
        disable=disable,
        reason=" ".join(str(raw.get("reason", "")).split()),
        stacks=_names(raw.get("stacks")),
    )


def _check_streams(stacks: tuple[StackSpec, ...]) -> None:
    """Every stream a residual section names is a stack of the spec."""
    names = {s.name for s in stacks}
    for stack in stacks:
        section = stack.residual
        if section is None:
            continue
        named = {section.stream, *section.role_streams.values()} - {""}
        named |= {name for rule in (*section.model, *section.layer) for name in rule.streams}
        unknown = sorted(named - names)
        if unknown:
            raise ValueError(
                f"residual section of stack {stack.name!r} names unknown streams {unknown} "
                f"(streams are named by their stack: {sorted(names)})"
            )


def _parse_residual(raw: Any) -> ResidualSection:
    """The `residual:` section of one stack, checked (ValueError on a mistake)."""
    raw = _mapping(raw, {"norm", "model", "layer", "tie", "stream", "role_streams"}, "residual")
    norm = raw.get("norm")
    if norm not in NORM_TYPES:
        raise ValueError(f"residual norm must be one of {NORM_TYPES}, got {norm!r}")
    model = tuple(_parse_rule(r, norm) for r in raw.get("model") or ())
    layer = tuple(_parse_rule(r, norm) for r in raw.get("layer") or ())
    tie = None
    if raw.get("tie") is not None:
        entry = _mapping(raw["tie"], {"embedding", "head", "config", "default", "classes", "pin"}, "residual tie")
        tie = TieRule(
            embedding=str(entry["embedding"]),
            head=str(entry["head"]),
            config_key=str(entry.get("config", "tie_word_embeddings")),
            default=bool(entry.get("default", False)),
            classes=_names(entry.get("classes")),
            pin=dict(_mapping(entry.get("pin") or {}, set(map(str, entry.get("pin") or {})), "tie pin")),
        )
    role_streams = {
        str(k): str(v)
        for k, v in _mapping(raw.get("role_streams") or {}, set(STREAM_ROLES), "residual role_streams").items()
    }
    return ResidualSection(norm, model, layer, tie, stream=str(raw.get("stream") or ""), role_streams=role_streams)


def _parse_rule(raw: Any, norm: str) -> ResidualRule:
    if not isinstance(raw, dict):
        raise ValueError(f"each entry must be a mapping like {{table: NAME}}, got {raw!r}")
    roles = [role for role in ROLES if role in raw]
    if len(roles) != 1:
        raise ValueError(f"each entry needs exactly one of {', '.join(ROLES)}: {raw!r}")
    role = roles[0]
    _mapping(
        raw, {role, "layout", "readers", "bias", "when", "classes", "stream", "gain_offset"}, f"residual entry {raw!r}"
    )
    if (role == "norm") != ("readers" in raw):
        raise ValueError(f"readers go with norm entries, and every norm entry needs them: {raw!r}")
    offset = raw.get("gain_offset", 0.0)
    if "gain_offset" in raw and (role != "norm" or isinstance(offset, bool) or not isinstance(offset, (int, float))):
        raise ValueError(f"gain_offset goes with norm entries and is a number: {raw!r}")
    if "bias" in raw and (role != "norm" or norm != "layernorm" or len(_names(raw[role])) != 1):
        raise ValueError(f"bias goes with the norm entry of one LayerNorm gain: {raw!r}")
    rule = ResidualRule(
        role=role,
        names=_names(raw[role]),
        layout=str(raw.get("layout", "out_in")),
        readers=_names(raw.get("readers")),
        bias=str(raw.get("bias", "")),
        when=_when(raw.get("when") or {}),
        classes=_names(raw.get("classes")),
        streams=_names(raw.get("stream")),
        gain_offset=float(offset),
    )
    if rule.role == "free" and rule.streams:
        raise ValueError(f"a free tensor sits on no stream: {raw!r}")
    if rule.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {rule.layout!r}")
    if not rule.names:
        raise ValueError(f"entry names no tensor: {raw!r}")
    return rule


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """config[a][b] for "a.b" (None where absent)."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
