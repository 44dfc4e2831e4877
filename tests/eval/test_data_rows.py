"""`load_inputs` with a row range and `count_samples`: a rank of a distributed job reads and
checks only its share of a `.safetensors` data file, with the samples one process would see."""

from __future__ import annotations

import pytest
import torch
from helpers.merge_data import save_inputs, token_inputs
from safetensors.torch import save_file

from rotfuse.core.errors import InputError
from rotfuse.eval.data import count_samples, load_inputs


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_row_range_gives_those_rows_of_the_whole(tmp_path, suffix):
    inputs = token_inputs(11, 7, vocab=50, seed=3)
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        import numpy as np

        np.savez(path, **{name: tensor.numpy() for name, tensor in inputs.items()})
    else:
        save_inputs(path, inputs)
    whole = load_inputs(path)
    assert count_samples(path) == 11 and count_samples(path, max_samples=8) == 8
    for rows in [(0, 4), (4, 11), (3, 3)]:
        part = load_inputs(path, rows=rows)
        assert set(part) == set(whole)
        for name, tensor in whole.items():
            assert torch.equal(part[name], tensor[rows[0] : rows[1]])
    capped = load_inputs(path, max_samples=8, rows=(6, 8))
    assert torch.equal(capped["input_ids"], whole["input_ids"][6:8])


def test_rows_outside_the_range_are_not_checked(tmp_path):
    inputs = token_inputs(6, 5, vocab=50, seed=4)
    inputs["input_ids"][5, 0] = -1  # a bad id in the last row only
    path = save_inputs(tmp_path / "data.safetensors", inputs)
    assert len(load_inputs(path, rows=(0, 5))["input_ids"]) == 5
    with pytest.raises(InputError, match="token ids"):
        load_inputs(path, rows=(4, 6))


def test_tensors_that_disagree_on_the_sample_count_are_refused_from_the_header(tmp_path):
    path = tmp_path / "data.safetensors"
    save_file({"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": torch.zeros(5, dtype=torch.long)}, str(path))
    with pytest.raises(InputError, match="one common leading"):
        count_samples(path)
