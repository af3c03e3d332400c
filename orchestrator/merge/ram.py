"""RAM and RAM+ (tensor-local): sum what one model changes, average what several change.

Reference: "Reinforced Agent Merging", https://arxiv.org/abs/2601.13572, as implemented by
mergekit 0.1.5's ``ram`` and ``ramplus_tl``, whose semantics this follows.

Per tensor, with task vectors ``delta_i = x_i - base`` (i = 1..n):

1. An entry of ``delta_i`` is active where ``|delta_i| > epsilon``; inactive entries are
   zeroed. ``c`` = the number of models active at an entry.
2. RAM: entries changed by one model (``c = 1``) keep its value (summed); entries changed by
   several (``c > 1``) get the mean of the active values, ``sum_i delta_i [active] / c``;
   entries no model changes stay at the base.
3. RAM+ (tensor-local) also boosts each model's unique entries by
   ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, where ``rho_i`` is the ratio of model i's
   shared active entries to its unique ones in this tensor, ``shared_i / max(unique_i, epsilon)``.

Choice: a model with no unique entry has nothing to boost; its ``rho_i`` is taken as 0 rather
than ``shared_i / epsilon`` (the same result, and no NaN from ``0 / 0`` when ``epsilon = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_range


@dataclass(frozen=True)
class RamParams:
    """Global parameters of ram.

    Attributes:
        epsilon: an entry counts as changed where ``|delta| > epsilon``, in [0, inf)
            (mergekit's default 1e-5).
    """

    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        check_range("epsilon", self.epsilon, 0, None)


@dataclass(frozen=True)
class RamPlusParams:
    """Global parameters of ramplus_tl.

    Attributes:
        r: strength of the boost of unique entries, in [0, inf) (mergekit's default 0.1).
        alpha: cap on the shared/unique ratio in the boost, in [0, inf) (default 0.2), so
            ``lambda`` lies in ``[1, 1 + r * alpha]``.
        epsilon: an entry counts as changed where ``|delta| > epsilon``, in [0, inf)
            (default 1e-5).
    """

    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        check_range("r", self.r, 0, None)
        check_range("alpha", self.alpha, 0, None)
        check_range("epsilon", self.epsilon, 0, None)


def ram(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
        params: RamParams, generator: torch.Generator | None) -> Tensor:
    """Merged delta: unique changes summed, shared ones averaged (module docstring)."""
    kept, _, count = active_entries(xs, params.epsilon)  # (n, *shape), _, (*shape)
    # c = 1: sum of the one active value; c > 1: their mean; c = 0: 0.
    return kept.sum(dim=0).div_(count.clamp(min=1))


def ramplus_tl(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
               params: RamPlusParams, generator: torch.Generator | None) -> Tensor:
    """RAM with each model's unique entries boosted by ``lambda_i`` (module docstring)."""
    kept, active, count = active_entries(xs, params.epsilon)  # (n, *shape), (n, *shape), (*shape)
    unique, shared = count == 1, count > 1  # (*shape)
    boost = unique_boost(active, unique, shared, params)  # (n,)
    boost = boost.view(-1, *[1] * (kept.dim() - 1))  # (n, 1, ...)
    merged = (kept * unique * boost).sum(dim=0)  # (*shape) boosted unique entries
    return merged.add_((kept * shared).sum(dim=0).div_(count.clamp(min=1)))  # + shared means


def active_entries(xs: Sequence[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(kept, active, count)``: the task vectors with inactive entries zeroed (n, *shape),
    the bool mask ``|delta| > epsilon`` (n, *shape) and the active count per entry (*shape)."""
    tvs = torch.stack([x.float() for x in xs])  # (n, *shape)
    active = tvs.abs() > epsilon  # (n, *shape)
    count = active.sum(dim=0)  # (*shape) int64
    return tvs.mul_(active), active, count


def unique_boost(active: Tensor, unique: Tensor, shared: Tensor, params: RamPlusParams) -> Tensor:
    """``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)`` per model (n,)."""
    n = active.shape[0]
    shared_i = (active & shared).reshape(n, -1).sum(dim=1).double()  # (n,)
    unique_i = (active & unique).reshape(n, -1).sum(dim=1).double()  # (n,)
    rho = torch.where(unique_i > 0, shared_i / unique_i.clamp(min=params.epsilon), 0.0)  # (n,)
    return (1 + params.r * rho.clamp(0, params.alpha)).float()
