"""rotfuse's task-vector and interpolation methods give mergekit's output on the same checkpoints.

mergekit is not a rotfuse dependency: it is found as `mergekit-yaml` through $MERGEKIT_YAML, PATH
or /work/mergekit-venv/bin (scripts/compare_mergekit.py, which these tests drive), and the tests
that run it skip without it -- or fail, where $ROTFUSE_REQUIRE_MERGEKIT is set (CI installs it).
Each builds a tiny LLaMA base and two fine-tunes of it, runs `mergekit-yaml` and `rotfuse merge`
as separate processes with the same settings, and compares every tensor.

DARE draws its masks from another RNG in each tool, so its tests compare what both must share --
the fraction kept, the rescaling, the unbiased mean -- and check rotfuse's own promise that a seed
gives the same bytes whatever the thread count.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from rotfuse.merge.engine import MergeOptions, merge

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "compare_mergekit.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_mergekit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


compare = _load_script()
MERGEKIT = compare.find_mergekit()
REQUIRED = bool(os.environ.get("ROTFUSE_REQUIRE_MERGEKIT"))  # CI sets it: a missing mergekit fails there
needs_mergekit = pytest.mark.skipif(
    MERGEKIT is None and not REQUIRED, reason="mergekit-yaml not found ($MERGEKIT_YAML, PATH, /work/mergekit-venv/bin)"
)
CASES = {case.label: case for case in compare.CASES}


def test_mergekit_found_where_required() -> None:
    """CI installs mergekit beside rotfuse: there the comparisons must run, never skip."""
    assert MERGEKIT is not None or not REQUIRED, "ROTFUSE_REQUIRE_MERGEKIT is set, but mergekit-yaml was not found"


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("vs-mergekit")
    return {name: compare.make_family(root / name, dtype) for name, dtype in compare.DTYPES.items()}


@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize(
    "label",
    [
        "task-arithmetic",
        "ties",
        "ties no-normalize",
        "dare-linear (density 1)",
        "dare-ties (density 1)",
        "slerp t=0.3",
        "model-stock",
        "model-stock filter-wise",
    ],
)
def test_float32_checkpoints_equal_mergekits(families: dict, tmp_path: Path, label: str) -> None:
    """float32 checkpoints: mergekit computes in float32, rotfuse in float64 -- within 1e-6 relative."""
    case, folders = CASES[label], families["fp32"]
    ours = compare.run_rotfuse(case, folders, tmp_path / "ours")
    theirs = compare.run_mergekit(MERGEKIT, case, folders, tmp_path / "theirs")
    difference = compare.compare(ours, theirs)
    assert difference.dtype == "float32" and difference.tensors == 21
    assert difference.max_rel < 1e-6, difference


@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize("label", ["task-arithmetic", "ties", "slerp t=0.3", "model-stock"])
def test_bfloat16_checkpoints_equal_mergekits_within_one_rounding(families: dict, tmp_path: Path, label: str) -> None:
    """bfloat16 checkpoints, mergekit computing in float32 (`dtype: float32`) as rotfuse does:
    at most one bfloat16 step apart (the last rounding of two float32 results)."""
    case, folders = CASES[label], families["bf16"]
    ours = compare.run_rotfuse(case, folders, tmp_path / "ours")
    theirs = compare.run_mergekit(MERGEKIT, case, folders, tmp_path / "theirs", "float32", "bfloat16")
    difference = compare.compare(ours, theirs)
    assert difference.dtype == "bfloat16"
    assert difference.max_ulps <= 1.0, difference


def _task_vectors(folder: Path, base: Path) -> dict[str, torch.Tensor]:
    merged, origin = compare.load(folder), compare.load(base)
    return {name: merged[name].double() - origin[name].double() for name in origin}


@needs_mergekit
@pytest.mark.slow
def test_dare_drop_statistics_match_mergekits(families: dict, tmp_path: Path) -> None:
    """Fine-tunes weighted 1 and 0 (one task vector), density 0.3: both tools keep about 30 % of each task vector,
    rescale what they keep (rotfuse by exactly 1/density, mergekit by the L1 ratio, 1/density in
    expectation) and leave the task vector's mean unbiased."""
    folders = families["fp32"]
    density = 0.3
    case = compare.Case(
        "dare-linear",
        ("--method", "dare-linear", "--density", str(density), "--seed", "11"),
        "dare_linear",
        {},
        {"density": density},
        "base",
        weights=(1.0, 0.0),
    )
    ours = compare.run_rotfuse(case, folders, tmp_path / "ours")
    theirs = compare.run_mergekit(MERGEKIT, case, folders, tmp_path / "theirs")
    original = _task_vectors(folders["ft1"], folders["base"])
    for label, folder in (("rotfuse", ours), ("mergekit", theirs)):
        vectors = _task_vectors(folder, folders["base"])
        merged = compare.load(folder)
        kept = sum(int((vectors[n] != 0).sum()) for n in vectors)
        total = sum(v.numel() for v in vectors.values())
        sigma = math.sqrt(density * (1 - density) / total)
        assert abs(kept / total - density) < 5 * sigma, (label, kept / total)
        for name, vector in vectors.items():
            mask = vector != 0
            if vector.numel() < 400:
                continue  # too few entries for a statistical statement about one tensor
            kept, source = vector[mask], original[name][mask]
            factor = float((kept * source).sum() / (source * source).sum())  # one scale per tensor
            rounding = 4 * torch.finfo(torch.float32).eps * float(merged[name].abs().max())
            assert float((kept - factor * source).abs().max()) <= rounding, (name, label)
            if label == "rotfuse":
                assert abs(factor * density - 1) < 1e-6, (name, factor)
            else:  # mergekit's L1 ratio: 1/density in expectation, drawn from its unseeded RNG
                # relative spread of the kept L1 mass: sqrt((1 - d) / (d n)) times |x|'s coefficient
                # of variation (~1.3 for Gaussian entries); six of those is never hit by chance
                tolerance = 6 * 1.3 * math.sqrt((1 - density) / (density * vector.numel()))
                assert abs(factor * density - 1) < tolerance, (name, factor)
            spread = float(original[name].std()) * math.sqrt((1 - density) / (density * vector.numel()))
            assert abs(float(vector.mean()) - float(original[name].mean())) < 6 * spread, (name, label)


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
def test_dare_same_seed_same_bytes_whatever_the_thread_count(families: dict, tmp_path: Path, method: str) -> None:
    folders = families["bf16"]
    options = MergeOptions(
        method=method, base=folders["base"], settings={"density": 0.4, "seed": 123}, device="cpu", fsync=False
    )
    threads = torch.get_num_threads()
    merge([folders["ft1"], folders["ft2"]], tmp_path / "default", options)
    try:
        torch.set_num_threads(1)
        merge([folders["ft1"], folders["ft2"]], tmp_path / "one_thread", options)
    finally:
        torch.set_num_threads(threads)
    merge([folders["ft1"], folders["ft2"]], tmp_path / "again", options)
    other = MergeOptions(
        method=method, base=folders["base"], settings={"density": 0.4, "seed": 124}, device="cpu", fsync=False
    )
    merge([folders["ft1"], folders["ft2"]], tmp_path / "other_seed", other)
    data = {
        name: (tmp_path / name / "model.safetensors").read_bytes()
        for name in ("default", "one_thread", "again", "other_seed")
    }
    assert data["default"] == data["one_thread"] == data["again"]
    assert data["default"] != data["other_seed"]
