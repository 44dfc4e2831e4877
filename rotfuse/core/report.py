"""Reports: the JSON every command writes (atomically, with the schema version) and the rich tables
people read on stderr.

The match report (schema SCHEMA_VERSION), every distance a Frobenius norm ||model - anchor||:
  tool, version, schema, command, created_by (argv), anchor/model/output {path, fingerprint},
  arch, symmetries, device, settings, restrictions (notes), layers: [{layer, modules: {attn.qk,
  attn.vo, ffn: {before, after, reduction, applied, rounds, reverted}}}], totals {matched, model:
  {before, after, reduction, tensors}}, timings {read, solve, write, copy, total} in seconds.
The merge report: tool, version, schema, command, method, models [{path, fingerprint, weight,
  stats, alignment}], base, output, device, settings (the method's own included), tensors
  {count, rules}, ignored_tensors, not_copied, timings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Distance:
    before: float = 0.0  # accumulated as squared norms, reported as norms
    after: float = 0.0
    tensors: int = 0

    def add(self, before_sq: float, after_sq: float, tensors: int = 1) -> None:
        self.before += before_sq
        self.after += after_sq
        self.tensors += tensors

    def as_dict(self) -> dict[str, Any]:
        before, after = math.sqrt(self.before), math.sqrt(self.after)
        return {
            "before": before,
            "after": after,
            "reduction": 0.0 if before == 0 else 1.0 - after / before,
            "tensors": self.tensors,
        }


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: strict JSON has no NaN or
    Infinity, and a reader that meets them (jq, JavaScript, most parsers) fails or guesses."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dumps_strict(data: Any) -> str:
    """Every JSON rotfuse writes (stdout, reports, manifests): strict, non-finite values as null."""
    return json.dumps(finite_json(data), indent=2, allow_nan=False)


def render_match_table(report: dict[str, Any], console: Any) -> None:
    """Per-layer before/after distances as a rich table (stderr)."""
    from rich.table import Table

    model = report.get("model", {}).get("path", "?")
    table = Table(
        title=f"rotfuse match: {model} -> {report.get('output', {}).get('path', '?')}: {report['arch']} "
        f"({', '.join(report['symmetries']) or 'no symmetries'})"
    )
    table.add_column("layer", justify="right")
    modules: tuple[str, ...] = ("attn.qk", "attn.vo", "ffn")
    if any("moe.experts" in row["modules"] for row in report["layers"]):
        modules += ("moe.experts",)
    for module in modules:
        table.add_column(f"{module} before", justify="right")
        table.add_column(f"{module} after", justify="right")
    for row in report["layers"]:
        cells = [str(row["layer"])]
        for module in modules:
            entry = row["modules"].get(module)
            if entry is None:
                cells += ["", ""]
                continue
            cells += [f"{entry['before']:.4g}", f"{entry['after']:.4g} ({100 * entry['reduction']:.1f}%)"]
        table.add_row(*cells)
    console.print(table)
    totals = report["totals"]
    for key in ("matched", "model"):
        t = totals[key]
        console.print(
            f"{key:>8} parameters: distance {t['before']:.6g} -> {t['after']:.6g} "
            f"({100 * t['reduction']:.2f}% lower, {t['tensors']} tensors)"
        )
    for note in report.get("restrictions", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(
        f"timings of {model}: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in report["timings"].items())
    )


def render_plan(plan: dict[str, Any], console: Any) -> None:
    """A --dry-run plan, one fact per line (stderr)."""
    console.print(f"[bold]dry run[/bold]: rotfuse {plan['command']} would write {plan['output']}")
    for key, value in plan.items():
        if key in ("tool", "command", "dry_run", "output"):
            continue
        console.print(f"  {key}: {value}")
