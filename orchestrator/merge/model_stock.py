"""Model Stock: move from the base towards the models' average by an angle-derived ratio.

Reference: Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_bool
from orchestrator.merge.linear import weighted_sum

NORM_PRODUCT_MIN = 1e-6  # mergekit clamps |a| |b| to at least this before dividing
SINGULAR_EPS = 1e-6  # |1 + (n - 1) cos| below this keeps the base


@dataclass(frozen=True)
class ModelStockParams:
    """Global parameters of model_stock.

    Attributes:
        filter_wise: one ratio per row (along the last dim) instead of one per tensor.
    """

    filter_wise: bool = False

    def __post_init__(self) -> None:
        check_bool("filter_wise", self.filter_wise)


def model_stock(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
                params: ModelStockParams, generator: torch.Generator | None) -> Tensor:
    """``t * mean(x_i) + (1 - t) * base`` with ``t = n cos / (1 + (n - 1) cos)``.

    ``cos`` is the mean cosine between pairs of task vectors ``x_i - base`` (needs n >= 2).
    Where ``1 + (n - 1) cos`` is ~0 there is no finite ratio and the base is kept (mergekit).
    """
    n = len(xs)
    w0 = _rows(base, params.filter_wise)  # (r, c): one ratio per row
    offsets = [_rows(x, params.filter_wise) - w0 for x in xs]  # n x (r, c)
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]  # n x (r,)
    cosines = [
        (torch.linalg.vecdot(offsets[i], offsets[j], dim=-1)
         / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_MIN)).clamp(-1.0, 1.0)
        for i, j in combinations(range(n), 2)
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (r, 1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))  # (r, 1)
    average = weighted_sum([_rows(x, params.filter_wise) for x in xs], [1.0] * n).div_(n)  # (r, c)
    return (average.mul_(t) + w0 * (1 - t)).reshape(base.shape)


def _rows(x: Tensor, filter_wise: bool) -> Tensor:
    """``x`` as rows whose cosines are taken: its last dim (filter-wise), else one flat row."""
    if not filter_wise:
        return x.float().reshape(1, -1)  # (1, n)
    return x.float().unsqueeze(0) if x.dim() == 1 else x.float()  # (..., c)
