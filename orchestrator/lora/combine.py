"""Exact adapter merging: engine methods on full updates, ``cat``, ``svd``, baking into a base.

Every adapter is expanded to its full updates ``delta W_i = scaling_i * B_i @ A_i`` and a merge
method of the engine with ``inputs == "deltas"`` (task_arithmetic, ties, dare_*, della*,
breadcrumbs*), or ``linear``, combines them parameter by parameter, over the union of the
targeted parameters (an adapter that does not target one contributes a zero update there).
This is the weighted sum of the updates for linear merges, unlike PEFT's factor-wise
``add_weighted_adapter`` (see ``peft_compat``).

``linear`` on updates: with ``normalize`` (its default) it is the linear merge of the full
models ``base + delta W_i``, minus the base; with ``normalize: false`` it is the plain weighted
sum of the updates (task arithmetic), which is what adapter users mean by a linear combination.

Random methods get one ``torch.Generator`` per parameter, seeded from ``(seed, name)`` as the
engine does, so a parameter's draws do not depend on which other parameters are merged or in
what order, and equal those of a full-model merge with the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from orchestrator.errors import UserError
from orchestrator.lora.adapter import Adapter, LoraModule, natural_key
from orchestrator.lora.knots import knots_merge
from orchestrator.lora.save import make_config, with_config
from orchestrator.merge.seeding import make_generator


def delta_method(method: Any) -> Any:
    """The engine's ``MergeMethod`` for ``method`` (name or instance), if it merges updates.

    Raises:
        UserError: unknown method, or one that needs the full tensors (slerp, model_stock...).
    """
    if isinstance(method, str):
        from orchestrator.merge import get_method

        try:
            method = get_method(method)
        except (KeyError, ValueError) as err:
            raise UserError(f"merging adapters: {err}") from None
    if method.updates == "never":
        raise UserError(f"method {method.name} merges full tensors, not updates, so it cannot "
                        "merge adapters; use linear, task_arithmetic, ties, dare_* or della*")
    return method


def _build(make, values: Any, where: str) -> Any:
    """A params dataclass from recipe keys (dict), an instance, or None (defaults)."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        return values
    try:
        return make(dict(values))
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None


def method_params(spec: Any, adapters: Sequence[Adapter], model_params: Sequence[Any],
                  params: Any) -> tuple[list[Any], Any]:
    """Per-adapter and global params dataclasses for ``spec``, checked."""
    if len(model_params) != len(adapters):
        raise UserError(f"method {spec.name}: {len(adapters)} adapters but "
                        f"{len(model_params)} sets of per-model parameters")
    if len(adapters) < spec.min_models or (spec.max_models and len(adapters) > spec.max_models):
        raise UserError(f"method {spec.name} takes {spec.min_models}..{spec.max_models or 'any'}"
                        f" models, got {len(adapters)} adapters")
    models = [_build(spec.make_model_params, mp, f"{a.where} in method {spec.name}")
              for a, mp in zip(adapters, model_params)]
    return models, _build(spec.make_params, params, f"method {spec.name}")


def param_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The engine's generator for one tensor, seeded from ``(seed, name)``.

    Same seeds as a full-model merge, so random methods draw the same masks for a parameter
    whether the adapters or the baked models are merged.
    """
    return make_generator(seed, name, torch.device(device))


def union_params(adapters: Sequence[Adapter]) -> list[str]:
    """Parameters targeted by any adapter, in model order."""
    return sorted({p for a in adapters for p in a.modules}, key=natural_key)


def layout(adapters: Sequence[Adapter]) -> dict[str, LoraModule]:
    """For each targeted parameter, the first adapter's module (kind, orientation, shape)."""
    out: dict[str, LoraModule] = {}
    for adapter in adapters:
        for param, mod in adapter.modules.items():
            first = out.setdefault(param, mod)
            if (first.kind, first.shape, first.transposed) != (mod.kind, mod.shape, mod.transposed):
                raise UserError(f"{adapter.where} updates {param} as a {mod.kind} of shape "
                                f"{list(mod.shape)}, another adapter as a {first.kind} of shape "
                                f"{list(first.shape)}: adapters of different bases")
    return out


def merge_param(spec: Any, xs: Sequence[Tensor], base: Tensor | None, models: Sequence[Any],
                params: Any, seed: int, name: str) -> Tensor:
    """One parameter's merged update (float32)."""
    generator = param_generator(seed, name, xs[0].device) if spec.random else None
    try:
        return spec.fn(xs, base, models, params, generator)
    except ValueError as err:
        raise UserError(f"method {spec.name} on {name}: {err}") from None


def merge_deltas(adapters: Sequence[Adapter], method: Any, model_params: Sequence[Any],
                 params: Any = None, *, seed: int = 0,
                 base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Merge the adapters' full updates with an engine method.

    Args:
        adapters: the adapters, on one base.
        method: a method name (``ties``...) or ``MergeMethod`` with ``inputs == "deltas"``,
            or ``linear``.
        model_params: per adapter, a dict of recipe keys (``{"weight": 0.5}``) or a dataclass.
        params: global parameters (dict, dataclass, or None for the defaults).
        seed: seed of random methods (dare, della).
        base: base tensors by name, passed to methods that use them (the engine's
            delta methods need none: the updates are relative to the adapters' base).

    Returns:
        ``{parameter name: merged update}`` (float32) over every targeted parameter.
    """
    spec = delta_method(method)
    models, gparams = method_params(spec, adapters, model_params, params)
    shapes = {p: m.shape for p, m in layout(adapters).items()}
    out = {}
    for name in union_params(adapters):
        xs = [a.delta(name) if name in a.modules else torch.zeros(shapes[name]) for a in adapters]
        b = _base_tensor(spec, base, name)
        out[name] = merge_param(spec, xs, b, models, gparams, seed, name)
    return out


def _base_tensor(spec: Any, base: Mapping[str, Tensor] | None, name: str) -> Tensor | None:
    """The base tensor for methods that look at it; the updates already imply the base."""
    if spec.base == "none" or base is None or name not in base:
        return None
    return base[name].float()


def model_weights(model_params: Sequence[Any]) -> list[float]:
    """The ``weight`` of each adapter from dicts or dataclasses."""
    weights = []
    for mp in model_params:
        w = mp.get("weight") if isinstance(mp, Mapping) else getattr(mp, "weight", None)
        if w is None or isinstance(w, bool) or not isinstance(w, (int, float)):
            raise UserError(f"each adapter needs a numeric weight, got {mp!r}")
        weights.append(float(w))
    return weights


def cat_adapters(adapters: Sequence[Adapter], weights: Sequence[float], *,
                 name: str = "cat") -> Adapter:
    """Exact weighted sum as one adapter: factors concatenated, rank ``r_1 + r_2 + ...``.

    ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` and ``B = [B_1, B_2, ...]``, scaling 1, so
    ``B @ A = sum_i w_i s_i B_i @ A_i`` at every parameter (adapters that do not target a
    parameter are left out there, so its rank is the sum over those that do).
    """
    first = layout(adapters)
    modules = {}
    for param in union_params(adapters):
        parts = [(a.modules[param], w) for a, w in zip(adapters, weights) if param in a.modules]
        a = torch.cat([m.a.float() * (w * m.scaling) for m, w in parts], dim=0)  # (sum r, in)
        b = torch.cat([m.b.float() for m, _ in parts], dim=1)  # (out, sum r)
        modules[param] = LoraModule(first[param].module, first[param].kind, a, b, 1.0,
                                    first[param].fan_in_fan_out)
    return _finish(name, modules, adapters)


def lowrank(delta: Tensor, like: LoraModule, rank: int) -> LoraModule:
    """Truncated SVD of one update: ``B = U_k S_k``, ``A = V_k^T``, scaling 1 (k <= rank)."""
    mat = delta.float().T if like.transposed else delta.float()  # (out, in) LoRA orientation
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, s.numel())
    return LoraModule(like.module, like.kind, vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous(),
                      1.0, like.fan_in_fan_out)


def svd_adapter(deltas: Mapping[str, Tensor], adapters: Sequence[Adapter], rank: int, *,
                name: str = "svd") -> Adapter:
    """A rank-``rank`` adapter approximating merged updates (Eckart-Young optimal per parameter).

    Args:
        deltas: merged updates by parameter name (e.g. from ``merge_deltas``).
        adapters: the source adapters (module kinds and orientation, config template).
        rank: rank of each module (capped by the parameter's smaller side).
    """
    if rank < 1:
        raise UserError(f"svd rank must be a positive integer, got {rank}")
    like = layout(adapters)
    modules = {p: lowrank(d, like[p], rank) for p, d in deltas.items()}
    return _finish(name, modules, adapters)


def _finish(name: str, modules: dict[str, LoraModule], adapters: Sequence[Adapter]) -> Adapter:
    config = make_config(adapters[0].config, modules)
    return with_config(Adapter(name, modules, config), config)


def peft_kwargs(model_params: Sequence[Any], params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``add_weighted_adapter`` keyword arguments from recipe parameters.

    PEFT has one ``density`` for all adapters: it may be given globally or per adapter, where
    it must then be the same for all.
    """
    kwargs = dict(params or {})
    densities = {mp.get("density") for mp in model_params if isinstance(mp, Mapping)} - {None}
    if len(densities) > 1:
        raise UserError(f"PEFT-compatible mode uses one density for all adapters, got {sorted(densities)}")
    if densities and "density" not in kwargs:
        kwargs["density"] = densities.pop()
    allowed = ("density", "majority_sign_method", "svd_rank", "svd_clamp", "svd_full_matrices")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(f"PEFT-compatible mode: unknown parameter(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(allowed)}")
    return kwargs


def peft_mode(adapters: Sequence[Adapter], method: str, model_params: Sequence[Any],
              params: Mapping[str, Any] | None, seed: int,
              module_order: Sequence[str] | None = None, name: str = "merged") -> Adapter:
    """PEFT's ``add_weighted_adapter`` result for recipe-style arguments (DARE masks drawn
    from a generator seeded with ``seed``: PEFT's distribution, not its global-RNG stream)."""
    from orchestrator.lora.peft_compat import peft_weighted_adapter

    return peft_weighted_adapter(adapters, model_weights(model_params), method,
                                 generator=torch.Generator().manual_seed(seed),
                                 module_order=module_order, name=name,
                                 **peft_kwargs(model_params, params))


def merge_adapters(adapters: Sequence[Adapter], method: str, model_params: Sequence[Any],
                   params: Any = None, *, seed: int = 0, base: Mapping[str, Tensor] | None = None,
                   peft_compatible: bool = False,
                   module_order: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The merged full update of every targeted parameter, for any way of merging adapters.

    Exact mode: ``cat`` and ``svd`` give the weighted sum of the updates (a combined adapter's
    rank does not matter for its full update, except svd's truncation: use
    ``combine_adapters`` for that); any other name is an engine method (``merge_deltas``).
    With ``peft_compatible``, ``method`` is a PEFT combination type and ``params`` holds
    ``add_weighted_adapter``'s keyword arguments.
    """
    if peft_compatible:
        return peft_mode(adapters, method, model_params, params, seed, module_order).deltas()
    if method in ("cat", "svd"):
        return weighted_sum_deltas(adapters, model_weights(model_params))
    return merge_deltas(adapters, method, model_params, params, seed=seed, base=base)


def knots_deltas(adapters: Sequence[Adapter], method: str, model_params: Sequence[Any],
                 params: Any = None, *, seed: int = 0) -> dict[str, Tensor]:
    """The merged update of every targeted parameter, each module merged KnOTS-style.

    The updates of one module are expressed in their joint SVD basis and ``method`` merges the
    coefficients there (``knots.knots_merge``); adapters that do not target a module take no
    part in its merge. Random methods get the engine's per-parameter generator.
    """
    spec = delta_method(method)
    out: dict[str, Tensor] = {}
    for param in union_params(adapters):
        idx = [i for i, a in enumerate(adapters) if param in a.modules]
        mods = [adapters[i].modules[param] for i in idx]
        gen = param_generator(seed, param, mods[0].a.device) if spec.random else None
        merged = knots_merge([m.b.float() for m in mods], [m.a.float() for m in mods], [m.scaling for m in mods],
                             spec, [model_params[i] for i in idx], params, generator=gen)  # (out, in)
        out[param] = merged.T.contiguous() if mods[0].transposed else merged
    return out


def combine_adapters(adapters: Sequence[Adapter], method: str, model_params: Sequence[Any],
                     params: Any = None, *, seed: int = 0, rank: int | None = None,
                     base: Mapping[str, Tensor] | None = None, peft_compatible: bool = False,
                     module_order: Sequence[str] | None = None, name: str = "merged",
                     knots: bool = False) -> Adapter:
    """Combine adapters into one adapter (to save with ``save_adapter``).

    ``cat`` is exact (rank: sum of ranks). ``svd`` is the weighted sum of the updates,
    truncated to ``rank``. Any other method merges the full updates (``merge_deltas``) and
    truncates the result to ``rank`` by SVD; with ``knots``, the method merges each module's
    updates in their joint SVD basis first (KnOTS, ``knots_deltas``). With ``peft_compatible``,
    PEFT's result for the combination type ``method`` (``params``: ``add_weighted_adapter``'s
    keyword arguments).

    Args:
        rank: rank of the result for svd and the engine methods (default: the sum of the
            adapters' largest ranks, which keeps any linear combination exact).
    """
    if peft_compatible:
        return peft_mode(adapters, method, model_params, params, seed, module_order, name)
    if method == "cat":
        return cat_adapters(adapters, model_weights(model_params), name=name)
    rank = rank or sum(a.max_rank() for a in adapters)
    if knots:
        deltas = knots_deltas(adapters, method, model_params, params, seed=seed)
    elif method == "svd":
        deltas = weighted_sum_deltas(adapters, model_weights(model_params))
    else:
        deltas = merge_deltas(adapters, method, model_params, params, seed=seed, base=base)
    return svd_adapter(deltas, adapters, rank, name=name)


def weighted_sum_deltas(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i w_i delta W_i`` per targeted parameter (float32)."""
    out: dict[str, Tensor] = {}
    for adapter, w in zip(adapters, weights):
        for param in adapter.param_names():
            term = adapter.delta(param) * w
            out[param] = out[param].add_(term) if param in out else term
    return {p: out[p] for p in sorted(out, key=natural_key)}


def apply_delta(tensor: Tensor, delta: Tensor, weight: float = 1.0) -> Tensor:
    """``tensor + weight * delta`` in the tensor's dtype (added in float32, rounded once)."""
    d = delta.to(tensor.device) if weight == 1.0 else delta.to(tensor.device) * weight
    if tensor.dtype == torch.float32:
        return tensor + d
    return (tensor.float() + d).to(tensor.dtype)


def bake(target: nn.Module | MutableMapping[str, Tensor], deltas: Mapping[str, Tensor],
         weight: float = 1.0) -> None:
    """Add updates to a model's parameters in place, or replace them in a state dict.

    With one adapter's ``deltas()`` and weight 1 this equals PEFT's ``merge_and_unload`` (for
    float32 weights bit for bit; for 16-bit weights within one rounding, as PEFT rounds the
    update to 16 bits before adding it and this adds in float32 and rounds once).

    Raises:
        UserError: an update names a parameter the target does not have.
    """
    if isinstance(target, nn.Module):
        params = dict(target.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, delta in deltas.items():
                p = _lookup(params, name)
                p.copy_(apply_delta(p.detach(), delta, weight))
        return
    for name, delta in deltas.items():
        target[name] = apply_delta(_lookup(target, name), delta, weight)


def _lookup(tensors: Mapping[str, Any], name: str) -> Any:
    if name not in tensors:
        raise UserError(f"the base model has no parameter {name} to apply an adapter update to")
    return tensors[name]
