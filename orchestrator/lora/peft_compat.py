"""PEFT-compatible mode: the results of PEFT's ``LoraModel.add_weighted_adapter``, reproduced.

For users who must match merges made with PEFT. Our own code, same math as PEFT 0.21:

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A
  factors and the B factors *separately*, with weights ``sqrt(|w_i s_i|)`` on both and the sign
  of ``w_i s_i`` on A (``s_i`` the adapter's scaling). The product of the combined factors is
  ``sum_ij sqrt(w_i s_i w_j s_j) B_i A_j``: the weighted sum of the updates *plus cross terms*
  ``B_i A_j`` (i != j), which are as large as the updates themselves for unrelated adapters.
  All adapters must have the same rank. Measured (``benchmarks/lora_bench.py gap``): for two
  PEFT-trained adapters (default init) on a small Llama, PEFT's ``linear`` update is 73% away
  (relative Frobenius norm) from the exact weighted sum, for any positive weights (the factor-
  wise result scales with the weights, so the gap does not); 72% with weights (0.7, -0.4);
  100% for independent random factors. On the adapters' toy tasks (loss 3.69 for the base,
  2.50 / 2.49 for each adapter on its own task), the exact sum with weights (1, 1) reaches
  3.19 / 3.09 and PEFT's linear 3.51 / 3.53: of each adapter's gain, PEFT's linear keeps a
  quarter to a third of what the exact sum keeps.
* ``cat`` concatenates ``w_i s_i A_i`` and ``B_i`` (exact), zero-padded to the summed rank.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``
  combine the full updates with PEFT's merge_utils math (TIES: signs elected from unweighted
  trimmed updates, division by the count of agreeing entries; DARE: Bernoulli keep mask,
  rescale by ``1/density``), then keep the top ``svd_rank`` singular directions
  (``B = U_k S_k``, ``A = V_k^T``), optionally clamped at a quantile.

The result has ``r = lora_alpha = new_rank`` and every other option of the first adapter, so
its scaling is 1, except when the first adapter uses rslora: then PEFT's result is scaled by
``sqrt(new_rank)`` (``new_rank / sqrt(new_rank)``), a PEFT quirk reproduced here on purpose.

Random draws (dare) come from ``generator``, in PEFT's order: module by module in model order
(pass ``module_order``), A factors then B factors, adapter by adapter. PEFT draws from torch's
global RNG, after initialising the new adapter's layers from it too; a generator set to the
global RNG state at which PEFT's merge step starts gives the same masks bit for bit (the tests
find that state with a probe call of a non-random type), any other seed masks with the same
distribution.

Where PEFT's result has modules of a rank other than ``new_rank`` (rank_pattern inputs), PEFT
swaps in smaller tensors under a config that says ``new_rank``; the config built here adds
rank/alpha patterns for those modules, so the same adapter saves and loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from orchestrator.errors import UserError
from orchestrator.lora.adapter import Adapter, LoraModule, module_scaling, natural_key
from orchestrator.lora.combine import layout, union_params
from orchestrator.lora.save import make_config, with_config

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear",
             "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}
COMBINATION_TYPES = (*FACTORWISE, "cat", *SVD_TYPES)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SignMethod = Literal["total", "frequency"]


# PEFT's merge_utils math, on a list of same-shape tensors --------------------------------------

def _prune(t: Tensor, density: float, random: bool, generator: torch.Generator | None) -> Tensor:
    """Keep the top ``density`` fraction by magnitude, or a Bernoulli(density) sample rescaled."""
    if density >= 1:
        return t  # PEFT: no pruning and no random draw
    if random:
        keep = torch.bernoulli(torch.full_like(t, density), generator=generator)  # 0/1
        return t * keep / density
    mask = torch.zeros_like(t).reshape(-1)
    mask[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * mask.reshape(t.shape)


def _weighted(stacked: Tensor, weights: Tensor) -> Tensor:
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))  # (n, *shape)


def peft_combine(kind: str, tensors: Sequence[Tensor], weights: Tensor, density: float | None,
                 sign_method: SignMethod, generator: torch.Generator | None) -> Tensor:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune."""
    if kind == "linear":
        return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)
    random = kind.startswith("dare")
    stacked = torch.stack([_prune(t, density, random, generator) for t in tensors])  # (n, *shape)
    if kind in ("dare_linear", "magnitude_prune"):
        return _weighted(stacked, weights).sum(dim=0)
    # ties / dare_ties: elect a sign per entry from the unweighted pruned tensors ...
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)  # (n, *shape); zeros never agree
    # ... and average the agreeing weighted entries over their count.
    merged = (_weighted(stacked, weights) * agree).sum(dim=0)
    return merged / torch.clamp(agree.sum(dim=0), min=1.0)


# One module per combination family -------------------------------------------------------------

def _factorwise(kind: str, parts: Sequence[tuple[LoraModule, float]], density: float | None,
                sign_method: SignMethod, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Combine A factors and B factors separately with sqrt(|w s|) weights (sign on A)."""
    if len({m.rank for m, _ in parts}) > 1:
        raise UserError(f"PEFT's {kind} needs equal ranks, but {parts[0][0].module} has ranks "
                        f"{[m.rank for m, _ in parts]} in the adapters; use cat or svd")
    roots = [math.sqrt(abs(w * m.scaling)) for m, w in parts]
    signs = [1 if w * m.scaling >= 0 else -1 for m, w in parts]
    wa = torch.tensor([r * s for r, s in zip(roots, signs)])
    wb = torch.tensor(roots)
    a = peft_combine(kind, [m.a.float() for m, _ in parts], wa, density, sign_method, generator)
    b = peft_combine(kind, [m.b.float() for m, _ in parts], wb, density, sign_method, generator)
    return a, b


def _cat(parts: Sequence[tuple[LoraModule, float]], new_rank: int) -> tuple[Tensor, Tensor]:
    """Concatenated ``w s A`` and ``B``, zero-padded to ``new_rank``."""
    a = torch.cat([m.a.float() * w * m.scaling for m, w in parts], dim=0)  # (sum r, in)
    b = torch.cat([m.b.float() for m, _ in parts], dim=1)  # (out, sum r)
    a_out = a.new_zeros(new_rank, a.shape[1])
    b_out = b.new_zeros(b.shape[0], new_rank)
    a_out[: a.shape[0]] = a
    b_out[:, : b.shape[1]] = b
    return a_out, b_out


def _svd(kind: str, parts: Sequence[tuple[LoraModule, float]], new_rank: int, density: float | None,
         sign_method: SignMethod, generator: torch.Generator | None, clamp: float | None,
         full_matrices: bool) -> tuple[Tensor, Tensor]:
    """Combine full updates, then keep the top ``new_rank`` singular directions."""
    weights = torch.tensor([w for _, w in parts])
    delta = peft_combine(SVD_TYPES[kind], [m.delta() for m, _ in parts], weights, density,
                         sign_method, generator)
    mat = delta.T if parts[0][0].transposed else delta  # (out, in) LoRA orientation
    u, s, vh = torch.linalg.svd(mat, full_matrices=full_matrices)
    u, s, vh = u[:, :new_rank], s[:new_rank], vh[:new_rank, :]
    if u.shape[1] != s.shape[0]:
        raise UserError(f"PEFT's {kind}: svd_rank {new_rank} exceeds the smaller side of "
                        f"{parts[0][0].param} ({s.shape[0]}); PEFT fails here too")
    u = u @ torch.diag(s)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


# The entry point -------------------------------------------------------------------------------

def _adapter_rank(adapter: Adapter) -> int:
    """PEFT's rank of an adapter: ``r``, or the largest ``rank_pattern`` value."""
    config = adapter.config
    return max([int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def _new_rank(kind: str, adapters: Sequence[Adapter], svd_rank: int | None) -> int:
    ranks = [_adapter_rank(a) for a in adapters]
    if kind in FACTORWISE:
        if len(set(ranks)) != 1:
            raise UserError(f"PEFT's {kind} needs adapters of equal r, got {ranks}; use cat or svd")
        return ranks[0]
    if kind == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _check_args(kind: str, adapters: Sequence[Adapter], weights: Sequence[float],
                density: float | None, sign_method: str) -> str:
    if kind not in COMBINATION_TYPES:
        raise UserError(f"unknown PEFT combination type {kind!r}; one of {', '.join(COMBINATION_TYPES)}")
    if not adapters or len(weights) != len(adapters):
        raise UserError(f"PEFT's {kind}: {len(adapters)} adapters but {len(weights)} weights")
    kind = "linear" if len(adapters) == 1 else kind  # PEFT forces linear for one adapter
    if SVD_TYPES.get(kind, kind) in NEEDS_DENSITY and (density is None or not 0 <= density <= 1):
        raise UserError(f"PEFT's {kind} needs a density in [0, 1], got {density!r}")
    if sign_method not in ("total", "frequency"):
        raise UserError(f"majority_sign_method must be total or frequency, got {sign_method!r}")
    return kind


def _order(params: Sequence[str], module_order: Sequence[str] | None) -> list[str]:
    """Parameters in model order (``module_order``: module names as ``named_modules`` gives)."""
    if module_order is None:
        return list(params)
    index = {f"{m}.weight": i for i, m in enumerate(module_order)}
    return sorted(params, key=lambda p: (index.get(p, len(index)), natural_key(p)))


def peft_weighted_adapter(adapters: Sequence[Adapter], weights: Sequence[float],
                          combination_type: str = "svd", *, svd_rank: int | None = None,
                          svd_clamp: float | None = None, svd_full_matrices: bool = True,
                          density: float | None = None, majority_sign_method: SignMethod = "total",
                          generator: torch.Generator | None = None,
                          module_order: Sequence[str] | None = None, name: str = "merged") -> Adapter:
    """The adapter PEFT's ``add_weighted_adapter`` would build (same arguments, same math).

    Args:
        adapters, weights, combination_type, svd_rank, svd_clamp, svd_full_matrices, density,
            majority_sign_method: as in PEFT.
        generator: random source of the dare types (None: torch's global RNG, as PEFT).
        module_order: the base model's module names in ``named_modules()`` order, to draw
            dare masks in PEFT's order (default: natural name order).
        name: the result's name.

    Returns:
        The combined adapter; its config reproduces PEFT's (``r = lora_alpha = new_rank``),
        plus rank/alpha patterns where a module's rank differs, so that it saves and loads.
    """
    kind = _check_args(combination_type, adapters, weights, density, majority_sign_method)
    new_rank = _new_rank(kind, adapters, svd_rank)
    template = {**adapters[0].config, "r": new_rank, "lora_alpha": new_rank,
                "rank_pattern": {}, "alpha_pattern": {}}
    first = layout(adapters)
    modules = {}
    for param in _order(union_params(adapters), module_order):
        parts = [(a.modules[param], w) for a, w in zip(adapters, weights) if param in a.modules]
        if kind in FACTORWISE:
            a, b = _factorwise(kind, parts, density, majority_sign_method, generator)
        elif kind == "cat":
            a, b = _cat(parts, new_rank)
        else:
            a, b = _svd(kind, parts, new_rank, density, majority_sign_method, generator,
                        svd_clamp, svd_full_matrices)
        _, scaling = module_scaling(template, first[param].module)
        modules[param] = LoraModule(first[param].module, first[param].kind, a, b, scaling,
                                    first[param].fan_in_fan_out)
    config = make_config(template, modules, use_rslora=bool(template.get("use_rslora")))
    return with_config(Adapter(name, modules, config), config)
