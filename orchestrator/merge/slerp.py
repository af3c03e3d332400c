"""Spherical linear interpolation between two tensors: slerp and nuslerp.

slerp follows mergekit's ``slerp``: the whole tensor is one vector, the angle comes from the
normalised vectors, the sine coefficients are applied to the raw tensors, and nearly collinear
pairs (``|cos| > 0.9995``) fall back to linear interpolation. nuslerp follows mergekit's
``nuslerp``: ``t`` comes from two weights, the angle may be taken per row or per column, and
only exactly collinear pairs fall back to lerp.

Reference: Shoemake 1985, "Animating rotation with quaternion curves";
https://en.wikipedia.org/wiki/Slerp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge import chunks
from orchestrator.merge.base import check_bool, check_range
from orchestrator.merge.linear import WeightParams

DOT_THRESHOLD = 0.9995  # slerp: |cos| above this counts as collinear (mergekit's value)
NORM_EPS = 1e-8  # slerp: vectors with a smaller norm are left unnormalised
NUSLERP_NORM_EPS = 1e-7  # nuslerp: norms are clamped to at least this
NUSLERP_COLINEAR_EPS = 1e-8  # nuslerp: 1 - cos^2 <= eps^2 counts as collinear


@dataclass(frozen=True)
class SlerpParams:
    """Global parameters of slerp.

    Attributes:
        t: interpolation factor in [0, 1]; 0 gives the base model, 1 the other model.
    """

    t: float

    def __post_init__(self) -> None:
        check_range("t", self.t, 0, 1)


@dataclass(frozen=True)
class NuslerpParams:
    """Global parameters of nuslerp (``t = w_2 / (w_1 + w_2)`` comes from the model weights).

    Attributes:
        nuslerp_row_wise: take the angle along dim 0 (per column of a matrix) instead of the
            last dim; only used when ``nuslerp_flatten`` is false.
        nuslerp_flatten: treat the whole tensor as one vector (mergekit's default).
    """

    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True

    def __post_init__(self) -> None:
        check_bool("nuslerp_row_wise", self.nuslerp_row_wise)
        check_bool("nuslerp_flatten", self.nuslerp_flatten)


def slerp_coefficients(t: float, cos: Tensor, collinear: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients of ``v0`` and ``v1``: ``sin((1-t)θ)/sinθ`` and ``sin(tθ)/sinθ``.

    Where ``collinear`` they are ``1 - t`` and ``t`` (lerp). All tensors have ``cos``'s shape.
    """
    theta = torch.acos(torch.where(collinear, 0.0, cos))  # finite on the unused branch
    sin_theta = torch.where(collinear, 1.0, torch.sin(theta))
    c0 = torch.where(collinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(collinear, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def dots(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """``(a.a, b.b, a.b)`` of flat float32 tensors, accurate to float64 rounding.

    A float32 reduction over tens of millions of entries is off by 1e-4 (``dot``) to 1e-3
    (``vector_norm``) here, and ``acos`` of a cosine near 1 multiplies that error into the
    slerp coefficients (2.5% of the task vector on a 35M-entry embedding). Slice-sized float32
    dots summed in float64 are exact to about 1e-8, in one pass over both inputs.
    """
    if a.device.type != "cpu":
        a64, b64 = a.double(), b.double()
        return float(a64 @ a64), float(b64 @ b64), float(a64 @ b64)
    aa = bb = ab = 0.0
    for start, stop in chunks.spans(a.numel(), chunks.CPU_CHUNK):
        x, y = a[start:stop], b[start:stop]
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


def slerp_tensors(t: float, v0: Tensor, v1: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Whole-tensor slerp from ``v0`` (t=0) to ``v1`` (t=1), as mergekit's ``slerp``."""
    a, b = v0.float().reshape(-1), v1.float().reshape(-1)  # (n,) views
    result = torch.empty(v0.shape, dtype=torch.float32, device=v0.device) if out is None else out
    if a.numel() == 0:
        return result
    # Cosine of the normalised vectors (a vector shorter than eps is left unnormalised), in
    # float64 from accurate dot products.
    aa, bb, ab = dots(a, b)
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    cos = torch.tensor(ab / (norm_a * norm_b), dtype=torch.float64).clamp(-1.0, 1.0)  # ()
    c0, c1 = (c.to(device=a.device, dtype=torch.float32)
              for c in slerp_coefficients(t, cos, cos.abs() > DOT_THRESHOLD))
    # The coefficients apply to the raw tensors, so norms are kept only when equal. One pass,
    # a slice at a time: c0 v0 + c1 v1 (the same bits as on the whole tensor).
    flat_out = result.view(-1)
    for start, stop in chunks.spans(a.numel(), chunks.chunk_size(a.device, a.numel())):
        torch.mul(a[start:stop], c0, out=flat_out[start:stop]).addcmul_(b[start:stop], c1)
    return result  # (*shape)


def slerp(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[object],
          params: SlerpParams, generator: torch.Generator | None, *,
          out: Tensor | None = None) -> Tensor:
    """Slerp from the base model (t=0) to the one other model (t=1).

    ``out``: a float32 tensor of the inputs' shape to write into and return; default: new.
    """
    return slerp_tensors(params.t, base, xs[0], out=out)


def nuslerp_tensors(t: float, v0: Tensor, v1: Tensor, *, dim: int | None) -> Tensor:
    """Slerp along ``dim`` (``None``: the whole tensor), as mergekit's ``nuslerp``."""
    a, b = v0.float(), v1.float()
    if dim is None:  # one vector: accurate float64 dots (see ``dots``)
        a, b, dim = a.reshape(-1), b.reshape(-1), 0  # (n,)
        aa, bb, ab = dots(a, b)
        norm_a, norm_b = max(math.sqrt(aa), NUSLERP_NORM_EPS), max(math.sqrt(bb), NUSLERP_NORM_EPS)
        cos = torch.tensor([ab / (norm_a * norm_b)], dtype=torch.float64).clamp(-1.0, 1.0)
        c0, c1 = (c.to(device=a.device, dtype=torch.float32) for c in slerp_coefficients(
            t, cos, (1 - cos.square()) <= NUSLERP_COLINEAR_EPS**2))
        return torch.mul(a, c0).addcmul_(b, c1).reshape(v0.shape)  # (*shape)
    norm_a = torch.linalg.vector_norm(a, dim=dim, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    norm_b = torch.linalg.vector_norm(b, dim=dim, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = (torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim) / (norm_a * norm_b)).clamp(-1.0, 1.0)
    c0, c1 = slerp_coefficients(t, cos, (1 - cos.square()) <= NUSLERP_COLINEAR_EPS**2)
    return torch.mul(a, c0).addcmul_(b, c1).reshape(v0.shape)  # (*shape)


def nuslerp(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[WeightParams],
            params: NuslerpParams, generator: torch.Generator | None) -> Tensor:
    """Slerp between two models with ``t = w_2 / (w_1 + w_2)`` (0.5 if the weights cancel).

    With a base model, slerps the two task vectors and adds the base back (WARP-style).
    """
    w1, w2 = models[0].weight, models[1].weight
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    dim = None if params.nuslerp_flatten else (0 if params.nuslerp_row_wise else -1)
    if base is None:
        return nuslerp_tensors(t, xs[0], xs[1], dim=dim)
    base = base.float()
    return nuslerp_tensors(t, xs[0] - base, xs[1] - base, dim=dim).add_(base)
