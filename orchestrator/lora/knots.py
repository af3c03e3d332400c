"""KnOTS: merge LoRA updates after aligning them in a shared SVD basis.

Reference: Stoica, Ramesh, Ecsedi, Choshen, Hoffman 2025, "Model merging with SVD to tie the
KnOTS" (ICLR 2025), https://arxiv.org/abs/2410.19735, Section 4.

For one module and T adapters with updates ``Delta_i = scaling_i * B_i A_i`` (out, in):

1. Concatenate the updates side by side and take the SVD of the concatenation:
   ``[Delta_1 ... Delta_T] = U S [V_1^T ... V_T^T]`` (U: (out, K), V_i^T: (K, in)), so every
   update is written in one shared basis ``U``: ``Delta_i = U S V_i^T``.
2. Merge the per-task coefficient matrices with an existing method (TIES, DARE, task
   arithmetic, ...): as the paper's default (``s_on_V``), the coefficients are ``S V_i^T``
   (= ``U^T Delta_i``); with ``scale_coefficients=False`` they are ``V_i^T`` and ``S`` is applied
   after merging.
3. Return ``U @ merged`` (or ``U S merged``), the merged full update (out, in).

The basis change is orthogonal, so a linear combination (task arithmetic, or linear) equals the
weighted sum of the updates; sparsifying or sign-electing methods act on coordinates in which
the tasks are aligned instead of on raw weight entries.

The SVD is computed exactly without forming the (out, T in) concatenation: with
``[s_1 B_1 ... s_T B_T] = Q_B R_B`` and ``A_i^T = Q_i R_i`` (thin QR), the concatenation is
``Q_B [R_B,1 R_1^T ... R_B,T R_T^T] diag(Q_i^T)``, so the SVD of the small core matrix gives
``U = Q_B X`` and ``V_i^T = Y_i^T Q_i^T``. It runs in float64; directions with singular values
at or below the float32 rank tolerance are dropped (the paper drops ``s <= 1e-5``).

Choices: the method merges each module's coefficients on their own (the paper's code ranks
TIES/DARE magnitudes over all modules at once); methods that do not merge updates on their own
(slerp, model_stock...) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from orchestrator.errors import UserError
from orchestrator.merge import get_method
from orchestrator.merge.base import MergeMethod
from orchestrator.merge.spectral import numerical_rank, rank_tol


def knots_basis(bs: Sequence[Tensor], as_: Sequence[Tensor],
                scalings: Sequence[float]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The shared basis of the updates ``scaling_i * B_i A_i``: ``(U, s, [V_i^T])``.

    ``U`` (out, K) has orthonormal columns, ``s`` (K,) is descending and positive, each
    ``V_i^T`` is (K, in), and ``scaling_i B_i A_i = U diag(s) V_i^T`` (float64 tensors).
    """
    _check_factors(bs, as_, scalings)
    ranks = [b.shape[1] for b in bs]
    b_cat = torch.cat([b.double() * s for b, s in zip(bs, scalings)], dim=1)  # (out, R)
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, R'), (R', R)
    qr_a = [torch.linalg.qr(a.double().T) for a in as_]  # T x ((in, r_i'), (r_i', r_i))
    blocks = torch.split(r_b, ranks, dim=1)  # T x (R', r_i)
    core = torch.cat([rb @ ra.T for rb, (_, ra) in zip(blocks, qr_a)], dim=1)  # (R', sum r_i')
    x, s, yh = torch.linalg.svd(core, full_matrices=False)  # (R', k), (k,), (k, sum r_i')
    out_dim, in_dim = bs[0].shape[0], as_[0].shape[1]
    top = float(s[0]) if s.numel() else 0.0
    k = numerical_rank(s, rank_tol((out_dim, len(bs) * in_dim), top))
    x, s, yh = x[:, :k], s[:k], yh[:k]
    widths = [qa.shape[1] for qa, _ in qr_a]
    vhs = [y @ qa.T for y, (qa, _) in zip(torch.split(yh, widths, dim=1), qr_a)]  # T x (k, in)
    return q_b @ x, s, vhs  # (out, k), (k,), T x (k, in)


def knots_merge(bs: Sequence[Tensor], as_: Sequence[Tensor], scalings: Sequence[float],
                method: MergeMethod | str, model_params: Sequence[Any], params: Any = None, *,
                generator: torch.Generator | None = None,
                scale_coefficients: bool = True) -> Tensor:
    """Merge one module's LoRA updates with ``method`` in their shared SVD basis (KnOTS).

    Args:
        bs, as_: each adapter's factors ``B_i`` (out, r_i) and ``A_i`` (r_i, in); ranks may
            differ. Never modified.
        scalings: each adapter's ``scaling_i`` (``alpha / r``); the update is
            ``scaling_i * B_i @ A_i``.
        method: a registry ``MergeMethod`` (or its name) that merges updates
            (``merges_updates``: task_arithmetic, ties, dare_*, della*, breadcrumbs*, linear...).
        model_params: per adapter, the method's per-model parameters (a dict of recipe keys,
            ``{"weight": 0.5, "density": 0.3}``, or the dataclass).
        params: the method's global parameters (dict, dataclass, or None for the defaults).
        generator: the seeded generator of random methods (dare_*, della*).
        scale_coefficients: merge ``S V_i^T`` (the paper's default) instead of ``V_i^T``.

    Returns:
        The merged update (out, in), float32, on the factors' device.

    Raises:
        UserError: mismatched factor shapes or counts, or a method that cannot merge updates.
        ValueError: from the method, for values it cannot merge with.
    """
    method = get_method(method) if isinstance(method, str) else method
    models, gparams = _method_params(method, model_params, params, len(bs))
    u, s, vhs = knots_basis(bs, as_, scalings)
    out_dim, in_dim = bs[0].shape[0], as_[0].shape[1]
    if s.numel() == 0:  # every update is zero
        return torch.zeros((out_dim, in_dim), dtype=torch.float32, device=bs[0].device)
    coeffs = [(vh * s[:, None] if scale_coefficients else vh).float() for vh in vhs]  # T x (K, in)
    merged = method.fn(coeffs, None, models, gparams, generator).double()  # (K, in)
    basis = u if scale_coefficients else u * s  # (out, K)
    return (basis @ merged).float()  # (out, in)


def _method_params(method: MergeMethod, model_params: Sequence[Any], params: Any,
                   count: int) -> tuple[list[Any], Any]:
    """The method's per-model and global dataclasses, checked against what KnOTS can merge."""
    gparams = _build(method.make_params, {} if params is None else params, method.name)
    if not method.merges_updates(gparams):
        raise UserError(f"KnOTS: method {method.name} does not merge updates on their own "
                        "(use task_arithmetic, ties, dare_*, della*, breadcrumbs* or linear)")
    if len(model_params) != count:
        raise UserError(f"KnOTS: {count} adapters but {len(model_params)} sets of per-model "
                        "parameters")
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        raise UserError(f"KnOTS: method {method.name} takes {method.min_models}.."
                        f"{method.max_models or 'any'} models, got {count} adapters")
    return [_build(method.make_model_params, m, method.name) for m in model_params], gparams


def _build(make: Any, values: Any, name: str) -> Any:
    if not isinstance(values, Mapping):
        return values
    try:
        return make(dict(values))
    except (TypeError, ValueError) as err:
        raise UserError(f"KnOTS, method {name}: {err}") from None


def _check_factors(bs: Sequence[Tensor], as_: Sequence[Tensor], scalings: Sequence[float]) -> None:
    if not bs or not len(bs) == len(as_) == len(scalings):
        raise UserError(f"KnOTS needs one B, A and scaling per adapter, got {len(bs)} B, "
                        f"{len(as_)} A, {len(scalings)} scalings")
    out_dim, in_dim = bs[0].shape[0], as_[0].shape[1]
    for i, (b, a) in enumerate(zip(bs, as_)):
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise UserError(f"KnOTS: adapter {i} has B {list(b.shape)} and A {list(a.shape)}; "
                            "expected B (out, r) and A (r, in)")
        if (b.shape[0], a.shape[1]) != (out_dim, in_dim):
            raise UserError(f"KnOTS: adapter {i} updates a ({b.shape[0]}, {a.shape[1]}) weight, "
                            f"adapter 0 a ({out_dim}, {in_dim}) one")
