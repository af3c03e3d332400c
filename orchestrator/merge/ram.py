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

from orchestrator.merge import chunks
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
    out = torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for o, kept, _, count in _active_slices(xs, params.epsilon, out):
        # c = 1: sum of the one active value; c > 1: their mean; c = 0: 0.
        chunks.sum_into(kept, o).div_(count.clamp_(min=1))
    return out


def ramplus_tl(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
               params: RamPlusParams, generator: torch.Generator | None) -> Tensor:
    """RAM with each model's unique entries boosted by ``lambda_i`` (module docstring).

    Two passes a slice at a time: one counts each model's unique and shared entries (the
    boost needs the whole tensor's counts), one merges: the RAM mean times a factor that is
    exactly ``lambda_i`` where model ``i`` alone is active and 1 elsewhere, so an entry gets
    ``lambda_i * delta_i`` (one rounding, as summing the boosted unique and the shared parts).
    """
    n = len(xs)
    unique_i, active_i = [0.0] * n, [0.0] * n
    for _, _, active, count in _active_slices(xs, params.epsilon):
        alone = _is_one(count)  # (slice,) 1.0 where one model is active
        for i, a in enumerate(active):
            active_i[i] += float(a.sum())  # 0/1 sums: exact in float32 up to 2**24 per slice
            unique_i[i] += float(torch.dot(a, alone))
    boost = unique_boost([a - u for a, u in zip(active_i, unique_i)], unique_i, params)
    out = torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for o, kept, active, count in _active_slices(xs, params.epsilon, out):
        chunks.sum_into(kept, o).div_(count.clamp(min=1))  # the means (c = 1: the one value)
        factor = active[0].mul_(boost[0] - 1)  # sum_i (lambda_i - 1) [active_i] ...
        for a, b in zip(active[1:], boost[1:]):
            factor.add_(a.mul_(b - 1))
        o.mul_(factor.mul_(_is_one(count)).add_(1))  # ... where c = 1, plus 1: exact
    return out


def _is_one(count: Tensor) -> Tensor:
    """1.0 where the integer-valued ``count`` is 1, else 0.0 (in place)."""
    return count.sub_(1).abs_().neg_().add_(1).clamp_(min=0)


def _active_slices(xs: Sequence[Tensor], epsilon: float, out: Tensor | None = None):
    """Per slice: ``(out slice, kept, active, count)``: the task vectors with the entries where
    ``|delta| <= epsilon`` zeroed, 1.0 where they are not, and how many models are active per
    entry (all float32, in reused buffers that callers may overwrite)."""
    flats = [chunks.flat(x) for x in xs]
    n, numel = len(flats), flats[0].numel()
    size = chunks.chunk_size(flats[0].device, numel)
    bufs = chunks.buffers(2 * n + 2, size, flats[0].device, name="ram")
    count_buf, tmp = bufs.pop(), bufs.pop()
    flat_out = None if out is None else out.view(-1)
    for start, stop in chunks.spans(numel, size):
        m = stop - start
        count = count_buf[:m].zero_()
        kept, active = [], []
        for f, buf, act in zip(flats, bufs[:n], bufs[n:]):
            # hardshrink keeps |d| > epsilon; a kept entry is non-zero (epsilon >= 0)
            k = torch.hardshrink(chunks.as_float32(f[start:stop], tmp), epsilon, out=buf[:m])
            a = torch.sign(k, out=act[:m]).abs_()
            count.add_(a)
            kept.append(k)
            active.append(a)
        yield (None if flat_out is None else flat_out[start:stop]), kept, active, count



def unique_boost(shared_i: Sequence[float], unique_i: Sequence[float],
                 params: RamPlusParams) -> list[float]:
    """``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)`` per model."""
    shared = torch.tensor(shared_i, dtype=torch.float64)
    unique = torch.tensor(unique_i, dtype=torch.float64)
    rho = torch.where(unique > 0, shared / unique.clamp(min=params.epsilon), 0.0)  # (n,)
    return (1 + params.r * rho.clamp(0, params.alpha)).float().tolist()
