"""Oracle tests of the SVD-based merges beyond mergekit: TSV-Merge, Iso-C and Iso-CTS.

Expected values come from the papers' equations, computed by hand or along another path
(closed-form polar factors via eigendecompositions instead of SVDs).
"""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.merge import REGISTRY
from orchestrator.merge.isotropic import subspace_sizes
from orchestrator.merge.spectral import polar

T = torch.tensor


def merge(name: str, deltas, **glob) -> torch.Tensor:
    method = REGISTRY[name]
    xs = [torch.as_tensor(d, dtype=torch.float32) for d in deltas]
    return method.fn(xs, torch.zeros_like(xs[0]), [method.make_model_params({}) for _ in xs],
                     method.make_params(glob), None)


def close(actual, expected, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32),
                               rtol=tol, atol=tol)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """``gram^(-1/2)`` of a symmetric positive definite matrix, by eigendecomposition."""
    w, q = torch.linalg.eigh(gram.double())
    return (q * w.rsqrt()) @ q.T


def orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(rand(n, n, seed=seed).double())[0]


# declared capabilities ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_declared_as_deterministic_task_vector_methods(name):
    method = REGISTRY[name]
    assert (method.base, method.inputs, method.random, method.updates) == (
        "required", "deltas", False, "always")
    assert method.reference_url.startswith("https://arxiv.org/abs/")


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_tensors_that_are_not_matrices_get_alpha_times_the_mean(name):
    deltas = [[1.0, -2.0, 3.0], [3.0, 0.0, -1.0]]
    close(merge(name, deltas, alpha=1.5), [3.0, -1.5, 1.5])  # 1.5 * [2, -1, 1]
    close(merge(name, [rand(2, 3, 2, seed=1), rand(2, 3, 2, seed=2)], alpha=1.0),
          (rand(2, 3, 2, seed=1) + rand(2, 3, 2, seed=2)) / 2)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_alpha_scales_linearly_and_inputs_never_produce_nan(name):
    deltas = [rand(7, 5, seed=i) for i in range(3)]
    one, two = merge(name, deltas, alpha=1.0), merge(name, deltas, alpha=2.0)
    close(two, 2 * one)
    assert one.dtype == torch.float32 and one.shape == (7, 5)
    zero = merge(name, [torch.zeros(7, 5)] * 3, alpha=1.0)
    assert torch.equal(zero, torch.zeros(7, 5))
    close(merge(name, [deltas[0], -deltas[0]], alpha=1.0), torch.zeros(7, 5), tol=1e-5)


# TSV-Merge --------------------------------------------------------------------------------------

def test_tsv_of_orthogonal_task_vectors_is_their_sum():
    # Disjoint singular vectors of one orthonormal pair (P, Q); each task has rank 2 = 6 // 3,
    # so the truncation is lossless and U, V are already orthonormal: Procrustes changes nothing.
    p, q = orthonormal(6, 1), orthonormal(6, 2)
    deltas = [(p[:, 2 * t:2 * t + 2] * T([3.0 - t, 0.5 + t], dtype=torch.float64))
              @ q[:, 2 * t:2 * t + 2].T for t in range(3)]
    close(merge("tsv", [d.float() for d in deltas]), sum(deltas).float())


def test_tsv_keeps_a_one_over_t_share_of_each_tasks_rank():
    # 2 tasks on 4 x 4: k = 4 // 2 = 2 singular triplets each. Task 2 is zero and contributes none.
    close(merge("tsv", [torch.diag(T([4.0, 3.0, 2.0, 1.0])), torch.zeros(4, 4)]),
          torch.diag(T([4.0, 3.0, 0.0, 0.0])))
    # One task keeps its whole rank: TSV is the identity.
    d = rand(5, 3, seed=3)
    close(merge("tsv", [d]), d)


def test_tsv_decorrelates_by_orthogonal_procrustes():
    # Delta_1 = 2 e1 e1^T, Delta_2 = u u^T with u = (1, 1)/sqrt(2): one triplet each (2 // 2).
    # U_hat = V_hat = [e1, u]; the Procrustes solution is U_hat (U_hat^T U_hat)^(-1/2) and
    # M = P diag(2, 1) P^T.
    u = T([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    e1 = T([1.0, 0.0], dtype=torch.float64)
    u_hat = torch.stack([e1, u], dim=1)  # (2, 2)
    p = u_hat @ inverse_sqrt(u_hat.T @ u_hat)
    expected = p @ torch.diag(T([2.0, 1.0], dtype=torch.float64)) @ p.T
    deltas = [2 * torch.outer(e1, e1), torch.outer(u, u)]
    close(merge("tsv", [d.float() for d in deltas]), expected.float())
    assert not torch.allclose(expected, sum(deltas))  # the overlap is removed, not summed


def test_polar_factor_is_the_partial_isometry_on_degenerate_inputs():
    # A zero column stays zero; two equal columns c share one direction: c / (sqrt(2) |c|).
    c = T([[3.0], [4.0]]) / 5
    close(polar(torch.cat([c, torch.zeros(2, 1)], dim=1)), torch.cat([c, torch.zeros(2, 1)], 1))
    close(polar(torch.cat([c, c], dim=1)), torch.cat([c, c], dim=1) / math.sqrt(2))


# Iso-C ------------------------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    # diag(3, 0) + diag(0, 1) = diag(3, 1): mean singular value 2.
    close(merge("iso_c", [torch.diag(T([3.0, 0.0])), torch.diag(T([0.0, 1.0]))]), 2 * torch.eye(2))
    close(merge("iso_c", [torch.diag(T([3.0, 0.0])), torch.diag(T([0.0, 1.0]))], alpha=1.5),
          3 * torch.eye(2))


def test_iso_c_is_alpha_sigma_times_the_polar_factor_of_the_sum():
    deltas = [rand(6, 4, seed=i) for i in range(3)]
    total = sum(deltas).double()  # (6, 4), full column rank
    sigma = torch.linalg.svdvals(total).mean()
    out = merge("iso_c", deltas, alpha=0.7)
    close(out, (0.7 * sigma * total @ inverse_sqrt(total.T @ total)).float())
    close(torch.linalg.svdvals(out), [0.7 * float(sigma)] * 4)


def test_iso_c_of_a_rank_one_sum_is_the_sum():
    # Only the numerically non-zero direction is used (see spectral.py): sigma = 3.
    u, v = T([0.6, 0.8, 0.0]), T([1.0, 0.0])
    close(merge("iso_c", [2 * torch.outer(u, v), torch.outer(u, v)]), 3 * torch.outer(u, v))


# Iso-CTS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("rank", "tasks", "fraction", "sizes"), [
    (4096, 3, 0.8, (3277, 273)),  # int(3276.8) = 3276; round(820 / 3) = 273 per task
    (10, 2, 0.8, (8, 1)),
    (3, 2, 0.0, (1, 1)),  # round(3 / 2) = 2 is capped at 3 // 2 = 1
    (2, 3, 0.8, (2, 0)),  # round(1 / 3) = 0: all common
    (6, 2, 1.0, (6, 0)),
])
def test_iso_cts_subspace_sizes(rank, tasks, fraction, sizes):
    assert subspace_sizes(rank, tasks, fraction) == sizes


def test_iso_cts_with_one_task_is_iso_c():
    # The residual of the only task off its top-k directions is its remaining directions.
    d = rand(6, 5, seed=7)
    close(merge("iso_cts", [d], alpha=1.3), merge("iso_c", [d], alpha=1.3))


def test_iso_cts_with_an_all_common_space_is_iso_c():
    deltas = [rand(6, 5, seed=i) for i in range(3)]
    close(merge("iso_cts", deltas, common_space_fraction=1.0), merge("iso_c", deltas))


def test_iso_cts_adds_each_tasks_top_residual_direction():
    # 3 x 3, 2 tasks, fraction 1/3: k = 1 common direction, s = 1 per task.
    # Delta_TA = diag(8, 2, 1): common e1 (sigma 8). Residuals: task 1 diag(0, 2, 1) -> e2
    # (sigma 2); task 2 zero -> nothing. Mean of (8, 2) = 5 on span(e1, e2); e3 (task 1's second
    # residual direction, beyond its share) is left out. Iso-C would give mean(8, 2, 1) * I.
    deltas = [torch.diag(T([4.0, 2.0, 1.0])), torch.diag(T([4.0, 0.0, 0.0]))]
    close(merge("iso_cts", deltas, common_space_fraction=1 / 3), torch.diag(T([5.0, 5.0, 0.0])))
    close(merge("iso_c", deltas), torch.diag(T([11 / 3] * 3)))


def test_iso_cts_counts_a_shared_residual_direction_once():
    # Two equal tasks diag(3, 1, 0): common e1 (sigma 6); both residuals are e2 (sigma 1). The
    # concatenated U = [e1, e2, e2] orthogonalises to [e1, e2/sqrt 2, e2/sqrt 2]: P Q^T =
    # e1 e1^T + e2 e2^T, times the mean of (6, 1, 1) = 8/3. (Iso-C: mean(6, 2) = 4.)
    deltas = [torch.diag(T([3.0, 1.0, 0.0]))] * 2
    close(merge("iso_cts", deltas, common_space_fraction=1 / 3), torch.diag(T([8 / 3, 8 / 3, 0.0])))
    close(merge("iso_c", deltas), torch.diag(T([4.0, 4.0, 0.0])))


def test_iso_cts_output_has_a_flat_spectrum_on_generic_inputs():
    deltas = [rand(8, 6, seed=10 + i) for i in range(3)]
    values = torch.linalg.svdvals(merge("iso_cts", deltas, alpha=1.0))
    close(values, values.mean().expand(6))
