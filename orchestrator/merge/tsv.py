"""TSV-Merge: merge task matrices through their decorrelated top singular vectors.

Reference: Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging" (CVPR 2025), https://arxiv.org/abs/2412.00081, Section 5 (TSV-M).

Per 2-D tensor (a layer's task matrices ``Delta_t = x_t - base``, t = 1..T, of shape (m, n)):

1. Low-rank approximate each task matrix by its top singular vectors, a ``1/T`` share of the
   rank each: ``Delta_t ~ U_t S_t V_t^T`` with ``k = floor(min(m, n) / T)`` triplets (at least
   1; fewer when ``Delta_t`` has a lower numerical rank).
2. Concatenate: ``U = [U_1 ... U_T]`` (m, Tk), ``S = diag(S_1 ... S_T)``, ``V = [V_1 ... V_T]``.
3. Decorrelate by orthogonal Procrustes: ``U = P S_U Q^T`` -> ``U_perp = P Q^T``, and likewise
   ``V_perp``, removing the interference ``U^T U - I`` between tasks' singular vectors.
4. Reconstruct ``M = U_perp S V_perp^T`` and return ``alpha * M`` (the model is
   ``base + alpha * M``; the paper uses ``alpha = 1``, needing no validation data).

Tensors that are not matrices (norms, biases) get ``alpha * mean_t Delta_t`` (task arithmetic
with weights ``1/T``), as in the paper's code. Rank-deficient inputs: see ``spectral.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchestrator.merge.base import NoParams, check_range
from orchestrator.merge.spectral import is_matrix, mean_delta, polar, truncated_svd


@dataclass(frozen=True)
class TsvParams:
    """Global parameters of tsv.

    Attributes:
        alpha: multiply the merged task vector by this, in [0, inf) (paper: 1.0).
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0, None)


def tsv(xs: Sequence[Tensor], base: Tensor | None, models: Sequence[NoParams],
        params: TsvParams, generator: torch.Generator | None) -> Tensor:
    """Merge task vectors ``xs`` into ``alpha * M`` (module docstring); not-matrices: the mean."""
    if not is_matrix(xs[0]):
        return mean_delta(xs, params.alpha)
    merged = tsv_matrix([x.float() for x in xs])
    return merged.mul_(params.alpha) if params.alpha != 1 else merged


def tsv_matrix(deltas: Sequence[Tensor]) -> Tensor:
    """``M = U_perp S V_perp^T`` of task matrices ``deltas`` (each (m, n), float32)."""
    m, n = deltas[0].shape
    share = max(1, min(m, n) // len(deltas))  # 1. a 1/T share of the rank per task
    triplets = [truncated_svd(d, share) for d in deltas]  # T x ((m, k), (k,), (k, n))
    # 2. Concatenate the tasks' singular vectors and values.
    u = torch.cat([t[0] for t in triplets], dim=1)  # (m, R), R = sum of the kept ranks
    s = torch.cat([t[1] for t in triplets])  # (R,)
    vh = torch.cat([t[2] for t in triplets], dim=0)  # (R, n)
    if s.numel() == 0:  # every task matrix is zero
        return torch.zeros((m, n), dtype=torch.float32, device=deltas[0].device)
    # 3. Decorrelate by orthogonal Procrustes (the nearest orthonormal U and V).
    u_perp = polar(u)  # (m, R)
    vh_perp = polar(vh.T).T  # (R, n)
    # 4. Reconstruct.
    return (u_perp * s) @ vh_perp  # (m, n)
