"""The one loaded model of a worker, its merger and its evaluator.

The merger is the engine's ``InMemoryMerger``, or, when every candidate is a LoRA adapter on
the base and every method merges updates, an ``AdapterMerger`` that rewrites only the adapted
parameters: a trial then costs the adapters' size, not the model's. Both give the tensors
``merge_to_disk`` writes for the same recipe.

A data-flow recipe (``passthrough`` over slices) is run by ``flow.FlowResident`` instead: a
path model over the candidates' own modules, with an evaluator of its own. ``evaluator`` is
whichever evaluator the last merge used (``main``: the resident model's).
"""

from __future__ import annotations

import hashlib
import os
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from typing import Any

import torch

from orchestrator.engine.resident import InMemoryMerger, all_finite
from orchestrator.errors import UserError
from orchestrator.evaluation.evaluator import ResidentEvaluator
from orchestrator.lora import AdapterMerger, load_adapter
from orchestrator.merge import get_method
from orchestrator.study.candidates import Candidates, union_recipe
from orchestrator.study.flow import FlowResident, is_path_recipe
from orchestrator.study.records import ConfirmResult, Rung


class Resident:
    """The resident model: merge a recipe into it, evaluate it in rungs or on the confirm split.

    Args:
        candidates: the resolved candidates.
        spec, suite: the evaluation spec and its checked tasks.
        seed: the default merge seed.
        adapter_fast: merge adapter updates only (every candidate ``base+adapter``, every
            method merging updates).
        quiet: hide lm-eval's progress bars.
    """

    def __init__(self, candidates: Candidates, spec: Any, suite: Any, seed: int,
                 quiet: bool = True, adapter_fast: bool = False) -> None:
        adapters = candidates.adapters() if adapter_fast else None
        self.merger: InMemoryMerger | None = None
        if adapters is None:
            self.merger = _engine_merger(candidates, spec.device, seed)
        folder = (candidates.base or next(iter(candidates.models.values()))).partition("+")[0]
        self.evaluator = ResidentEvaluator(folder, spec, tokenizer=candidates.tokenizer_source, suite=suite)
        self.adapters = _adapter_merger(self.evaluator.model, adapters) if adapters is not None else None
        self.adapter_index = {ref: i for i, ref in enumerate(candidates.models.values())} if adapters else {}
        if self.merger is not None:
            self.merger.model = self.evaluator.model
        self.main = self.evaluator
        self.flow: FlowResident | None = None
        self._first = next(iter(candidates.models.values()))
        self._allow_pickle = candidates.allow_pickle
        self.quiet = quiet
        self._leaf_info = {leaf: (t.name, suite.metrics[t.name], t.weight)
                           for t in spec.tasks for leaf in suite.loaded(t.name, None).leaves}

    def merge(self, recipe: Mapping[str, Any], seed: int) -> None:
        """Write the merge of ``recipe`` into the model; FloatingPointError on NaN/inf weights."""
        if is_path_recipe(recipe) and self.merger is not None:
            self.evaluator = self.flow_resident().merge(recipe, seed)
            self.evaluator.reset()
            return
        self.evaluator = self.main
        if self.adapters is not None:
            self._merge_adapters(recipe, seed)
            written = [self.adapters.params[n] for n in self.adapters.names]  # the rest is the base's
        else:
            self.merger.merge_into(dict(recipe), seed=seed)
            written = self.evaluator.model.parameters()
        if not all_finite(written):
            raise FloatingPointError("the merge produced NaN or inf weights")
        self.evaluator.reset()

    def flow_resident(self) -> FlowResident:
        """The data-flow side (built on first use: the path model over the candidates' modules)."""
        if self.flow is None:
            self.flow = FlowResident(self.merger, self.main.model, self.main.spec, self.main.suite,
                                     self.main.tokenizer, self._first)
        return self.flow

    def _merge_adapters(self, recipe: Mapping[str, Any], seed: int) -> None:
        """A recipe over ``base+adapter`` candidates, merged by the ``AdapterMerger``."""
        method, entries = recipe["merge_method"], recipe.get("models") or []
        gparams = dict(recipe.get("parameters") or {})
        knots = bool(gparams.pop("knots", False))
        if recipe.get("slices") or not entries:
            raise UserError("an adapter sweep merges recipes with models:, not slices")
        spec = get_method(method)
        if not spec.merges_updates(spec.make_params(gparams)):
            raise UserError(f"an adapter sweep cannot run {method} with {gparams} (it scales the whole "
                            "model, not only the adapted parameters)")
        subset = [self.adapter_index[e["model"]] for e in entries]
        params = [dict(e.get("parameters") or {}) for e in entries]
        self.adapters.apply(method, params, gparams, seed, subset=subset, knots=knots)

    def rungs(self, split: str, per_item: bool = False) -> Iterator[Rung]:
        """The evaluator's rungs as ``Rung``s; with ``per_item``, also the items each one added.

        Per-item values are only needed by the Wilcoxon pruner; collecting them scans every
        stored item at every rung, so the other pruners skip it.
        """
        seen: set[tuple[str, int]] = set()
        results = self.evaluator.evaluate_rungs(split)
        while True:
            with _quiet(self.quiet):
                result = next(results, None)
            if result is None:
                return
            new = self._new_items(split, seen) if per_item else ()
            yield Rung(result.n_items, result.score, result.stderr,
                       {k: c.value for k, c in result.components.items()}, new)

    def _new_items(self, split: str, seen: set[tuple[str, int]]) -> tuple[tuple[int, float], ...]:
        """(stable id, weighted metric value) of the items not in ``seen`` (which it updates)."""
        new = []
        for leaf, docs in self.evaluator.item_results(split).items():
            _, metric, weight = self._leaf_info[leaf]
            for doc, record in docs.items():
                if (leaf, doc) not in seen:
                    seen.add((leaf, doc))
                    new.append((item_id(leaf, doc), weight * float(record[metric])))
        return tuple(sorted(new))

    def full_search(self) -> Rung:
        """The merge in the model on the whole search split (the last rung)."""
        last = None
        for last in self.rungs("search"):  # noqa: B007 - only the final value is wanted
            pass
        return last

    def confirm(self, recipe: Mapping[str, Any], seeds: Sequence[int]) -> ConfirmResult:
        """``recipe`` on the confirm split, once per seed; the scores and items are the means.

        ``items``: (task, ``leaf/doc``, the task metric's value) per confirm item.
        """
        per_seed, components, items = [], [], []
        if is_path_recipe(recipe) and self.merger is not None:  # its PS source on disk, for the export
            self.flow_resident().materialize(recipe, seeds[0], self._allow_pickle)
        for seed in seeds:
            self.merge(recipe, seed)
            with _quiet(self.quiet):
                result = self.evaluator.evaluate("confirm")
            per_seed.append(result.score)
            components.append({k: c.value for k, c in result.components.items()})
            items.append(self._confirm_items())
        mean_items = tuple((task, item, statistics.fmean(run[i][2] for run in items))
                           for i, (task, item, _) in enumerate(items[0]))
        return ConfirmResult(statistics.fmean(per_seed), result.stderr,
                             {k: statistics.fmean(c[k] for c in components) for k in components[0]},
                             mean_items, tuple(seeds), tuple(per_seed))

    def answers(self, recipe: Mapping[str, Any], seed: int, prompts: Sequence[str],
                max_new_tokens: int) -> list[str]:
        """The merge's greedy answers to ``prompts`` (the continuation only, stripped)."""
        self.merge(recipe, seed)
        model, tokenizer = self.evaluator.model, self.evaluator.tokenizer
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt").to(model.device)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                tokens = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
                out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    def _confirm_items(self) -> list[tuple[str, str, float]]:
        out = []
        for leaf, docs in sorted(self.evaluator.item_results("confirm").items()):
            task, metric, _ = self._leaf_info[leaf]
            out += [(task, f"{leaf}/{doc}", float(docs[doc][metric])) for doc in sorted(docs)]
        return out


def _engine_merger(candidates: Candidates, device: str, seed: int) -> InMemoryMerger:
    try:  # headers, architectures and vocabularies are checked here
        return InMemoryMerger(union_recipe(candidates), device=device, seed=seed,
                              allow_pickle=candidates.allow_pickle)
    except UserError as err:
        raise UserError(str(err).replace("pass --allow-pickle", "set candidates.allow_pickle=true")) from None


def _adapter_merger(model: Any, adapters: Mapping[str, str]) -> AdapterMerger:
    """An ``AdapterMerger`` over the candidates' adapters, on the resident base model."""
    loaded = []
    for name, path in adapters.items():
        try:
            loaded.append(load_adapter(path, name=name))
        except UserError as err:
            raise UserError(f"candidates.models.{name}: {err}") from None
    try:
        return AdapterMerger(model, loaded)
    except UserError as err:
        raise UserError(f"candidates: {err}") from None


@contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Send lm-eval's progress bars (tqdm on stderr) to nowhere while evaluating."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def item_id(leaf: str, doc: int) -> int:
    """A stable integer id of an item (the same in every worker and on resume)."""
    return int.from_bytes(hashlib.blake2b(f"{leaf}/{doc}".encode(), digest_size=6).digest(), "big")
