"""Exact rank selection for magnitude pruning, without mergekit's full argsort.

``rank_window`` keeps the entries whose ascending rank of ``|delta|`` lies in ``[start, stop)``:
the top-k of TIES is ``[n - k, n)``, Model Breadcrumbs' band is ``[n_bot, n_bot + target)``.
Two order statistics give the thresholds; entries tied with a threshold are ranked by position,
so exactly ``stop - start`` entries are kept (mergekit's choice among ties follows its unstable
sort and is unspecified). Task vectors of bf16 checkpoints have many ties; they are settled by
locating one cut-off position per threshold, not by ranking or listing the tied entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_CHUNK = 1 << 20  # entries counted at a time when locating a tied position


def order_statistics(values: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """The values at ascending 0-based ``ranks`` of flat ``values`` (reordered in place on CPU).

    On CPU numpy's introselect (``ndarray.partition``) is several times faster than
    ``torch.kthvalue``; on other devices ``kthvalue`` is used and ``values`` is left as it is.
    """
    if values.device.type != "cpu":
        return [values.kthvalue(r + 1).values for r in ranks]
    array, done, found = values.numpy(), 0, {}  # the array shares memory with `values`
    for rank in sorted(ranks):
        # After partitioning at `done`, array[done:] holds exactly the ranks >= done. One kth
        # at a time: numpy's multi-kth partition is several times slower.
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
