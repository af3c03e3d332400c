"""The trial: suggest -> recipe -> merge in memory -> evaluate rung by rung -> a ``TrialRecord``.

Kept short on purpose. The resident model (its merger and evaluator) is ``resident.Resident``;
the search space is ``spaces.MethodSpace``; what a trial produced is a ``records.TrialRecord``,
stored on the Optuna trial by ``records.save`` and handed to the listeners (MLflow, the
progress line) when the trial starts, after each rung and when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import optuna

from orchestrator.study import records
from orchestrator.study.records import INTERRUPTED, Rung, State, TrialRecord
from orchestrator.study.spaces import MethodSpace

RecipeBuilder = Callable[[str, Mapping[str, Any], Mapping[str, Mapping[str, Any]]], dict[str, Any]]


class TrialListener(Protocol):
    """Told what a trial does (the MLflow tracker, the progress printer)."""

    def trial_started(self, record: TrialRecord) -> None: ...

    def trial_rung(self, record: TrialRecord, rung: Rung) -> None: ...

    def trial_finished(self, record: TrialRecord) -> None: ...


class Objective:
    """One merge-and-evaluate per trial (``objective(trial, method)``, as ``Worker`` calls it).

    Args:
        spaces: each method's search space.
        resident: merges a recipe into the resident model and evaluates it in rungs.
        build_recipe: ``(method, global values, {model: values}) -> recipe``.
        seed: the merge seed (DARE/DELLA masks).
        n_rungs: rungs of the search split (the last one is the full split).
        multi_objective: one value per task, no pruning.
        per_item: report each item's value to the pruner (Wilcoxon) instead of the score.
        listeners: told when a trial starts, after each rung, and when it ends.
        interruptible: context manager around compute, where SIGINT/SIGTERM may cut in.
        worker: ``host:pid``, recorded on each trial.
    """

    def __init__(self, spaces: Mapping[str, MethodSpace], resident: Any, build_recipe: RecipeBuilder,
                 seed: int, n_rungs: int, *, multi_objective: bool = False, per_item: bool = False,
                 listeners: Sequence[TrialListener] = (), interruptible: Any = None,
                 worker: str | None = None, model_names: Sequence[str] = ()) -> None:
        import contextlib

        self.spaces = dict(spaces)
        self.resident = resident
        self.build_recipe = build_recipe
        self.seed = seed
        self.n_rungs = n_rungs
        self.multi_objective = multi_objective
        self.per_item = per_item
        self.listeners = list(listeners)
        self.interruptible = interruptible or contextlib.nullcontext
        self.worker = worker
        self.model_names = list(model_names)

    def suggest(self, trial: Any, method: str | None = None) -> tuple[str, dict[str, Any]]:
        """The method (sampled when several share one sampler) and the trial's recipe."""
        if method is None:
            methods = list(self.spaces)
            method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
        global_values, per_model = self.spaces[method].suggest(trial, self.model_names)
        return method, self.build_recipe(method, global_values, per_model)

    def __call__(self, trial: Any, method: str | None = None) -> float | tuple[float, ...]:
        """One trial; every trial is told to the listeners, whatever its outcome."""
        method, recipe = self.suggest(trial, method)
        key = records.recipe_key(recipe, self.seed)
        record = records.start(trial, records.number_of(trial) or 0, method, recipe, key, self.worker,
                               trial.params)
        self._notify("trial_started", record)
        rungs: list[Rung] = []
        try:
            done = records.completed_by_key(trial.study.get_trials(deepcopy=False), key)
            if done is not None:  # the same recipe was evaluated already: reuse its value
                return self._duplicate(trial, record, done)
            return self._run(trial, record, recipe, rungs)
        except optuna.TrialPruned:
            raise
        except BaseException as err:
            self._finish(trial, records.finish(record, _fail_state(err), rungs=tuple(rungs), reason=_reason(err)))
            raise

    def _run(self, trial: Any, record: TrialRecord, recipe: dict[str, Any],
             rungs: list[Rung]) -> float | tuple[float, ...]:
        start = time.perf_counter()
        with self.interruptible():
            self.resident.merge(recipe, seed=self.seed)
        merge_s = time.perf_counter() - start
        eval_start = time.perf_counter()
        for i, rung in enumerate(self._rungs()):
            rungs.append(rung)
            self._notify("trial_rung", record, rung)
            if self.multi_objective:
                continue
            self._report(trial, rung)
            if i < self.n_rungs - 1 and trial.should_prune():  # a full evaluation is never pruned
                pruned = records.finish(record, State.PRUNED, rungs=tuple(rungs), merge_s=merge_s,
                                        eval_s=time.perf_counter() - eval_start,
                                        reason=f"pruned at {rung.n_items} items (score {rung.score:.4f})")
                self._finish(trial, pruned)
                raise optuna.TrialPruned(pruned.reason)
        last = rungs[-1]
        values = tuple(last.components.values()) if self.multi_objective else (last.score,)
        done = records.finish(record, State.COMPLETE, rungs=tuple(rungs), values=values, merge_s=merge_s,
                              eval_s=time.perf_counter() - eval_start)
        self._finish(trial, done)
        return values if self.multi_objective else values[0]

    def _rungs(self) -> Any:
        """The search split's rungs, each computed inside an interruptible window.

        Exactly ``n_rungs`` windows: none is opened once the last rung is in, so a signal that
        arrives after the evaluation finished cannot cut the trial short.
        """
        rungs = self.resident.rungs("search", per_item=self.per_item)
        for _ in range(self.n_rungs):
            with self.interruptible():
                rung = next(rungs)
            yield rung

    def _report(self, trial: Any, rung: Rung) -> None:
        """Successive halving/median prune on the running score; Wilcoxon on per-item values."""
        if self.per_item:
            for item_id, value in rung.new_items:
                trial.report(float(value), item_id)
        else:
            trial.report(rung.score, rung.n_items)

    def _duplicate(self, trial: Any, record: TrialRecord, done: Any) -> float | tuple[float, ...]:
        earlier = records.load(done)
        dup = records.finish(record, State.COMPLETE, rungs=earlier.rungs, values=tuple(done.values),
                             duplicate_of=earlier.number, reason=f"same recipe as trial {earlier.number}")
        self._finish(trial, dup)
        return done.values[0] if len(done.values) == 1 else tuple(done.values)

    def _finish(self, trial: Any, record: TrialRecord) -> None:
        records.save(trial, record)
        self._notify("trial_finished", record)

    def _notify(self, event: str, *args: Any) -> None:
        """Tell the listeners; a listener that fails never fails the trial (it is said)."""
        for listener in self.listeners:
            try:
                getattr(listener, event)(*args)
            except Exception as err:  # noqa: BLE001
                import sys

                print(f"({type(listener).__name__}.{event} failed: {type(err).__name__}: {err})",
                      file=sys.stderr)


def _fail_state(err: BaseException) -> State:
    return State.INTERRUPTED if isinstance(err, KeyboardInterrupt) else State.FAILED


def _reason(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return f"{INTERRUPTED} ({err.args[0] if err.args else 'SIGINT'})"
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
