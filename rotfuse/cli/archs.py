"""`rotfuse archs`: which architectures are supported and which symmetries each gets.

Everything printed here is read off the specs (configs/archs/*.yaml), so a new spec shows up with
an accurate description without touching this file.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rotfuse.cli.common import Debug, JsonOut, Quiet, Ui, imports_done, run_command

if TYPE_CHECKING:
    from rotfuse.archs.spec import ArchSpec, Restriction, StackSpec


def archs_command(
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
    spec_dir: Annotated[
        bool, typer.Option("--spec-dir", help="Print the folder holding the built-in specs and exit.")
    ] = False,
) -> None:
    """List the supported architectures (one YAML spec each) and the symmetries they get."""
    ui = Ui(quiet, json_out)

    def body() -> dict:
        from rotfuse.archs.spec import builtin_spec_dir, builtin_specs

        imports_done()

        if spec_dir:
            if not json_out:
                typer.echo(str(builtin_spec_dir()))
            return {"spec_dir": str(builtin_spec_dir())}
        rows = [describe_spec(spec) for spec in builtin_specs().values()]
        if not json_out and not quiet:
            _print_table(rows)
        return {"architectures": rows}

    ui.emit(run_command(body, debug))


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rotfuse architectures", show_lines=True)
    for column in ("name", "model_type", "symmetries", "restricted when"):
        table.add_column(column)
    for row in rows:
        restrictions = [f"{r['when_text']}: {', '.join(r['disable'])} off" for r in row["restrictions"]]
        table.add_row(row["name"], ", ".join(row["model_types"]), row["summary"], "\n".join(restrictions) or "-")
    Console().print(table)  # the listing is this command's result: stdout


def describe_spec(spec: ArchSpec) -> dict[str, Any]:
    """One architecture as plain data: its stacks' symmetry groups and its restrictions."""
    stacks = []
    for stack in spec.stacks:
        features = stack_features(stack, always_disabled(spec, stack.name))
        stacks.append(
            {
                "name": stack.name,
                "layer": stack.layer,
                "optional": stack.optional,
                "summary": ", ".join(short for short, _ in features),
                "symmetries": [long for _, long in features],
            }
        )
    return {
        "name": spec.name,
        "model_types": list(spec.model_types),
        "description": spec.description,
        "summary": _merge(stacks, "summary"),
        "symmetries": _merge(stacks, "symmetries"),
        "stacks": stacks,
        "restrictions": [describe_restriction(r) for r in spec.restrictions],
        "renames": [dict(layout.renames) for layout in spec.layouts[1:]],
        "spec": spec.source,
    }


def _merge(stacks: list[dict[str, Any]], key: str) -> Any:
    """A field over all stacks; prefixed by the stack name only where the stacks differ."""
    if all(s[key] == stacks[0][key] for s in stacks):
        return stacks[0][key]
    if isinstance(stacks[0][key], str):
        return "; ".join(f"{s['name']}: {s[key]}" for s in stacks)
    return [f"{s['name']}: {line}" for s in stacks for line in s[key]]


def always_disabled(spec: ArchSpec, stack: str) -> frozenset[str]:
    """Symmetries one stack never gets, whatever the config: restrictions without `when` (T5's
    self-attention heads), and those that fire for every model_type of the spec (Qwen3's QK maps)."""
    off: set[str] = set()
    for restriction in spec.restrictions:
        if restriction.stacks and stack not in restriction.stacks:
            continue
        if not restriction.when or set(spec.model_types) <= set(restriction.when.get("model_type", ())):
            off |= restriction.disable
    return frozenset(off)


def stack_features(stack: StackSpec, always: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The symmetry group one stack gets, as (short, long) phrases derived from its spec (`always`:
    symmetries that a restriction switches off for every config)."""
    att = stack.attention
    qk = _qk_feature(stack) if "qk.rot" not in always else ("no QK rot", "no QK rotation (see restrictions)")
    scale = [role for role in ("qk", "vo") if f"{role}.scale" not in always]
    features = [
        *(_ffn_feature(stack) if "ffn.perm" not in always else []),
        *([("heads perm", "whole-head (KV-group) permutation")] if "heads.perm" not in always else []),
        qk,
        *([("VO rot", "VO rotation (full Procrustes per head)")] if "vo.rot" not in always else []),
    ]
    if scale:
        names = "/".join(role.upper() for role in scale)
        features.append((f"{names} scale", f"{' and '.join(role.upper() for role in scale)} rescaling per head"))
    linear = [role.upper() for role in ("qk", "vo") if f"{role}.linear" not in always]
    if linear:
        rope = " (QK: a scaled rotation per RoPE pair)" if stack.rope is not None and "QK" in linear else ""
        features.append(
            (
                f"{'/'.join(linear)} linear (opt-in)",
                f"{' and '.join(linear)} general invertible map per head{rope}, opt-in (-s default,linear)",
            )
        )
    if stack.residual and stack.residual.stream:  # a stack on other stacks' streams (cross-attention)
        others = sorted({stack.residual.stream, *stack.residual.role_streams.values()})
        features.append(
            (
                f"residual: moves with {'/'.join(others)}",
                f"residual stream: its tensors sit on the streams of {', '.join(others)} and move with them",
            )
        )
    elif stack.residual:
        norm = stack.residual.norm
        norms = [rule for rule in (*stack.residual.model, *stack.residual.layer) if rule.role == "norm"]
        folds = bool(norms) and all(rule.readers or rule.when or rule.classes for rule in norms)
        features.append(
            ("residual: permutation", "residual stream: one permutation (the norms act on the stream)")
            if not norms
            else (
                "residual: permutation (norms write the stream)",
                "residual stream: one permutation (a norm's output is added to the stream, so its gain cannot fold)",
            )
            if not folds
            else (
                "residual: orthogonal (RMSNorm, gains folded)",
                "residual stream: any orthogonal map, "
                "after folding RMSNorm gains into their readers (a permutation with tied embeddings)",
            )
            if norm == "rmsnorm"
            else (
                "residual: orthogonal (pre-LN, norms folded)",
                "residual stream: "
                "orthogonal maps with Q 1 = 1, after folding LayerNorm gains into their readers "
                "(a permutation with tied embeddings, a head-less class or a norm on the stream)",
            )
        )
    if stack.dims.num_kv_heads:
        features.append(("GQA", "GQA: one QK and one VO transform per KV head, shared by its query heads"))
    if att.qkv is not None:
        order = "|".join(att.qkv.order).upper()
        per_head = " per head" if att.qkv.per_head else ""
        features.append((f"fused {order}{per_head}", f"fused {order}{per_head} split and re-fused"))
    refs = (att.qkv or att.q, att.o, *((stack.ffn.output,) if stack.ffn else ()))
    if any(ref is not None and ref.layout == "in_out" for ref in refs):
        features.append(("Conv1D", "Conv1D weights stored [in, out]"))
    return features


def _module(ref: Any) -> str:
    """ "attention.self.pos_key_proj.weight" -> "pos_key_proj"."""
    return ref.weight.rsplit(".", 2)[-2] if ref.weight.count(".") else ref.weight


def _ffn_feature(stack: StackSpec) -> list[tuple[str, str]]:
    """The stack's own FFN layout's permutations, then those of its per-layer alternatives."""
    return [*_own_ffn_feature(stack), *_layout_features(stack)]


def _own_ffn_feature(stack: StackSpec) -> list[tuple[str, str]]:
    features = []
    if stack.experts is not None:
        names = "+".join(_module(ref) for ref in stack.experts.ffn.inputs)
        features = [
            ("experts perm (with router rows)", "MoE: whole routed experts permute with the router's rows"),
            (f"FFN perm per expert ({names})", f"each routed expert's own neuron permutation ({names} share one)"),
        ]
    if stack.ffn is None:
        return features  # an attention-only stack, or routed experts only
    if stack.experts is not None:
        names = "+".join(_module(ref) for ref in stack.ffn.inputs)
        return [*features, (f"FFN perm shared expert ({names})", f"the shared expert's neuron permutation ({names})")]
    inputs = stack.ffn.inputs
    if len(inputs) == 1 and inputs[0].parts == 1:
        return [("FFN perm", "FFN neuron permutation")]
    names = "+".join(
        _module(ref) + (f" (fused x{ref.parts})" if ref.parts > 1 else "") + ("?" if ref.optional else "")
        for ref in inputs
    )
    optional = "; ? = where present" if any(ref.optional for ref in inputs) else ""
    return [(f"FFN perm ({names})", f"FFN neuron permutation ({names} share one{optional})")]


def _layout_features(stack: StackSpec) -> list[tuple[str, str]]:
    """The alternative per-layer FFN layouts (ffn_layouts), each with the FFN permutation it gets."""
    features = []
    for layout in stack.ffn_layouts:
        parts = []
        if layout.ffn is not None:
            parts.append("FFN perm (" + "+".join(_module(ref) for ref in layout.ffn.inputs) + ")")
        if layout.experts is not None:
            parts.append("experts perm, FFN perm per expert")
        features.append(
            (
                f"{layout.name} layers: {', '.join(parts)}",
                f"layers holding the {layout.name!r} FFN layout's tensors: {', '.join(parts)}",
            )
        )
    return features


def _qk_feature(stack: StackSpec) -> tuple[str, str]:
    rope = stack.rope
    short, long = "QK rot", "QK rotation (full Procrustes per head)"
    if rope is not None:
        partial = bool(rope.partial_factor_key) or rope.partial_factor_default < 1.0
        short = "QK rot (RoPE-commuting" + (", partial rotary)" if partial else ")")
        long = f"QK rotation (RoPE-commuting: one 2-D rotation per {rope.style} frequency pair" + (
            ", full Procrustes past the partial rotary dims)" if partial else ")"
        )
    extras = [_module(ref) for ref in (*stack.attention.q_like, *stack.attention.k_like)]
    if extras:
        short += f" + {', '.join(extras)}"
        long += f"; also applied to {', '.join(extras)} when present"
    return short, long


def describe_restriction(restriction: Restriction) -> dict[str, Any]:
    when = {key: list(values) for key, values in restriction.when.items()}
    text = " or ".join(f"{key} = {' | '.join(_value(v) for v in values)}" for key, values in when.items()) or "always"
    if restriction.stacks:
        text += f" (in {', '.join(restriction.stacks)})"
    return {
        "when": when,
        "when_text": text,
        "disable": sorted(restriction.disable),
        "reason": restriction.reason,
        "stacks": list(restriction.stacks),
    }


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
