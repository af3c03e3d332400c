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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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


def slerp_tensors(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Whole-tensor slerp from ``v0`` (t=0) to ``v1`` (t=1), as mergekit's ``slerp``."""
    a, b = v0.float().reshape(-1), v1.float().reshape(-1)  # (n,) views
    if a.numel() == 0:
        return torch.empty_like(v0, dtype=torch.float32)
    # Cosine of the normalised vectors (a vector shorter than eps is left unnormalised).
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)  # ()
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1.0)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1.0)
    cos = (torch.dot(a, b) / (norm_a * norm_b)).clamp(-1.0, 1.0)  # ()
    c0, c1 = slerp_coefficients(t, cos, cos.abs() > DOT_THRESHOLD)
    # The coefficients apply to the raw tensors, so norms are kept only when equal.
    return torch.mul(v0.float(), c0).addcmul_(v1.float(), c1)  # (*shape)


def slerp(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[object],
          params: SlerpParams, generator: torch.Generator | None) -> Tensor:
    """Slerp from the base model (t=0) to the one other model (t=1)."""
    return slerp_tensors(params.t, base, xs[0])


def nuslerp_tensors(t: float, v0: Tensor, v1: Tensor, *, dim: int | None) -> Tensor:
    """Slerp along ``dim`` (``None``: the whole tensor), as mergekit's ``nuslerp``."""
    a, b = v0.float(), v1.float()
    if dim is None:
        a, b, dim = a.reshape(-1), b.reshape(-1), 0  # (n,)
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
