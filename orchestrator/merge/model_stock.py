"""Model Stock: move from the base towards the models' average by an angle-derived ratio.

Reference: Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor

from orchestrator.merge import chunks, span
from orchestrator.merge.base import NoParams, check_bool
from orchestrator.merge.linear import weighted_sum

NORM_PRODUCT_MIN = 1e-6  # mergekit clamps |a| |b| to at least this before dividing
SINGULAR_EPS = 1e-6  # |1 + (n - 1) cos| below this keeps the base


@dataclass(frozen=True)
class ModelStockParams:
    """Global parameters of model_stock.

    Attributes:
        filter_wise: one ratio per row (along the last dim) instead of one per tensor.
    """

    filter_wise: bool = False

    def __post_init__(self) -> None:
        check_bool("filter_wise", self.filter_wise)


def model_stock(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
                params: ModelStockParams, generator: torch.Generator | None) -> Tensor:
    """``t * mean(x_i) + (1 - t) * base`` with ``t = n cos / (1 + (n - 1) cos)``.

    ``cos`` is the mean cosine between pairs of task vectors ``x_i - base`` (needs n >= 2).
    Where ``1 + (n - 1) cos`` is ~0 there is no finite ratio and the base is kept (mergekit).
    One ratio per tensor comes from the task vectors' Gram matrix (``span.py``: float64 sums,
    no full-size temporaries); ``filter_wise`` takes one per row.
    """
    if params.filter_wise:
        return _filter_wise(xs, base)
    g = span.gram(xs, base)  # (n, n) task-vector dot products
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0.0))
    pairs = [float((g[i, j] / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_MIN)).clamp(-1.0, 1.0))
             for i, j in combinations(range(len(xs)), 2)]
    t = _ratio(torch.tensor(sum(pairs) / len(pairs)), len(xs))  # float32, as mergekit's
    return _blend(xs, base, float(t), float(1 - t))


def _ratio(cos: Tensor, n: int) -> Tensor:
    """``n cos / (1 + (n - 1) cos)`` in float32, 0 where the denominator is ~0."""
    cos = cos.float()
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def _blend(xs: Sequence[Tensor], base: Tensor, t: float, one_minus_t: float) -> Tensor:
    """``t * (sum_i x_i / n) + (1 - t) * base``, a slice at a time (mergekit's order of ops)."""
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat_out, b = out.view(-1), chunks.flat(base)
    flats = [chunks.flat(x) for x in xs]
    size = chunks.chunk_size(base.device, b.numel())
    conv, tmp = chunks.buffers(2, size, base.device)
    for start, stop in chunks.spans(b.numel(), size):
        o = flat_out[start:stop]
        o.copy_(flats[0][start:stop])
        for f in flats[1:]:
            o.add_(chunks.as_float32(f[start:stop], conv))
        o.div_(len(xs)).mul_(t)
        o.add_(torch.mul(chunks.as_float32(b[start:stop], conv), one_minus_t,
                         out=tmp[: stop - start]))
    return out


def _filter_wise(xs: Sequence[Tensor], base: Tensor) -> Tensor:
    """One ratio per row (along the last dim)."""
    n = len(xs)
    w0 = _rows(base)  # (r, c)
    offsets = [_rows(x) - w0 for x in xs]  # n x (r, c)
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]  # n x (r,)
    cosines = [
        (torch.linalg.vecdot(offsets[i], offsets[j], dim=-1)
         / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_MIN)).clamp(-1.0, 1.0)
        for i, j in combinations(range(n), 2)
    ]
    t = _ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n)  # (r, 1)
    average = weighted_sum([_rows(x) for x in xs], [1.0] * n).div_(n)  # (r, c)
    return (average.mul_(t) + w0 * (1 - t)).reshape(base.shape)


def _rows(x: Tensor) -> Tensor:
    """``x`` as rows whose cosines are taken (its last dim)."""
    return x.float().unsqueeze(0) if x.dim() == 1 else x.float()  # (..., c)
