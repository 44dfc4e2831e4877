"""The learned loop's fused activations: the same function as the model as configured, fewer ops."""

from __future__ import annotations

import pytest
import torch

from rotfuse.eval.runtime import TANH_GELU_COMPOSED, TanhGelu, with_fused_activations


def _gpt2(activation: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50, activation_function=activation)
    return GPT2LMHeadModel(config).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast"])
def test_composed_tanh_gelu_is_swapped_for_the_fused_one_with_the_same_outputs(activation: str) -> None:
    model = _gpt2(activation)
    names = {type(m).__name__ for m in model.modules()}
    assert names & set(TANH_GELU_COMPOSED)  # the config really builds a composed one
    before = _logits(model)
    fused = with_fused_activations(model)
    assert not {type(m).__name__ for m in fused.modules()} & set(TANH_GELU_COMPOSED)
    assert sum(isinstance(m, TanhGelu) for m in fused.modules()) == 2  # one per layer's MLP
    after = _logits(fused)
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)


def test_other_activations_are_left_alone() -> None:
    """Exact GELU (erf) is another function: replacing it by the tanh form would change the model."""
    model = _gpt2("gelu")
    kinds = [type(m) for m in model.modules()]
    before = _logits(model)
    assert [type(m) for m in with_fused_activations(model).modules()] == kinds
    x = torch.linspace(-4, 4, 101)
    assert not torch.allclose(TanhGelu()(x), torch.nn.functional.gelu(x), atol=1e-6)  # why it must stay
    assert torch.equal(_logits(model), before)
