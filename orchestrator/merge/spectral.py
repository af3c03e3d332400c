"""Linear algebra shared by the SVD-based merges (TSV, Iso-C, Iso-CTS; KnOTS for adapters).

Two choices hold for all of them, and are where they may differ from the papers' code on
degenerate inputs (never on the full-rank task matrices the papers study):

* **Numerical rank.** A singular value at or below ``max(m, n) * eps(float32) * scale`` (the
  usual rank tolerance, ``scale`` the matrix's largest singular value or another stated scale)
  counts as zero, and its singular vectors are dropped. The SVD's vectors for zero singular
  values are an arbitrary basis of a null space; keeping them (the papers' code does) makes the
  result depend on the LAPACK driver, and Iso-C would give them the mean singular value, turning
  a rank-16 LoRA update into a full-rank one with arbitrary directions.
* **Polar factor.** The orthogonal Procrustes solution ``P = W Z^T`` for ``X = W S Z^T`` (the
  orthonormal matrix nearest to ``X``) is taken over the numerical rank of ``X``. For ``X`` of
  full column rank (the papers' case) it is the Procrustes solution; otherwise (zero columns,
  repeated directions) it is the unique partial isometry on ``X``'s column space, not an
  arbitrary completion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from orchestrator.merge.linear import weighted_sum

EPS32 = torch.finfo(torch.float32).eps


def rank_tol(shape: Sequence[int], scale: float) -> float:
    """Singular values at or below this count as zero: ``max(shape) * eps(float32) * scale``."""
    return max(shape) * EPS32 * scale


def numerical_rank(s: Tensor, tol: float) -> int:
    """How many of the descending singular values ``s`` are above ``tol`` (and above 0)."""
    return int(torch.count_nonzero(s > max(tol, 0.0)))


def truncated_svd(matrix: Tensor, rank: int | None = None, *,
                  scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top singular triplets of ``matrix`` (m, n): ``U (m, k), s (k,), Vh (k, n)``.

    ``k`` is ``rank`` (default: all) capped at the numerical rank, with the tolerance scaled by
    ``scale`` (default: the largest singular value of ``matrix``).
    """
    u, s, vh = svd(matrix)  # (m, r), (r,), (r, n)
    top = float(s[0]) if s.numel() else 0.0
    k = numerical_rank(s, rank_tol(matrix.shape, top if scale is None else scale))
    k = k if rank is None else min(rank, k)
    return u[:, :k], s[:k], vh[:k]


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, redone in float64 (then cast back)
    where LAPACK's float32 divide and conquer fails to converge.

    It fails on some matrices with many repeated singular values: Iso-CTS's concatenated
    subspace bases for ``layers.12.self_attn.o_proj`` of the real bf16 pair (singular values
    1 and sqrt(2), hundreds of times each) made the whole merge fail. Where float32 converges
    the result is unchanged; float64 converges there and its triplets agree with float32's to
    float32 precision (1e-5 relative on the merged tensor; ``tests/test_merge_bf16.py``).
    """
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def polar(x: Tensor) -> Tensor:
    """The orthonormal matrix nearest to ``x`` (m, k) on its column space: ``W Z^T`` (m, k).

    ``x = W S Z^T`` (thin SVD); the directions with zero singular values are dropped, so a zero
    column of ``x`` gives a zero column, and two equal columns ``c`` give ``c / (sqrt(2) |c|)``
    each (see the module docstring).
    """
    if x.numel() == 0:
        return torch.zeros_like(x)
    w, _, zh = truncated_svd(x)  # (m, q), (q,), (q, k)
    return w @ zh  # (m, k)


def mean_delta(xs: Sequence[Tensor], alpha: float) -> Tensor:
    """``alpha * mean_i x_i`` (task arithmetic with weights 1/T): the papers' rule for tensors
    that are not matrices (norms, biases)."""
    out = weighted_sum(xs, [1.0] * len(xs), divide_by=float(len(xs)))
    return out.mul_(alpha) if alpha != 1 else out


def is_matrix(x: Tensor) -> bool:
    """Whether the SVD-based rule applies: a 2-D tensor with entries (else ``mean_delta``)."""
    return x.dim() == 2 and x.numel() > 0
