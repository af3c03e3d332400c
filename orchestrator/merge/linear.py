"""Linear merge (model soups): a weighted average of the models' tensors.

Reference: Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge import chunks
from orchestrator.merge.base import check_bool, check_range


@dataclass(frozen=True)
class WeightParams:
    """Per-model parameters of linear, nuslerp and multislerp.

    Attributes:
        weight: the model's coefficient (any finite number; negative subtracts).
    """

    weight: float

    def __post_init__(self) -> None:
        check_range("weight", self.weight, None, None)


@dataclass(frozen=True)
class LinearParams:
    """Global parameters of linear.

    Attributes:
        normalize: divide by the sum of the weights (mergekit's default: true).
    """

    normalize: bool = True

    def __post_init__(self) -> None:
        check_bool("normalize", self.normalize)


def weighted_sum(xs: Sequence[Tensor], weights: Sequence[float], *,
                 divide_by: float | None = None, out: Tensor | None = None) -> Tensor:
    """``sum_i w_i x_i`` (then ``/ divide_by``) in float32, into one new tensor (or ``out``).

    Computed a cache-sized slice at a time (``chunks.py``): each input is read once and the
    output written once, with no full-size temporaries; the bits equal the whole-tensor
    ``w_0 x_0 + w_1 x_1 + ...`` (then ``/ divide_by``), evaluated left to right.
    """
    shape, device = xs[0].shape, xs[0].device
    flats = [chunks.flat(x) for x in xs]
    n = flats[0].numel()
    result = torch.empty(shape, dtype=torch.float32, device=device) if out is None else out
    flat_out = result.view(-1)  # (n,)
    size = chunks.chunk_size(device, n)
    conv = chunks.buffers(1, size, device)[0] if any(x.dtype != torch.float32 for x in xs) else None
    for start, stop in chunks.spans(n, size):
        o = flat_out[start:stop]
        torch.mul(_f32(flats[0][start:stop], conv), weights[0], out=o)
        for x, w in zip(flats[1:], weights[1:]):
            o.add_(_f32(x[start:stop], conv), alpha=w)
        if divide_by is not None:
            o.div_(divide_by)
    return result


def _f32(x: Tensor, conv: Tensor | None) -> Tensor:
    return x if conv is None else chunks.as_float32(x, conv)


def linear(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[WeightParams],
           params: LinearParams, generator: torch.Generator | None, *,
           out: Tensor | None = None) -> Tensor:
    """``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    ``out``: a float32 tensor of the inputs' shape to write into and return (a caller merging
    many tensors reuses one); default: a new tensor.

    Raises:
        ValueError: ``normalize`` is set and the weights sum to zero (mergekit would return
            inf/NaN here).
    """
    weights = [m.weight for m in models]
    total = sum(weights)
    if params.normalize and abs(total) < 1e-8:
        raise ValueError(f"weights sum to zero ({weights}) with normalize: true; "
                         "change the weights or set normalize: false")
    return weighted_sum(xs, weights, divide_by=total if params.normalize else None, out=out)
