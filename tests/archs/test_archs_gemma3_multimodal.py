"""Multimodal Gemma 3 (Gemma3ForConditionalGeneration, configs/archs/gemma3_mm.yaml): a text stack and a
SigLIP vision stack joined by the projector (avg-pool, (1 + w) RMSNorm, x @ mm_input_projection_weight).

The real model runs on pixel values and input ids holding the processor's image block (begin, one token
per image feature, end). Per-layer maps in both stacks keep every output and are recovered exactly; the
text stack's QK maps are off (q_norm / k_norm), and that restriction is necessary. The residual maps the
spec's comments work out -- a permutation of either stream moving the projector's rows (vision) or columns
(text) with it -- are exact, and the projector is where they must move it: left out, the function breaks.
The spec's residual maps themselves: tests/archs/test_archs_gemma3_mm_residual.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli import match_verify_merge, run_here
from helpers.functions import assert_same_function, max_relative_change
from helpers.gemma3_mm import PROJECTOR, trained_like_pair
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.eval.runtime import example_inputs, image_block
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3  # a relative output change this large is a different function, not rounding


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Model and anchor with trained-like projector and norms (helpers/gemma3_mm.py)."""
    return trained_like_pair(tmp_path_factory.mktemp("gemma3-mm"))


def _rows(report: dict, stack: str) -> list[dict]:
    return [row for row in report["layers"] if row["layer"].startswith(stack + ".")]


def test_example_inputs_hold_one_image_block_per_row(pair):
    config = json.loads((pair[0] / "config.json").read_text())
    inputs = example_inputs(config, batch=3, seq_len=12, seed=4)
    image = config["image_token_index"]
    assert inputs["pixel_values"].shape[0] == 3
    assert (inputs["input_ids"] == image).sum(dim=1).tolist() == [config["mm_tokens_per_image"]] * 3
    assert inputs["token_type_ids"].equal((inputs["input_ids"] == image).long())
    block = torch.tensor(image_block(config))
    assert inputs["input_ids"][:, 1 : 1 + len(block)].eq(block).all()
    assert image_block({"vocab_size": 10}) == []  # text-only models: no block


def test_matching_keeps_the_function_in_both_stacks(pair, tmp_path):
    model, anchor = pair
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(device="cpu"))
    assert report["arch"] == "gemma3_mm"
    assert_same_function(model, tmp_path / "aligned")
    totals = report["totals"]["matched"]
    assert totals["after"] < 0.99 * totals["before"]
    for stack, qk_maps in (("text", set()), ("vision", {"rot", "scale"})):
        rows = _rows(report, stack)
        assert len(rows) == 2
        for row in rows:
            assert {"rot", "scale"} & set(row["modules"]["attn.qk"]["applied"]) == qk_maps, row["layer"]
            for name, module in row["modules"].items():
                assert module["after"] <= module["before"], (row["layer"], name)


def test_scramble_keeps_the_function_and_matching_undoes_it(pair, tmp_path):
    model, _ = pair
    scramble(model, tmp_path / "scrambled", MatchOptions(device="cpu"), seed=11)
    assert_same_function(model, tmp_path / "scrambled")
    report = match(model, tmp_path / "scrambled", tmp_path / "back", MatchOptions(device="cpu"))
    totals = report["totals"]["matched"]
    assert totals["before"] > 1.0
    assert totals["after"] < 1e-5 * totals["before"]


# ---------------------------------------------------------------------- necessity


def _edited(folder: Path, out: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a single-file checkpoint with `change` applied to its tensors."""
    out.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out


UNRESTRICTED_TEXT = """extends: gemma3_mm
name: gemma3_mm
restrictions:
  - disable: [residual.map]
    reason: not under test
"""


def test_the_text_stacks_qk_restriction_is_necessary(pair, tmp_path):
    model = pair[0]  # trained-like q_norm / k_norm gains (w = 0 at init would commute with every rotation)
    spec = tmp_path / "unrestricted.yaml"
    spec.write_text(UNRESTRICTED_TEXT)
    qk = symmetry_set("qk.rot")
    scramble(model, tmp_path / "safe", MatchOptions(symmetries=qk, device="cpu"), seed=2)
    scramble(model, tmp_path / "unsafe", MatchOptions(symmetries=qk, device="cpu", arch_spec=spec), seed=2)
    assert_same_function(model, tmp_path / "safe")
    assert max_relative_change(model, tmp_path / "unsafe") > BROKEN


# stream -> (tensor name globs -> axes of the stream), from modeling_gemma3 / modeling_siglip
VISION_STREAM = {
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.fc1.weight"): (1,),
    ("self_attn.out_proj.weight", "mlp.fc2.weight", "patch_embedding.weight"): (0,),
    ("self_attn.out_proj.bias", "mlp.fc2.bias", "patch_embedding.bias", "position_embedding.weight"): (-1,),
    ("layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias"): (-1,),
    ("post_layernorm.weight", "post_layernorm.bias", "mm_soft_emb_norm.weight"): (-1,),
    (PROJECTOR,): (0,),
}
TEXT_STREAM = {
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"): (1,),
    ("mlp.gate_proj.weight", "mlp.up_proj.weight", "embed_tokens.weight"): (1,),
    ("self_attn.o_proj.weight", "mlp.down_proj.weight"): (0,),
    ("input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight"): (-1,),
    ("post_feedforward_layernorm.weight", "model.norm.weight"): (-1,),
    (PROJECTOR,): (1,),
}


def _permute_stream(tower: str, table: dict, width: int, skip: str = "") -> Callable[[dict], None]:
    """Every tensor of one stream (under `tower`, and the projector) permuted along its stream axes."""
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(3))

    def change(tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            if name == skip or not name.startswith((tower, "multi_modal_projector.")):
                continue
            axes = next((axes for ends, axes in table.items() if name.endswith(ends)), ())
            for axis in axes:
                tensors[name] = tensors[name].index_select(axis % tensors[name].ndim, perm)

    return change


@pytest.mark.parametrize("stream", ["vision", "text"])
@pytest.mark.parametrize("with_projector", [True, False])
def test_a_stream_permutation_is_exact_only_with_the_projector(pair, tmp_path, stream, with_projector):
    """The worked-out residual maps: exact with the projector's rows (vision) or columns (text) moved, and
    the projector is a reader / writer of the stream that must move (the spec puts it on both streams)."""
    model = pair[0]
    config = json.loads((model / "config.json").read_text())
    tower, table = ("vision_tower.", VISION_STREAM) if stream == "vision" else ("language_model.", TEXT_STREAM)
    width = config[f"{stream}_config"]["hidden_size"]
    moved = _edited(
        model, tmp_path / "moved", _permute_stream(tower, table, width, "" if with_projector else PROJECTOR)
    )
    change = max_relative_change(model, moved, main_only=True)
    assert (change < 2e-5) if with_projector else (change > BROKEN), change


def test_through_the_cli(pair, tmp_path):
    model, anchor = pair
    code, err = run_here("scramble", model, "-o", tmp_path / "scrambled", "--seed", "3", "-q")
    assert code == 0, err
    assert_same_function(model, tmp_path / "scrambled")
    report = tmp_path / "back.json"
    code, err = run_here("match", model, tmp_path / "scrambled", "-o", tmp_path / "back", "-q", "--report", report)
    assert code == 0, err
    totals = json.loads(report.read_text())["totals"]["matched"]
    assert totals["after"] < 1e-5 * totals["before"]
    match_verify_merge(anchor, model, tmp_path)
