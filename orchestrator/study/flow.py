"""The resident side of data-flow trials: the path model, its evaluator, the PS merge.

Built by ``Resident`` on the first data-flow recipe. The candidates stay loaded once, in the
in-memory merger's cache; ``engine.dataflow.LayerBank`` builds their modules on those very
tensors, and ``PathModel`` references them (no weight is copied per trial). The path model has
its own ``ResidentEvaluator`` (one HFLM wrapping the one path-model object, re-wired in place),
so the parameter-space evaluator's model is never swapped. A ``ps`` source (PS+DFS) is one
more resident model (a copy of the resident one) into which the trial's PS recipe is merged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.dataflow import LayerBank, PathModel
from orchestrator.engine.plan import build_plan
from orchestrator.engine.resident import InMemoryMerger, all_finite
from orchestrator.engine.sources import as_recipe
from orchestrator.engine.streaming import merge_to_disk
from orchestrator.errors import UserError
from orchestrator.evaluation.evaluator import ResidentEvaluator
from orchestrator.study.dataflow import ps_recipe_of


def is_path_recipe(recipe: Mapping[str, Any]) -> bool:
    """A passthrough recipe over slices: what a data-flow trial (or a frankenmerge) is."""
    return recipe.get("merge_method") == "passthrough" and bool(recipe.get("slices"))


def shared_tensor(merger: InMemoryMerger) -> Any:
    """``(ref, name) -> tensor`` from the merger's input cache (read once, float32, kept).

    Sharing them is what keeps the bank free of a second copy.
    """
    return merger.source


class FlowResident:
    """Runs data-flow recipes on the candidates' own modules.

    Args:
        merger: the resident's in-memory merger (its model set and input cache).
        model: the resident (parameter-space) model: dtype, config-derived buffers, PS copy.
        spec, suite, tokenizer: what the path model's evaluator evaluates, with which tokenizer.
        first: the candidate whose model is the path model's template.
    """

    def __init__(self, merger: InMemoryMerger, model: torch.nn.Module, spec: Any, suite: Any,
                 tokenizer: Any, first: str) -> None:
        self.merger = merger
        self.model = model
        self.bank = LayerBank(merger.weights, shared_tensor(merger), model)
        self.path = PathModel(self.bank, first)
        self.first = first
        self.evaluator = ResidentEvaluator(self.path.model, spec, tokenizer=tokenizer, suite=suite)
        self.ps_model: torch.nn.Module | None = None
        self._ps_done: tuple[str, int] | None = None

    def merge(self, recipe: Mapping[str, Any], seed: int) -> ResidentEvaluator:
        """Wire the path of ``recipe`` (merging its PS source first, if any); its evaluator."""
        parsed = as_recipe(dict(recipe))
        weights = dict(self.merger.weights)
        for ref in parsed.referenced_models():
            if ref not in weights:
                self._merge_ps(ref, seed)
                weights[ref] = self.merger.weights[self.first]  # same architecture: its headers plan it
        self.path.wire(build_plan(parsed, weights))
        return self.evaluator

    def _merge_ps(self, ref: str, seed: int) -> None:
        """Merge the PS recipe of folder ``ref`` into the PS model (once per recipe and seed)."""
        ps = ps_recipe_of(ref)
        if ps is None:
            raise UserError(f"data-flow source {ref} is neither a candidate nor the PS merge of this study "
                            f"(no {ref}.yml beside it)")
        if self._ps_done == (ref, seed):
            return
        if self.ps_model is None:
            self.ps_model = copy.deepcopy(self.model)
        self.merger.merge_into(ps, model=self.ps_model, seed=seed)
        if not all_finite(self.ps_model.parameters()):
            raise FloatingPointError("the PS merge produced NaN or inf weights")
        self.bank.models = {k: v for k, v in self.bank.models.items() if v is not self.ps_model}
        self.bank.add(ref, self.ps_model)
        self._ps_done = (ref, seed)

    def materialize(self, recipe: Mapping[str, Any], seed: int, allow_pickle: bool = False) -> list[str]:
        """Write the PS folders ``recipe`` reads to disk (for export); the folders written."""
        written = []
        for ref in as_recipe(dict(recipe)).referenced_models():
            ps = ps_recipe_of(ref) if ref not in self.merger.weights else None
            if ps is not None and not (Path(ref) / "config.json").is_file():
                merge_to_disk(ps, ref, seed=seed, allow_pickle=allow_pickle, overwrite=True)
                written.append(ref)
        return written
