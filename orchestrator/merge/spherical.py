"""Means of many tensors on the hypersphere: multislerp and karcher.

Both treat each tensor as one flat vector, average directions on the unit sphere and rescale
the result by the average norm, as mergekit's ``multislerp`` and ``karcher`` do.

References: C. Goddard, "Multi-SLERP",
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; H. Karcher 1977, "Riemannian center
of mass and mollifier smoothing" (the Karcher mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_bool, check_int, check_range
from orchestrator.merge.linear import WeightParams, weighted_sum


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

    Raises:
        ValueError: the weights sum to zero with ``normalize_weights``, or more than two
            non-zero inputs have directions whose weighted mean is zero (antipodal inputs).
    """
    if len(xs) == 1:
        return xs[0].float().clone()
    weights = torch.tensor([m.weight for m in models], dtype=torch.float32, device=xs[0].device)
    if params.normalize_weights:
        if abs(float(weights.sum())) < 1e-8:
            raise ValueError(f"weights sum to zero ({weights.tolist()}) with normalize_weights: true")
        weights = weights / weights.sum()  # (n,)
    x = torch.stack([t.float().reshape(-1) for t in xs])  # (n, d)
    if base is not None:
        x.sub_(base.float().reshape(-1))
    # 1. Project each input onto the unit sphere; 2. take the normalised weighted mean direction.
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (n, 1)
    units = x / (norms + params.eps)  # (n, d)
    mean = weights @ units  # (d,)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < params.eps:
        # mergekit falls back to lerp for two inputs; we also do when every input is zero
        # (mergekit raises there), so identical models give the base instead of an error.
        if len(xs) == 2 or bool((norms <= params.eps).all()):
            out = weighted_sum(list(x), weights.tolist()).reshape(xs[0].shape)
            return out if base is None else out.add_(base.float())
        raise ValueError("the weighted mean of the inputs' directions is zero (antipodal inputs "
                         "whose weights cancel); use different weights")
    mean = mean / mean_norm
    # 3. Weighted mean of the tangent vectors at `mean`; 4. map it back onto the sphere.
    # (Analytically this tangent is zero; it only carries rounding, as in mergekit.)
    tangents = units - (units @ mean).unsqueeze(1) * mean  # (n, d)
    tangent = weights @ tangents  # (d,)
    tangent_norm = torch.linalg.vector_norm(tangent) + params.eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    # 5. Rescale by the weighted mean norm and add the base back.
    out = out.mul_(weights @ norms.squeeze(1)).reshape(xs[0].shape)
    return out if base is None else out.add_(base.float())


def karcher(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
            params: KarcherParams, generator: torch.Generator | None) -> Tensor:
    """Equal-weight Karcher (Riemannian) mean of the directions, times the mean norm.

    A base model, when given, is averaged in as one more model (mergekit adds it to the inputs).
    """
    tensors = [*xs, base] if base is not None else list(xs)
    if len(tensors) == 1:
        return tensors[0].float().clone()
    x = torch.stack([t.float().reshape(-1) for t in tensors])  # (n, d)
    norms = torch.linalg.vector_norm(x, dim=1)  # (n,)
    units = x / torch.where(norms == 0, 1.0, norms).unsqueeze(1)  # (n, d); zero rows stay zero
    valid = norms > params.tol  # (n,)
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0], dtype=torch.float32)
    alphas = valid.float() / valid.sum()  # (n,) equal weights over inputs with a direction
    mean = _unit_or(alphas @ units, units[int(valid.nonzero()[0])], params.tol)  # (d,)
    for _ in range(params.max_iter):
        # Log map: tangent = sum_i a_i θ_i / sin θ_i (u_i - cos θ_i mean), skipping θ_i < tol.
        cos = (units @ mean).clamp(-1.0, 1.0)  # (n,)
        theta = torch.arccos(cos)
        coef = torch.where(valid & (theta >= params.tol), alphas * theta / torch.sin(theta), 0.0)
        tangent = coef @ units - (coef @ cos) * mean  # (d,)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm < params.tol:
            break
        # Exp map back onto the sphere, then renormalise against drift.
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        mean = _unit_or(mean, mean, params.tol)
    return mean.mul_(norms.mean()).reshape(tensors[0].shape)


def _unit_or(v: Tensor, fallback: Tensor, tol: float) -> Tensor:
    """``v / |v|``, or ``fallback`` (copied) when ``|v| < tol``."""
    norm = torch.linalg.vector_norm(v)
    return fallback.clone() if norm < tol else v / norm
