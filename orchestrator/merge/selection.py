"""Exact rank selection for magnitude pruning, without mergekit's full argsort.

``rank_window`` keeps the entries whose ascending rank of ``|delta|`` lies in ``[start, stop)``:
the top-k of TIES is ``[n - k, n)``, Model Breadcrumbs' band is ``[n_bot, n_bot + target)``.
Two order statistics give the thresholds; entries tied with a threshold are ranked by position,
so exactly ``stop - start`` entries are kept (mergekit's choice among ties follows its unstable
sort and is unspecified). Task vectors of bf16 checkpoints have many ties; they are settled by
locating one cut-off position per threshold, not by ranking or listing the tied entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_CHUNK = 1 << 20  # entries counted at a time when locating a tied position


def order_statistics(values: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """The values at ascending 0-based ``ranks`` of flat ``values`` (reordered in place on CPU).

    On CPU numpy's introselect (``ndarray.partition``) is 7x faster than ``torch.kthvalue``
    (``benchmarks/ops_bench.py``); on other devices ``kthvalue`` is used and ``values`` is
    left as it is.
    """
    if values.device.type != "cpu":
        return [values.kthvalue(r + 1).values for r in ranks]
    array, done, found = values.numpy(), 0, {}  # the array shares memory with `values`
    for rank in sorted(ranks):
        # After partitioning at `done`, array[done:] holds exactly the ranks >= done. One kth
        # at a time: numpy's multi-kth partition is 4.6x slower for three ranks (ops_bench).
        array[done:].partition(rank - done)
        found[rank], done = torch.tensor(array[rank]), rank
    return [found[r] for r in ranks]


def rank_window(work: Tensor, delta: Tensor, start: int, stop: int) -> None:
    """Turn ``work`` (holding ``|delta|``, contiguous) into a 0/1 mask of ranks ``[start, stop)``."""
    flat = work.view(-1)  # (n,)
    n = flat.numel()
    if stop <= start or start >= n:
        flat.zero_()
        return
    if start <= 0 and stop >= n:
        flat.fill_(1.0)
        return
    ranks = ([start] if start > 0 else []) + ([stop - 1] if stop < n else [])
    bounds = order_statistics(flat, ranks)
    torch.abs(delta, out=work)  # the selection may have reordered it
    lo = bounds[0] if start > 0 else None
    hi = bounds[-1] if stop < n else None
    # Keep lo <= |delta| <= hi. Ties rank by position: at lo the first tied entries fall below
    # `start`, at hi the last ones reach `stop`; drop just those.
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)  # (n,)
    if lo is not None:
        torch.logical_and(keep, flat >= lo, out=keep)
        _drop_ties(keep, flat == lo, int(keep.count_nonzero()) - (n - start), first=True)
    if hi is not None:
        below_hi = flat <= hi  # (n,) bool
        _drop_ties(keep, flat == hi, int(below_hi.count_nonzero()) - stop, first=False)
        torch.logical_and(keep, below_hi, out=keep)
    flat.copy_(keep)


def _drop_ties(keep: Tensor, tied: Tensor, count: int, *, first: bool) -> None:
    """Clear ``keep`` at the first (or last) ``count`` true positions of ``tied``."""
    if count <= 0:
        return
    cut = _nth_true(tied, count, from_end=not first)
    region = slice(0, cut + 1) if first else slice(cut, None)
    torch.logical_and(keep[region], tied[region].logical_not(), out=keep[region])


def _nth_true(flags: Tensor, m: int, *, from_end: bool) -> int:
    """Position of the ``m``-th (1-based) true entry of flat bool ``flags`` from either end.

    Counts chunk by chunk and lists positions only inside the chunk that holds the answer.
    """
    chunks = list(enumerate(flags.split(_CHUNK)))
    seen = 0
    for index, chunk in reversed(chunks) if from_end else chunks:
        count = int(chunk.count_nonzero())
        if seen + count >= m:
            positions = torch.nonzero(chunk).squeeze(1)  # (count,)
            return index * _CHUNK + int(positions[-(m - seen) if from_end else m - seen - 1])
        seen += count
    raise ValueError(f"asked for true entry {m} of {seen}")


# -- thresholds: the same selection without a mask ---------------------------------------------

@dataclass(frozen=True)
class Window:
    """Ranks ``[start, stop)`` of ascending ``|delta|`` as two thresholds and two tie cuts.

    An entry is kept when ``lo <= |delta| <= hi``, except entries tied at ``lo`` at flat
    positions ``<= lo_cut`` (they rank below ``start``) and entries tied at ``hi`` at positions
    ``>= hi_cut`` (they rank at or above ``stop``): exactly ``rank_window``'s mask. ``None``
    bounds are open; a bound at 0 only decides about zeros and is dropped (a kept zero and a
    dropped one contribute the same). ``empty``: nothing is kept.
    """

    lo: float | None = None
    hi: float | None = None
    lo_cut: int = -1
    hi_cut: int = 1 << 62
    empty: bool = False

    def apply(self, delta: Tensor, out: Tensor, start: int, tmp: Tensor) -> Tensor:
        """Write the kept entries of the slice ``delta`` (flat positions ``start...``) into ``out``.

        ``delta`` may be ``out`` itself; ``tmp`` is scratch of at least ``len(delta)`` entries.
        Each kept entry is copied, each dropped one becomes 0 (``hardshrink``: one pass, no mask).
        """
        if self.empty:
            return out.zero_()
        stop = start + delta.numel()
        cuts = sorted({c for c in (self.lo_cut + 1, self.hi_cut) if start < c < stop})
        edges = [start, *cuts, stop]
        for a, b in zip(edges, edges[1:]):
            d, o = delta[a - start:b - start], out[a - start:b - start]
            # Pieces never straddle a cut: all of [a, b) lies on one side of each.
            lo = None if self.lo is None else (self.lo if b - 1 <= self.lo_cut else _below(self.lo))
            hi = None if self.hi is None else (_below(self.hi) if a >= self.hi_cut else self.hi)
            if hi is None:
                if lo is None:
                    o.copy_(d)
                else:
                    torch.hardshrink(d, lo, out=o)  # keeps |d| > lo
                continue
            over = torch.hardshrink(d, hi, out=tmp[: b - a])  # the entries above the band
            if lo is None:
                torch.sub(d, over, out=o)
            else:
                torch.hardshrink(d, lo, out=o).sub_(over)  # d - d = 0 above the band
        return out


def _below(value: float) -> float:
    """The largest float32 below ``value`` (>= 0): ``|x| > _below(v)`` is ``|x| >= v`` in float32."""
    return float(np.nextafter(np.float32(value), np.float32(0)))


def window_of(values: Tensor, start: int, stop: int) -> tuple[float | None, float | None, int, int]:
    """Thresholds of ranks ``[start, stop)`` of flat ``values`` (``|delta|``; reordered on CPU).

    Returns ``(lo, hi, drop_lo, drop_hi)``: the values at ranks ``start`` and ``stop - 1``
    (``None`` when ``start <= 0`` / ``stop >= n``), how many entries tied at ``lo`` rank below
    ``start`` (the first ones by position are dropped) and how many tied at ``hi`` rank at or
    above ``stop`` (the last ones). Needs ``0 <= start < stop`` and ``start < n``.
    """
    n = values.numel()
    want_lo, want_hi = start > 0, stop < n
    ranks = ([start] if want_lo else []) + ([stop - 1] if want_hi else [])
    if not ranks:
        return None, None, 0, 0
    bounds = [float(v) for v in order_statistics(values, ranks)]
    lo = bounds[0] if want_lo else None
    hi = bounds[-1] if want_hi else None
    if values.device.type == "cpu":
        # After the selection values[:start] <= lo and values[stop:] >= hi (numpy partition).
        array = values.numpy()
        drop_lo = int(np.count_nonzero(array[:start] == np.float32(lo))) if want_lo else 0
        drop_hi = int(np.count_nonzero(array[stop:] == np.float32(hi))) if want_hi else 0
    else:
        drop_lo = start - int(torch.count_nonzero(values < lo)) if want_lo else 0
        drop_hi = int(torch.count_nonzero(values <= hi)) - stop if want_hi else 0
    return lo, hi, drop_lo, drop_hi


def nth_equal(abs_chunk, n: int, size: int, value: float, m: int, *, from_end: bool) -> int:
    """Flat position of the ``m``-th (1-based) entry equal to ``value``, from either end.

    ``abs_chunk(start, stop)`` returns ``|delta[start:stop]|``; slices are visited in order (or
    in reverse) and positions listed only in the slice that holds the answer.
    """
    starts = list(range(0, n, size))
    seen = 0
    for start in reversed(starts) if from_end else starts:
        stop = min(n, start + size)
        chunk = abs_chunk(start, stop)
        if chunk.device.type == "cpu":  # numpy's float32 == is 3.4x faster (ops_bench)
            tied = torch.from_numpy(chunk.numpy() == np.float32(value))  # (stop - start,) bool
        else:
            tied = chunk == value
        count = int(tied.count_nonzero())
        if seen + count >= m:
            positions = torch.nonzero(tied).squeeze(1)
            return start + int(positions[-(m - seen) if from_end else m - seen - 1])
        seen += count
    raise ValueError(f"asked for tied entry {m} of {seen}")


def sampled_window(sample: np.ndarray, abs_chunk, n: int, size: int, start: int,
                   stop: int, *, z: float = 6.0) -> tuple[float | None, float | None, int, int] | None:
    """``window_of``'s result from one pass over ``|delta|`` instead of a full selection.

    ``sample`` (``|delta|`` at evenly spaced positions; reordered) brackets each wanted rank
    ``z`` standard errors wide; one pass (``abs_chunk(start, stop)`` per slice, CPU) counts the
    entries below each bracket and collects those inside it, and only the collected ones are
    selected from. Exact: returns ``None`` when a bracket misses its rank (the sample was
    unrepresentative), and the caller falls back to ``window_of``.
    """
    want = ([("lo", start)] if start > 0 else []) + ([("hi", stop - 1)] if stop < n else [])
    if not want:
        return None, None, 0, 0
    m = sample.size
    brackets = []
    for _, rank in want:
        q = rank / n
        margin = z * math.sqrt(q * (1 - q) / m) * m + 2
        brackets.append((max(0, int(q * m - margin)), min(m - 1, math.ceil(q * m + margin))))
    sample.partition(sorted({i for bracket in brackets for i in bracket}))
    # A bracket at the sample's extremes is open-ended: tail ranks cannot miss it.
    lowest, highest = np.float32(-np.inf), np.float32(np.inf)
    bounds = [(lowest if i == 0 else sample[i], highest if j == m - 1 else sample[j])
              for i, j in brackets]  # float32 scalars
    below = [0] * len(want)
    found: list[list[np.ndarray]] = [[] for _ in want]
    for a, b in zip(range(0, n, size), range(size, n + size, size)):
        values = abs_chunk(a, min(b, n)).numpy()
        for k, (low, high) in enumerate(bounds):
            inside = values >= low
            below[k] += values.size - int(np.count_nonzero(inside))
            inside &= values <= high
            found[k].append(values[inside])  # a copy: the slice buffer is reused
    result: dict[str, tuple[float, int]] = {}
    for k, (kind, rank) in enumerate(want):
        candidates = np.concatenate(found[k])
        i = rank - below[k]
        if not 0 <= i < candidates.size:
            return None
        candidates.partition(i)
        value = candidates[i]
        # Ties ranked outside the window: below `start` at lo, at or above `stop` at hi.
        ties = candidates[:i] if kind == "lo" else candidates[i + 1:]
        result[kind] = (float(value), int(np.count_nonzero(ties == value)))
    lo, drop_lo = result.get("lo", (None, 0))
    hi, drop_hi = result.get("hi", (None, 0))
    return lo, hi, drop_lo, drop_hi
