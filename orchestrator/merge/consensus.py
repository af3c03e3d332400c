"""TIES sign consensus: elect a sign per entry, then merge only the deltas that agree with it.

Reference: Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from orchestrator.merge.linear import weighted_sum

SignMethod = Literal["weighted_sum", "sum"]


def disjoint_merge(trimmed: Tensor, weights: Sequence[float], sign_method: SignMethod, *,
                   divisor: bool) -> tuple[Tensor, Tensor | None]:
    """Sum the weighted deltas that agree with the elected sign.

    Args:
        trimmed: the sparsified task vectors, unweighted, shape ``(n, *shape)``; used as
            scratch space (overwritten).
        weights: one weight per task vector.
        sign_method: ``"weighted_sum"`` (mergekit): elect ``sign(sum_i w_i t_i)`` and count a
            model's weight where ``w_i t_i`` agrees; ``"sum"`` (paper, PEFT): elect
            ``sign(sum_i t_i)`` and count 1 where ``t_i`` agrees. Zero sums elect +; zeros
            (pruned entries) never agree.
        divisor: also return the per-entry divisor for normalizing (where no model agrees it is
            a positive placeholder, as mergekit's 1: the merged value there is 0).

    Returns:
        ``(mixed, divisor)``: ``sum_i w_i t_i [agrees_i]`` of shape ``shape``, and the divisor
        or ``None``.
    """
    votes = list(weights) if sign_method == "weighted_sum" else [1.0] * len(weights)
    counted = votes  # what an agreeing model adds to the divisor: its weight (or 1)
    # Elect sign: +1 where the (weighted) sum is >= 0, else -1. copysign maps a -0.0 sum to -1,
    # but such a sum has only zero terms, which agree with neither sign: the result is the same.
    total_vote = weighted_sum(list(trimmed), votes)  # (*shape)
    elected = torch.copysign(torch.ones((), device=total_vote.device), total_vote, out=total_vote)
    # Disjoint merge. Where t_i agrees, w_i t_i = w_i s_i elected |t_i| with s_i = sign(vote_i),
    # so accumulate w_i s_i |t_i| over agreeing entries and apply the elected sign once at the end.
    mixed = total = None
    for t, w, vote, count in zip(trimmed, weights, votes, counted):
        if vote == 0:
            continue  # a zero-weighted vote never agrees (mergekit: sign(0) != ±1)
        s = 1.0 if vote > 0 else -1.0
        agreeing = t.mul_(elected) if s > 0 else t.mul_(elected).neg_()
        agreeing.relu_()  # (*shape) |t_i| where it agrees, else 0
        mixed = _accumulate(mixed, agreeing, w * s)
        if divisor:
            total = _accumulate(total, agreeing.sign_(), count)
    if mixed is None:  # every vote was zero: nothing agrees anywhere
        mixed, total = torch.zeros_like(elected), torch.zeros_like(elected) if divisor else None
    mixed.mul_(elected)
    if total is not None:
        _replace_zeros_by_one(total, counted)
    return mixed, total


def _accumulate(total: Tensor | None, x: Tensor, alpha: float) -> Tensor:
    """``total + alpha * x``, in place; a new tensor for the first term."""
    return torch.mul(x, alpha) if total is None else total.add_(x, alpha=alpha)


def _replace_zeros_by_one(total: Tensor, counted: Sequence[float]) -> None:
    """Make divisor entries with no agreeing model non-zero (mergekit: 1; the merged value is 0)."""
    positive = [c for c in counted if c > 0]
    if len(positive) == len(counted):
        # Sums of positive counts are 0 or >= the smallest one; a 0 divides a 0, so any
        # positive value gives mergekit's result, and clamping is much faster than masking.
        total.clamp_(min=min(positive))
    else:  # mixed signs can cancel to 0 where the merged value is not 0
        total.masked_fill_(total == 0, 1.0)
