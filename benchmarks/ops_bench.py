"""Side-by-side timings behind the "numpy is faster here" choices in the merge math.

Each line times the two ways of doing one step on 16M float32 entries, one torch thread, best
of several runs, and prints how many times slower the alternative we did not take is:

- ``sparsify.MaskSparsifier.apply``: a bool mask to float, ``torch.Tensor.copy_`` vs ``np.copyto``;
- ``sparsify._mask_sparsifier``: ``u < density`` into a bool buffer, ``torch.lt`` vs ``np.less``;
- ``selection.nth_equal``: ``x == value``, torch vs numpy;
- ``selection.select_ranks``: one rank of bf16-like task-vector magnitudes (70% exact zeros,
  a few hundred distinct values) and of random float32, ``ndarray.partition`` (the
  introselect used before) vs ``select_ranks`` (sample brackets and counting passes) and its
  exact fallback alone (radix selection); also ``torch.kthvalue``;
- ``selection``'s bracket pass: ``count(x < v)`` with torch vs numpy; the radix passes'
  ``bincount`` of int32 bins, numpy vs torch;
- ``consensus._replace_zeros_by_one``: ``masked_fill_(x == 0, 1)`` vs ``clamp_(min=...)``.

Usage: ``python benchmarks/ops_bench.py [--log2n 24]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.merge.selection import _radix, row_order, sample_of, select_ranks  # noqa: E402


def best(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bf16_magnitudes(n: int, gen: torch.Generator) -> torch.Tensor:
    """``|ft - base|`` of bf16 weights: about 70% exact zeros, a few hundred magnitudes."""
    base = (torch.randn(n, generator=gen) * 0.02).bfloat16()
    step = torch.randn(n, generator=gen) * 4e-4
    step[torch.rand(n, generator=gen) < 0.6] = 0
    return ((base.float() + step).bfloat16().float() - base.float()).abs_()


def two_partitions(values: torch.Tensor) -> None:
    """TIES/breadcrumbs-like thresholds the old way: partition at n/2, then the tail at 99%."""
    array, n = values.numpy().copy(), values.numel()
    array.partition(n // 2)
    array[n // 2:].partition(n - n // 100 - n // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2n", type=int, default=24, help="entries = 2**log2n (default 24: 16M)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 1 << args.log2n
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    mask, tmp = x > 0, torch.empty(n)
    uniform, keep = torch.rand(n, generator=gen), torch.empty(n, dtype=torch.bool)
    magnitude = x.abs()
    value = float(x[123])
    ranks = [n // 4, n // 2, 3 * n // 4]
    counts = torch.randint(0, 3, (n,), generator=gen).float()
    tied = bf16_magnitudes(n, gen)
    bins = (tied.numpy().view(np.int32) >> 16) + (1 << 15)
    rows576 = tied[: n // 576 * 576].view(-1, 576)  # DELLA ranks along rows

    def select(values: torch.Tensor) -> None:
        select_ranks(lambda a, b: values[a:b], n, 1 << 16, [n // 2, n - n // 100],
                     sample_of(values))

    def radix(values: torch.Tensor) -> None:
        _radix(lambda a, b: values[a:b], n, 1 << 16, [n // 2, n - n // 100])

    def one_kth_at_a_time() -> None:
        array, done = magnitude.numpy().copy(), 0
        for rank in ranks:
            array[done:].partition(rank - done)
            done = rank

    rows = [
        ("bool -> float: torch copy_ vs np.copyto", best(lambda: tmp.copy_(mask)),
         best(lambda: np.copyto(tmp.numpy(), mask.numpy()))),
        ("u < density into bool: torch.lt vs np.less", best(lambda: torch.lt(uniform, 0.5, out=keep)),
         best(lambda: np.less(uniform.numpy(), np.float32(0.5), out=keep.numpy()))),
        ("x == value: torch vs numpy", best(lambda: x == value), best(lambda: x.numpy() == np.float32(value))),
        ("random: torch.kthvalue vs ndarray.partition", best(lambda: magnitude.kthvalue(n // 2), 3),
         best(lambda: magnitude.numpy().copy().partition(n // 2), 3)),
        ("three ranks: multi-kth partition vs one at a time",
         best(lambda: magnitude.numpy().copy().partition(ranks), 3), best(one_kth_at_a_time, 3)),
        ("random, 2 ranks: partition vs select_ranks",
         best(lambda: two_partitions(magnitude), 3), best(lambda: select(magnitude), 3)),
        ("bf16 tied, 2 ranks: partition vs select_ranks",
         best(lambda: two_partitions(tied), 1), best(lambda: select(tied), 3)),
        ("bf16 tied, 2 ranks: partition vs radix alone",
         best(lambda: two_partitions(tied), 1), best(lambda: radix(tied), 3)),
        ("bf16 tied, 1 rank: torch.kthvalue vs select_ranks",
         best(lambda: tied.kthvalue(n // 2), 3), best(lambda: select(tied), 3)),
        ("count(x < v): torch vs numpy", best(lambda: int(torch.count_nonzero(x < value))),
         best(lambda: np.count_nonzero(x.numpy() < np.float32(value)))),
        ("bincount of int32 bins: numpy vs torch", best(lambda: np.bincount(bins, minlength=1 << 16)),
         best(lambda: torch.bincount(torch.from_numpy(bins), minlength=1 << 16))),
        ("bf16 tied rows of 576: torch stable argsort vs row_order",
         best(lambda: rows576.argsort(dim=1, stable=True), 3), best(lambda: row_order(rows576), 3)),
        ("zero counts -> 1: masked_fill_ vs clamp_", best(lambda: counts.clone().masked_fill_(counts == 0, 1.0)),
         best(lambda: counts.clone().clamp_(min=1.0))),
    ]
    print(f"{n:,} float32 entries, 1 thread, best of 3-5 runs")
    print(f"{'step: not taken vs taken':52} {'not taken ms':>12} {'taken ms':>9} {'ratio':>6}")
    for name, slow, fast in rows:
        print(f"{name:52} {slow * 1e3:12.1f} {fast * 1e3:9.1f} {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()
