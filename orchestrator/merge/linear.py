"""Linear merge (model soups): a weighted average of the models' tensors.

Reference: Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import check_bool, check_range


@dataclass(frozen=True)
class WeightParams:
    """Per-model parameters of linear, nuslerp and multislerp.

    Attributes:
        weight: the model's coefficient (any finite number; negative subtracts).
    """

    weight: float

    def __post_init__(self) -> None:
        check_range("weight", self.weight, None, None)


@dataclass(frozen=True)
class LinearParams:
    """Global parameters of linear.

    Attributes:
        normalize: divide by the sum of the weights (mergekit's default: true).
    """

    normalize: bool = True

    def __post_init__(self) -> None:
        check_bool("normalize", self.normalize)


def weighted_sum(xs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i x_i`` in float32, into one new tensor."""
    out = torch.mul(xs[0].float(), weights[0])  # (*shape)
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x.float(), alpha=w)  # (*shape)
    return out


def linear(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[WeightParams],
           params: LinearParams, generator: torch.Generator | None) -> Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    Raises:
        ValueError: ``normalize`` is set and the weights sum to zero (mergekit would return
            inf/NaN here).
    """
    weights = [m.weight for m in models]
    total = sum(weights)
    if params.normalize and abs(total) < 1e-8:
        raise ValueError(f"weights sum to zero ({weights}) with normalize: true; "
                         "change the weights or set normalize: false")
    out = weighted_sum(xs, weights)
    return out.div_(total) if params.normalize else out
