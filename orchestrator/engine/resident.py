"""Merge into a resident model: the sweep's trial merge, with inputs cached across merges.

Merged values are written with ``param.copy_`` under ``no_grad``: parameter objects (and tied
weights) stay the same, so a wrapper around the model (lm-eval's HFLM) keeps working.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.compute import CachedReader, cast, compute_tensor
from orchestrator.engine.devices import resolve_device
from orchestrator.engine.plan import MergePlan, TensorRef, TensorTask, build_plan
from orchestrator.engine.validate import check_recipe
from orchestrator.engine.recipe import Recipe
from orchestrator.engine.sources import as_recipe, close_all, open_models
from orchestrator.errors import UserError
from orchestrator.merge.chunks import Workspace


@dataclass(frozen=True)
class MergeStats:
    """What one in-memory merge did."""

    tensors: int
    seconds: float
    cache_bytes: int


class InMemoryMerger:
    """Merges into a resident model's parameters, caching inputs across merges.

    Source tensors and task vectors are read and computed once (float32, on ``device``) and
    reused by every later merge with the same model set, so a sweep trial costs only the
    merge math. Merged values are written with ``param.copy_`` under ``no_grad``: parameter
    objects (and tied weights) stay the same, so a wrapper around the model (lm-eval's HFLM)
    keeps working.

    Args:
        recipe: the template recipe (Recipe, dict or YAML path); it fixes the model set.
        model: the resident model (may also be given per call).
        device: where to cache and compute; defaults to the model's device, else cpu.
        seed: default seed for random methods.
        allow_pickle: accept ``pytorch_model.bin`` inputs.

    Memory: the cache holds each model's tensors once and, for task-vector methods, each
    task vector once: up to about (2 x models) x model size in float32 on ``device``.
    """

    def __init__(self, recipe: Recipe | Mapping[str, Any] | str | Path,
                 model: torch.nn.Module | None = None, *, device: str | torch.device | None = None,
                 seed: int = 0, allow_pickle: bool = False):
        self.template = as_recipe(recipe)
        check_recipe(self.template)
        if device is None and model is not None:
            device = next(model.parameters()).device
        self.device = resolve_device(device)
        self.model = model
        self.seed = seed
        self.weights = open_models(self.template, allow_pickle=allow_pickle)
        self._reader = CachedReader(self.weights, self.device)
        self._workspace = Workspace()  # output and scratch buffers, reused across merges
        self.plan(self.template)  # validate the template against the headers now

    def plan(self, recipe: Recipe | Mapping[str, Any] | None = None) -> MergePlan:
        """Validate a recipe over this merger's model set and build its plan."""
        recipe = self.template if recipe is None else as_recipe(recipe, self.template.source_dir)
        unknown = [m for m in recipe.referenced_models() if m not in self.weights]
        if unknown:
            raise UserError(f"recipe uses model(s) outside this merger's set: {', '.join(unknown)}"
                            f" (set: {', '.join(self.weights)})")
        return build_plan(recipe, self.weights)

    def merge_into(self, recipe: Recipe | Mapping[str, Any] | None = None,
                   model: torch.nn.Module | None = None, *, seed: int | None = None) -> MergeStats:
        """Merge ``recipe`` (default: the template) into ``model``'s parameters in place."""
        start = time.perf_counter()
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("merge_into needs a model (here or in the constructor)")
        plan = self.plan(recipe)
        targets = _targets(model, plan)
        seed = self.seed if seed is None else seed
        done: set[int] = set()
        with torch.no_grad():
            for task in plan.tasks:
                param = targets[task.name]
                if id(param) in done:  # tied weights: written once
                    continue
                direct = _writable_target(param, task, self._reader)
                out = compute_tensor(task, plan.method, self._reader, seed, self._workspace,
                                     out=direct)
                if direct is None or out is not direct:
                    # Round through the output dtype first, as a merge saved to disk would
                    # (copy_ then converts to the parameter's dtype).
                    param.copy_(cast(out, task.dtype, self._workspace))
                done.add(id(param))
        return MergeStats(len(done), time.perf_counter() - start, self._reader.cache_bytes())

    def source(self, ref: str, name: str) -> torch.Tensor:
        """Tensor ``name`` of model ``ref`` in float32 on the device, read once and kept cached.

        Other views of the same models (a data-flow path model) share these tensors instead of
        holding copies.
        """
        return self._reader.tensor(TensorRef(ref, name))

    def cached_storages(self) -> set[int]:
        """Data pointers of every cached tensor's storage (to prove sharing, not copying)."""
        return {t.untyped_storage().data_ptr() for t in self._reader.cached(self._reader.refs())}

    def cache_bytes(self) -> int:
        """Bytes held by the tensor and task-vector cache."""
        return self._reader.cache_bytes()

    def close(self) -> None:
        """Drop the cache, the scratch buffers and the file handles."""
        self._reader.clear()
        self._workspace.clear()
        close_all(self.weights)


def _writable_target(param: torch.Tensor, task: TensorTask,
                     reader: CachedReader) -> torch.Tensor | None:
    """``param.data`` when the merge can be computed straight into it, else ``None``.

    That needs float32 output and parameter (no rounding step in between), a contiguous
    parameter on the compute device, and no memory shared with the task's inputs (a
    parameter that is a view of a cached source tensor must not be overwritten mid-merge).
    """
    if not (task.merge and task.dtype == torch.float32 and param.dtype == torch.float32
            and param.is_contiguous() and param.device == reader.device):
        return None
    refs = [*task.inputs, *([task.base] if task.base is not None else [])]
    storage = param.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    for x in reader.cached(refs):
        s = x.untyped_storage()
        if s.data_ptr() < hi and lo < s.data_ptr() + s.nbytes():
            return None
    return param.data


def _targets(model: torch.nn.Module, plan: MergePlan) -> dict[str, torch.Tensor]:
    """Output tensor name -> the model's parameter/buffer; UserError on any mismatch."""
    state = model.state_dict(keep_vars=True)
    targets = {}
    for task in plan.tasks:
        if task.name not in state:
            raise UserError(f"the resident model has no parameter {task.name} (the merge output "
                            "has another architecture, e.g. a different layer count)")
        target = state[task.name]
        if tuple(target.shape) != task.shape:
            raise UserError(f"shape mismatch for {task.name}: merge gives {list(task.shape)}, "
                            f"resident model has {list(target.shape)}")
        targets[task.name] = target
    written = {id(t) for t in targets.values()}
    stale = [n for n, p in model.named_parameters() if id(p) not in written]
    if stale:
        raise UserError(f"the merge does not produce parameter(s) {', '.join(stale[:3])} of the "
                        "resident model; they would keep stale values")
    return targets


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no floating-point entry of ``tensors`` is NaN or infinite (a merge's check).

    A sum over a tensor is finite only when every entry is (a NaN or an infinity makes it NaN
    or infinite), so one float32 sum per tensor decides it: 0.08 s over the real 135M pair's
    bf16 parameters against 0.39 s for ``torch.isfinite(p).all()``. A sum that overflows from
    finite entries is checked again entry by entry.
    """
    for t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        t = t.detach()
        total = float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))
        if not math.isfinite(total) and not bool(torch.isfinite(t).all()):
            return False
    return True
