"""Multimodal Gemma 3's two residual streams (configs/archs/gemma3_mm.yaml), joined by a tensor on both.

The projector `x @ W` ([vision_hidden, text_hidden]) reads the vision stream on axis 0 and writes the
text stream on axis 1. Claimed by both stacks' residual sections in different roles, it sits on two
independent streams (not coupled: each moves by its own map, on its own axis, and the two commute).
Both maps are permutations: post-sublayer norms in the text stack (as gemma3_text), and in the vision
stack post_layernorm's output goes through avg-pool and an RMSNorm, not a weight, so no gain folds.

Shown here: random maps of both streams keep the function (main output: the auxiliary
`image_hidden_states` is the projector's output, the text stream itself); matching recovers them
(distance ratio < 1e-5); leaving the projector or mm_soft_emb_norm's gain out of the vision stream
breaks the function; a spec putting one tensor on two streams on the same axis is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers.functions import assert_same_function, max_relative_change, save_tiny
from helpers.gemma3_mm import PROJECTOR, trained_like_pair
from safetensors.torch import load_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.archs.bind import bind
from rotfuse.archs.residual import residual_plans
from rotfuse.archs.spec import builtin_spec_dir, load_spec_file
from rotfuse.core.errors import InputError
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.symmetry.names import symmetry_set

BROKEN = 1e-3  # a relative output change this large is a different function, not rounding
RESIDUAL = symmetry_set("residual")
EVERYTHING = symmetry_set("default,residual")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return trained_like_pair(tmp_path_factory.mktemp("gemma3-mm-residual"))


def _distance(a: Path, b: Path) -> float:
    ours, theirs = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    return sum(((ours[n].double() - theirs[n].double()) ** 2).sum().item() for n in ours) ** 0.5


def _rows(tensor: torch.Tensor) -> list[tuple[float, ...]]:
    """The rows as a multiset (each sorted): unchanged by permuting rows and columns."""
    return sorted(map(tuple, tensor.sort(dim=1).values.tolist()))


def _variant(tmp_path: Path, stack: str, first: dict) -> Path:
    """gemma3_mm with `first` put before the other model entries of one stack's residual section."""
    raw = yaml.safe_load((builtin_spec_dir() / "gemma3_mm.yaml").read_text())
    section = next(s for s in raw["stacks"] if s["name"] == stack)["residual"]
    section["model"] = [first, *section["model"]]
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_projector_sits_on_both_streams_on_its_own_axes(pair):
    checkpoint = Checkpoint.open(pair[0])
    spec = load_spec_file(builtin_spec_dir() / "gemma3_mm.yaml")
    plans = residual_plans(bind(spec, checkpoint.config, checkpoint, "model"), checkpoint)
    assert set(plans) == {"text", "vision"}  # two streams, not one coupled "text+vision"
    assert plans["vision"].tensors[PROJECTOR].axes == (0,)
    assert plans["text"].tensors[PROJECTOR].axes == (1,)
    assert not plans["text"].orthogonal and not plans["vision"].orthogonal
    config = checkpoint.config
    assert (plans["text"].hidden_size, plans["vision"].hidden_size) == (
        config["text_config"]["hidden_size"],
        config["vision_config"]["hidden_size"],
    )


def test_random_maps_of_both_streams_keep_the_function(pair, tmp_path):
    model = pair[0]
    report = scramble(model, tmp_path / "scrambled", MatchOptions(symmetries=EVERYTHING, device="cpu"), seed=3)
    assert report["residual"]["maps"] == {"text": "permutation", "vision": "permutation"}
    moved = load_file(str(tmp_path / "scrambled" / "model.safetensors"))
    before = load_file(str(model / "model.safetensors"))
    # both axes of the projector moved (as a set of values, rows and columns are permuted)
    assert not torch.equal(moved[PROJECTOR], before[PROJECTOR])
    assert _rows(moved[PROJECTOR]) == _rows(before[PROJECTOR])
    assert _rows(moved[PROJECTOR].T) == _rows(before[PROJECTOR].T)
    for name in ("vision_tower.post_layernorm.weight", "language_model.model.norm.weight"):
        assert not torch.equal(moved[name], before[name]), name
    assert_same_function(model, tmp_path / "scrambled", main_only=True)


@pytest.mark.parametrize("symmetries", [RESIDUAL, EVERYTHING], ids=["residual", "all"])
def test_matching_recovers_both_stream_maps(pair, tmp_path, symmetries):
    model = pair[0]
    options = MatchOptions(symmetries=symmetries, device="cpu")
    scramble(model, tmp_path / "scrambled", options, seed=7)
    match(model, tmp_path / "scrambled", tmp_path / "back", options)
    scrambled = _distance(model, tmp_path / "scrambled")
    assert scrambled > 1.0
    assert _distance(model, tmp_path / "back") < 1e-5 * scrambled


def test_matching_a_different_model_keeps_its_function(pair, tmp_path):
    model, anchor = pair
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(symmetries=EVERYTHING, device="cpu"))
    rounds = report["residual"]["rounds"]
    assert min(r["distance"] for r in rounds) <= rounds[0]["distance"]
    assert not any(note.startswith("residual.map off") for note in report["restrictions"])
    assert_same_function(model, tmp_path / "aligned", main_only=True)
    assert _distance(anchor, tmp_path / "aligned") < _distance(anchor, model)


@pytest.mark.parametrize(
    ("stack", "left_out"),
    [
        ("vision", PROJECTOR),  # then only its columns move (with the text stream)
        ("text", PROJECTOR),  # then only its rows move (with the vision stream)
        ("vision", "multi_modal_projector.mm_soft_emb_norm.weight"),  # the (1 + w) gain on the vision width
    ],
)
def test_leaving_a_bridge_tensor_off_a_stream_breaks_the_function(pair, tmp_path, stack, left_out):
    model = pair[0]
    spec = _variant(tmp_path, stack, {"free": left_out})
    options = MatchOptions(symmetries=RESIDUAL, device="cpu", arch_spec=spec)
    scramble(model, tmp_path / "unsafe", options, seed=3)
    assert max_relative_change(model, tmp_path / "unsafe", main_only=True) > BROKEN


def test_a_tensor_on_two_streams_on_one_axis_is_refused(tmp_path):
    """The text stack also claiming the projector's axis 0 (the vision one): no two maps can move it
    (equal widths, so that the shape check does not refuse it first)."""
    folder = save_tiny("gemma3-mm", tmp_path / "square", text_config={"hidden_size": 24})
    spec = load_spec_file(_variant(tmp_path, "text", {"writes": PROJECTOR}))  # out_in: axis 0
    checkpoint = Checkpoint.open(folder)
    bound = bind(spec, checkpoint.config, checkpoint, "model")
    with pytest.raises(InputError, match="on the same axis"):
        residual_plans(bound, checkpoint)
