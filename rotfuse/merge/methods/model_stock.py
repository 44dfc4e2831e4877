"""Model Stock (Jang et al. 2024): average fine-tunes, then pull the average towards their base.

Per tensor, with task vectors `delta_i = theta_i - base` of N fine-tunes, `cos` the mean over
pairs i < j of the cosine between delta_i and delta_j, and

    t = N cos / (1 + (N - 1) cos)

the result is `t * mean_i(theta_i) + (1 - t) * base`. Fine-tunes whose task vectors are
orthogonal (cos 0) give the base; identical ones (cos 1) their mean. The paper states t for one
angle; the mean of the pairwise cosines for N > 2, the cosine's 1e-6 floor on the norms' product
and the clamp to [-1, 1] are mergekit's `model_stock`. With `--filter-wise` the angle and t are
computed per row (along the last dimension; a 1-D tensor is one row), as its `filter_wise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rotfuse.merge.methods.base import MergeMethod
from rotfuse.merge.methods.task_vectors import no_weights, work_dtype


def model_stock(tensors: Sequence[torch.Tensor], base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock's merge of one tensor (see the module docstring)."""
    work = work_dtype([*tensors, base])
    shape = base.shape
    origin = base.to(dtype=work)
    width = shape[-1] if filter_wise and len(shape) >= 1 else -1

    def rows(x: torch.Tensor) -> torch.Tensor:  # one row per angle: the tensor, or its last dimension
        return x.reshape(-1, width) if width != -1 else x.reshape(1, -1)

    models = [rows(tensor.to(origin.device, work)) for tensor in tensors]
    w0 = rows(origin)
    offsets = [model - w0 for model in models]
    norms = [torch.linalg.vector_norm(offset, dim=-1) for offset in offsets]
    cosines = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    cos = (sum(cosines[1:], cosines[0].clone()) / len(cosines)).unsqueeze(-1)
    count = len(models)
    t = count * cos / (1 + (count - 1) * cos)
    mean = sum(models[1:], models[0].clone()) / count
    return (t * mean + (1 - t) * w0).reshape(shape)


@dataclass(frozen=True)
class ModelStockSettings:
    filter_wise: bool = False  # one angle per row (last dimension) instead of per tensor

    def validate(self) -> None:
        """Nothing to check."""


class ModelStock(MergeMethod):
    name = "model-stock"
    summary = "Model Stock: the fine-tunes' mean pulled towards the base by their task vectors' angle"
    needs_base = True
    min_models = 2
    Settings = ModelStockSettings

    @classmethod
    def normalise(cls, weights: Sequence[float] | None, count: int) -> list[float]:
        return no_weights(
            cls.name, weights, count, "the fine-tunes are averaged, the base's share comes from their angle"
        )

    def merge(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        assert base is not None
        return model_stock(tensors, base, self.settings.filter_wise)
