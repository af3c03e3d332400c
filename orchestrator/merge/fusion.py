"""Arcee Fusion: keep only the changes whose importance is an outlier.

Reference: mergekit 0.1.5's ``arcee_fusion`` (Arcee AI, https://arcee.ai), whose semantics
this follows. One model ``x`` besides the base ``b``:

1. Importance per entry: ``|x - b| * KL(softmax(x) || softmax(b))``, the KL divergence taken
   along the last dim (per row of a matrix; over the whole of a vector), with ``1e-8`` added to
   both distributions.
2. Threshold: ``median + 1.5 * (q3 - q1)`` of the importances, the quantiles taken as the
   sorted values at ``floor(q * (N - 1))``.
3. Result: ``b + (x - b) [importance >= threshold]``.

Choice: the quantiles are exact for every tensor. mergekit takes them exactly up to 1,000,000
entries and estimates them above from a random sample of 1,000,000 entries drawn with the
global RNG (so its result varies run to run there); ours is deterministic and needs no
generator. The two agree exactly up to 1M entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from orchestrator.merge import chunks
from orchestrator.merge.base import NoParams
from orchestrator.merge.selection import order_statistics

SOFTMAX_EPS = 1e-8  # added to both distributions before the KL divergence (mergekit's)
FENCE = 1.5  # threshold = median + FENCE * interquartile range


def arcee_fusion(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
                 params: NoParams, generator: torch.Generator | None) -> Tensor:
    """The base plus the model's changes of outlying importance (module docstring)."""
    x, b = xs[0].float(), base.float()  # (*shape)
    delta = x - b  # (*shape)
    importance = delta.abs().mul_(kl_rows(x, b))  # (*shape) 1.
    keep = importance >= outlier_threshold(importance)  # (*shape) 2.
    return delta.mul_(keep).add_(b)  # 3.


def kl_rows(x: Tensor, b: Tensor) -> Tensor:
    """``KL(softmax(x) || softmax(b))`` along the last dim, kept as a size-1 dim (..., 1).

    Computed for a few rows at a time (about ``chunks.CPU_CHUNK`` entries) so the softmaxes
    and their temporaries stay in the CPU cache; rows are independent, so the bits are those
    of the whole-tensor computation.
    """
    c = x.shape[-1] if x.dim() else 1
    rows_x, rows_b = x.reshape(-1, c), b.reshape(-1, c)  # (r, c)
    out = torch.empty(rows_x.shape[0], 1, dtype=torch.float32, device=x.device)  # (r, 1)
    step = rows_x.shape[0] if x.device.type != "cpu" else max(1, chunks.CPU_CHUNK // max(c, 1))
    for start in range(0, rows_x.shape[0], step):
        rx, rb = rows_x[start:start + step], rows_b[start:start + step]
        p = F.softmax(rx, dim=-1).add_(SOFTMAX_EPS)  # (rows, c)
        q = F.softmax(rb, dim=-1).add_(SOFTMAX_EPS)  # (rows, c)
        torch.sum(p * torch.log(p / q), dim=-1, keepdim=True, out=out[start:start + step])
    return out.view(*x.shape[:-1], 1) if x.dim() else out.view(())


def outlier_threshold(values: Tensor) -> Tensor:
    """``median + 1.5 * (q3 - q1)`` of ``values``, each quantile the sorted value at
    ``floor(q * (N - 1))`` (a 0-dim float32 tensor)."""
    flat = values.reshape(-1).clone()  # (N,) reordered by the selection
    last = flat.numel() - 1
    q1, median, q3 = order_statistics(flat, [last // 4, last // 2, 3 * last // 4])
    return median + FENCE * (q3 - q1)
