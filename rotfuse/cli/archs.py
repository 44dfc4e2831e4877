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
    spec_dir: Annotated[bool, typer.Option("--spec-dir", help="Print the folder holding the built-in specs and exit.")] = False,
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
        always_off = {name for r in spec.restrictions if not r.when and (not r.stacks or stack.name in r.stacks)
                      for name in r.disable}
        features = [f for f in stack_features(stack) if not _FEATURE_SYMMETRIES.get(f[0].split(" (")[0], set())
                    or not _FEATURE_SYMMETRIES[f[0].split(" (")[0]] <= always_off]
        stacks.append({"name": stack.name, "layer": stack.layer, "optional": stack.optional,
                       "summary": ", ".join(short for short, _ in features),
                       "symmetries": [long for _, long in features]})
    return {
        "name": spec.name,
        "model_types": list(spec.model_types),
        "description": spec.description,
        "summary": _merge(stacks, "summary"),
        "symmetries": _merge(stacks, "symmetries"),
        "stacks": stacks,
        "restrictions": [describe_restriction(r) for r in spec.restrictions],
        "spec": spec.source,
    }


# a feature's short phrase (up to " (") -> the symmetries it stands for: a restriction without
# `when` switches them off for good, so the stack does not list them
_FEATURE_SYMMETRIES = {"FFN perm": {"ffn.perm"}, "experts perm": {"experts.perm"}, "heads perm": {"heads.perm"},
                       "QK rot": {"qk.rot"},
                       "VO rot": {"vo.rot"}, "QK/VO scale": {"qk.scale", "vo.scale"}}


def _merge(stacks: list[dict[str, Any]], key: str) -> Any:
    """A field over all stacks; prefixed by the stack name only where the stacks differ."""
    if all(s[key] == stacks[0][key] for s in stacks):
        return stacks[0][key]
    if isinstance(stacks[0][key], str):
        return "; ".join(f"{s['name']}: {s[key]}" for s in stacks)
    return [f"{s['name']}: {line}" for s in stacks for line in s[key]]


def stack_features(stack: StackSpec) -> list[tuple[str, str]]:
    """The symmetry group one stack gets, as (short, long) phrases derived from its spec."""
    att = stack.attention
    features = [*_ffn_feature(stack), ("heads perm", "whole-head (KV-group) permutation"), _qk_feature(stack),
                ("VO rot", "VO rotation (full Procrustes per head)"),
                ("QK/VO scale", "QK and VO rescaling per head")]
    if stack.residual:
        norm = stack.residual.norm
        folds = any(rule.role == "norm" for rule in (*stack.residual.model, *stack.residual.layer))
        features.append(("residual: permutation", "residual stream: one permutation (the norms act on the stream)")
                        if not folds else
                        ("residual: orthogonal (RMSNorm, gains folded)", "residual stream: any orthogonal map, "
                         "after folding RMSNorm gains into their readers (a permutation with tied embeddings)")
                        if norm == "rmsnorm" else
                        ("residual: orthogonal (pre-LN, norms folded)", "residual stream: "
                         "orthogonal maps with Q 1 = 1, after folding LayerNorm gains into their readers "
                         "(a permutation with tied embeddings, a head-less class or a norm on the stream)"))
    if stack.dims.num_kv_heads:
        features.append(("GQA", "GQA: one QK and one VO transform per KV head, shared by its query heads"))
    if att.qkv is not None:
        order = "|".join(att.qkv.order).upper()
        features.append((f"fused {order}", f"fused {order} split and re-fused"))
    refs = (att.qkv or att.q, att.o, *((stack.ffn.output,) if stack.ffn else ()))
    if any(ref.layout == "in_out" for ref in refs):
        features.append(("Conv1D", "Conv1D weights stored [in, out]"))
    return features


def _module(ref: Any) -> str:
    """"attention.self.pos_key_proj.weight" -> "pos_key_proj"."""
    return ref.weight.rsplit(".", 2)[-2] if ref.weight.count(".") else ref.weight


def _ffn_feature(stack: StackSpec) -> list[tuple[str, str]]:
    features = []
    if stack.experts is not None:
        names = "+".join(_module(ref) for ref in stack.experts.ffn.inputs)
        features = [("experts perm (with router rows)", "MoE: whole routed experts permute with the router's rows"),
                    (f"FFN perm per expert ({names})",
                     f"each routed expert's own neuron permutation ({names} share one)")]
    if stack.ffn is None:
        return features  # an attention-only stack, or routed experts only
    if stack.experts is not None:
        names = "+".join(_module(ref) for ref in stack.ffn.inputs)
        return [*features, (f"FFN perm shared expert ({names})", f"the shared expert's neuron permutation ({names})")]
    inputs = stack.ffn.inputs
    if len(inputs) == 1:
        return [("FFN perm", "FFN neuron permutation")]
    names = "+".join(_module(ref) + ("?" if ref.optional else "") for ref in inputs)
    return [(f"FFN perm ({names})", f"FFN neuron permutation ({names} share one; ? = where present)")]


def _qk_feature(stack: StackSpec) -> tuple[str, str]:
    rope = stack.rope
    short, long = "QK rot", "QK rotation (full Procrustes per head)"
    if rope is not None:
        partial = bool(rope.partial_factor_key) or rope.partial_factor_default < 1.0
        short = "QK rot (RoPE-commuting" + (", partial rotary)" if partial else ")")
        long = (f"QK rotation (RoPE-commuting: one 2-D rotation per {rope.style} frequency pair"
                + (", full Procrustes past the partial rotary dims)" if partial else ")"))
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
    return {"when": when, "when_text": text, "disable": sorted(restriction.disable), "reason": restriction.reason,
            "stacks": list(restriction.stacks)}


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
