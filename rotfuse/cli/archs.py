"""`rotfuse archs`: which architectures are supported and which symmetries each gets."""

from __future__ import annotations

from typing import Annotated

import typer

from rotfuse.cli.common import Debug, JsonOut, Quiet, Ui, run_command


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

        if spec_dir:
            typer.echo(str(builtin_spec_dir()))
            return {"spec_dir": str(builtin_spec_dir())}
        rows = []
        for spec in builtin_specs().values():
            rows.append({
                "name": spec.name,
                "model_types": list(spec.model_types),
                "description": spec.description,
                "symmetries": describe_symmetries(spec),
                "restrictions": [f"when {r.when}: {', '.join(sorted(r.disable))} off" for r in spec.restrictions],
                "spec": spec.source,
            })
        if not json_out and not quiet:
            from rich.table import Table

            table = Table(title="rotfuse architectures")
            for column in ("name", "model_type", "symmetries", "restricted when"):
                table.add_column(column)
            for row in rows:
                table.add_row(row["name"], ", ".join(row["model_types"]), row["symmetries"],
                              "\n".join(row["restrictions"]) or "-")
            from rich.console import Console

            Console().print(table)  # the listing is this command's result: stdout
        return {"architectures": rows}

    ui.emit(run_command(body, debug))


def describe_symmetries(spec) -> str:  # noqa: ANN001 - ArchSpec
    parts = ["FFN permutation"]
    stack = spec.stacks[0]
    parts.append("QK rotation (RoPE-commuting)" if stack.rope else "QK rotation")
    parts += ["VO rotation", "QK/VO rescaling"]
    if stack.dims.num_kv_heads:
        parts.append("GQA-aware")
    return ", ".join(parts)
