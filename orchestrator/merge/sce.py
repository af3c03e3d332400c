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

import numpy as np
import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_bool, check_range
from orchestrator.merge import chunks
from orchestrator.merge.selection import BLOCK, Window, nth_equal, sample_of, window_from, window_of

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
    """Merge task vectors ``xs`` into one delta (module docstring).

    A slice at a time, in a few cache-sized buffers: the variance is recomputed per slice
    wherever it is needed (selecting its top k, then masking), so the only full-size tensor is
    the result. Passes: the selection's counting passes, one for the energies, one to merge.
    """
    tv = _TaskVectors(xs)
    if params.select_topk < 1:  # 1. select
        tv.window = variance_window(tv, params.select_topk)
    weights = energy_weights(tv)  # n floats 2. calculate
    out = torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    flat_out = out.view(-1)
    elected, divisor, agree, tmp = tv.scratch
    for start, stop in chunks.spans(tv.numel, tv.size):
        m = stop - start
        ts = tv.read(start, stop)
        o, e, d, a, t_ = (flat_out[start:stop], elected[:m], divisor[:m], agree[:m], tmp[:m])
        chunks.sum_into(ts, e).sign_().add_(0.5).sign_()  # 3. erase: +1 where sum >= 0, else -1
        for i, (t, w) in enumerate(zip(ts, weights)):
            erased = torch.sign(t, out=a).mul_(e).relu_().mul_(w)  # w [sign(t) == elected]
            if i == 0:  # 4. merge
                torch.mul(t, erased, out=o)
                d.copy_(erased)
            else:
                o.add_(torch.mul(t, erased, out=t_))
                d.add_(erased)
        o.div_(d.clamp_(min=DIVISOR_MIN))
    return out


class _TaskVectors:
    """The task vectors a slice at a time (float32), masked by the selection's ``window``
    over their variance once it is set; buffers reused from slice to slice."""

    def __init__(self, xs: Sequence[Tensor]):
        self.flats = [chunks.flat(x) for x in xs]
        self.numel = self.flats[0].numel()
        self.device = self.flats[0].device
        self.size = chunks.chunk_size(self.device, self.numel)
        bufs = chunks.buffers(len(xs) + 6, self.size, self.device, name="sce")
        self.bufs, self.mask_bufs, self.scratch = bufs[:len(xs)], bufs[-6:-4], bufs[-4:]
        self.var: Tensor | None = None  # (numel,) once a selection is made
        self.window: Window | None = None  # None: every entry is kept

    def read(self, start: int, stop: int) -> list[Tensor]:
        """The task vectors on ``[start, stop)``, zero outside the selection."""
        m = stop - start
        ts = [chunks.as_float32(f[start:stop], b) for f, b in zip(self.flats, self.bufs)]
        if self.window is None:
            return ts
        kept, tmp = (b[:m] for b in self.mask_bufs)
        mask = self.window.apply(self.var[start:stop], kept, start, tmp).sign_()  # 1 where kept
        return [torch.mul(t, mask, out=b[:m]) for t, b in zip(ts, self.bufs)]

    def variances(self) -> Tensor:
        """The variance across models of every entry (numel,), computed slice by slice."""
        var = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        mean = self.mask_bufs[0]
        for start, stop in chunks.spans(self.numel, self.size):
            ts = [chunks.as_float32(f[start:stop], b) for f, b in zip(self.flats, self.bufs)]
            variance(ts, out=var[start:stop], mean=mean[: stop - start])
        return var



def variance(ts: Sequence[Tensor], *, out: Tensor, mean: Tensor) -> Tensor:
    """Population variance across models, entry by entry: ``mean_i (t_i - mean)^2`` (into
    ``out``; ``mean`` is scratch); for two models ``((t_0 - t_1) / 2)^2``, the same value
    correctly rounded.

    Elementwise. mergekit takes ``torch.var(stack, dim=0, correction=0)``, whose reduction over
    the stacked first dim costs about 100 ns per entry on CPU (15 s of a 19 s merge of the real
    135M pair; benchmarks/RESULTS.md). The two differ in the last bit on some entries, and
    where many variances tie at the top-k threshold (bf16 deltas) such an entry can fall on the
    other side of the cut than in mergekit.
    """
    if len(ts) == 2:
        return torch.sub(ts[0], ts[1], out=out).mul_(0.5).square_()
    chunks.sum_into(ts, mean).div_(len(ts))
    out.zero_()
    for t in ts:
        out.add_(torch.sub(t, mean).square_())
    return out.div_(len(ts))


def variance_window(tv: _TaskVectors, fraction: float) -> Window:
    """The ``int(nonzero * fraction)`` entries of largest variance, as a ``Window`` over
    ``tv.var`` (ties at the threshold by position: the first ones are dropped)."""
    tv.var = var = tv.variances()
    n = tv.numel
    k = int(torch.tensor(_count_nonzero(var)) * fraction)  # float32 product, as mergekit
    if k == 0:
        return Window(empty=True)

    def read(a: int, b: int) -> Tensor:
        return var[a:b]

    if tv.device.type == "cpu":
        lo, _, drop_lo, _ = window_from(read, n, BLOCK, n - k, n, sample_of(var))
    else:
        lo, _, drop_lo, _ = window_of(var, n - k, n)
    lo_cut = -1
    if lo is not None and drop_lo > 0:  # the first tied entries rank below n - k
        lo_cut = nth_equal(read, n, tv.size, lo, drop_lo, from_end=False)
    return Window(lo=lo, lo_cut=lo_cut)


def _count_nonzero(x: Tensor) -> int:
    if x.device.type == "cpu":
        return int(np.count_nonzero(x.numpy()))
    return int(torch.count_nonzero(x))


def energy_weights(tv: _TaskVectors) -> list[float]:
    """``mean(delta_i^2)`` per model (after the selection), normalised to sum to 1 (uniform
    when ~0); sums of squares accumulated slice by slice."""
    energy = [0.0] * len(tv.flats)
    for start, stop in chunks.spans(tv.numel, tv.size):
        for i, t in enumerate(tv.read(start, stop)):
            energy[i] += float(torch.dot(t, t))
    energy = [e / max(tv.numel, 1) for e in energy]
    total = sum(energy)
    if abs(total) < WEIGHT_SUM_MIN:
        return [1.0 / len(energy)] * len(energy)
    return [e / total for e in energy]
