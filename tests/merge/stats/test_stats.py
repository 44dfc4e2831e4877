"""`rotfuse stats`: Gram matrices and Fishers of real (tiny) transformers models on data.

References are computed here independently: forward hooks on the live modules (by their
in-memory names, which transformers 5 renames for ViT) with padding removed by hand, and
per-example gradients of transformers' own loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.merge_data import hooked_grams, save_inputs, token_inputs
from helpers.tiny_models import save_tiny

from rotfuse.core.errors import InputError, UsageError
from rotfuse.eval.runtime import load_model
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.merge.stats.collect import StatsOptions, compute_stats
from rotfuse.merge.stats.folder import StatsFolder


def _gram(stats: StatsFolder, weight: str) -> torch.Tensor:
    entry = stats.linear_input(weight)
    assert entry is not None, f"no Gram for {weight}"
    return stats.get(entry.gram).double()


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("bert", tmp_path_factory.mktemp("bert") / "model", seed=1)


def test_grams_are_the_gram_matrices_of_hooked_inputs_without_padding(bert: Path, tmp_path: Path) -> None:
    inputs = token_inputs(10, 9, vocab=61, seed=0)
    data = save_inputs(tmp_path / "inputs.safetensors", inputs)
    compute_stats(bert, data, tmp_path / "stats", StatsOptions(kind="regmean", batch_size=4, device="cpu"))
    stats = StatsFolder.open(tmp_path / "stats")

    live = {
        "bert.encoder.layer.1.attention.self.query": True,
        "bert.encoder.layer.0.output.dense": True,
        "bert.pooler.dense": False,
        "classifier": False,
    }
    expected = hooked_grams(load_model(bert), inputs, list(live), live)  # one batch of 10, not 4+4+2
    for module in live:
        torch.testing.assert_close(_gram(stats, module + ".weight"), expected[module], rtol=1e-5, atol=1e-6)

    manifest = stats.manifest
    assert manifest["checkpoint"]["fingerprint"] == Checkpoint.open(bert).fingerprint()
    assert manifest["data"]["tokens"] == int(inputs["attention_mask"].sum())
    # q, k and v read one input: one Gram; the attention output reads another
    prefix = "bert.encoder.layer.0.attention."
    shared = {stats.linear_input(prefix + f"self.{r}.weight").gram for r in ("query", "key", "value")}
    assert len(shared) == 1 and stats.linear_input(prefix + "output.dense.weight").gram not in shared
    gram = manifest["inputs"][shared.pop()]
    assert gram["rows"] == int(inputs["attention_mask"].sum()) and len(gram["readers"]) == 3
    assert stats.linear_input("bert.encoder.layer.0.attention.self.query.bias") is None


def test_padding_changes_no_gram(bert: Path, tmp_path: Path) -> None:
    """Pad to twice the length with random token ids behind the mask: nothing may change."""
    inputs = token_inputs(8, 7, vocab=61, seed=3)
    padded = {k: torch.cat([v, torch.zeros_like(v)], dim=1) for k, v in inputs.items()}
    padded["input_ids"][:, 7:] = torch.randint(3, 61, (8, 7), generator=torch.Generator().manual_seed(9))
    for name, data in (("plain", inputs), ("padded", padded)):
        compute_stats(
            bert,
            save_inputs(tmp_path / f"{name}.safetensors", data),
            tmp_path / name,
            StatsOptions(kind="regmean", batch_size=3, device="cpu"),
        )
    plain, padded_stats = StatsFolder.open(tmp_path / "plain"), StatsFolder.open(tmp_path / "padded")
    assert plain.manifest["inputs"].keys() == padded_stats.manifest["inputs"].keys()
    for gram, entry in plain.manifest["inputs"].items():
        assert padded_stats.manifest["inputs"][gram]["rows"] == entry["rows"]
        torch.testing.assert_close(padded_stats.get(gram), plain.get(gram), rtol=1e-5, atol=1e-6)


def test_vit_stats_use_the_checkpoint_names_not_the_renamed_modules(tmp_path: Path) -> None:
    model = save_tiny("vit", tmp_path / "vit", seed=2)
    pixels = {
        "pixel_values": torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(0)),
        "labels": torch.tensor([0, 1, 2, 3, 4, 0]),
    }
    data = save_inputs(tmp_path / "images.npz", pixels)
    compute_stats(model, data, tmp_path / "grams", StatsOptions(kind="regmean", device="cpu"))
    compute_stats(model, data, tmp_path / "fisher", StatsOptions(kind="fisher", device="cpu"))
    stats = StatsFolder.open(tmp_path / "grams")
    on_disk = set(Checkpoint.open(model).names())
    assert set(stats.manifest["linear"]) <= on_disk
    # transformers 5 calls it vit.layers.0.attention.q_proj in memory
    live = {"vit.layers.0.attention.q_proj": True, "vit.layers.1.mlp.fc2": True}
    expected = hooked_grams(load_model(model), pixels, list(live), live)
    torch.testing.assert_close(
        _gram(stats, "vit.encoder.layer.0.attention.attention.query.weight"),
        expected["vit.layers.0.attention.q_proj"],
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        _gram(stats, "vit.encoder.layer.1.output.dense.weight"), expected["vit.layers.1.mlp.fc2"], rtol=1e-5, atol=1e-6
    )
    assert (
        stats.manifest["inputs"][stats.linear_input("vit.encoder.layer.0.attention.attention.query.weight").gram][
            "rows"
        ]
        == 6 * 10
    )
    fisher = StatsFolder.open(tmp_path / "fisher")
    assert fisher.names == {n for n in on_disk if Checkpoint.open(model).entry(n).dtype == "F32"}
    assert fisher.manifest["labels"] == "data"


def test_gpt2_conv1d_layout_and_tied_lm_head(tmp_path: Path) -> None:
    model = save_tiny("gpt2", tmp_path / "gpt2", seed=3)
    inputs = token_inputs(6, 8, vocab=61, seed=4)
    data = save_inputs(tmp_path / "inputs.safetensors", inputs)
    compute_stats(model, data, tmp_path / "grams", StatsOptions(kind="regmean", device="cpu"))
    stats = StatsFolder.open(tmp_path / "grams")
    entry = stats.linear_input("transformer.h.0.attn.c_attn.weight")
    assert entry is not None and entry.layout == "in_out"
    assert stats.get(entry.gram).shape == (24, 24)  # d_in of c_attn's [24, 72] weight
    assert stats.linear_input("transformer.h.0.mlp.c_proj.weight").layout == "in_out"
    live = {"transformer.h.1.mlp.c_proj": True}
    torch.testing.assert_close(
        _gram(stats, "transformer.h.1.mlp.c_proj.weight"),
        hooked_grams(load_model(model), inputs, list(live), live)["transformer.h.1.mlp.c_proj"],
        rtol=1e-5,
        atol=1e-6,
    )
    # lm_head is the token embedding (one tensor on disk): no Gram, so one rule (simple average)
    assert stats.linear_input("transformer.wte.weight") is None
    assert "transformer.wte.weight" in stats.manifest["skipped"]

    compute_stats(model, data, tmp_path / "fisher", StatsOptions(kind="fisher", device="cpu"))
    fisher = StatsFolder.open(tmp_path / "fisher")
    assert fisher.manifest["labels"] == "sampled"  # no labels in the data: sampled from the model
    assert "transformer.wte.weight" in fisher.names and "lm_head.weight" not in fisher.names
    assert float(fisher.get("transformer.wte.weight").sum()) > 0


def test_fp16_model_grams_are_accumulated_in_float32(tmp_path: Path) -> None:
    model = save_tiny("bert", tmp_path / "half", seed=5, dtype=torch.float16)
    inputs = token_inputs(6, 9, vocab=61, seed=6)
    compute_stats(
        model,
        save_inputs(tmp_path / "in.safetensors", inputs),
        tmp_path / "grams",
        StatsOptions(kind="regmean", device="cpu", model_dtype="fp16"),
    )
    stats = StatsFolder.open(tmp_path / "grams")
    assert stats.manifest["settings"]["model_dtype"] == "float16"
    live = {"bert.encoder.layer.1.intermediate.dense": True}
    reference = hooked_grams(load_model(model, dtype=torch.float16), inputs, list(live), live)
    gram = stats.get(stats.linear_input("bert.encoder.layer.1.intermediate.dense.weight").gram)
    assert gram.dtype == torch.float32
    # float16 products would be ~1e-3 off; float32 products summed in float64 are not
    torch.testing.assert_close(
        gram.double(), reference["bert.encoder.layer.1.intermediate.dense"], rtol=2e-5, atol=1e-5
    )


def test_fisher_is_the_mean_of_per_example_squared_gradients(bert: Path, tmp_path: Path) -> None:
    inputs = token_inputs(5, 8, vocab=61, seed=7, labels=3)
    data = save_inputs(tmp_path / "labelled.safetensors", inputs)
    compute_stats(bert, data, tmp_path / "fisher", StatsOptions(kind="fisher", batch_size=4, device="cpu"))
    stats = StatsFolder.open(tmp_path / "fisher")
    assert stats.manifest["labels"] == "data"

    model = load_model(bert)
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for row in range(5):  # transformers' own cross-entropy, one padded example at a time
        model.zero_grad()
        example = {k: v[row : row + 1] for k, v in inputs.items()}
        model(**example).loss.backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.pow(2) / 5
    assert stats.names == set(expected)  # BERT's names in memory are its names on disk
    scale = max(float(value.max()) for value in expected.values())  # key biases' true Fisher is 0
    for name, value in expected.items():
        torch.testing.assert_close(stats.get(name), value, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_sampled_labels_are_seeded(bert: Path, tmp_path: Path) -> None:
    data = save_inputs(tmp_path / "unlabelled.safetensors", token_inputs(6, 8, vocab=61, seed=8))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        compute_stats(bert, data, tmp_path / name, StatsOptions(kind="fisher", seed=seed, device="cpu"))
    a, b, c = (StatsFolder.open(tmp_path / n) for n in "abc")
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    assert a.manifest["labels"] == "sampled"
    assert torch.equal(a.get(weight), b.get(weight))
    assert not torch.equal(a.get(weight), c.get(weight))
    with pytest.raises(UsageError, match="has no labels"):
        compute_stats(bert, data, tmp_path / "d", StatsOptions(kind="fisher", labels="data", device="cpu"))


def test_text_data_is_tokenised_with_the_checkpoints_tokenizer(minilm_dir: Path, tmp_path: Path, run) -> None:
    texts = [
        "a short one",
        "a considerably longer sentence that needs many more tokens than the first",
        "mid length text",
    ]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    result = run(
        "stats",
        minilm_dir,
        "--data",
        data,
        "--kind",
        "regmean",
        "-o",
        tmp_path / "stats",
        "--batch-size",
        "2",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    from transformers import AutoTokenizer

    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(str(minilm_dir))(texts)["input_ids"])
    assert manifest["data"]["tokens"] == tokens
    first = manifest["linear"]["encoder.layer.0.attention.self.query.weight"]["gram"]
    assert manifest["inputs"][first]["rows"] == tokens

    again = run("stats", minilm_dir, "--data", data, "--kind", "regmean", "-o", tmp_path / "stats")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    with pytest.raises(InputError, match="logits"):  # a bare encoder has no prediction to sample from
        compute_stats(minilm_dir, data, tmp_path / "fisher", StatsOptions(kind="fisher", device="cpu"))
