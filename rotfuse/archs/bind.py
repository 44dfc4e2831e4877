"""A spec bound to one checkpoint: its key prefix, the stacks present, the sizes read from
config.json, the coverage of every layer tensor, and the restrictions its config switches on."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rotfuse.archs.spec import (
    ArchSpec,
    LinearRef,
    NameLayout,
    RopeSpec,
    StackSpec,
    builtin_specs,
    config_value,
    load_spec_file,
)
from rotfuse.core.errors import InputError
from rotfuse.symmetry.names import EXPERTS

if TYPE_CHECKING:
    from pathlib import Path

    from rotfuse.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Dims:
    """The sizes of one stack, read from a checkpoint's config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rotary_dim: int = 0  # leading head dims under RoPE (0: none)
    num_experts: int = 0  # routed experts per layer (0: no mixture of experts)


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
    extras: frozenset[str] = frozenset()  # "stack/relative weight" of the optional refs found in layer 0
    stack_disabled: dict[str, frozenset[str]] = field(default_factory=dict)  # restrictions limited to stacks
    # per stack with ffn_layouts: the index into StackSpec.layouts() of each layer's FFN layout
    layer_layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layout: NameLayout = NameLayout()  # the naming era of this checkpoint (spec `renames`)

    def applicable(self, symmetries: frozenset[str]) -> frozenset[str]:
        """The requested `symmetries` this checkpoint can apply: not switched off by a restriction,
        and with parts to move (whole-expert permutation only where a layer has experts)."""
        if not any(dims.num_experts for dims in self.dims.values()):
            symmetries = symmetries - {EXPERTS}
        return symmetries - self.disabled

    def disabled_in(self, stack: str) -> frozenset[str]:
        """The symmetries switched off in one stack (the global ones and that stack's own)."""
        return self.disabled | self.stack_disabled.get(stack, frozenset())

    def layers(self) -> list[LayerId]:
        return [
            LayerId(s.name, i)
            for s in self.spec.stacks
            if s.name not in self.absent
            for i in range(self.dims[s.name].num_layers)
        ]

    def stack(self, name: str) -> StackSpec:
        return next(s for s in self.spec.stacks if s.name == name)

    def full_name(self, layer: LayerId, relative: str) -> str:
        return self.name(self.stack(layer.stack).layer.format(i=layer.index) + relative)

    def name(self, spec_name: str) -> str:
        """The checkpoint's name for a spec name: relative to the key prefix, or from the root
        with a leading "/" (residual sections); renamed by the checkpoint's naming era."""
        if spec_name.startswith("/"):
            return self.layout.apply(spec_name[1:])
        return self.prefix + self.layout.apply(spec_name)

    def canonical(self, name: str) -> str:
        """A checkpoint name without its key prefix, in the spec's naming era (the key under which
        two checkpoints of different prefixes or eras pair their tensors)."""
        if self.prefix and name.startswith(self.prefix):
            name = name[len(self.prefix) :]
        return self.layout.revert(name)

    def layer_pattern(self, stack: StackSpec) -> re.Pattern[str]:
        """The regex of one stack's layer tensors in this checkpoint (StackSpec.layer_pattern)."""
        return stack.layer_pattern(self.prefix, self.layout)

    def layer_spec(self, layer: LayerId) -> StackSpec:
        """The stack spec of one layer, with that layer's FFN layout (stacks with ffn_layouts)."""
        stack = self.stack(layer.stack)
        chosen = self.layer_layouts.get(layer.stack)
        return stack.with_layout(chosen[layer.index]) if chosen else stack

    def touched(self, layer: LayerId) -> list[str]:
        """Relative names of every tensor the symmetries of one layer may move."""
        return self.layer_spec(layer).touched(self.dims[layer.stack].num_experts)

    def present(self, stack: str, refs: tuple[LinearRef, ...]) -> tuple[LinearRef, ...]:
        """The extra projections among `refs` that this checkpoint has (decided on layer 0)."""
        return tuple(ref for ref in refs if f"{stack}/{ref.weight}" in self.extras)


def select_spec(
    config: dict[str, Any], arch: str | None = None, spec_file: Path | None = None, where: str = "config.json"
) -> ArchSpec:
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
    all_names = set(names.names() if hasattr(names, "names") else names)
    prefix, layout, absent = _detect_prefix(spec, all_names, where)
    named = BoundArch(spec, prefix, {}, layout=layout)  # names only, for the checks below
    dims = {stack.name: _read_dims(stack, config, where) for stack in spec.stacks}
    layer_layouts: dict[str, tuple[int, ...]] = {}
    for stack in spec.stacks:
        if stack.name not in absent:
            last = named.name(stack.layer.format(i=dims[stack.name].num_layers - 1) + stack.probe())
            if last not in all_names:  # (also keeps a corrupt layer count from being enumerated)
                raise InputError(
                    f"{where}: the config gives {dims[stack.name].num_layers} layers, but tensor "
                    f"{last!r} of the last one is not in the checkpoint"
                )
            if stack.ffn_layouts:
                layer_layouts[stack.name] = _layer_layouts(spec, stack, named, dims[stack.name], all_names, where)
            _check_coverage(spec, stack, named, dims[stack.name], all_names, where, layer_layouts.get(stack.name))
    disabled, stack_disabled, notes = _restrictions(spec, config)
    notes += [f"{spec.name}: no {name!r} stack in this checkpoint (left as is)" for name in sorted(absent)]
    extras = _present_extras(spec, named, all_names)
    for stack in spec.stacks:
        if (
            stack.name not in absent
            and stack.ffn is not None
            and not any(not ref.optional or f"{stack.name}/{ref.weight}" in extras for ref in stack.ffn.inputs)
        ):
            first = stack.layer.format(i=0)
            raise InputError(
                f"{where}: none of the FFN inputs of the {spec.name} spec "
                f"({', '.join(named.name(first + ref.weight) for ref in stack.ffn.inputs)}) is in the checkpoint"
            )
    return BoundArch(
        spec,
        prefix,
        dims,
        frozenset(disabled),
        notes,
        frozenset(absent),
        extras,
        {name: frozenset(off) for name, off in stack_disabled.items()},
        layer_layouts,
        layout,
    )


def _present_extras(spec: ArchSpec, named: BoundArch, names: set[str]) -> frozenset[str]:
    """ "stack/weight" of every optional projection (q_like/k_like, optional FFN inputs) that
    layer 0 has (they depend on config)."""
    return frozenset(
        f"{stack.name}/{ref.weight}"
        for stack in spec.stacks
        for ref in stack.optional_refs()
        if named.name(stack.layer.format(i=0) + ref.weight) in names
    )


def _restrictions(spec: ArchSpec, config: dict[str, Any]) -> tuple[set[str], dict[str, set[str]], list[str]]:
    """Symmetries switched off by config values (everywhere, and in named stacks only), and one
    note per restriction that fired."""
    disabled: set[str] = set()
    stack_disabled: dict[str, set[str]] = {}
    notes: list[str] = []
    for restriction in spec.restrictions:
        fires, value = restriction.fires(config)
        if not fires:
            continue
        for stack in restriction.stacks:
            stack_disabled.setdefault(stack, set()).update(restriction.disable)
        if not restriction.stacks:
            disabled |= restriction.disable
        reason = restriction.reason.replace("{value}", str(value))
        where = f" in {', '.join(restriction.stacks)}" if restriction.stacks else ""
        notes.append(f"{', '.join(sorted(restriction.disable))} off{where}: {reason}")
    return disabled, stack_disabled, notes


def _detect_prefix(spec: ArchSpec, names: set[str], where: str) -> tuple[str, NameLayout, set[str]]:
    """The first prefix under which a stack's layer 0 exists, the naming era (spec `renames`)
    whose names the checkpoint has, and the optional stacks missing there. Two eras that both
    name every stack found are refused: the checkpoint mixes them."""

    def probe(prefix: str, layout: NameLayout, stack: StackSpec) -> str:
        return prefix + layout.apply(stack.layer.format(i=0) + stack.probe())

    for prefix in spec.prefixes:
        candidates = [
            (layout, found)
            for layout in spec.layouts
            if (found := {s.name for s in spec.stacks if probe(prefix, layout, s) in names})
        ]
        if not candidates:
            continue
        complete = [
            (layout, found) for layout, found in candidates if all(s.optional or s.name in found for s in spec.stacks)
        ]
        if not complete:
            layout, found = candidates[0]
            stack = next(s for s in spec.stacks if not s.optional and s.name not in found)
            raise InputError(
                f"{where}: tensor {probe(prefix, layout, stack)!r} not found (the {spec.name} spec needs it)"
            )
        most = max(len(found) for _, found in complete)
        best = [(layout, found) for layout, found in complete if len(found) == most]
        if len(best) > 1:
            layouts = "; ".join(str(layout) for layout, _ in best)
            raise InputError(
                f"{where}: the tensor names fit several naming layouts of the {spec.name} spec ({layouts}), "
                "e.g. a checkpoint that mixes two transformers versions; rename its tensors to one layout"
            )
        layout, found = best[0]
        return prefix, layout, {s.name for s in spec.stacks} - found
    tried = ", ".join(repr(probe(p, layout, s)) for p in spec.prefixes for layout in spec.layouts for s in spec.stacks)
    raise InputError(f"{where}: does not look like a {spec.name} checkpoint (none of {tried} found)")


def _layer_layouts(
    spec: ArchSpec, stack: StackSpec, named: BoundArch, dims: Dims, names: set[str], where: str
) -> tuple[int, ...]:
    """Each layer's FFN layout: the one whose identifying tensors (FFN output, router) it holds.
    A layer matching none or several is refused."""
    layouts = stack.layouts()
    chosen = []
    for i in range(dims.num_layers):
        first = named.name(stack.layer.format(i=i))
        matches = [j for j, layout in enumerate(layouts) if all(first + p in names for p in layout.probes())]
        if len(matches) != 1:
            what = "none" if not matches else "several (" + ", ".join(layouts[j].name for j in matches) + ")"
            probes = ", ".join(repr(first + p) for layout in layouts for p in layout.probes())
            raise InputError(
                f"{where}: layer {first!r} matches {what} of the FFN layouts of the {spec.name} spec "
                f"(identified by {probes})"
            )
        chosen.append(matches[0])
    return tuple(chosen)


def _check_coverage(
    spec: ArchSpec,
    stack: StackSpec,
    named: BoundArch,
    dims: Dims,
    names: set[str],
    where: str,
    layouts: tuple[int, ...] | None = None,
) -> None:
    """Refuse layer tensors the spec does not describe: one might read Q or K (a QK-norm, a LoRA
    adapter, a relative-position table), and a symmetry that ignores it could change the function.
    `layouts`: each layer's FFN layout (stacks with ffn_layouts); a layer is covered by its own."""
    pattern = named.layer_pattern(stack)
    by_layout = {j: set(stack.with_layout(j).touched(dims.num_experts)) for j in set(layouts or (0,))}
    for name in sorted(names):
        found = pattern.fullmatch(name)
        if found is None:
            continue
        index, relative = int(found.group(1)), found.group(2)
        if index >= dims.num_layers:
            raise InputError(
                f"{where}: tensor {name!r} belongs to layer {index}, but the config has {dims.num_layers} layers"
            )
        touched = by_layout[layouts[index] if layouts else 0]
        if relative not in touched and not any(fnmatch.fnmatchcase(relative, glob) for glob in stack.passive):
            raise InputError(
                f"{where}: tensor {name!r} is not described by the {spec.name} spec, so rotfuse cannot "
                "tell whether the symmetries keep it exact (list it under passive: in the spec if no "
                "symmetry affects it; see configs/archs/README.md)"
            )


def _read_dims(stack: StackSpec, config: dict[str, Any], where: str) -> Dims:
    section = config
    if stack.config_section:
        section = config_value(config, stack.config_section)
        if not isinstance(section, dict):
            raise InputError(f"{where}: config has no {stack.config_section!r} section")

    def get(keys: tuple[str, ...], what: str, required: bool = True) -> int | None:
        for key in keys:
            value = config_value(section, key)
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
    experts = next((layout.experts for layout in stack.layouts() if layout.experts), None)
    num_experts = get(experts.count, "the number of experts") if experts else 0
    return Dims(num_layers, num_heads, num_kv, head_dim, hidden, rotary_dim, num_experts or 0)


def _rotary_dim(rope: RopeSpec, section: dict[str, Any], head_dim: int, where: str) -> int:
    """Leading head coordinates under RoPE, computed as the model code does: int(head_dim * factor)."""
    factor: Any = rope.partial_factor_default
    for key in rope.partial_factor_key:
        value = config_value(section, key)
        if value is not None:
            factor = value
            break
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise InputError(f"{where}: partial rotary factor {factor!r} is not a number in (0, 1]")
    rotary_dim = int(head_dim * float(factor))
    if rotary_dim % 2 or rotary_dim == 0:
        raise InputError(
            f"{where}: rotary dimension {rotary_dim} (head_dim {head_dim} x {factor}) is not a positive even number"
        )
    return rotary_dim
