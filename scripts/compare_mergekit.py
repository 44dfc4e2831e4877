#!/usr/bin/env python
"""rotfuse's task-vector and interpolation methods against mergekit's, on one tiny LLaMA family.

    python scripts/compare_mergekit.py                 # float32 and bfloat16 checkpoints
    python scripts/compare_mergekit.py --dtypes fp32 --json

Builds a base (a tiny random LlamaForCausalLM) and two fine-tunes of it, `base + shared + own_i`
(small Gaussian noise, a shared part so that the task vectors are at an angle < 90 degrees), runs
`mergekit-yaml` (CPU) and `rotfuse merge` on the same inputs with the same settings, and prints
the largest difference per method over every tensor: absolute, and relative to the largest
magnitude of the tensor it occurs in. For bfloat16 checkpoints mergekit runs twice: as it does by
default (arithmetic in bfloat16) and with `dtype: float32` (arithmetic in float32, one rounding at
the end, as rotfuse); the last column is the largest difference in steps of bfloat16 at the
entry's magnitude, or at the tensor's RMS for smaller entries (1: one rounding apart).

DARE draws its masks from another RNG in each tool, so dare-* are compared at density 1 (no
drop): that checks their combination rules (linear; sign election without `normalize`). The drop
itself is checked by statistics in tests/merge/methods/test_mergekit_conformance.py.

mergekit-yaml is found through $MERGEKIT_YAML, then PATH, then $MERGEKIT_VENV/bin (default
/work/mergekit-venv/bin); it is never a rotfuse dependency (install it in its own environment).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FALLBACK = Path(os.environ.get("MERGEKIT_VENV", "/work/mergekit-venv")) / "bin" / "mergekit-yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = (0.7, 0.5)


@dataclass(frozen=True)
class Case:
    """One method with its settings, in both tools' words."""

    label: str
    rotfuse: tuple[str, ...]  # `rotfuse merge` arguments after the models
    mergekit: str  # merge_method
    parameters: dict  # mergekit's global parameters
    model_parameters: dict | None  # mergekit's per-model parameters besides the weight; None: no weights
    base: str  # "base", or "ft1" (slerp's base_model is its t = 0 end)
    weights: tuple[float, float] = WEIGHTS  # per model, when the method takes weights

    def rotfuse_args(self) -> tuple[str, ...]:
        weights = ("--weights", ",".join(map(str, self.weights))) if self.model_parameters is not None else ()
        return (*self.rotfuse, *weights)


CASES = (
    Case(
        "task-arithmetic",
        ("--method", "task-arithmetic", "--scale", "0.8"),
        "task_arithmetic",
        {"lambda": 0.8},
        {},
        "base",
    ),
    Case("ties", ("--method", "ties", "--density", "0.5"), "ties", {}, {"density": 0.5}, "base"),
    Case(
        "ties no-normalize",
        ("--method", "ties", "--density", "0.3", "--no-normalize", "--scale", "0.9"),
        "ties",
        {"normalize": False, "lambda": 0.9},
        {"density": 0.3},
        "base",
    ),
    Case(
        "dare-linear (density 1)",
        ("--method", "dare-linear", "--density", "1"),
        "dare_linear",
        {},
        {"density": 1.0},
        "base",
    ),
    Case(
        "dare-ties (density 1)", ("--method", "dare-ties", "--density", "1"), "dare_ties", {}, {"density": 1.0}, "base"
    ),
    Case("slerp t=0.3", ("--method", "slerp", "--t", "0.3"), "slerp", {"t": 0.3}, None, "ft1"),
    Case("model-stock", ("--method", "model-stock"), "model_stock", {}, None, "base"),
    Case(
        "model-stock filter-wise",
        ("--method", "model-stock", "--filter-wise"),
        "model_stock",
        {"filter_wise": True},
        None,
        "base",
    ),
)


def find_mergekit() -> str | None:
    """mergekit-yaml: $MERGEKIT_YAML, PATH, or the conventional separate venv."""
    for candidate in (os.environ.get("MERGEKIT_YAML"), shutil.which("mergekit-yaml"), str(FALLBACK)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def make_family(root: Path, dtype: torch.dtype, shared: float = 0.02, own: float = 0.02) -> dict[str, Path]:
    """base/, ft1/, ft2/: a tiny LLaMA and two fine-tunes of it (noise added in float32, then cast)."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers.tiny_models import save_tiny

    folders = {name: root / name for name in ("base", "ft1", "ft2")}
    if all((folder / "model.safetensors").is_file() for folder in folders.values()):
        return folders  # made by an earlier run into the same --workdir (deterministic)
    shutil.rmtree(root, ignore_errors=True)
    base = save_tiny("llama", root / "base", seed=0, dtype=dtype)
    weights = load_file(str(base / "model.safetensors"))
    folders = {"base": base}
    generator = torch.Generator().manual_seed(1234)
    common = {name: torch.randn(t.shape, generator=generator) * shared for name, t in weights.items()}
    for index in (1, 2):
        folder = root / f"ft{index}"
        shutil.copytree(base, folder)
        tuned = {
            name: (t.float() + common[name] + torch.randn(t.shape, generator=generator) * own).to(t.dtype)
            for name, t in weights.items()
        }
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[f"ft{index}"] = folder
    return folders


def mergekit_config(case: Case, folders: dict[str, Path], dtype: str | None, out_dtype: str | None) -> str:
    lines = [f"merge_method: {case.mergekit}", f"base_model: {folders[case.base]}", "models:"]
    for index, name in enumerate(("ft1", "ft2")):
        lines.append(f"  - model: {folders[name]}")
        if case.model_parameters is not None:
            parameters = {"weight": case.weights[index], **case.model_parameters}
            lines.append(f"    parameters: {json.dumps(parameters)}")
    if case.parameters:
        lines.append(f"parameters: {json.dumps(case.parameters)}")
    if dtype:
        lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


def run_mergekit(
    mergekit: str,
    case: Case,
    folders: dict[str, Path],
    out: Path,
    dtype: str | None = None,
    out_dtype: str | None = None,
) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    config = out.with_suffix(".yaml")
    config.write_text(mergekit_config(case, folders, dtype, out_dtype), encoding="utf-8")
    result = subprocess.run(
        [mergekit, str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed on {case.label}:\n{result.stderr[-3000:]}")
    return out


def run_rotfuse(case: Case, folders: dict[str, Path], out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    base = ("--base", str(folders["base"])) if case.base == "base" else ()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rotfuse",
            "merge",
            str(folders["ft1"]),
            str(folders["ft2"]),
            *case.rotfuse_args(),
            *base,
            "-o",
            str(out),
            "-q",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rotfuse merge failed on {case.label}:\n{result.stderr[-3000:]}")
    return out


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@dataclass
class Difference:
    max_abs: float
    max_rel: float  # |ours - theirs| / max |theirs| of the same tensor
    max_ulps: float | None  # 16-bit checkpoints: largest |ours - theirs| in steps of the dtype at
    # max(|theirs|, the tensor's RMS)
    tensors: int
    dtype: str


def compare(ours: Path, theirs: Path) -> Difference:
    mine, reference = load(ours), load(theirs)
    if set(mine) != set(reference):
        raise AssertionError(f"tensor names differ: {sorted(set(mine) ^ set(reference))}")
    worst_abs = worst_rel = worst_ulps = 0.0
    dtype = ""
    for name, expected in reference.items():
        got = mine[name]
        if got.dtype != expected.dtype or got.shape != expected.shape:
            raise AssertionError(
                f"{name}: {got.dtype} {list(got.shape)} vs mergekit's {expected.dtype} {list(expected.shape)}"
            )
        dtype = str(expected.dtype).removeprefix("torch.")
        difference = (got.double() - expected.double()).abs()
        scale = float(expected.double().abs().max()) or 1.0
        worst_abs = max(worst_abs, float(difference.max()))
        worst_rel = max(worst_rel, float(difference.max()) / scale)
        info = torch.finfo(expected.dtype)
        # one step at |x| is eps * 2^floor(log2 |x|); entries below the tensor's RMS (cancellations,
        # where 16-bit arithmetic loses most) are measured in steps at the RMS
        rms = float(expected.double().square().mean().sqrt())
        magnitude = expected.double().abs().clamp_min(max(rms, info.tiny))
        step = info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))
        worst_ulps = max(worst_ulps, float((difference / step).max()))
    half = dtype in ("bfloat16", "float16")
    return Difference(worst_abs, worst_rel, round(worst_ulps, 2) if half else None, len(reference), dtype)


def run_all(root: Path, dtypes: list[str], mergekit: str, cases: tuple[Case, ...] = CASES) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        folders = make_family(root / dtype_name, DTYPES[dtype_name])
        runs = [("default", None, None)]
        if dtype_name == "bf16":
            runs.append(("dtype float32", "float32", "bfloat16"))
        for case in cases:
            slug = case.label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
            ours = run_rotfuse(case, folders, root / f"{dtype_name}-{slug}-rotfuse")
            for label, dtype, out_dtype in runs:
                target = root / f"{dtype_name}-{slug}-mk-{label.replace(' ', '_')}"
                theirs = run_mergekit(mergekit, case, folders, target, dtype, out_dtype)
                rows.append(
                    {
                        "checkpoints": dtype_name,
                        "method": case.label,
                        "mergekit": label,
                        **asdict(compare(ours, theirs)),
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| checkpoints | method | mergekit run | max abs diff | max rel diff | max diff in bf16 steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['checkpoints']} | {row['method']} | {row['mergekit']} | {row['max_abs']:.3g} | "
            f"{row['max_rel']:.3g} | {'-' if row['max_ulps'] is None else row['max_ulps']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16", help="checkpoint dtypes: fp32, bf16")
    parser.add_argument("--methods", help="only the cases whose label starts with one of these (comma-separated)")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of a Markdown table")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    args = parser.parse_args()
    mergekit = find_mergekit()
    if mergekit is None:
        parser.exit(
            2, "compare_mergekit.py: mergekit-yaml not found (set MERGEKIT_YAML, or install mergekit in its own venv)\n"
        )
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes: use {', '.join(DTYPES)}")
    with tempfile.TemporaryDirectory(prefix="rotfuse-vs-mergekit-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        chosen = CASES
        if args.methods:
            prefixes = tuple(m.strip() for m in args.methods.split(",") if m.strip())
            chosen = tuple(case for case in CASES if case.label.startswith(prefixes))
        rows = run_all(root, dtypes, mergekit, chosen)
    print(json.dumps({"rows": rows}, indent=2) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
