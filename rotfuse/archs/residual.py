"""Which tensors of a checkpoint the residual stream indexes, from each spec's `residual:` section.

Moving the stream by a map Q (rotfuse.symmetry.residual) is exact only if EVERY tensor that
reads or writes it moves: embeddings, every projection into and out of the stream, every norm,
the final norm and the heads. A tensor left in the old basis changes the function silently, so
`residual_plans` classifies every tensor of the checkpoint and refuses one that the spec neither
places on the stream nor declares stream-free (a LoRA adapter, a head the spec does not know).

Per layer, the roles already in the spec are used: Q/K/V (or fused QKV) and FFN input weights
read the stream, O and the FFN output weight write it, and the biases of Q/K/V and of the FFN
inputs live in head or neuron space. Everything else -- the layer's norms, the biases of O and of
the FFN output, all tensors outside the layers -- comes from the `residual:` section (schema:
configs/archs/README.md). A `norm` entry says which weights read a norm's output, so that its
gain can be folded into them: RMSNorm models, and pre-LN LayerNorm models (whose norms feed only
weights, never the stream), then admit orthogonal maps -- keeping the all-ones direction for
LayerNorm (rotfuse.symmetry.residual).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from rotfuse.archs.spec import ResidualRule, ResidualSection, StackSpec, TieRule, config_value
from rotfuse.core.errors import InputError
from rotfuse.symmetry.residual import StreamMap, scale_axis, work_dtype

if TYPE_CHECKING:
    from rotfuse.archs.bind import BoundArch
    from rotfuse.archs.spec import ArchSpec
    from rotfuse.io.checkpoint import Checkpoint


def _axes(role: str, layout: str, ndim: int) -> tuple[int, ...]:
    """The stream axes of a tensor with `ndim` axes, in its stored layout."""
    if role == "both":
        return (0, 1)
    if role in ("table", "norm"):  # vectors and tables of stream vectors: the last axis
        return (ndim - 1,)
    input_axis = 1 if layout == "out_in" else 0  # torch Linear/Conv [out, in, ...]; Conv1D [in, out]
    return (input_axis,) if role == "reads" else (1 - input_axis,)


# ---------------------------------------------------------------------- plans


@dataclass(frozen=True)
class StreamTensor:
    name: str  # full tensor name in the checkpoint
    axes: tuple[int, ...]  # axes indexed by the stream, in the STORED layout (Conv1D is [in, out])
    stack: str  # which stack's stream (CLIP has two towers, two streams)
    layer: int | None  # layer index, None for tensors outside the layers (embeddings, final norm, heads)
    role: str = "table"  # reads | writes | both | table | norm: how it meets the stream


@dataclass(frozen=True)
class NormFold:
    gain: str  # full name of a norm's gain
    readers: tuple[str, ...]  # full names of the weights reading its output
    bias: str | None = None  # full name of a LayerNorm's bias: b / g after folding
    offset: float = 0.0  # the norm scales by offset + w (Gemma: 1 + w): that is what folds, w = 1 - offset after


# How a moved checkpoint is expressed: a norm gain's full name -> the gain to unfold the folded
# checkpoint into (e.g. the anchor's), or None to leave that norm folded (gain 1).
GainSource = Callable[[str], "torch.Tensor | None"]


@dataclass
class ResidualPlan:
    """How to move one stack's residual stream: every tensor on it, and where orthogonal maps are
    exact the norm gains to fold first. `transform` gives a tensor's new value; apply it to every
    tensor.

    `orthogonal`: orthogonal maps are exact (every norm foldable and no tie in the way) -- any
    for RMSNorm, those keeping the all-ones direction for LayerNorm (`keeps_ones`); otherwise
    only permutations are, and `folds` is empty. `untie`: the folds untie the input embedding
    from the output head; the caller then writes `config_updates` into config.json and adds
    every tensor of `added` (new name -> the tensor whose value it starts from, to be passed
    through `transform` under the new name)."""

    stack: str  # the stream's name: its stack, or the coupled stacks joined with "+"
    norm: str  # "layernorm" or "rmsnorm"
    hidden_size: int
    tensors: dict[str, StreamTensor]  # EVERY tensor touching this stream
    folds: list[NormFold]  # empty unless orthogonal
    orthogonal: bool
    untie: bool
    added: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why orthogonal maps are off, when they are
    streams: tuple[str, ...] = ()  # the stacks whose streams this plan moves (default: `stack`)

    def __post_init__(self) -> None:
        self._gains = {fold.gain for fold in self.folds}
        self._offsets = {fold.gain: fold.offset for fold in self.folds}
        self._gain_of_bias = {fold.bias: fold.gain for fold in self.folds if fold.bias}
        self._gains_of: dict[str, list[str]] = {}
        for fold in self.folds:
            for reader in fold.readers:
                self._gains_of.setdefault(reader, []).append(fold.gain)

    @property
    def keeps_ones(self) -> bool:
        """Orthogonal maps must keep the all-ones direction (LayerNorm centers the stream)."""
        return self.norm == "layernorm"

    def transform(
        self, name: str, tensor: torch.Tensor, stream_map: StreamMap, read: Callable[[str], torch.Tensor]
    ) -> torch.Tensor:
        """The new value of one tensor: fold (gains become 1, a LayerNorm bias b becomes b / g,
        readers get the gain; gains read through `read`, by full name), then multiply every
        stream axis by Q. Tensors outside the plan come back unchanged. Same dtype as `tensor`."""
        entry = self.tensors.get(name)
        if entry is None:
            return tensor
        if stream_map.d != self.hidden_size:
            raise ValueError(f"stream map of width {stream_map.d} for a stream of width {self.hidden_size}")
        if not (stream_map.is_permutation or self.orthogonal):
            raise ValueError(
                f"only a permutation of the {self.stack or 'residual'} stream is exact here "
                f"({'; '.join(self.notes) or self.norm})"
            )
        if self.keeps_ones and not stream_map.keeps_ones:
            raise ValueError(
                f"the {self.stack or 'residual'} stream goes through LayerNorm: an orthogonal map "
                "must keep the all-ones direction (Q 1 = 1)"
            )
        if name in self._gains:  # a gain of 1: stored as 1 - offset
            return torch.full_like(tensor, 1.0 - self._offsets[name])
        work = tensor.to(work_dtype(tensor.dtype))  # one rounding to the stored dtype, at the end
        gain = self._gain_of_bias.get(name)
        if gain is not None:
            work = scale_axis(work, 1.0 / self._scale(gain, read(gain)), entry.axes[0])
        for reader_gain in self._gains_of.get(name, ()):
            work = scale_axis(work, self._scale(reader_gain, read(reader_gain)), entry.axes[0])
        return stream_map.apply(work, entry.axes).to(tensor.dtype)

    def unfold(self, name: str, tensor: torch.Tensor, into: GainSource) -> torch.Tensor:
        """A folded tensor (a `transform` output, possibly moved further along other axes)
        expressed in the gains `into` gives: gain 1 -> g', bias -> bias * g', readers -> / g'.
        Exact for any g' without zeros, so the copy can take another model's gains and be averaged
        with it entry by entry. Tensors outside the folds come back unchanged."""
        entry = self.tensors.get(name)
        if entry is None:
            return tensor
        if name in self._gains:
            target = into(name)
            return tensor if target is None else target.to(tensor.dtype).reshape(tensor.shape)
        work, axis = tensor.to(work_dtype(tensor.dtype)), entry.axes[0]
        gain = self._gain_of_bias.get(name)
        if gain is not None and (target := into(gain)) is not None:
            work = scale_axis(work, self._scale(gain, target), axis)
        for reader_gain in self._gains_of.get(name, ()):
            if (target := into(reader_gain)) is not None:
                work = scale_axis(work, 1.0 / self._scale(reader_gain, target), axis)
        return work.to(tensor.dtype)

    def _scale(self, gain: str, stored: torch.Tensor) -> torch.Tensor:
        """What norm `gain` multiplies by, from its stored value: offset + w (float64)."""
        return stored.double() + self._offsets[gain]


@dataclass(frozen=True)
class _Found:
    """A tensor's classification: the stacks whose streams it touches (several: it couples them;
    none: stream-free), its layer, role and layout, and for a norm gain the full names (or globs)
    of the weights that read its output and of its bias (a LayerNorm's bias is itself a norm
    tensor, with `gain_of` naming its gain)."""

    streams: tuple[str, ...]
    layer: int | None
    role: str
    layout: str = "out_in"
    readers: tuple[str, ...] = ()
    bias: str = ""
    gain_of: str = ""
    offset: float = 0.0

    @classmethod
    def of(
        cls, rule: ResidualRule, name: str, streams: tuple[str, ...], layer: int | None, full: Callable[[str], str]
    ) -> _Found:
        """`name`'s classification by the rule that matched it."""
        streams = () if rule.role == "free" else (rule.streams or streams)
        if rule.role != "norm":
            return cls(streams, layer, rule.role, rule.layout)
        gain = full(rule.names[0])
        if rule.bias and name == full(rule.bias):
            return cls(streams, layer, "norm", gain_of=gain)
        return cls(
            streams,
            layer,
            "norm",
            readers=tuple(full(r) for r in rule.readers),
            bias=full(rule.bias) if rule.bias else "",
            offset=rule.gain_offset,
        )


def own_stream(stack: StackSpec) -> str:
    """The stack whose stream a stack's tensors sit on (its own unless its section says `stream`)."""
    return (stack.residual.stream if stack.residual is not None else "") or stack.name


def role_stream(stack: StackSpec, role: str) -> str:
    """The stack whose stream a layer-spec role (q, k, v, qkv, o, ffn_inputs, ffn_output) reads or
    writes: e.g. cross-attention K and V read the encoder's."""
    overrides = stack.residual.role_streams if stack.residual is not None else {}
    return overrides.get(role) or own_stream(stack)


def residual_plans(bound: BoundArch, checkpoint: Checkpoint, allow_untie: bool = False) -> dict[str, ResidualPlan]:
    """One plan per residual stream of the checkpoint, keyed by its name. A stream is a stack's
    (tensors may sit on another stack's stream: cross-attention K/V read the encoder's); streams
    that share a tensor (an embedding shared by encoder and decoder) can only move together, so
    they form one plan, named by their stacks joined with "+". Refuses (InputError) a tensor that
    the spec does not classify, a stream axis whose size is not the hidden size, and a spec
    without a `residual:` section. `allow_untie`: with tied embeddings, fold anyway (see
    ResidualPlan)."""
    stacks = [s for s in bound.spec.stacks if s.name not in bound.absent]
    where = str(checkpoint.folder)
    classifier = _Classifier(bound, stacks, checkpoint.config, where)
    found = {name: classifier.classify(name) for name in checkpoint.names()}
    present = {s.name for s in stacks}
    for name, items in found.items():
        missing = {stream for item in items for stream in item.streams} - present
        if missing:
            raise InputError(
                f"{checkpoint.folder}: tensor {name!r} sits on the residual stream of stack "
                f"{sorted(missing)[0]!r}, which this checkpoint does not have"
            )
    groups = _coupled(stacks, [item for items in found.values() for item in items])
    plans = {}
    for group in groups:
        key = "+".join(group)
        members = {}
        for name, items in found.items():
            mine = [item for item in items if item.streams and item.streams[0] in group]
            if len(mine) > 1:
                raise InputError(
                    f"{where}: tensor {name!r} sits on the residual streams {key!r} in two roles "
                    f"({', '.join(item.role for item in mine)}), and those streams move by one map"
                )
            if mine:
                members[name] = mine[0]
        plans[key] = _plan(bound, key, [s for s in stacks if s.name in group], checkpoint, members, allow_untie)
    _check_bridges(plans, where)
    return plans


def _check_bridges(plans: dict[str, ResidualPlan], where: str) -> None:
    """A tensor on several independent streams (a projector reading one and writing another) must
    meet each on axes of its own: the maps then act on different axes and commute."""
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, plan in plans.items():
        for name, entry in plan.tensors.items():
            if name in seen and set(seen[name][1]) & set(entry.axes):
                raise InputError(
                    f"{where}: tensor {name!r} sits on the residual streams {seen[name][0]!r} and {key!r} "
                    f"on the same axis ({sorted(set(seen[name][1]) & set(entry.axes))[0]}), which two "
                    "independent maps cannot both move"
                )
            seen.setdefault(name, (key, entry.axes))


def _coupled(stacks: list[StackSpec], found: Any) -> list[list[str]]:
    """The streams in use, grouped where a tensor sits on several (in the spec's stack order)."""
    parent = {s.name: s.name for s in stacks}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    used: set[str] = set()
    for item in found:
        used.update(item.streams)
        for other in item.streams[1:]:
            parent[root(other)] = root(item.streams[0])
    groups: dict[str, list[str]] = {}
    for stack in stacks:
        if stack.name in used:
            groups.setdefault(root(stack.name), []).append(stack.name)
    return list(groups.values())


def _full(bound: BoundArch, name: str) -> str:
    """A model-level name of a residual section: from the root with a leading "/", else after the prefix."""
    return bound.name(name)


def _first(
    rules: tuple[ResidualRule, ...], name: str, config: dict[str, Any], full: Callable[[str], str]
) -> ResidualRule | None:
    for rule in rules:
        globs = (*rule.names, rule.bias) if rule.bias else rule.names
        if any(fnmatch.fnmatchcase(name, full(glob)) for glob in globs) and rule.applies(config):
            return rule
    return None


class _Classifier:
    """Classifies tensor names against the spec: layer tensors by the layer spec's roles, then the
    section's `layer` entries, of every stack whose layer prefix matches (encoder-decoders: the
    decoder and its cross-attention share one); other tensors by the `model` entries of every
    stack present (several may claim one tensor: it then sits on each of their streams)."""

    def __init__(self, bound: BoundArch, stacks: list[StackSpec], config: dict[str, Any], where: str):
        self.bound, self.stacks, self.config, self.where = bound, stacks, config, where
        self.sections = {s.name: _section(bound.spec, s) for s in stacks}
        self.layer_patterns = {stack.name: bound.layer_pattern(stack) for stack in stacks}
        self.derived = {s.name: _derived(s, bound.dims[s.name].num_experts) for s in stacks}

    def classify(self, name: str) -> tuple[_Found, ...]:
        """The tensor's memberships: one per role it plays on the streams (a tensor reading one
        stream and writing another has two), streams that share a role coupled in one."""
        matches = [
            (stack, m) for stack in self.stacks if (m := self.layer_patterns[stack.name].fullmatch(name)) is not None
        ]
        if matches:
            return (self._in_layer(name, matches),)
        claims, free = [], False
        for stack in self.stacks:
            rule = _first(self.sections[stack.name].model, name, self.config, lambda g: _full(self.bound, g))
            if rule is not None and rule.role == "free":
                free = True
            elif rule is not None:
                claims.append(_Found.of(rule, name, (own_stream(stack),), None, lambda g: _full(self.bound, g)))
        if claims:
            roles = dict.fromkeys((claim.role, claim.layout) for claim in claims)
            return tuple(self._merge(name, [c for c in claims if (c.role, c.layout) == role]) for role in roles)
        if free:
            return (_Found((), None, "free"),)
        raise _unclassified(name, self.bound, self.config, self.where)

    def _merge(self, name: str, claims: list[_Found]) -> _Found:
        """One tensor claimed by several stacks in one role: on each of their streams (coupling them)."""
        first = claims[0]
        for other in claims[1:]:
            if replace(other, streams=first.streams) != first:
                raise InputError(
                    f"{self.where}: tensor {name!r} is placed on the residual streams of several "
                    f"stacks in one role but differently (readers, bias, offset) by the {self.bound.spec.name} spec"
                )
        streams = tuple(dict.fromkeys(s for claim in claims for s in claim.streams))
        return replace(first, streams=streams)

    def _in_layer(self, name: str, matches: list[tuple[StackSpec, re.Match[str]]]) -> _Found:
        for stack, match in matches:
            derived = self.derived[stack.name].get(match.group(2))
            if derived is not None:
                role, layout, spec_role = derived
                streams = () if role == "free" else (role_stream(stack, spec_role),)
                return _Found(streams, int(match.group(1)), role, layout)
        for stack, match in matches:
            relative = match.group(2)
            rule = _first(self.sections[stack.name].layer, relative, self.config, lambda glob: glob)
            if rule is not None:
                layer_prefix = name[: len(name) - len(relative)]

                def in_layer(glob: str, prefix: str = layer_prefix) -> str:
                    return prefix + glob

                return _Found.of(rule, name, (own_stream(stack),), int(match.group(1)), in_layer)
        raise _unclassified(name, self.bound, self.config, self.where)


def _section(spec: ArchSpec, stack: StackSpec) -> ResidualSection:
    what = f"{spec.source or spec.name}" + (f" (stack {stack.name})" if stack.name else "")
    if stack.residual is None:
        raise InputError(
            f"{what}: the {spec.name} spec has no residual: section, so rotfuse does not know "
            "which tensors touch the residual stream (see configs/archs/README.md)"
        )
    return stack.residual


def _derived(stack: StackSpec, num_experts: int = 0) -> dict[str, tuple[str, str, str]]:
    """Roles the layer spec implies: relative name -> (role, layout, layer-spec role). The routed
    experts are FFNs like the layer's own, and their router reads the stream (its bias is in expert
    space); they count as the layer's FFN inputs and outputs."""
    att = stack.attention
    ffns = []
    routers = []
    for layout in stack.layouts():  # every per-layer FFN layout's (their names are distinct)
        ffns += [layout.ffn] if layout.ffn else []
        if layout.experts is not None:
            ffns += [layout.experts.expert(e) for e in range(num_experts)]
            routers.append(layout.experts.router)
    roles: dict[str, tuple[str, str, str]] = {}
    inputs: list[tuple[str, Any]] = [("qkv", att.qkv)] if att.qkv else [("q", att.q), ("k", att.k), ("v", att.v)]
    inputs += [("ffn_inputs", ref) for ffn in ffns for ref in ffn.inputs]
    inputs += [("ffn_inputs", ref) for ref in routers]
    for spec_role, ref in inputs:
        assert ref is not None
        roles[ref.weight] = ("reads", ref.layout, spec_role)
        if ref.bias:
            roles[ref.bias] = ("free", ref.layout, spec_role)  # head / neuron / expert space
    for side, names in stack.moves_with_heads.items():
        for name in names:
            roles[name] = ("free", "out_in", side)  # head space
    roles[att.o.weight] = ("writes", att.o.layout, "o")
    for ffn in ffns:
        roles[ffn.output.weight] = ("writes", ffn.output.layout, "ffn_output")
    return roles


def _unclassified(name: str, bound: BoundArch, config: dict[str, Any], where: str) -> InputError:
    architectures = ", ".join(map(str, config.get("architectures") or ())) or "none in config.json"
    return InputError(
        f"{where}: tensor {name!r} is not classified by the residual: section of the {bound.spec.name} spec "
        f"(model class: {architectures}), so rotfuse cannot tell whether it reads or writes the residual "
        "stream; a residual map could leave it in the old basis (classify it in the spec; see "
        "configs/archs/README.md)"
    )


def _plan(
    bound: BoundArch,
    key: str,
    streams: list[StackSpec],
    checkpoint: Checkpoint,
    found: dict[str, _Found],
    allow_untie: bool,
) -> ResidualPlan:
    where = str(checkpoint.folder)
    sizes = {bound.dims[s.name].hidden_size for s in streams}
    norms_types = {_section(bound.spec, s).norm for s in streams}
    if len(sizes) != 1 or len(norms_types) != 1:
        raise InputError(
            f"{where}: the residual streams {key!r} share a tensor but differ in width or norm type "
            f"({sorted(sizes)}, {sorted(norms_types)}), so they cannot move together"
        )
    d, norm = sizes.pop(), norms_types.pop()
    tensors = {
        name: _stream_tensor(name, tuple(checkpoint.entry(name).shape), item, d, key, where)
        for name, item in found.items()
    }
    norms = {name: item for name, item in found.items() if item.role == "norm" and not item.gain_of}
    ties = [tie for s in streams if (tie := _section(bound.spec, s).tie) is not None]
    if norms:
        folding = _folding(bound, ties, norms, tensors, checkpoint, allow_untie)
    else:  # post-LN (BERT and family): the norms act on the stream itself
        folding = _Folding(
            note="the spec names no norm whose gain folds into the weights reading it (post-LN "
            "models normalise the stream itself), so only permutations of the stream are exact"
        )
    if not folding.note and outputs_the_stream(bound, checkpoint.config):
        folding = _Folding(
            note="the model has no head: its outputs are the final norm's, which cannot be folded, "
            "so only permutations are exact"
        )
    names = tuple(s.name for s in streams)
    if folding.note:
        return ResidualPlan(
            key, norm, d, tensors, [], orthogonal=False, untie=False, notes=[folding.note], streams=names
        )
    for name in folding.added:
        tensors[name] = StreamTensor(name, (1,), key, None, "reads")  # a Linear head [vocab, d]
    return ResidualPlan(
        key,
        norm,
        d,
        tensors,
        folding.folds,
        orthogonal=True,
        untie=bool(folding.config_updates),
        added=folding.added,
        config_updates=folding.config_updates,
        streams=names,
    )


def _stream_tensor(name: str, shape: tuple[int, ...], item: _Found, d: int, key: str, where: str) -> StreamTensor:
    if item.layout == "in_out" and item.role in ("reads", "writes") and len(shape) != 2:
        raise InputError(f"{where}: tensor {name!r} of shape {list(shape)} cannot have the in_out layout")
    axes = _axes(item.role, item.layout, len(shape))
    if len(shape) == 0 or max(axes) >= len(shape) or any(shape[a] != d for a in axes):
        raise InputError(
            f"{where}: tensor {name!r} has shape {list(shape)}, but as a residual-stream "
            f"{item.role} tensor it needs size {d} (the hidden size) on axes {list(axes)}"
        )
    return StreamTensor(name, axes, key, item.layer, item.role)


def outputs_the_stream(bound: BoundArch, config: dict[str, Any]) -> bool:
    """A class without a head (BertModel, LlamaModel, ...): its outputs are the residual stream itself."""
    names = config.get("architectures") or []
    return any(fnmatch.fnmatchcase(str(name), glob) for name in names for glob in bound.spec.stream_output_classes)


@dataclass
class _Folding:
    """The folds of a stack's norms, or the reason (`note`) why they cannot be made."""

    folds: list[NormFold] = field(default_factory=list)
    added: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _folding(
    bound: BoundArch,
    ties: list[TieRule],
    norms: dict[str, _Found],
    tensors: dict[str, StreamTensor],
    checkpoint: Checkpoint,
    allow_untie: bool,
) -> _Folding:
    """Whether every norm gain can be folded into its readers, which makes orthogonal maps exact,
    and if so the folds and the untying they need. Readers may be globs (T5's encoder output is
    read by the cross-attention K/V of every decoder layer)."""
    where = str(checkpoint.folder)
    folding = _Folding()
    for tie in ties:
        head = _tied_head(bound, tie, checkpoint.config)
        if head is None:
            continue
        if not allow_untie:
            return _Folding(
                note=f"{tie.config_key} is set: folding the final norm into {head!r} would untie it "
                "from the input embedding, so only permutations are exact (allow untying for any "
                "orthogonal map)"
            )
        folding.config_updates[tie.config_key] = False
        for key, default in tie.pin.items():
            value = config_value(checkpoint.config, key)
            folding.config_updates[key] = default if value is None else value
        if head not in tensors:  # stored once, as the embedding: the head must be added
            embedding = _full(bound, tie.embedding)
            if embedding not in tensors:
                raise InputError(f"{where}: tied embedding {embedding!r} not found")
            folding.added[head] = embedding
    readable = {name for name, t in tensors.items() if t.role == "reads"} | set(folding.added)
    for gain, item in norms.items():
        readers = tuple(dict.fromkeys(name for glob in item.readers for name in _expand(glob, readable, checkpoint)))
        for reader in readers:
            if reader not in readable:
                raise InputError(
                    f"{where}: {reader!r} is listed as a reader of {gain!r} but is not a reads tensor "
                    "of the same stream"
                )
        if not readers:
            return _Folding(
                note=f"{gain!r} feeds no weight of this checkpoint (its output is the stream or the "
                "model's output), so its gain cannot be folded: only permutations are exact"
            )
        bias = item.bias if item.bias in checkpoint else None
        if bias is not None and bool((checkpoint.get(gain).double() + item.offset == 0).any()):
            return _Folding(
                note=f"{gain!r} has zero entries, so its bias cannot ride along as bias / gain: "
                "only permutations are exact"
            )
        folding.folds.append(NormFold(gain, readers, bias, item.offset))
    unfolded = readable - {reader for fold in folding.folds for reader in fold.readers}
    if unfolded:
        raise InputError(
            f"{where}: {sorted(unfolded)[0]!r} reads the residual stream but the spec lists it as the "
            "reader of no norm, so an orthogonal map could not be made exact"
        )
    return folding


def _expand(glob: str, readable: set[str], checkpoint: Checkpoint) -> list[str]:
    """The names a reader entry stands for: itself, or every match of a glob, in checkpoint order."""
    if not any(c in glob for c in "*?["):
        return [glob] if glob in readable or glob in checkpoint else []
    return [n for n in (*checkpoint.names(), *sorted(readable)) if fnmatch.fnmatchcase(n, glob)]


def _tied_head(bound: BoundArch, tie: TieRule | None, config: dict[str, Any]) -> str | None:
    """The full name of the output head tied to the input embedding, if this checkpoint has one."""
    if tie is None:
        return None
    tied = config_value(config, tie.config_key)
    architectures = [str(a) for a in config.get("architectures") or ()]
    has_head = not tie.classes or any(fnmatch.fnmatchcase(a, g) for a in architectures for g in tie.classes)
    return _full(bound, tie.head) if (tie.default if tied is None else bool(tied)) and has_head else None
