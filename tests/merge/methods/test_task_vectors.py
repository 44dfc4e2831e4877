"""Task arithmetic, TIES, DARE, SLERP and Model Stock: the math on small tensors, then the command.

Every expected value is computed here from the papers' formulas (element by element where the
rule is per entry), independently of rotfuse's vectorised code; the command is checked on tiny
LLaMA checkpoints (a base and two fine-tunes of it). Conformance with mergekit's own output is in
tests/merge/methods/test_mergekit_conformance.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.files import tensors
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.core.errors import UsageError
from rotfuse.merge.methods import REGISTRY, method_class
from rotfuse.merge.methods.model_stock import model_stock
from rotfuse.merge.methods.slerp import slerp
from rotfuse.merge.methods.task_vectors import COMBINE_CHUNK, dare, dare_mask, magnitude_mask, ties_combine

NEW = ("task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp", "model-stock")


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _method(name: str, weights: list[float] | None = None, count: int = 2, **settings: object):
    cls = method_class(name)
    return cls(cls.make_settings(settings), cls.normalise(weights, count))


def _family(count: int = 2, shape: tuple[int, ...] = (6, 9), seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = _randn(*shape, seed=seed)
    return base, [base + 0.1 * _randn(*shape, seed=seed + 1 + i) for i in range(count)]


# ---------------------------------------------------------------------- the registry and settings


def test_registry_declares_the_new_methods() -> None:
    assert set(NEW) <= set(REGISTRY)
    needs_base = {name: method_class(name).needs_base for name in NEW}
    assert needs_base == {
        "task-arithmetic": True,
        "ties": True,
        "dare-linear": True,
        "dare-ties": True,
        "slerp": False,
        "model-stock": True,
    }
    assert (method_class("slerp").min_models, method_class("slerp").max_models) == (2, 2)
    assert all(method_class(name).name == name and method_class(name).stats is None for name in NEW)


def test_defaults_recorded_in_the_report() -> None:
    assert _method("task-arithmetic").describe() == {"scale": 1.0}
    assert _method("ties").describe() == {"density": 0.2, "scale": 1.0, "normalize": True}
    assert _method("dare-linear").describe() == {"density": 0.1, "scale": 1.0, "seed": 0}
    assert _method("dare-ties").describe() == {"density": 0.1, "scale": 1.0, "seed": 0, "normalize": False}
    assert _method("slerp").describe() == {"t": 0.5}
    assert _method("model-stock").describe() == {"filter_wise": False}


@pytest.mark.parametrize(
    ("name", "settings", "says"),
    [
        ("ties", {"density": 0.0}, "--density 0.0"),
        ("ties", {"density": 1.5}, "(0, 1]"),
        ("dare-linear", {"density": -0.1}, "(0, 1]"),
        ("dare-ties", {"density": float("nan")}, "(0, 1]"),
        ("dare-ties", {"seed": -1}, "--seed -1"),
        ("slerp", {"t": 1.5}, "--t 1.5: must be in [0, 1]"),
        ("slerp", {"t": -0.01}, "[0, 1]"),
        ("task-arithmetic", {"scale": float("inf")}, "--scale"),
        ("task-arithmetic", {"density": 0.5}, "--density is not a setting of --method task-arithmetic"),
        ("slerp", {"seed": 3}, "--seed is not a setting of --method slerp"),
    ],
)
def test_bad_settings_are_usage_errors(name: str, settings: dict, says: str) -> None:
    with pytest.raises(UsageError) as error:
        method_class(name).make_settings(settings)
    assert says in str(error.value)


def test_task_vector_weights_are_kept_as_given() -> None:
    for name in ("task-arithmetic", "ties", "dare-linear", "dare-ties"):
        cls = method_class(name)
        assert cls.normalise(None, 3) == [1.0, 1.0, 1.0]
        assert cls.normalise([0.7, -0.3], 2) == [0.7, -0.3]  # not normalised, negatives allowed
        with pytest.raises(UsageError, match="--weights has 1 values for 2 models"):
            cls.normalise([1.0], 2)
        with pytest.raises(UsageError, match="finite"):
            cls.normalise([1.0, float("nan")], 2)
    for name in ("slerp", "model-stock"):
        with pytest.raises(UsageError, match=f"--method {name} takes no --weights"):
            method_class(name).normalise([0.5, 0.5], 2)


# ---------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_is_the_formula() -> None:
    base, (a, b) = _family()
    merged = _method("task-arithmetic", [0.7, -0.3], scale=0.8).merge("w", [a, b], base)
    expected = base.double() + 0.8 * (0.7 * (a.double() - base.double()) - 0.3 * (b.double() - base.double()))
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["task-arithmetic", "ties", "dare-linear", "dare-ties", "model-stock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fine_tunes_equal_to_the_base_give_the_base(name: str, dtype: torch.dtype) -> None:
    base = _randn(5, 8, seed=3, dtype=dtype)
    merged = _method(name).merge("w", [base.clone(), base.clone()], base)
    assert torch.equal(merged.to(dtype), base)


# ---------------------------------------------------------------------- TIES


def _ties_by_hand(
    base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float, scale: float, normalize: bool
) -> torch.Tensor:
    """Yadav et al. 2023, entry by entry (inputs without ties in magnitude)."""
    flat_base = base.double().reshape(-1).tolist()
    vectors = [(m.double().reshape(-1) - base.double().reshape(-1)).tolist() for m in models]
    count = len(flat_base)
    k = int(density * count)
    trimmed = []
    for vector in vectors:
        kept = set(sorted(range(count), key=lambda i: -abs(vector[i]))[:k])
        trimmed.append([v if i in kept else 0.0 for i, v in enumerate(vector)])
    out = []
    for i in range(count):
        votes = [w * t[i] for w, t in zip(weights, trimmed)]
        sign = 1.0 if sum(votes) >= 0 else -1.0
        agree = [j for j, v in enumerate(votes) if v * sign > 0]
        total = sum(votes[j] for j in agree)
        mass = sum(weights[j] for j in agree)
        if normalize and mass != 0:
            total /= mass
        out.append(flat_base[i] + scale * total)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize(
    ("weights", "density", "scale", "normalize"),
    [
        ([1.0, 1.0, 1.0], 0.2, 1.0, True),
        ([0.7, 0.5, 0.2], 0.5, 0.8, True),
        ([0.7, 0.5, 0.2], 0.29, 1.0, False),
        ([1.0, -0.5, 0.4], 0.6, 1.2, True),
        ([1.0, 1.0, 1.0], 1.0, 1.0, True),
    ],
)
def test_ties_is_trim_elect_disjoint_merge(weights: list[float], density: float, scale: float, normalize: bool) -> None:
    base, models = _family(3, (10, 10), seed=11)
    merged = _method("ties", weights, 3, density=density, scale=scale, normalize=normalize).merge("w", models, base)
    expected = _ties_by_hand(base, models, weights, density, scale, normalize)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


def test_ties_keeps_int_of_density_times_numel_entries() -> None:
    delta = _randn(10, 10, seed=5)
    assert int(magnitude_mask(delta, 0.29).sum()) == 28  # int(0.29 * 100) == 28, as mergekit
    assert int(magnitude_mask(delta, 0.2).sum()) == 20
    assert int(magnitude_mask(_randn(3, seed=1), 0.1).sum()) == 1  # mergekit stops here; we keep the largest
    kept = magnitude_mask(delta, 0.2)
    assert float(delta.abs()[kept].min()) > float(delta.abs()[~kept].max())


def test_ties_breaks_ties_at_the_threshold_as_torchs_argsort() -> None:
    # 16-bit task vectors repeat magnitudes: which of the tied entries survive is mergekit's choice
    values = (_randn(4000, seed=9) * 8).round() / 8
    k = int(0.37 * values.numel())
    expected = torch.zeros(values.numel(), dtype=torch.bool)
    expected[torch.argsort(values.abs().float(), descending=True)[:k]] = True
    assert torch.equal(magnitude_mask(values, 0.37), expected)
    assert torch.equal(magnitude_mask(values, 0.37, ties_likely=True), expected)
    distinct = _randn(3000, seed=10)  # both paths agree where the top k is unique
    assert torch.equal(magnitude_mask(distinct, 0.3), magnitude_mask(distinct, 0.3, ties_likely=True))


def test_ties_combine_elects_the_sign_of_the_weighted_sum() -> None:
    a = torch.tensor([3.0, -1.0, 0.0, 2.0, -2.0], dtype=torch.float64)
    b = torch.tensor([-1.0, -3.0, 0.0, -2.0, 0.0], dtype=torch.float64)
    # sums: 2 (+), -4 (-), 0 (+: ties go to +, no entry agrees), 0 (+), -2 (-)
    merged = ties_combine([a, b], [1.0, 1.0], normalize=True)
    torch.testing.assert_close(merged, torch.tensor([3.0, -2.0, 0.0, 2.0, -2.0], dtype=torch.float64))
    unnormalised = ties_combine([a, b], [2.0, 1.0], normalize=False)
    torch.testing.assert_close(unnormalised, torch.tensor([6.0, -5.0, 0.0, 4.0, -4.0], dtype=torch.float64))


def test_ties_combine_over_many_chunks_is_the_whole_tensor_rule() -> None:
    # the tensors are combined COMBINE_CHUNK entries at a time: every entry as the rule says
    size = 3 * COMBINE_CHUNK + 123
    deltas = [_randn(size, seed=seed, dtype=torch.float64) for seed in (1, 2, 3)]
    masks = [_randn(size, seed=seed).abs() > 0.5 for seed in (4, 5, 6)]
    weights = [1.0, 0.5, -0.25]
    trimmed = [delta * mask for delta, mask in zip(deltas, masks, strict=True)]
    weighted = [delta * w for delta, w in zip(trimmed, weights, strict=True)]
    positive = (weighted[0] + weighted[1] + weighted[2]) >= 0
    agree = [torch.where(positive, v > 0, v < 0) for v in weighted]
    total = sum((v * a for v, a in zip(weighted, agree, strict=True)), torch.zeros(size, dtype=torch.float64))
    count = sum((a.double() * w for a, w in zip(agree, weights, strict=True)), torch.zeros(size, dtype=torch.float64))
    expected = total / torch.where(count == 0, torch.ones_like(count), count)
    merged = ties_combine(deltas, weights, normalize=True, masks=masks)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    assert torch.equal(ties_combine(trimmed, weights, normalize=False), total)


# ---------------------------------------------------------------------- DARE


def test_dare_keeps_about_density_and_rescales_by_its_inverse() -> None:
    delta = _randn(400, 500, seed=21, dtype=torch.float64) + 0.3
    for density in (0.1, 0.5, 0.9):
        dropped = dare(delta, density, seed=7, name="layers.0.w", index=1)
        kept = dropped != 0
        fraction = float(kept.double().mean())
        sigma = math.sqrt(density * (1 - density) / delta.numel())
        assert abs(fraction - density) < 5 * sigma, (density, fraction)
        torch.testing.assert_close(dropped[kept], delta[kept] / density, rtol=0, atol=0)
        # unbiased: the mean of the rescaled task vector is the task vector's mean
        spread = float(delta.std()) / math.sqrt(delta.numel() * density)
        assert abs(float(dropped.mean()) - float(delta.mean())) < 6 * spread + 0.3 * 5 * sigma / density
    assert torch.equal(dare(delta, 1.0, 7, "w", 0), delta)


def test_dare_masks_are_seeded_per_tensor_and_model_and_thread_independent() -> None:
    shape = torch.Size([300, 301])
    first = dare_mask(shape, 0.3, seed=5, name="model.layers.0.mlp.up_proj.weight", index=1)
    assert torch.equal(first, dare_mask(shape, 0.3, seed=5, name="model.layers.0.mlp.up_proj.weight", index=1))
    assert not torch.equal(first, dare_mask(shape, 0.3, seed=6, name="model.layers.0.mlp.up_proj.weight", index=1))
    assert not torch.equal(first, dare_mask(shape, 0.3, seed=5, name="model.layers.1.mlp.up_proj.weight", index=1))
    assert not torch.equal(first, dare_mask(shape, 0.3, seed=5, name="model.layers.0.mlp.up_proj.weight", index=0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dare_mask(shape, 0.3, seed=5, name="model.layers.0.mlp.up_proj.weight", index=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    # the draw never touches the global RNG: merging does not change a user's random stream
    state = torch.get_rng_state()
    dare_mask(shape, 0.3, seed=5, name="w", index=0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["dare-linear", "dare-ties"])
def test_dare_methods_are_their_formulas(name: str) -> None:
    base, models = _family(3, (20, 30), seed=31)
    weights, density, scale = [0.7, 0.5, -0.2], 0.4, 0.9
    merged = _method(name, weights, 3, density=density, scale=scale, seed=4).merge("mlp.w", models, base)
    dropped = [
        (m.double() - base.double()) * dare_mask(base.shape, density, 4, "mlp.w", i) / density
        for i, m in enumerate(models)
    ]
    if name == "dare-linear":
        expected = base.double() + scale * sum(w * d for w, d in zip(weights, dropped))
    else:  # sign election, no division (mergekit's dare_ties default)
        votes = [w * d for w, d in zip(weights, dropped)]
        sign = torch.where(sum(votes) >= 0, 1.0, -1.0).double()
        expected = base.double() + scale * sum(v * (v * sign > 0) for v in votes)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- SLERP


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.0, 0.25, 0.5, 0.8, 1.0):
        torch.testing.assert_close(
            slerp(t, a, b),
            torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)], dtype=torch.float64),
            rtol=0,
            atol=1e-15,
        )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_is_the_formula_and_its_ends_are_the_models(t: float) -> None:
    a, b = _randn(7, 11, seed=1), _randn(7, 11, seed=2) * 3
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    theta = math.acos(float(x @ y / (x.norm() * y.norm())))
    expected = (math.sin((1 - t) * theta) * a.double() + math.sin(t * theta) * b.double()) / math.sin(theta)
    merged = _method("slerp", t=t).merge("w", [a, b])
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
    if t in (0.0, 1.0):
        assert torch.equal(merged.float(), a if t == 0.0 else b)


def test_slerp_of_near_parallel_tensors_is_linear() -> None:
    a = _randn(50, seed=4) + 5.0  # |cos| > 0.9995 with b
    b = a + 0.01 * _randn(50, seed=5)
    x, y = a.double(), b.double()
    assert float(x @ y / (x.norm() * y.norm())) > 0.9995
    torch.testing.assert_close(slerp(0.3, a, b), 0.7 * x + 0.3 * y, rtol=0, atol=1e-12)
    torch.testing.assert_close(slerp(0.3, a, -a), 0.7 * x - 0.3 * x, rtol=0, atol=1e-12)  # antiparallel too


# ---------------------------------------------------------------------- Model Stock


def _stock_by_hand(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    offsets = [(m.double() - base.double()).reshape(-1) for m in models]
    pairs = [(i, j) for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    cos = sum(float(offsets[i] @ offsets[j] / (offsets[i].norm() * offsets[j].norm())) for i, j in pairs) / len(pairs)
    n = len(models)
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(m.double() for m in models) / n + (1 - t) * base.double()


@pytest.mark.parametrize("count", [2, 3, 4])
def test_model_stock_is_the_formula(count: int) -> None:
    base = _randn(8, 12, seed=40)
    shared = 0.1 * _randn(8, 12, seed=41)
    models = [base + shared + 0.1 * _randn(8, 12, seed=42 + i) for i in range(count)]
    merged = _method("model-stock", count=count).merge("w", models, base)
    torch.testing.assert_close(merged, _stock_by_hand(base, models), rtol=0, atol=1e-12)


def test_model_stock_limits_orthogonal_and_identical_task_vectors() -> None:
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    orthogonal = [base + torch.tensor([1.0, 0, 0, 0]), base + torch.tensor([0, 1.0, 0, 0])]
    torch.testing.assert_close(model_stock(orthogonal, base), base.double())  # cos 0: t = 0, the base
    same = [base + torch.tensor([0.5, -1.0, 0, 2.0])] * 2
    torch.testing.assert_close(model_stock(same, base), same[0].double())  # cos 1: t = 1, their mean


def test_model_stock_filter_wise_takes_one_angle_per_row() -> None:
    base = _randn(5, 9, seed=50)
    shared = 0.1 * _randn(5, 9, seed=51)
    models = [base + shared + 0.1 * _randn(5, 9, seed=52 + i) for i in range(3)]
    merged = _method("model-stock", count=3, filter_wise=True).merge("w", models, base)
    expected = torch.stack([_stock_by_hand(base[r], [m[r] for m in models]) for r in range(5)])
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
    vector = _method("model-stock", count=3, filter_wise=True).merge("b", [m[0] for m in models], base[0])
    torch.testing.assert_close(vector, expected[0], rtol=0, atol=1e-12)  # a 1-D tensor is one row


# ---------------------------------------------------------------------- the command on tiny LLaMAs


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base/ (a tiny LLaMA), ft1/ and ft2/ (base + shared + own noise)."""
    root = tmp_path_factory.mktemp("family")
    base = save_tiny("llama", root / "base", seed=0)
    weights = load_file(str(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(99)
    shared = {n: 0.02 * torch.randn(t.shape, generator=generator) for n, t in weights.items()}
    found = {"base": base}
    for name in ("ft1", "ft2"):
        shutil.copytree(base, root / name)
        tuned = {n: t + shared[n] + 0.02 * torch.randn(t.shape, generator=generator) for n, t in weights.items()}
        save_file(tuned, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        found[name] = root / name
    return found


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("rotfuse: error:"), result.stderr
    return lines[0]


NAME = "model.layers.1.mlp.down_proj.weight"


def _expected(method: str, ins: dict[str, dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """What each command below must write for tensor `name`, from the formulas."""
    base, a, b = (ins[k][name].double() for k in ("base", "ft1", "ft2"))
    if method == "task-arithmetic":
        return base + 0.5 * (0.6 * (a - base) + 1.2 * (b - base))
    if method == "ties":
        return _ties_by_hand(base, [a, b], [0.6, 1.2], 0.3, 1.0, True)
    if method in ("dare-linear", "dare-ties"):
        dropped = [(x - base) * dare_mask(base.shape, 0.5, 3, name, i) / 0.5 for i, x in enumerate((a, b))]
        votes = [w * d for w, d in zip((0.6, 1.2), dropped)]
        if method == "dare-linear":
            return base + votes[0] + votes[1]
        sign = torch.where(votes[0] + votes[1] >= 0, 1.0, -1.0).double()
        return base + sum(v * (v * sign > 0) for v in votes)
    if method == "slerp":
        x, y = a.reshape(-1), b.reshape(-1)
        theta = math.acos(float(x @ y / (x.norm() * y.norm())))
        return (math.sin(0.7 * theta) * a + math.sin(0.3 * theta) * b) / math.sin(theta)
    return _stock_by_hand(base, [a, b])


ARGS = {
    "task-arithmetic": ["--weights", "0.6,1.2", "--scale", "0.5"],
    "ties": ["--weights", "0.6,1.2", "--density", "0.3"],
    "dare-linear": ["--weights", "0.6,1.2", "--density", "0.5", "--seed", "3"],
    "dare-ties": ["--weights", "0.6,1.2", "--density", "0.5", "--seed", "3"],
    "slerp": ["--t", "0.3"],
    "model-stock": [],
}


@pytest.mark.parametrize("method", NEW)
def test_each_method_on_tiny_llamas(family: dict[str, Path], tmp_path: Path, run, method: str) -> None:
    base = [] if method == "slerp" else ["--base", family["base"]]
    result = run(
        "merge",
        "--method",
        method,
        family["ft1"],
        family["ft2"],
        *base,
        *ARGS[method],
        "-o",
        tmp_path / "out",
        "--json",
        "-q",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == method
    assert report["tensors"]["count"] == {method: len(tensors(family["base"]))}
    if method == "slerp":
        assert "base" not in report and report["settings"]["t"] == 0.3
        assert [m["weight"] for m in report["models"]] == [0.7, 0.3]
    else:
        assert report["base"]["path"] == str(family["base"]) and report["base"]["fingerprint"]
    if method.startswith("dare"):
        assert report["settings"]["seed"] == 3 and report["settings"]["density"] == 0.5
    ins = {k: tensors(v) for k, v in family.items()}
    out = tensors(tmp_path / "out")
    assert out.keys() == ins["base"].keys()
    assert all(out[n].dtype == ins["base"][n].dtype for n in out)
    for name in (NAME, "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(out[name].double(), _expected(method, ins, name), rtol=1e-6, atol=1e-7, msg=name)


def test_dare_same_seed_same_bytes_other_seed_other_bytes(family: dict[str, Path], tmp_path: Path, run) -> None:
    common = ["merge", "--method", "dare-ties", family["ft1"], family["ft2"], "--base", family["base"], "-q"]
    for out, seed in (("one", 1), ("again", 1), ("other", 2)):
        assert run(*common, "--seed", seed, "-o", tmp_path / out).returncode == 0
    one, again, other = (tmp_path / name / "model.safetensors" for name in ("one", "again", "other"))
    assert one.read_bytes() == again.read_bytes()
    assert one.read_bytes() != other.read_bytes()


def test_job_file_equals_flags_and_excluded_heads_are_copied(family: dict[str, Path], tmp_path: Path, run) -> None:
    flags = [
        "--method",
        "ties",
        "--base",
        family["base"],
        "--weights",
        "1,0.5",
        "--density",
        "0.4",
        "--scale",
        "0.9",
        "--no-normalize",
        "--exclude",
        "lm_head",
    ]
    assert run("merge", family["ft1"], family["ft2"], *flags, "-o", tmp_path / "flags", "-q").returncode == 0
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "models": [str(family["ft1"]), str(family["ft2"])],
                "base": str(family["base"]),
                "weights": [1, 0.5],
                "density": 0.4,
                "scale": 0.9,
                "normalize": False,
                "exclude": ["lm_head"],
                "out": str(tmp_path / "job"),
            }
        ),
        encoding="utf-8",
    )
    result = run("merge", "--config", job, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"] | {"exclude": None} == {
        "dtype": None,
        "exclude": None,
        "head_from": 0,
        "match": False,
        "density": 0.4,
        "scale": 0.9,
        "normalize": False,
    }
    assert report["tensors"]["rules"]["lm_head.weight"] == "head"
    from_flags, from_job, first = tensors(tmp_path / "flags"), tensors(tmp_path / "job"), tensors(family["ft1"])
    assert all(torch.equal(from_flags[n], from_job[n]) for n in from_flags)
    assert torch.equal(from_job["lm_head.weight"], first["lm_head.weight"])
    assert not torch.equal(from_job[NAME], first[NAME])


def test_match_aligns_the_models_and_the_base(family: dict[str, Path], tmp_path: Path, run) -> None:
    """--match merges what `match` then `merge` would: the second model and the base aligned to
    the first (here the second one is a scrambled copy, so alignment has work to do)."""
    assert run("scramble", family["ft2"], "-o", tmp_path / "ft2s", "--seed", "5", "-q").returncode == 0
    assert run("scramble", family["base"], "-o", tmp_path / "bases", "--seed", "6", "-q").returncode == 0
    for source, aligned in (("ft2s", "ft2a"), ("bases", "basea")):
        result = run("match", family["ft1"], tmp_path / source, "-o", tmp_path / aligned, "-q", "--device", "cpu")
        assert result.returncode == 0, result.stderr
    common = ["--method", "task-arithmetic", "--weights", "0.5,0.5", "--device", "cpu", "-q"]
    assert (
        run(
            "merge",
            family["ft1"],
            tmp_path / "ft2a",
            "--base",
            tmp_path / "basea",
            *common,
            "-o",
            tmp_path / "two_steps",
        ).returncode
        == 0
    )
    result = run(
        "merge",
        family["ft1"],
        tmp_path / "ft2s",
        "--base",
        tmp_path / "bases",
        *common,
        "--match",
        "--json",
        "-o",
        tmp_path / "one_step",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["base"]["alignment"]["after"] < report["base"]["alignment"]["before"]
    assert report["models"][1]["alignment"]["after"] < report["models"][1]["alignment"]["before"]
    two, one = tensors(tmp_path / "two_steps"), tensors(tmp_path / "one_step")
    for name in two:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-m", "ties", "{ft1}", "{ft2}"], "--method ties needs the models' common base: pass --base BASE"),
        (["-m", "model-stock", "{ft1}", "{ft2}"], "needs the models' common base"),
        (["-m", "ties", "{ft1}", "{ft2}", "--base", "{base}", "--density", "0"], "--density 0.0"),
        (["-m", "dare-linear", "{ft1}", "{ft2}", "--base", "{base}", "--density", "1.2"], "(0, 1]"),
        (["-m", "slerp", "{ft1}", "{ft2}", "--t", "1.5"], "--t 1.5: must be in [0, 1]"),
        (["-m", "slerp", "{ft1}", "{ft2}", "{base}"], "--method slerp merges at most 2 checkpoints, got 3"),
        (["-m", "slerp", "{ft1}"], "needs at least two checkpoints, got 1 (--method slerp)"),
        (["-m", "slerp", "{ft1}", "{ft2}", "--base", "{base}"], "--method slerp takes no base model"),
        (["-m", "slerp", "{ft1}", "{ft2}", "--weights", "1,2"], "--method slerp takes no --weights"),
        (
            ["-m", "task-arithmetic", "{ft1}", "{ft2}", "--base", "{base}", "--weights", "1,2,3"],
            "--weights has 3 values for 2 models",
        ),
        (["-m", "simple", "{ft1}", "{ft2}", "--density", "0.5"], "--density is not a setting of --method simple"),
        (["-m", "model-stock", "{ft1}", "--base", "{base}"], "needs at least two checkpoints"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    family: dict[str, Path], tmp_path: Path, run, args: list[str], says: str
) -> None:
    line = _one_error_line(run("merge", *(arg.format(**family) for arg in args), "-o", tmp_path / "x"))
    assert says in line
    assert not (tmp_path / "x").exists()


def test_task_arithmetic_of_one_fine_tune_scales_its_task_vector(family: dict[str, Path], tmp_path: Path, run) -> None:
    result = run(
        "merge",
        "-m",
        "task-arithmetic",
        family["ft1"],
        "--base",
        family["base"],
        "--weights",
        "-1",
        "-o",
        tmp_path / "negated",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    base, tuned, out = tensors(family["base"]), tensors(family["ft1"]), tensors(tmp_path / "negated")
    torch.testing.assert_close(out[NAME].double(), 2 * base[NAME].double() - tuned[NAME].double(), rtol=1e-6, atol=1e-7)
