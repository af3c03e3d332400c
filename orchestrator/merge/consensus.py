"""TIES sign consensus: elect a sign per entry, then merge only the deltas that agree with it.

Reference: Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


SignMethod = Literal["weighted_sum", "sum"]


def disjoint_merge(trimmed: Sequence[Tensor], weights: Sequence[float], sign_method: SignMethod, *,
                   divisor: bool, work: Sequence[Tensor] | None = None, out: Tensor | None = None,
                   elected: Tensor | None = None,
                   total: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Sum the weighted deltas that agree with the elected sign.

    Args:
        trimmed: the sparsified task vectors, unweighted, all of one shape (a stacked
            ``(n, *shape)`` tensor works too); read only, unless ``work`` is ``None``.
        weights: one weight per task vector.
        sign_method: ``"weighted_sum"`` (mergekit): elect ``sign(sum_i w_i t_i)`` and count a
            model's weight where ``w_i t_i`` agrees; ``"sum"`` (paper, PEFT): elect
            ``sign(sum_i t_i)`` and count 1 where ``t_i`` agrees. Zero sums elect +; zeros
            (pruned entries) never agree.
        divisor: also return the per-entry divisor for normalizing (where no model agrees it is
            a positive placeholder, as mergekit's 1: the merged value there is 0).
        work: one scratch tensor per task vector (may be the task vector itself); default:
            ``trimmed`` (overwritten).
        out, elected, total: where to put the merged sum, the elected signs and the divisor
            (default: new tensors). Used per slice by the chunked merge.

    Returns:
        ``(mixed, divisor)``: ``sum_i w_i t_i [agrees_i]`` (in ``out``), and the divisor or
        ``None``.
    """
    work = trimmed if work is None else work
    votes = list(weights) if sign_method == "weighted_sum" else [1.0] * len(weights)
    counted = votes  # what an agreeing model adds to the divisor: its weight (or 1)
    elected = elect_signs(trimmed, votes, elected)  # (*shape) +1 / -1
    # Disjoint merge. Where t_i agrees, w_i t_i = w_i s_i elected |t_i| with s_i = sign(vote_i),
    # so accumulate w_i s_i |t_i| over agreeing entries and apply the elected sign once at the end.
    mixed = summed = None
    for t, scratch, w, vote, count in zip(trimmed, work, weights, votes, counted):
        if vote == 0:
            continue  # a zero-weighted vote never agrees (mergekit: sign(0) != ±1)
        agreeing = torch.mul(t, elected, out=scratch)
        if vote < 0:
            agreeing.neg_()
        agreeing.relu_()  # (*shape) |t_i| where it agrees, else 0
        mixed = _accumulate(mixed, agreeing, w if vote > 0 else -w, out)
        if divisor:
            summed = _accumulate(summed, agreeing.sign_(), count, total)
    if mixed is None:  # every vote was zero: nothing agrees anywhere
        mixed = _zeros_like(elected, out)
        summed = _zeros_like(elected, total) if divisor else None
    mixed.mul_(elected)
    if summed is not None:
        _replace_zeros_by_one(summed, counted)
    return mixed, summed


def elect_signs(trimmed: Sequence[Tensor], votes: Sequence[float],
                out: Tensor | None = None) -> Tensor:
    """+1 where ``sum_i v_i t_i >= 0``, else -1 (into ``out``, or a new tensor).

    copysign maps a -0.0 sum to -1, but such a sum has only zero terms, which agree with
    neither sign: the merged result is the same.
    """
    first = trimmed[0]
    if out is None:
        out = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    torch.mul(first, votes[0], out=out)  # (*shape) the vote: sum_i v_i t_i
    for t, v in zip(trimmed[1:], votes[1:]):
        out.add_(t, alpha=v)
    return torch.copysign(torch.ones((), device=out.device), out, out=out)


def _zeros_like(x: Tensor, out: Tensor | None) -> Tensor:
    return torch.zeros_like(x) if out is None else out.zero_()


def _accumulate(total: Tensor | None, x: Tensor, alpha: float, out: Tensor | None) -> Tensor:
    """``total + alpha * x``, in place; for the first term ``alpha * x`` into ``out`` (or new)."""
    if total is not None:
        return total.add_(x, alpha=alpha)
    return torch.mul(x, alpha) if out is None else torch.mul(x, alpha, out=out)


def _replace_zeros_by_one(total: Tensor, counted: Sequence[float]) -> None:
    """Make divisor entries with no agreeing model non-zero (mergekit: 1; the merged value is 0)."""
    positive = [c for c in counted if c > 0]
    if len(positive) == len(counted):
        # Sums of positive counts are 0 or >= the smallest one; a 0 divides a 0, so any
        # positive value gives mergekit's result, and clamping is 2.9x faster than masking
        # (benchmarks/ops_bench.py).
        total.clamp_(min=min(positive))
    else:  # mixed signs can cancel to 0 where the merged value is not 0
        total.masked_fill_(total == 0, 1.0)
