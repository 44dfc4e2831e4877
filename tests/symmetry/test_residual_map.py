"""StreamMap and scale_axis (rotfuse.symmetry.residual): the one rule "multiply every stream axis by
Q" is checked against the layers themselves -- a Linear reading or writing the stream (torch and
Conv1D layouts), a patch convolution, embeddings, LayerNorm on the stream (permutations only),
LayerNorm feeding a reader (orthogonal maps keeping the ones, once the gain is folded and the
bias rides along as bias / gain) and RMSNorm (any orthogonal map once the gain is folded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rotfuse.symmetry.residual import StreamMap, keeping_ones, ones_frame, random_stream_map, scale_axis

D = 7


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both_forms(seed: int = 0) -> tuple[StreamMap, StreamMap]:
    """A random permutation, and the same map as a dense permutation matrix."""
    perm = random_stream_map(D, orthogonal=False, generator=_gen(seed))
    return perm, StreamMap(matrix=perm.as_matrix())


def _maps() -> list[StreamMap]:
    return [*_both_forms(), random_stream_map(D, orthogonal=True, generator=_gen(1))]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_identity_changes_nothing():
    x = torch.randn(3, D, 4, D, generator=_gen())
    assert torch.equal(StreamMap.identity(D).apply(x, (1, 3)), x)
    assert torch.equal(StreamMap(matrix=torch.eye(D, dtype=torch.float64)).apply(x, (1, 3)), x)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.lists(st.integers(1, 3), min_size=0, max_size=2), where=st.integers(0, 2))
def test_permutation_and_its_matrix_agree(seed, shape, where):
    perm, matrix = _both_forms(seed)
    dims = list(shape)
    dims.insert(min(where, len(dims)), D)
    x = torch.randn(*dims, generator=_gen(seed))
    axis = dims.index(D)
    assert _close(perm.apply(x, (axis,)), matrix.apply(x, (axis,)))


def test_the_rule_is_x_times_q():
    x = torch.randn(5, D, generator=_gen())
    for stream_map in _maps():
        q = stream_map.as_matrix().float()
        assert _close(stream_map.apply(x, (1,)), x @ q)
        assert _close(stream_map.apply(x.T.contiguous(), (0,)), (x @ q).T)


def test_inverse_undoes_and_then_composes():
    x = torch.randn(4, D, D, generator=_gen())
    for first in _maps():
        for second in _maps():
            both = first.then(second)
            assert _close(both.apply(x, (1, 2)), second.apply(first.apply(x, (1, 2)), (1, 2)))
        assert _close(first.inverse().apply(first.apply(x, (1, 2)), (1, 2)), x)
    perm, matrix = _both_forms()
    assert perm.then(perm).is_permutation and torch.equal(perm.then(perm.inverse()).perm, torch.arange(D))
    assert _close(perm.inverse().as_matrix(), matrix.inverse().as_matrix())


def test_linear_readers_and_writers_in_both_layouts():
    """x_new = x Q; a reader W [out, d] -> W Q (Conv1D [d, out] -> Q^T W); a writer W [d, in] and
    its bias -> Q^T W, b Q (Conv1D [in, d] -> W Q): the read values and the written vectors agree."""
    g = _gen()
    x, h = torch.randn(6, D, generator=g), torch.randn(6, 5, generator=g)
    reader, writer, bias = torch.randn(5, D, generator=g), torch.randn(D, 5, generator=g), torch.randn(D, generator=g)
    for stream_map in _maps():
        x_new = stream_map.apply(x, (1,))
        assert _close(x_new @ stream_map.apply(reader, (1,)).T, x @ reader.T)
        assert _close(x_new @ stream_map.apply(reader.T.contiguous(), (0,)), x @ reader.T)  # Conv1D [d, out]
        written = stream_map.apply(h @ writer.T + bias, (1,))
        assert _close(h @ stream_map.apply(writer, (0,)).T + stream_map.apply(bias, (0,)), written)
        assert _close(h @ stream_map.apply(writer.T.contiguous(), (1,)) + stream_map.apply(bias, (0,)), written)
        square = torch.randn(D, D, generator=g)  # reads and writes (an MLM head's transform)
        assert _close(x_new @ stream_map.apply(square, (0, 1)).T, stream_map.apply(x @ square.T, (1,)))


def test_embeddings_and_patch_convolution():
    g = _gen()
    table, ids = torch.randn(11, D, generator=g), torch.tensor([[3, 0, 10, 3]])
    cls_token, positions = torch.randn(1, 1, D, generator=g), torch.randn(1, 5, D, generator=g)
    kernel, kernel_bias = torch.randn(D, 3, 2, 2, generator=g), torch.randn(D, generator=g)
    image = torch.randn(2, 3, 4, 4, generator=g)
    for stream_map in _maps():
        assert _close(F.embedding(ids, stream_map.apply(table, (1,))), stream_map.apply(F.embedding(ids, table), (2,)))
        assert _close(
            stream_map.apply(cls_token, (2,)) + stream_map.apply(positions, (2,))[:, :1],
            stream_map.apply(cls_token + positions[:, :1], (2,)),
        )
        patches = F.conv2d(image, kernel, kernel_bias, stride=2).flatten(2).transpose(1, 2)  # [B, N, d]
        moved = F.conv2d(image, stream_map.apply(kernel, (0,)), stream_map.apply(kernel_bias, (0,)), stride=2)
        assert _close(moved.flatten(2).transpose(1, 2), stream_map.apply(patches, (2,)))


def test_layernorm_admits_permutations_only():
    g = _gen()
    x, gain, bias = torch.randn(6, D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
    perm, matrix = _both_forms()
    for stream_map in (perm, matrix):
        new = F.layer_norm(stream_map.apply(x, (1,)), (D,), stream_map.apply(gain, (0,)), stream_map.apply(bias, (0,)))
        assert _close(new, stream_map.apply(F.layer_norm(x, (D,), gain, bias), (1,)))
    rotation = random_stream_map(D, orthogonal=True, generator=_gen(1))
    new = F.layer_norm(rotation.apply(x, (1,)), (D,), rotation.apply(gain, (0,)), rotation.apply(bias, (0,)))
    assert not _close(new, rotation.apply(F.layer_norm(x, (D,), gain, bias), (1,)))


def test_a_layernorm_feeding_a_reader_admits_orthogonal_maps_that_keep_the_ones():
    g = _gen()
    x, reader, reader_bias = torch.randn(6, D, generator=g), torch.randn(4, D, generator=g), torch.randn(4, generator=g)
    gain, bias = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
    expected = F.linear(F.layer_norm(x, (D,), gain, bias), reader, reader_bias)
    rotation = random_stream_map(D, orthogonal=True, generator=_gen(2), keep_ones=True)
    assert rotation.keeps_ones and not rotation.is_permutation
    folded_reader = rotation.apply(scale_axis(reader, gain, 1), (1,))
    riding_bias = rotation.apply(bias / gain, (0,))
    new = F.linear(F.layer_norm(rotation.apply(x, (1,)), (D,), torch.ones(D), riding_bias), folded_reader, reader_bias)
    assert _close(new, expected)
    # a map that moves the ones does not commute with the centering
    moving = random_stream_map(D, orthogonal=True, generator=_gen(3))
    assert not moving.keeps_ones
    folded_reader = moving.apply(scale_axis(reader, gain, 1), (1,))
    new = F.linear(
        F.layer_norm(moving.apply(x, (1,)), (D,), torch.ones(D), moving.apply(bias / gain, (0,))),
        folded_reader,
        reader_bias,
    )
    assert not _close(new, expected)


def test_maps_that_keep_the_ones():
    frame = ones_frame(D)
    assert _close(frame @ frame.T, torch.eye(D, dtype=torch.float64)) and _close(frame, frame.T)
    assert _close(frame[:, 0], torch.full((D,), D**-0.5, dtype=torch.float64))
    rotation = random_stream_map(D - 1, orthogonal=True, generator=_gen(4)).as_matrix()
    kept = keeping_ones(rotation)
    assert kept.keeps_ones and _close(kept.as_matrix() @ torch.ones(D, dtype=torch.float64), torch.ones(D))
    assert random_stream_map(D, orthogonal=False, generator=_gen()).keeps_ones  # every permutation
    assert keeping_ones(torch.eye(0)).d == 1


def _rms(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain


def test_rmsnorm_admits_any_orthogonal_map_once_the_gain_is_folded():
    g = _gen()
    x, gain, reader = torch.randn(6, D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(4, D, generator=g)
    rotation = random_stream_map(D, orthogonal=True, generator=_gen(2))
    assert not rotation.is_permutation
    folded = rotation.apply(scale_axis(reader, gain, 1), (1,))
    assert _close(_rms(rotation.apply(x, (1,)), torch.ones(D)) @ folded.T, _rms(x, gain) @ reader.T)
    # unfolded, the gain would have to commute with Q, which it does not
    unfolded = rotation.apply(reader, (1,))
    assert not _close(_rms(rotation.apply(x, (1,)), rotation.apply(gain, (0,))) @ unfolded.T, _rms(x, gain) @ reader.T)


def test_fold_gain_axis_and_dtype():
    weight, gain = torch.randn(3, D, dtype=torch.bfloat16, generator=_gen()), torch.rand(D) + 0.5
    folded = scale_axis(weight, gain, 1)
    assert folded.dtype == torch.bfloat16
    assert torch.allclose(folded.float(), weight.float() * gain, rtol=1e-2)
    assert torch.allclose(scale_axis(weight.T, gain, 0).float(), folded.T.float())
    with pytest.raises(ValueError, match="do not fit"):
        scale_axis(weight, gain, 0)


def test_apply_keeps_dtype_and_checks_the_axis():
    rotation = random_stream_map(D, orthogonal=True, generator=_gen())
    x = torch.randn(2, D, dtype=torch.bfloat16, generator=_gen())
    out = rotation.apply(x, (1,))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.allclose(out.float(), x.float() @ rotation.as_matrix().float(), atol=5e-2)
    with pytest.raises(ValueError, match="not the stream"):
        rotation.apply(x, (0,))


def test_random_maps_are_orthogonal_and_seeded():
    a = random_stream_map(D, orthogonal=True, generator=_gen(3))
    assert torch.allclose(a.matrix.T @ a.matrix, torch.eye(D, dtype=torch.float64), atol=1e-12)
    assert torch.equal(a.matrix, random_stream_map(D, orthogonal=True, generator=_gen(3)).matrix)
    b = random_stream_map(D, orthogonal=False, generator=_gen(3))
    assert b.is_permutation and sorted(b.perm.tolist()) == list(range(D))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"perm": torch.tensor([0, 0, 1])}, "exactly once"),
        ({"matrix": torch.ones(3, 3)}, "not orthogonal"),
        ({"matrix": torch.eye(3)[:2]}, "square"),
    ],
)
def test_invalid_maps_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamMap(**kwargs)
