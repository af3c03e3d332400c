"""Evaluation: lm-eval in-process on a resident model, in fidelity rungs, on search/confirm splits.

A thin layer over lm-eval's public API (``TaskManager``, ``HFLM``, ``lm_eval.evaluator.evaluate``);
what it needs beyond that lives in ``lm_eval_compat``:

* ``check_tasks_available(spec)`` resolves and builds every task before any model is loaded, so a
  missing dataset or an unknown name fails in milliseconds with a clear message.
* ``ResidentEvaluator`` loads the model once, wraps it in ``HFLM`` once and keeps the task objects
  for the whole study. Each trial writes new weights into the same parameters, calls ``reset()``
  and evaluates again. ``simple_evaluate`` is not used in the loop: it collects environment info
  (a ``pip list`` subprocess, ~1 s) on every call. lm-eval's response cache is never used: it is
  not keyed by the model, so it would serve one merge's answers to another.
* Items of each task are taken in a fixed, seeded, stratified order (subjects of a group are
  interleaved in proportion to their sizes). Rung r evaluates the first n_r items of that order;
  per-item results are kept, so a rung only sends lm-eval the items it adds (``samples=``).

Use in a sweep::

    spec = EvalSpec.from_names("demo_mmlu,demo_hellaswag", rungs=(0.1, 0.3, 1.0))
    suite = check_tasks_available(spec)              # fails fast, before any model is loaded
    evaluator = ResidentEvaluator(model, spec, suite=suite)
    for trial in trials:
        merger.merge_into(recipe, evaluator.model)     # new weights, same parameter objects
        evaluator.reset()
        for rung in evaluator.evaluate_rungs("search"):
            trial.report(rung.score, rung.rung)
            if trial.should_prune():
                break
    final = evaluator.evaluate("confirm")            # for the best merge, on held-out items
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.engine.devices import resolve_device
from orchestrator.errors import UserError
from orchestrator.evaluation import lm_eval_compat as compat
from orchestrator.evaluation.models import check_model_device, check_model_dir, load_model, wrap_model
from orchestrator.evaluation.spec import FEWSHOT_SEED, EvalResult, EvalSpec, TaskScore
from orchestrator.evaluation.suite import TaskItems, TaskSuite, check_tasks_available


class ResidentEvaluator:
    """Evaluates one resident model, trial after trial, without reloading anything.

    Write each trial's weights into the model's existing parameters (``p.copy_``), call
    ``reset()``, then ``evaluate_rungs()`` (search, prunable) or ``evaluate()`` (confirm).

    Args:
        model: A model folder, or a loaded ``PreTrainedModel`` already on its device.
        spec: What to evaluate.
        tokenizer: Tokenizer (object or folder); default: the model folder's.
        suite: Tasks already checked by ``check_tasks_available(spec)``; built here otherwise,
            before the model is loaded.
    """

    def __init__(self, model: Any, spec: EvalSpec, *, tokenizer: Any = None,
                 suite: TaskSuite | None = None) -> None:
        if suite is not None and suite.spec != spec:
            raise ValueError("the task suite was built for another EvalSpec")
        self.spec = spec
        if isinstance(model, (str, Path)):
            check_model_dir(model)
        resolve_device(spec.device)
        self.suite = suite or check_tasks_available(spec)
        if isinstance(model, (str, Path)):
            model, loaded_tokenizer = load_model(model, spec.device, spec.dtype)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            check_model_device(model, spec.device)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model.name_or_path)
        self.model, self.tokenizer = model, tokenizer
        self.lm = wrap_model(model, tokenizer, spec.batch_size)
        self._store: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        self.items_evaluated = 0  # documents sent to lm-eval since construction

    def reset(self) -> None:
        """Forget all per-item results (call after writing new weights)."""
        self._store.clear()

    def evaluate_rungs(self, split: str = "search") -> Iterator[EvalResult]:
        """Yield the running objective after each rung; stop iterating to prune.

        Args:
            split: ``search`` (default), ``confirm`` or a split expression. A split that overlaps
                a task's confirm split is refused unless ``allow_search_on_confirm_split``.
        """
        views = self._task_items(split)
        self._guard_search(views)
        for rung, counts in enumerate(self.suite.rung_counts(split)):
            self._ensure(views, counts)
            yield self._result(views, counts, split, rung)

    def evaluate(self, split: str = "confirm", limit: int | None = None) -> EvalResult:
        """Evaluate every item of ``split`` in one lm-eval call.

        Args:
            split: ``confirm`` (default), ``search``, ``default`` or a split expression.
            limit: At most this many items per task (default ``spec.limit``), taken from the
                front of the stratified order.
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise UserError(f"limit must be an integer >= 1, got {limit!r}")
        views = self._task_items(split)
        counts = [min(self.suite.cap(p), limit or self.suite.cap(p)) for p in views]
        self._ensure(views, counts)
        return self._result(views, counts, split, None)

    def item_results(self, split: str = "search") -> dict[str, dict[int, dict[str, Any]]]:
        """Per-item results kept so far on ``split``: {leaf task: {doc index: record}}.

        A record holds the item's metric values (``acc,none``...) and ``resps`` (lm-eval's
        filtered responses: (loglikelihood, is_greedy) per choice for multiple choice).
        """
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for view in self._task_items(split):
            for leaf, doc in view.order:
                record = self._store.get((leaf, view.split.base), {}).get(doc)
                if record is not None:
                    out.setdefault(leaf, {})[doc] = record
        return out

    # ------------------------------------------------------------------ internals

    def _task_items(self, split: str) -> list[TaskItems]:
        return [self.suite.items(task, split) for task in self.spec.tasks]

    def _guard_search(self, views: list[TaskItems]) -> None:
        if self.spec.allow_search_on_confirm_split:
            return
        for view in views:
            confirm = self.suite.splits[view.spec.name][1]
            if view.split.overlaps(confirm):
                raise UserError(
                    f"task {view.spec.name!r}: searching on '{view.split}' overlaps the confirm "
                    f"split '{confirm}'; refused (set allow_search_on_confirm_split=true)")

    def _ensure(self, views: list[TaskItems], counts: list[int]) -> None:
        """Run lm-eval on the items of the prefixes that have no stored result yet."""
        samples: dict[str, set[int]] = {}
        tasks: dict[str, Any] = {}
        for view, n in zip(views, counts, strict=True):
            for leaf, doc in view.order[:n]:
                if doc not in self._store.get((leaf, view.split.base), {}):
                    samples.setdefault(leaf, set()).add(doc)
                    tasks[leaf] = view.loaded.leaves[leaf]
        if not samples:
            return
        bases = {leaf: p.split.base for p in views for leaf in p.loaded.leaves}
        for leaf, doc, record in compat.run_items(self.lm, tasks, samples, FEWSHOT_SEED):
            self._store.setdefault((leaf, bases[leaf]), {})[doc] = record
        self.items_evaluated += sum(len(s) for s in samples.values())

    def _result(self, views: list[TaskItems], counts: list[int], split: str,
                rung: int | None) -> EvalResult:
        components = {p.spec.name: self._task_score(p, n)
                      for p, n in zip(views, counts, strict=True)}
        weights = {p.spec.name: p.spec.weight for p in views}
        score, stderr = objective(components, weights)
        return EvalResult(split=split, rung=rung, n_items=sum(counts), score=score,
                          stderr=stderr, components=components,
                          higher_is_better=self.suite.higher_is_better)

    def _task_score(self, view: TaskItems, n: int) -> TaskScore:
        per_leaf: dict[str, list[dict[str, Any]]] = {}
        for leaf, doc in view.order[:n]:
            record = self._store[(leaf, view.split.base)][doc]
            per_leaf.setdefault(leaf, []).append({k: v for k, v in record.items() if k != "resps"})
        leaves = {leaf: compat.leaf_metrics(view.loaded.leaves[leaf], entries)
                  for leaf, entries in per_leaf.items()}
        single = view.loaded.group is None and len(view.loaded.leaves) == 1
        metrics = next(iter(leaves.values()), {}) if single else (
            compat.group_metrics(view.loaded.group, leaves, per_leaf) if leaves else {})
        name, filter_key = view.metric.split(",", 1)
        return TaskScore(name=view.spec.name, metric=view.metric,
                         value=metrics.get(view.metric, math.nan),
                         stderr=metrics.get(f"{name}_stderr,{filter_key}", math.nan),
                         n_items=n, split=str(view.split),
                         metrics={k: v for k, v in metrics.items() if k != "sample_len"})


def objective(components: dict[str, TaskScore], weights: dict[str, float]) -> tuple[float, float]:
    """Weighted mean of the components' values; stderr with components taken as independent."""
    total = sum(weights.values())
    score = sum(weights[n] * c.value for n, c in components.items()) / total
    var = sum((weights[n] * c.stderr) ** 2 for n, c in components.items())
    return score, math.sqrt(var) / total
