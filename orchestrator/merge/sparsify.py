"""Sparsification of task vectors: which entries of a delta survive, and how they are rescaled.

Four methods, named as in mergekit (``mergekit/sparsify.py``), all keeping ``delta`` whole when
``density >= 1``:

* ``magnitude`` (TIES): keep the ``k = max(1, int(density * n))`` largest ``|delta|``.
* ``random`` (DARE): keep each entry with probability ``density``.
* ``magnitude_outliers`` (Model Breadcrumbs): drop the ``int(gamma * n)`` largest ``|delta|``
  and then the smallest, keeping ``int(density * n)`` entries (possibly none, as mergekit).
* ``della_magprune`` (DELLA): keep each entry with a probability that grows with its magnitude
  rank in its row, from ``density - epsilon`` to ``density + epsilon``.

Magnitude pruning selects by rank without a full sort and keeps exactly the requested count,
ties broken by position (``selection.py``). Random draws come only from the ``generator``
passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from orchestrator.merge.selection import rank_window

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
RescaleMode = Literal["l1", "density"]

_L1_EPS = 1e-7  # mergekit: no L1 rescale when either norm is below this


def magnitude(delta: Tensor, model: Any, generator: torch.Generator | None, out: Tensor) -> float:
    """Mask (into ``out``) the ``max(1, int(density * n))`` largest ``|delta|``."""
    n = delta.numel()
    k = max(1, int(model.density * n))
    torch.abs(delta, out=out)
    rank_window(out, delta, n - k, n)
    return model.density


def magnitude_outliers(delta: Tensor, model: Any, generator: torch.Generator | None,
                       out: Tensor) -> float:
    """Mask (into ``out``) ``int(density * n)`` entries below the ``int(gamma * n)`` largest.

    Ranks ``[n_bot, n_bot + target)`` in ascending ``|delta|``, as mergekit 0.1.5's
    ``magnitude_outliers``; when ``gamma`` leaves too few entries, fewer outliers are dropped.
    (mergekit <= 0.1.4 sliced ``[n_bot:-n_top]``, empty when ``n_top == 0``, so gamma=0 or
    tensors under ``1/gamma`` entries lost their whole task vector; we keep the band.)
    """
    n = delta.numel()
    target, n_top = int(model.density * n), int(model.gamma * n)
    n_bot = max(0, n - target - n_top)
    torch.abs(delta, out=out)
    rank_window(out, delta, n_bot, n_bot + target)
    return model.density


def bernoulli(delta: Tensor, model: Any, generator: torch.Generator | None, out: Tensor) -> float:
    """Mask (into ``out``) each entry with probability ``density`` (DARE's Bernoulli drop)."""
    out.uniform_(generator=_required(generator)).lt_(model.density)
    return model.density


def della_magprune(delta: Tensor, model: Any, generator: torch.Generator | None,
                   out: Tensor) -> Tensor:
    """Mask (into ``out``) entries with rank-dependent probabilities; returns them.

    Ranks run along dim 1 (a matrix's rows; a vector is one row): the smallest ``|delta|`` is
    kept with probability ``density - epsilon``, the largest with ``density + epsilon``,
    linearly in rank between. A row of one entry uses ``density`` (mergekit computes 0/0 there
    and torch.bernoulli raises).
    """
    mags = delta.abs() if delta.dim() > 1 else delta.abs().unsqueeze(0)  # (r, c, ...)
    n = mags.shape[1]
    order = mags.argsort(dim=1)  # (r, c, ...) ascending
    steps = torch.arange(n, dtype=mags.dtype, device=mags.device)
    steps = steps.view(1, n, *([1] * (mags.dim() - 2))).expand_as(order)
    probs = mags.scatter_(1, order, steps)  # (r, c, ...) rank 0..n-1 of each entry
    if n > 1:  # p = density - epsilon + 2 epsilon rank / (n - 1)
        probs.mul_(2 * model.epsilon / (n - 1)).add_(model.density - model.epsilon)
    else:
        probs.fill_(model.density)
    probs = probs.view(delta.shape)
    out.uniform_(generator=_required(generator)).lt_(probs)
    return probs


MASKS: dict[str, Callable[[Tensor, Any, torch.Generator | None, Tensor], float | Tensor]] = {
    "magnitude": magnitude,
    "random": bernoulli,
    "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune,
}


def sparsify(delta: Tensor, model: Any, method: Sparsification | None, *,
             rescale: RescaleMode | None, generator: torch.Generator | None,
             out: Tensor | None = None) -> Tensor:
    """Sparsify (and rescale) one task vector.

    Args:
        delta: the task vector (float32); never modified.
        model: per-model params with ``density`` (and ``gamma`` / ``epsilon`` as the method needs).
        method: one of ``MASKS``, or ``None`` for no sparsification.
        rescale: ``None``; ``"l1"`` to match the L1 norm of ``delta`` (mergekit); or
            ``"density"`` to divide kept entries by their keep probability (DARE/DELLA papers).
        generator: the random source of ``random`` and ``della_magprune``.
        out: a float32 buffer of ``delta``'s shape to write into (allocated if ``None``).

    Returns:
        ``delta`` itself when nothing is dropped (``method`` is None or ``density >= 1``),
        else ``out`` holding the sparsified delta.
    """
    if method is None or model.density >= 1 or delta.numel() == 0:
        return delta
    if out is None:  # contiguous even when delta is a strided view
        out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    keep_prob = MASKS[method](delta, model, generator, out)  # out: 0/1 mask
    out.mul_(delta)  # (*shape) kept entries
    if rescale == "l1":
        before, after = (float(torch.linalg.vector_norm(t, ord=1)) for t in (delta, out))
        if before >= _L1_EPS and after >= _L1_EPS:
            out.mul_(before / after)
    elif rescale == "density":
        out.div_(keep_prob)
    return out


def _required(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("this merge method is random and needs a seeded torch.Generator "
                         "(the global RNG is never used)")
    return generator
