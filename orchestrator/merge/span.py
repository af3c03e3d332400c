"""Merges whose result lies in the span of their inputs, computed from the inputs' Gram matrix.

Karcher, multislerp and model_stock only ever form linear combinations of the (flattened)
inputs ``v_i`` (task vectors ``x_i - base`` where a base is subtracted) and take dot products
of such combinations. Every vector they build is ``sum_i c_i v_i`` for some coefficients
``c`` (n,), and every dot product is ``c^T G c'`` with the Gram matrix ``G_ij = v_i . v_j``.
So the whole algorithm can run on ``n``-vectors once ``G`` is known: one pass over the inputs
to build ``G`` (float64 sums of float32 products, a slice at a time), iterations that cost
nothing, and one pass to write ``sum_i c_i v_i``. The per-tensor functions used to stack the
inputs and keep several ``(n, d)`` temporaries (units, tangents), and karcher made 10 passes
of them: it took 8.6 s and 1.3 GiB on the real 135M pair against mergekit's 2.3 s and 0.7 GiB;
from the Gram matrix it takes 1.3 s and 0.5 GiB (benchmarks/RESULTS.md, real model).

Rounding differs from the stacked computation only in the last bits of the coefficients,
and is smaller: the dot products are accumulated in float64 (the stacked code carried float32
rounding noise of about ``sqrt(d) * eps``, which for karcher kept the tangent norm above its
1e-5 tolerance, so it always ran all ``max_iter`` iterations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from orchestrator.merge import chunks


def _slices(xs: Sequence[Tensor], base: Tensor | None):
    """``(start, stop, [v_i[start:stop]])`` in float32, ``v_i = x_i - base`` (or ``x_i``); the
    slices live in reused buffers (valid until the next one)."""
    flats = [chunks.flat(x) for x in xs]
    b = None if base is None else chunks.flat(base)
    n = flats[0].numel()
    size = chunks.chunk_size(flats[0].device, n)
    bufs = chunks.buffers(len(flats) + 1, size, flats[0].device)
    for start, stop in chunks.spans(n, size):
        m = stop - start
        vs = [chunks.as_float32(f[start:stop], buf) for f, buf in zip(flats, bufs)]
        if b is not None:
            bb = chunks.as_float32(b[start:stop], bufs[-1])
            vs = [torch.sub(v, bb, out=buf[:m]) for v, buf in zip(vs, bufs)]
        yield start, stop, vs


def gram(xs: Sequence[Tensor], base: Tensor | None = None) -> Tensor:
    """``G_ij = v_i . v_j`` (n, n) float64 over the flattened ``v_i = x_i - base`` (or ``x_i``).

    Products of float32 values are exact in float64; they are summed in float64, a slice at
    a time (the same slices on every run, so the same bits).
    """
    n = len(xs)
    g = torch.zeros(n, n, dtype=torch.float64, device=xs[0].device)
    block = None
    for start, stop, vs in _slices(xs, base):
        if block is None:
            block = torch.empty(n, stop - start, dtype=torch.float64, device=xs[0].device)
        b = block[:, : stop - start]  # (n, slice)
        for row, v in zip(b, vs):
            row.copy_(v)
        g += b @ b.T
    return g.cpu()


def combine(xs: Sequence[Tensor], coefs: Sequence[float], base: Tensor | None = None, *,
            add_base: bool = False) -> Tensor:
    """``sum_i c_i v_i`` (then ``+ base`` when ``add_base``) in float32, shaped like ``xs[0]``."""
    first = xs[0]
    out = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    flat_out = out.view(-1)
    b = None if base is None else chunks.flat(base)
    for start, stop, vs in _slices(xs, base):
        o = flat_out[start:stop]
        torch.mul(vs[0], coefs[0], out=o)
        for v, c in zip(vs[1:], coefs[1:]):
            o.add_(v, alpha=c)
        if add_base:
            o.add_(b[start:stop])
    return out


def norm_of(c: Tensor, g: Tensor) -> float:
    """``|sum_i c_i v_i|`` from the Gram matrix (0 for a tiny negative rounding)."""
    return float(torch.sqrt(torch.clamp(c @ g @ c, min=0.0)))
