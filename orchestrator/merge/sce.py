"""SCE: Select, Calculate, Erase: task vectors weighted by their energy, after a variance top-k.

Reference: Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (SCE merging),
https://arxiv.org/abs/2408.07990; mergekit 0.1.5's ``sce``, whose semantics this follows.

Per tensor, with task vectors ``delta_i = x_i - base`` (i = 1..n):

1. Select: when ``select_topk < 1``, keep the ``k = int(nonzero * select_topk)`` entries where
   the variance of ``delta_i`` across models is largest (``nonzero``: entries with non-zero
   variance), zeroing the others in every task vector. Ties rank by position.
2. Calculate: a matrix-level weight per model, ``w_i = mean(delta_i^2) / sum_j mean(delta_j^2)``
   (uniform ``1/n`` when that sum is below 1e-6, as mergekit).
3. Erase: elect a sign per entry from ``sum_i delta_i`` (>= 0 elects +) and drop the entries of
   each task vector whose sign differs (zeros never agree).
4. Merge: ``sum_i w_i delta_i [agrees] / max(sum_i w_i [agrees], 1e-6)``.

User weights are not taken (mergekit's ``sce`` has no per-model parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_bool, check_range
from orchestrator.merge.selection import rank_window

WEIGHT_SUM_MIN = 1e-6  # mergekit: below this the energy weights are uniform
DIVISOR_MIN = 1e-6  # mergekit clamps the agreeing weight sum to at least this


@dataclass(frozen=True)
class SceParams:
    """Global parameters of sce.

    Attributes:
        select_topk: fraction of the entries with non-zero variance across models that are
            kept, in [0, 1] (1: all; mergekit's default).
        int8_mask: accepted for mergekit recipes; no effect (a memory option there).
    """

    select_topk: float = 1.0
    int8_mask: bool = False

    def __post_init__(self) -> None:
        check_range("select_topk", self.select_topk, 0, 1)
        check_bool("int8_mask", self.int8_mask)


def sce(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
        params: SceParams, generator: torch.Generator | None) -> Tensor:
    """Merge task vectors ``xs`` into one delta (module docstring)."""
    tvs = torch.stack([x.float() for x in xs])  # (n, *shape)
    if params.select_topk < 1:  # 1. select
        tvs.mul_(variance_mask(tvs, params.select_topk))
    weights = energy_weights(tvs)  # (n,) 2. calculate
    agree = sign_agreement(tvs)  # (n, *shape) 3. erase
    erased = agree.to(torch.float32).mul_(weights.view(-1, *[1] * (tvs.dim() - 1)))  # (n, *shape)
    merged = (tvs * erased).sum(dim=0)  # (*shape) 4. merge
    return merged.div_(erased.sum(dim=0).clamp_(min=DIVISOR_MIN))


def variance_mask(tvs: Tensor, fraction: float) -> Tensor:
    """0/1 mask (*shape) of the ``int(nonzero * fraction)`` entries of largest variance."""
    var = torch.var(tvs, dim=0, correction=0)  # (*shape) population variance across models
    k = int(torch.count_nonzero(var) * fraction)  # float32 product, as mergekit
    n = var.numel()
    if k == 0:
        return torch.zeros_like(var)
    mask = var.reshape(-1).clone()  # (n,) |var| = var
    rank_window(mask, var.reshape(-1), n - k, n)  # the top k, ties by position
    return mask.view(var.shape)


def energy_weights(tvs: Tensor) -> Tensor:
    """``mean(delta_i^2)`` per model (n,), normalised to sum to 1 (uniform when ~0)."""
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)  # (n,)
    total = float(energy.sum())
    if abs(total) < WEIGHT_SUM_MIN:
        return torch.full_like(energy, 1.0 / tvs.shape[0])
    return energy / total


def sign_agreement(tvs: Tensor) -> Tensor:
    """Bool (n, *shape): ``sign(delta_i) == sign(sum_j delta_j)``, a zero sum electing +."""
    elected = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0)  # (*shape)
    return tvs.sign() == elected
