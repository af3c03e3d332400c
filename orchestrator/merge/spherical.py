"""Means of many tensors on the hypersphere: multislerp and karcher.

Both treat each tensor as one flat vector, average directions on the unit sphere and rescale
the result by the average norm, as mergekit's ``multislerp`` and ``karcher`` do.

References: C. Goddard, "Multi-SLERP",
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; H. Karcher 1977, "Riemannian center
of mass and mollifier smoothing" (the Karcher mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_bool, check_int, check_range
from orchestrator.merge import span
from orchestrator.merge.linear import WeightParams


@dataclass(frozen=True)
class MultislerpParams:
    """Global parameters of multislerp.

    Attributes:
        normalize_weights: divide the weights by their sum.
        eps: added to norms to avoid division by zero, in [0, inf).
    """

    normalize_weights: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_bool("normalize_weights", self.normalize_weights)
        check_range("eps", self.eps, 0, None)


@dataclass(frozen=True)
class KarcherParams:
    """Global parameters of karcher (models are weighted equally, as in mergekit).

    Attributes:
        max_iter: most fixed-point iterations (an integer >= 0).
        tol: stop once the tangent step is shorter than this; inputs with a norm at most
            ``tol`` are left out of the direction (but still count in the norm), in [0, inf).
    """

    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self) -> None:
        check_int("max_iter", self.max_iter, 0)
        check_range("tol", self.tol, 0, None)


def multislerp(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[WeightParams],
               params: MultislerpParams, generator: torch.Generator | None) -> Tensor:
    """Barycentric interpolation on the hypersphere (of task vectors, with a base model).

    Computed on the Gram matrix of the inputs (``span.py``): one pass to build it, one to
    write the result, no ``(n, d)`` temporaries.

    Raises:
        ValueError: the weights sum to zero with ``normalize_weights``, or more than two
            non-zero inputs have directions whose weighted mean is zero (antipodal inputs).
    """
    if len(xs) == 1:
        return xs[0].float().clone()
    w = torch.tensor([m.weight for m in models], dtype=torch.float64)  # (n,)
    if params.normalize_weights:
        if abs(float(w.sum())) < 1e-8:
            raise ValueError(f"weights sum to zero ({w.tolist()}) with normalize_weights: true")
        w = w / w.sum()
    g = span.gram(xs, base)  # (n, n) of v_i = x_i (- base)
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0.0))  # (n,)
    # Coefficients on the v_i. 1. Project each onto the unit sphere (u_i = v_i / (|v_i| + eps));
    # 2. the normalised weighted mean direction.
    inv = 1.0 / (norms + params.eps)  # (n,)
    mean = w * inv  # sum_i w_i u_i
    mean_norm = span.norm_of(mean, g)
    if mean_norm < params.eps:
        # mergekit falls back to lerp for two inputs; we also do when every input is zero
        # (mergekit raises there), so identical models give the base instead of an error.
        if len(xs) == 2 or bool((norms <= params.eps).all()):
            return span.combine(xs, w.tolist(), base, add_base=base is not None)
        raise ValueError("the weighted mean of the inputs' directions is zero (antipodal inputs "
                         "whose weights cancel); use different weights")
    mean = mean / mean_norm
    # 3. Weighted mean of the tangent vectors at `mean`: sum_i w_i (u_i - (u_i . mean) mean);
    # 4. map it back onto the sphere. (Analytically this tangent is zero, as in mergekit.)
    along = (g @ mean) * inv  # (n,) u_i . mean
    tangent = w * inv - float(w @ along) * mean
    tangent_norm = span.norm_of(tangent, g) + params.eps
    coefs = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    # 5. Rescale by the weighted mean norm and add the base back.
    coefs = coefs * float(w @ norms)
    return span.combine(xs, coefs.tolist(), base, add_base=base is not None)


def karcher(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
            params: KarcherParams, generator: torch.Generator | None) -> Tensor:
    """Equal-weight Karcher (Riemannian) mean of the directions, times the mean norm.

    A base model, when given, is averaged in as one more model (mergekit adds it to the inputs).
    The iteration runs on coefficients over the inputs' unit vectors with their Gram matrix
    (``span.py``), so it costs two passes over the inputs whatever ``max_iter`` is.
    """
    tensors = [*xs, base] if base is not None else list(xs)
    if len(tensors) == 1:
        return tensors[0].float().clone()
    g = span.gram(tensors)  # (n, n)
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0.0))  # (n,)
    inv = torch.where(norms == 0, 0.0, 1.0 / torch.where(norms == 0, 1.0, norms))  # zero rows: 0
    gu = g * inv.unsqueeze(0) * inv.unsqueeze(1)  # (n, n) Gram matrix of the unit vectors u_i
    valid = norms > params.tol  # (n,)
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0], dtype=torch.float32)
    alphas = valid.double() / valid.sum()  # (n,) equal weights over inputs with a direction
    first = torch.zeros_like(alphas)
    first[int(valid.nonzero()[0])] = 1.0
    mean = _unit_or(alphas, first, gu, params.tol)  # coefficients on the u_i
    for _ in range(params.max_iter):
        # Log map: tangent = sum_i a_i θ_i / sin θ_i (u_i - cos θ_i mean), skipping θ_i < tol.
        cos = (gu @ mean).clamp(-1.0, 1.0)  # (n,) u_i . mean
        theta = torch.arccos(cos)
        coef = torch.where(valid & (theta >= params.tol), alphas * theta / torch.sin(theta), 0.0)
        tangent = coef - float(coef @ cos) * mean
        tangent_norm = span.norm_of(tangent, gu)
        if tangent_norm < params.tol:
            break
        # Exp map back onto the sphere, then renormalise against drift.
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        mean = _unit_or(mean, mean, gu, params.tol)
    coefs = mean * inv * float(norms.mean())  # on the inputs themselves
    return span.combine(tensors, coefs.tolist())


def _unit_or(c: Tensor, fallback: Tensor, gu: Tensor, tol: float) -> Tensor:
    """``c / |c|`` (coefficients on unit vectors with Gram matrix ``gu``), or ``fallback``
    when ``|c| < tol``."""
    norm = span.norm_of(c, gu)
    return fallback.clone() if norm < tol else c / norm
