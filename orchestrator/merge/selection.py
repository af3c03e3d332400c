"""Exact rank selection for magnitude pruning, without sorting and without mergekit's argsort.

``rank_window`` keeps the entries whose ascending rank of ``|delta|`` lies in ``[start, stop)``:
the top-k of TIES is ``[n - k, n)``, Model Breadcrumbs' band is ``[n_bot, n_bot + target)``.
Two order statistics give the thresholds, and entries tied with a threshold are ranked by
flat position, as a stable sort ranks them: at the lower threshold the first tied entries
fall below ``start``, at the upper one the last tied entries reach ``stop``. So exactly
``stop - start`` entries are kept, and the same ones on every run (mergekit's choice among
ties follows its unstable sort and is unspecified).

**How the order statistics are found (CPU), without moving any entry.** ``select_ranks``
returns the value at each wanted rank together with how many entries lie below it and how
many equal it (what the tie rule needs), exactly, from counting passes over the values read a
slice at a time (``read(start, stop)``), so the fused merge selects on task vectors it never
holds whole:

1. Bracket: a sorted sample of about ``SAMPLE`` evenly spaced entries gives, for each rank, two
   values ``Z`` standard errors either side of it. One pass counts the entries below and at
   each bracket end (vectorised float32 comparisons, under 0.5 ns per entry) and keeps the
   few strictly inside; the rank then falls on a bracket end (on bf16 deltas it usually does:
   the ends are heavily tied values, often 0) or among the kept few, which are sorted.
2. Fallback, exact whatever the data (a bracket that misses, no sample): radix selection on
   the float32 bit patterns, mapped to int32 keys that order as the floats. Pass 1 counts the
   keys' high 16 bits (65,536 bins), locating each rank's bin; pass 2 counts the low 16 bits
   of the entries in those bins. A rank among exact zeros needs no pass 2.

Task vectors of bf16 checkpoints are mostly exact zeros and take a few hundred distinct
magnitudes. numpy's introselect (``ndarray.partition``, used before) degrades on such ties to
about 100-360 ns per entry against 7-10 on random float32, which made TIES on the real 135M
pair take 22 s; the counting passes cost a few ns per entry on both
(``benchmarks/ops_bench.py``). Tensors of at most ``SAMPLE`` entries are simply sorted. On
other devices ``torch.kthvalue`` is used.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Reader = Callable[[int, int], Tensor]  # read(start, stop): float32 values[start:stop] (CPU)

BLOCK = 1 << 20  # entries read at a time when the values are held whole
SAMPLE = 1 << 14  # entries sampled to bracket a rank (tensors up to this size are sorted)
Z = 6.0  # a bracket spans this many standard errors of the sample quantile on each side
_BINS = 1 << 16  # radix bins per pass: 16 bits of the key
_OFFSET = 1 << 15  # high 16 bits of a key (-32768..32767) + this = bin 0..65535
_ZERO_BIN = _OFFSET  # the bin of key 0 (+0.0 and -0.0), whose smallest key it is


@dataclass(frozen=True)
class Rank:
    """The value at one ascending rank, with how many entries are below it and equal to it."""

    value: float
    below: int
    equal: int


def select_ranks(read: Reader, n: int, size: int, ranks: Sequence[int],
                 sample: np.ndarray | None = None) -> list[Rank]:
    """The values at ascending 0-based ``ranks`` (each in ``[0, n)``) of ``n`` float32 values
    read ``size`` at a time (CPU), with how many entries lie below and equal to each. Exact.

    ``sample``: the values at about ``SAMPLE`` evenly spaced positions (reordered here); with
    it, one counting pass over brackets around each rank usually settles everything (module
    docstring), else the radix selection does.
    """
    if n <= SAMPLE:  # small: sort it all
        values = np.sort(np.concatenate([read(a, min(n, a + size)).numpy()
                                         for a in range(0, n, size)]))
        return [_from_sorted(values, r) for r in ranks]
    found = _bracketed(read, n, size, ranks, sample) if sample is not None else {}
    missed = [r for r in ranks if r not in found]
    if missed:
        found.update(zip(missed, _radix(read, n, size, missed)))
    return [found[r] for r in ranks]


def _from_sorted(values: np.ndarray, rank: int) -> Rank:
    value = values[rank]
    below = int(np.searchsorted(values, value, side="left"))
    return Rank(float(value), below, int(np.searchsorted(values, value, side="right")) - below)


def _bracketed(read: Reader, n: int, size: int, ranks: Sequence[int],
               sample: np.ndarray) -> dict[int, Rank]:
    """Ranks settled by one pass that counts the entries below and at each end of a bracket
    taken from ``sample`` and collects the (few) entries strictly inside it."""
    m = sample.size
    sample.sort()
    brackets = []
    for rank in ranks:
        q = rank / n
        margin = Z * math.sqrt(q * (1 - q) * m) + 2
        i, j = int(q * m - margin), math.ceil(q * m + margin)
        # A bracket at the sample's ends is open: tail ranks cannot miss it.
        brackets.append((np.float32(-np.inf) if i <= 0 else sample[i],
                         np.float32(np.inf) if j >= m - 1 else sample[j]))
    counts = np.zeros((len(ranks), 4), dtype=np.int64)  # < lo, <= lo, < hi, <= hi
    inside: list[list[np.ndarray]] = [[] for _ in ranks]
    for a in range(0, n, size):
        x = read(a, min(n, a + size)).numpy()
        for k, (lo, hi) in enumerate(brackets):
            # numpy's float32 comparisons and counts: under 0.5 ns per entry (ops_bench)
            counts[k] += (np.count_nonzero(x < lo), np.count_nonzero(x <= lo),
                          np.count_nonzero(x < hi), np.count_nonzero(x <= hi))
            if lo < hi:
                inside[k].append(x[(x > lo) & (x < hi)])  # a copy: the slice may be reused
    found = {}
    for rank, (lo, hi), (lt_lo, le_lo, lt_hi, le_hi), parts in zip(ranks, brackets, counts, inside):
        if rank < lt_lo or rank >= le_hi:
            continue  # the bracket missed (an unrepresentative sample): radix selection
        if rank < le_lo:
            found[rank] = Rank(float(lo), int(lt_lo), int(le_lo - lt_lo))
        elif rank >= lt_hi:
            found[rank] = Rank(float(hi), int(lt_hi), int(le_hi - lt_hi))
        else:
            values = torch.from_numpy(np.concatenate(parts))
            r = select_ranks(lambda a, b: values[a:b], values.numel(), BLOCK, [rank - le_lo])[0]
            found[rank] = Rank(r.value, r.below + int(le_lo), r.equal)
    return found


# -- radix selection: exact in two counting passes, whatever the data -----------------------------

def _keys(values: np.ndarray) -> np.ndarray:
    """int32 keys ordered as the float32 ``values``: the bits of a value >= 0, minus those of
    ``|value|`` for a negative one (so -0.0 and +0.0 share the key 0; NaNs go to the ends)."""
    bits = values.view(np.int32)
    sign = bits >> 31  # 0, or -1 for negative values
    return ((bits & np.int32(0x7FFFFFFF)) ^ sign) - sign  # two's complement negation if -1


def _value_of(key: int) -> float:
    """The float32 whose key (``_keys``) is ``key`` (+0.0 for 0)."""
    bits = np.array([key if key >= 0 else (-key) | -0x80000000], dtype=np.int64).astype(np.int32)
    return float(bits.view(np.float32)[0])


def _bincount(bins: np.ndarray) -> np.ndarray:
    # torch's bincount: 1.5-1.9x faster than numpy's on int32 bins (no int64 copy; ops_bench)
    return torch.bincount(torch.from_numpy(bins), minlength=_BINS).numpy()


def _blocks(read: Reader, n: int, size: int):
    for start in range(0, n, size):
        yield _keys(read(start, min(n, start + size)).numpy())


def _radix(read: Reader, n: int, size: int, ranks: Sequence[int]) -> list[Rank]:
    """Pass 1 counts the keys' high 16 bits, locating each rank's bin; pass 2 counts the low
    16 bits of the entries in those bins (none needed for a rank among exact zeros)."""
    high = np.zeros(_BINS, dtype=np.int64)
    zeros = 0
    for keys in _blocks(read, n, size):
        high += _bincount((keys >> 16) + _OFFSET)
        zeros += int(np.count_nonzero(keys == 0))
    upto = np.cumsum(high)  # entries in bins <= b
    found: dict[int, Rank] = {}
    wanted: dict[int, list[tuple[int, int]]] = {}  # bin: [(rank, entries in lower bins)]
    for rank in ranks:
        b = int(np.searchsorted(upto, rank, side="right"))
        below = int(upto[b] - high[b])
        if b == _ZERO_BIN and rank - below < zeros:
            found[rank] = Rank(0.0, below, zeros)
        else:
            wanted.setdefault(b, []).append((rank, below))
    lows = {b: np.zeros(_BINS, dtype=np.int64) for b in wanted}
    for keys in _blocks(read, n, size) if wanted else ():
        high_bits = (keys >> 16) + _OFFSET
        for b, low in lows.items():
            low += _bincount(keys[high_bits == b] & 0xFFFF)
    for b, items in wanted.items():
        upto_low = np.cumsum(lows[b])
        for rank, below in items:
            low_bits = int(np.searchsorted(upto_low, rank - below, side="right"))
            equal = int(lows[b][low_bits])
            key = ((b - _OFFSET) << 16) | low_bits
            found[rank] = Rank(_value_of(key), below + int(upto_low[low_bits]) - equal, equal)
    return [found[r] for r in ranks]


# -- thresholds of a rank window --------------------------------------------------------------------

def order_statistics(values: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """The values at ascending 0-based ``ranks`` of flat ``values`` (0-dim tensors; ``values``
    is not modified): ``select_ranks`` on CPU, ``torch.kthvalue`` elsewhere."""
    if values.device.type != "cpu":
        return [values.kthvalue(r + 1).values for r in ranks]
    flat = values.reshape(-1).float()
    found = select_ranks(lambda a, b: flat[a:b], flat.numel(), BLOCK, ranks, sample_of(flat))
    return [torch.tensor(r.value, dtype=torch.float32) for r in found]


def sample_of(flat: Tensor) -> np.ndarray:
    """``flat`` (CPU) at about ``SAMPLE`` evenly spaced positions, as an owned float32 array."""
    return flat[:: max(1, flat.numel() // SAMPLE)].numpy().copy()


def window_from(read: Reader, n: int, size: int, start: int, stop: int,
                sample: np.ndarray | None = None) -> tuple[float | None, float | None, int, int]:
    """Thresholds of ranks ``[start, stop)`` of ``n`` values read a slice at a time (CPU).

    Returns ``(lo, hi, drop_lo, drop_hi)``: the values at ranks ``start`` and ``stop - 1``
    (``None`` when ``start <= 0`` / ``stop >= n``), how many entries tied at ``lo`` rank below
    ``start`` (the first ones by position are dropped) and how many tied at ``hi`` rank at or
    above ``stop`` (the last ones). Needs ``0 <= start < stop`` and ``start < n``.
    """
    want_lo, want_hi = start > 0, stop < n
    ranks = ([start] if want_lo else []) + ([stop - 1] if want_hi else [])
    if not ranks:
        return None, None, 0, 0
    found = select_ranks(read, n, size, ranks, sample)
    lo = found[0] if want_lo else None
    hi = found[-1] if want_hi else None
    return (None if lo is None else lo.value, None if hi is None else hi.value,
            0 if lo is None else start - lo.below,
            0 if hi is None else hi.below + hi.equal - stop)


def window_of(values: Tensor, start: int, stop: int) -> tuple[float | None, float | None, int, int]:
    """``window_from`` on flat ``values`` held whole, on any device (not modified)."""
    n = values.numel()
    if values.device.type == "cpu":
        return window_from(lambda a, b: values[a:b], n, BLOCK, start, stop, sample_of(values))
    want_lo, want_hi = start > 0, stop < n
    ranks = ([start] if want_lo else []) + ([stop - 1] if want_hi else [])
    if not ranks:
        return None, None, 0, 0
    bounds = [float(v) for v in order_statistics(values, ranks)]
    lo = bounds[0] if want_lo else None
    hi = bounds[-1] if want_hi else None
    drop_lo = start - int(torch.count_nonzero(values < lo)) if want_lo else 0
    drop_hi = int(torch.count_nonzero(values <= hi)) - stop if want_hi else 0
    return lo, hi, drop_lo, drop_hi


def rank_window(work: Tensor, delta: Tensor, start: int, stop: int) -> None:
    """Turn ``work`` (holding ``|delta|``, contiguous) into a 0/1 mask of ranks ``[start, stop)``."""
    flat = work.view(-1)  # (n,)
    n = flat.numel()
    if stop <= start or start >= n:
        flat.zero_()
        return
    lo, hi, drop_lo, drop_hi = window_of(flat, max(start, 0), min(stop, n))
    # Keep lo <= |delta| <= hi. Ties rank by position: at lo the first tied entries fall below
    # `start`, at hi the last ones reach `stop`; drop just those.
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)  # (n,)
    if lo is not None:
        torch.logical_and(keep, flat >= lo, out=keep)
        _drop_ties(keep, flat == lo, drop_lo, first=True)
    if hi is not None:
        torch.logical_and(keep, flat <= hi, out=keep)
        _drop_ties(keep, flat == hi, drop_hi, first=False)
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
    chunks = list(enumerate(flags.split(BLOCK)))
    seen = 0
    for index, chunk in reversed(chunks) if from_end else chunks:
        count = int(chunk.count_nonzero())
        if seen + count >= m:
            positions = torch.nonzero(chunk).squeeze(1)  # (count,)
            return index * BLOCK + int(positions[-(m - seen) if from_end else m - seen - 1])
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


def row_order(mags: Tensor) -> Tensor:
    """``mags.argsort(dim=1, stable=True)`` for non-negative float32 ``mags`` (r, c, ...): the
    ascending order within each row, equal values by position (DELLA's magnitude ranks).

    A non-negative float orders as its int32 bit pattern, and a difference of two bf16 numbers
    is almost always a bf16 number: its low 16 bits are zero. On the CPU, rows whose entries
    all are bf16 numbers are sorted by their high 16 bits with numpy's stable sort, which is a
    radix sort on 16-bit keys (about 7 ns per entry, against 18-36 for torch's stable float32
    sort of the same rows; ops_bench). When at most an eighth of the rows hold other values
    (on the real pair's task vectors 0-46% of a tensor's rows do, 16% at the median), those rows use torch's stable sort; when more
    do, every value is replaced by its rank among the tensor's distinct values (if under
    65,536) and the rows are radix sorted on that. Other devices, dtypes or shapes use torch's
    stable sort. The order is the same in every case.
    """
    if mags.device.type == "cpu" and mags.dim() == 2 and mags.dtype == torch.float32 \
            and mags.numel() > 0:
        bits = mags.contiguous().view(torch.int32).numpy()  # (r, c)
        halves = bits.view(np.uint16)  # (r, 2c)
        high, low = (halves[:, 1::2], halves[:, 0::2]) if sys.byteorder == "little" else \
            (halves[:, 0::2], halves[:, 1::2])
        if int(high.max()) < 0x8000:  # no negative value
            not_bf16 = low != 0  # (r, c)
            odd = np.flatnonzero(not_bf16.any(axis=1))  # rows with non-bf16 values
            keys = high
            if odd.size > mags.shape[0] // 8:  # many: all rows on dense ranks of the values
                keys = _dense_keys(bits.reshape(-1), high, not_bf16)
                odd = odd[:0]
            if keys is not None:
                order = torch.from_numpy(np.argsort(keys, axis=1, kind="stable"))
                if odd.size:  # few: those rows through torch
                    rows = torch.from_numpy(odd)
                    order[rows] = mags[rows].argsort(dim=1, stable=True)
                return order
    return mags.argsort(dim=1, stable=True)


def _dense_keys(bits: np.ndarray, high: np.ndarray, not_bf16: np.ndarray) -> np.ndarray | None:
    """uint16 keys (r, c) ordering as the non-negative floats of int32 ``bits`` (r * c,) do:
    each value's rank among the distinct values; None over 65,535 distinct values."""
    seen = np.zeros(1 << 15, dtype=bool)
    seen[high] = True
    present = np.flatnonzero(seen).astype(np.int64)
    odd = np.flatnonzero(not_bf16)  # flat positions of the non-bf16 values
    distinct = np.union1d(present << 16, bits[odd].astype(np.int64))
    if distinct.size > 0xFFFF:
        return None
    table = np.zeros(1 << 15, dtype=np.uint16)
    table[present] = np.searchsorted(distinct, present << 16)
    keys = table[high]
    keys.reshape(-1)[odd] = np.searchsorted(distinct, bits[odd].astype(np.int64))
    return keys
