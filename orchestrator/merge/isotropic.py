"""Isotropic merging: Iso-C and Iso-CTS, a flat spectrum on the task vectors' subspace.

Reference: Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025), https://arxiv.org/abs/2502.04959, Sections 4.1-4.2.

Iso-C, per 2-D tensor (task matrices ``Delta_t``, t = 1..T, of shape (m, n)):

1. Sum: ``Delta_TA = sum_t Delta_t = U S V^T``.
2. Flatten the spectrum: every singular value becomes their mean ``sigma = mean(diag S)``.
3. Return ``alpha * sigma * U V^T``.

Iso-CTS adds task-specific directions to the common subspace:

1. Common subspace: the top ``k`` singular triplets of ``Delta_TA``.
2. Task-specific subspaces: for each task, its residual off the common left subspace,
   ``Delta_t - U_k U_k^T Delta_t``, and that residual's top ``s`` singular triplets. With
   ``r = min(m, n)``: ``s = round((r - floor(r * common_space_fraction)) / T)`` (at most
   ``r // T``) and ``k = r - T s``, so the subspaces fill the rank (the paper's sizes).
3. Concatenate the common and task-specific ``U``'s (and ``V``'s) and orthogonalise each by
   orthogonal Procrustes (``U = P S Q^T -> P Q^T``).
4. Flatten: every concatenated singular value becomes their mean ``sigma``; return
   ``alpha * sigma * U_perp V_perp^T``.

The paper selects ``alpha`` on held-out validation data (no single default); ours is 1.0.
Tensors that are not matrices get ``alpha * mean_t Delta_t``, as in the paper's code.

Choice: the mean ``sigma`` is over the numerically non-zero singular values, and only their
directions are used (``spectral.py``). This is the paper's rule on full-rank matrices (every
full fine-tune's); on a rank-deficient sum (LoRA updates, cancelling tasks) the paper's rule
would spread the mean over arbitrary null-space directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_range
from orchestrator.merge.linear import weighted_sum
from orchestrator.merge.spectral import is_matrix, mean_delta, polar, truncated_svd


@dataclass(frozen=True)
class IsoCParams:
    """Global parameters of iso_c.

    Attributes:
        alpha: multiply the merged task vector by this, in [0, inf) (the paper tunes it on
            validation data; default 1.0).
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0, None)


@dataclass(frozen=True)
class IsoCtsParams:
    """Global parameters of iso_cts.

    Attributes:
        common_space_fraction: share of the rank given to the common subspace, in [0, 1]
            (paper: 0.8); the rest is split equally among the tasks.
        alpha: multiply the merged task vector by this, in [0, inf) (default 1.0).
    """

    common_space_fraction: float = 0.8
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_range("common_space_fraction", self.common_space_fraction, 0, 1)
        check_range("alpha", self.alpha, 0, None)


def iso_c(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
          params: IsoCParams, generator: torch.Generator | None) -> Tensor:
    """Iso-C of task vectors ``xs`` (module docstring); not-matrices: ``alpha`` times the mean."""
    if not is_matrix(xs[0]):
        return mean_delta(xs, params.alpha)
    total = weighted_sum(xs, [1.0] * len(xs))  # (m, n) 1. Delta_TA
    u, s, vh = truncated_svd(total)  # (m, k), (k,), (k, n)
    return _isotropic(u, s, vh, params.alpha, total.shape)


def iso_cts(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
            params: IsoCtsParams, generator: torch.Generator | None) -> Tensor:
    """Iso-CTS of task vectors ``xs`` (module docstring); not-matrices: ``alpha`` times the mean."""
    if not is_matrix(xs[0]):
        return mean_delta(xs, params.alpha)
    deltas = [x.float() for x in xs]
    common, per_task = subspace_sizes(min(deltas[0].shape), len(deltas),
                                      params.common_space_fraction)
    total = weighted_sum(deltas, [1.0] * len(deltas))  # (m, n) Delta_TA
    u_c, s_c, vh_c = truncated_svd(total, common)  # 1. (m, k), (k,), (k, n)
    parts = [(u_c, s_c, vh_c)]
    if per_task > 0:  # 2. each task's top directions off the common subspace
        parts += [truncated_svd(d - u_c @ (u_c.T @ d), per_task,
                                scale=float(torch.linalg.matrix_norm(d)))  # (m, n) residual
                  for d in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)  # (m, K) 3. concatenate
    s = torch.cat([p[1] for p in parts])  # (K,)
    vh = torch.cat([p[2] for p in parts], dim=0)  # (K, n)
    return _isotropic(polar(u), s, polar(vh.T).T, params.alpha, total.shape)  # 3-4.


def subspace_sizes(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k, s)``: common subspace size and task-specific size per task (module docstring).

    The task-specific share is rounded to a multiple of ``tasks`` (Python's ``round``, as the
    paper's code) and capped so that ``k >= 0``.
    """
    per_task = min(rank // tasks, round((rank - int(rank * common_space_fraction)) / tasks))
    return rank - tasks * per_task, per_task


def _isotropic(u: Tensor, s: Tensor, vh: Tensor, alpha: float, shape: Sequence[int]) -> Tensor:
    """``alpha * mean(s) * u @ vh`` (m, n): the spectrum flattened to its mean (zeros if empty)."""
    if s.numel() == 0:
        return torch.zeros(tuple(shape), dtype=torch.float32, device=u.device)
    return (u @ vh).mul_(float(s.mean()) * alpha)  # (m, n)

