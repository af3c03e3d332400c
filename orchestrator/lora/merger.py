"""Adapter sweeps on a resident model: each trial rewrites only the adapted parameters.

The merger reads each adapter's full updates once and keeps them (and a copy of the base
values of the targeted parameters) beside the model. A trial then costs one merge of the
cached updates per targeted parameter and one ``copy_`` into it: proportional to the size of
the adapted modules, not of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from orchestrator.errors import UserError
from orchestrator.lora.adapter import Adapter
from orchestrator.lora.combine import (
    apply_delta,
    delta_method,
    knots_deltas,
    merge_param,
    method_params,
    model_weights,
    peft_mode,
    union_params,
)


def model_layout(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Parameter shapes of ``model`` (tied ones under every name) and its ``Conv1D`` modules."""
    from transformers.pytorch_utils import Conv1D

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    return shapes, conv1d


class AdapterMerger:
    """Merge adapters into a resident model, trial after trial.

    Args:
        model: the base model, loaded once (any device and dtype).
        adapters: the adapters to merge (from ``load_adapter``).
        base_state: the base values of the targeted parameters (default: the model's current
            values, which must then be the base's).
        cache_deltas: keep every adapter's full updates on the model's device (fast trials,
            memory ``n_adapters x targeted parameters`` in float32); otherwise recompute them
            from the factors each trial (one matmul per module and adapter).
    """

    def __init__(self, model: nn.Module, adapters: Sequence[Adapter],
                 base_state: Mapping[str, Tensor] | None = None, *, cache_deltas: bool = True):
        if not adapters:
            raise UserError("an adapter sweep needs at least one adapter")
        shapes, conv1d = model_layout(model)
        self.adapters = [a.for_base(shapes, conv1d) for a in adapters]
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.names = union_params(self.adapters)
        self.base = {n: self._base_value(n, base_state) for n in self.names}
        for adapter in self.adapters:
            adapter.check_base_copies(self.base)
        self.cache_deltas = cache_deltas
        self._deltas = {n: self._compute(n) for n in self.names} if cache_deltas else {}
        self.module_order = [n for n, _ in model.named_modules()]

    def _base_value(self, name: str, base_state: Mapping[str, Tensor] | None) -> Tensor:
        param = self.params[name]
        if base_state is not None and name not in base_state:
            raise UserError(f"base_state lacks {name}, which an adapter updates")
        src = param.detach() if base_state is None else base_state[name]
        return src.to(device=param.device, dtype=param.dtype, copy=True)

    def _compute(self, name: str) -> list[Tensor]:
        """Each adapter's update of ``name`` (zeros where it does not target it)."""
        device = self.params[name].device
        zeros = None
        out = []
        for adapter in self.adapters:
            if name in adapter.modules:
                out.append(adapter.delta(name).to(device))
            else:
                zeros = zeros if zeros is not None else torch.zeros(self.base[name].shape, device=device)
                out.append(zeros)
        return out

    def deltas(self, name: str) -> list[Tensor]:
        """Per adapter, its full update of parameter ``name``."""
        return self._deltas[name] if self.cache_deltas else self._compute(name)

    def _pick(self, subset: Sequence[int] | None) -> list[int]:
        """Indices of the adapters a merge uses (default: all, in order)."""
        if subset is None:
            return list(range(len(self.adapters)))
        picked = list(subset)
        if not picked or any(not 0 <= i < len(self.adapters) for i in picked) or len(set(picked)) < len(picked):
            raise UserError(f"adapter subset {picked} must name distinct adapters among 0..{len(self.adapters) - 1}")
        return picked

    def merged(self, method: Any, model_params: Sequence[Any], params: Any = None,
               seed: int = 0, subset: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The merged update of every targeted parameter (exact mode; see ``merge_deltas``).

        ``subset``: merge only these adapters (indices), ``model_params`` being theirs; a
        parameter no adapter of the subset targets gets a zero update.
        """
        spec = delta_method(method)
        picked = self._pick(subset)
        models, gparams = method_params(spec, [self.adapters[i] for i in picked], model_params, params)
        out = {}
        for name in self.names:
            base = self.base[name].float() if spec.base != "none" else None  # unused by delta methods
            deltas = self.deltas(name)
            out[name] = merge_param(spec, [deltas[i] for i in picked], base, models, gparams, seed, name)
        return out

    def weighted_sum(self, weights: Sequence[float], subset: Sequence[int] | None = None) -> dict[str, Tensor]:
        """``sum_i w_i delta W_i`` of every targeted parameter (over ``subset``, default all)."""
        picked = self._pick(subset)
        if len(weights) != len(picked):
            raise UserError(f"{len(picked)} adapters but {len(weights)} weights")
        out = {}
        for name in self.names:
            deltas = self.deltas(name)
            total = deltas[picked[0]] * weights[0]
            for i, w in zip(picked[1:], weights[1:]):
                total.add_(deltas[i], alpha=w)
            out[name] = total
        return out

    def peft_merged(self, combination_type: str, model_params: Sequence[Any],
                    params: Mapping[str, Any] | None = None, seed: int = 0,
                    subset: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The update of PEFT's ``add_weighted_adapter`` (PEFT-compatible mode)."""
        adapters = [self.adapters[i] for i in self._pick(subset)]
        deltas = peft_mode(adapters, combination_type, model_params, params, seed, self.module_order).deltas()
        for name in self.names:  # parameters the subset does not target keep their base values
            deltas.setdefault(name, torch.zeros_like(self.base[name], dtype=torch.float32))
        return deltas

    def knots_merged(self, method: Any, model_params: Sequence[Any], params: Any = None, seed: int = 0,
                     subset: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The KnOTS merge of the subset's updates (``combine.knots_deltas``), zero where none applies."""
        adapters = [self.adapters[i] for i in self._pick(subset)]
        merged = knots_deltas(adapters, method, model_params, params, seed=seed)
        for name in self.names:  # parameters the subset does not target keep their base values
            merged.setdefault(name, torch.zeros_like(self.base[name], dtype=torch.float32))
        return {name: d.to(self.base[name].device) for name, d in merged.items()}

    def apply(self, method: Any, model_params: Sequence[Any], params: Any = None, seed: int = 0,
              *, peft_compatible: bool = False, subset: Sequence[int] | None = None,
              knots: bool = False) -> None:
        """Write ``base + merged update`` into every targeted parameter of the model.

        Args:
            method: engine method name, or cat/svd (exact weighted sum), in exact mode; a
                PEFT combination type in compatible mode.
            model_params: per adapter, recipe keys (``{"weight": 0.7, "density": 0.5}``).
            params: global parameters (exact mode: the method's; compatible mode: keyword
                arguments of ``add_weighted_adapter`` such as ``density``, ``svd_rank``).
            seed: seed of random methods.
            peft_compatible: reproduce PEFT's factor-wise combination instead.
            subset: merge only these adapters (indices into ``adapters``); every targeted
                parameter is still rewritten, so a smaller subset leaves no stale update behind.
            knots: merge each module's updates in their joint SVD basis (KnOTS).
        """
        if knots:
            merged = self.knots_merged(method, model_params, params, seed, subset)
        elif peft_compatible:
            merged = self.peft_merged(method, model_params, params, seed, subset)
        elif method in ("cat", "svd"):  # exact: the weighted sum of the updates
            merged = self.weighted_sum(model_weights(model_params), subset)
        else:
            merged = self.merged(method, model_params, params, seed, subset)
        with torch.no_grad():
            for name, delta in merged.items():
                param, base = self.params[name], self.base[name]
                if param.dtype == torch.float32 and delta.device == param.device:
                    torch.add(base, delta, out=param)  # = apply_delta, without a temporary
                else:
                    param.copy_(apply_delta(base, delta))

    def restore(self) -> None:
        """Put the base values back into the targeted parameters."""
        with torch.no_grad():
            for name in self.names:
                self.params[name].copy_(self.base[name])
