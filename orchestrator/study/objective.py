"""The trial: suggest -> recipe -> merge in memory -> evaluate rung by rung -> score.

Kept short on purpose; the resident model, its merger and evaluator live in ``Resident``
(``orchestrator/sweep.py``), the search space in ``orchestrator/search.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator.search import MethodSpace, build_recipe

PRUNED, COMPLETE, FAILED = "pruned", "complete", "failed"


def recipe_key(recipe: Mapping[str, Any], seed: int) -> str:
    """A canonical hash of a recipe and merge seed: the same merge gets the same key."""
    text = json.dumps({"recipe": recipe, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Rung:
    """The running objective after one rung of the search split.

    ``new_items`` are (stable item id, weighted value) for the items this rung added, for
    pruners that compare trials item by item (Wilcoxon).
    """

    n_items: int
    score: float
    stderr: float
    components: dict[str, float]
    new_items: tuple[tuple[int, float], ...] = ()


@dataclass
class TrialReport:
    """What the progress printer shows for one finished trial."""

    number: int
    method: str
    params: dict[str, Any]
    rungs: list[tuple[int, float]]
    state: str
    value: float | None = None
    reason: str = ""


class Objective:
    """Callable for ``study.optimize``: one merge-and-evaluate per trial."""

    def __init__(self, spaces: Mapping[str, MethodSpace], resident: Any, tracker: Any,
                 candidates: Any, seed: int, multi_objective: bool, wilcoxon: bool,
                 on_done: Any = None, worker: str | None = None, interruptible: Any = None) -> None:
        self.spaces = dict(spaces)
        self.resident = resident
        self.tracker = tracker
        self.candidates = candidates
        self.seed = seed
        self.multi_objective = multi_objective
        self.wilcoxon = wilcoxon
        self.on_done = on_done or (lambda report: None)
        self.worker = worker
        self.interruptible = interruptible or contextlib.nullcontext  # where SIGINT/SIGTERM may cut in

    def suggest(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """Pick a method (when comparing several) and its parameters; return (method, recipe)."""
        methods = list(self.spaces)
        method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
        global_values, per_model = self.spaces[method].suggest(trial, list(self.candidates.models))
        recipe = build_recipe(method, global_values, per_model, self.candidates.models,
                              self.candidates.base, self.candidates.dtype, self.candidates.tokenizer_source)
        return method, recipe

    def __call__(self, trial: Any) -> float | tuple[float, ...]:
        """One trial; every trial gets one MLflow child run, whatever its outcome."""
        import optuna

        method, recipe = self.suggest(trial)
        key = recipe_key(recipe, self.seed)
        for name, value in (("method", method), ("recipe_key", key), ("recipe", recipe), ("worker", self.worker)):
            trial.set_user_attr(name, value)
        run_id = self.tracker.start_trial(trial.number, {"method": method, **trial.params}, worker=self.worker)
        rungs: list[tuple[int, float]] = []
        try:
            self.tracker.log_artifact_data(run_id, "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
            done = _find_completed(trial.study, key)
            if done is not None:  # the same recipe was evaluated already: reuse its value
                return self._duplicate(trial, method, done, run_id)
            value = self._run(trial, recipe, run_id, rungs)
        except optuna.TrialPruned:
            self.tracker.end_trial(run_id, "KILLED")
            self._notify(TrialReport(trial.number, method, trial.params, rungs, PRUNED))
            raise
        except BaseException as err:
            self._failed(trial, method, run_id, rungs, err)
            raise
        self.tracker.end_trial(run_id, "FINISHED")
        self._notify(TrialReport(trial.number, method, trial.params, rungs, COMPLETE, _first(value)))
        return value

    def _duplicate(self, trial: Any, method: str, done: Any, run_id: str | None) -> float | tuple[float, ...]:
        trial.set_user_attr("duplicate_of", done.number)
        self.tracker.set_tags(run_id, {"duplicate_of": done.number})
        self.tracker.log_metrics(run_id, {"score": _first(done.values) or float("nan")})
        self.tracker.end_trial(run_id, "FINISHED")
        self._notify(TrialReport(trial.number, method, trial.params, [], COMPLETE, _first(done.values),
                                 f"same recipe as trial {done.number}"))
        return done.values[0] if len(done.values) == 1 else tuple(done.values)

    def _failed(self, trial: Any, method: str, run_id: str | None, rungs: list[tuple[int, float]],
                err: BaseException) -> None:
        """Record why a trial failed; an interrupt (SIGINT/SIGTERM) ends its run KILLED."""
        from orchestrator.workers import INTERRUPTED

        if isinstance(err, KeyboardInterrupt):
            reason = f"{INTERRUPTED} ({err.args[0] if err.args else 'SIGINT'})"
        else:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
        trial.set_user_attr("fail_reason", reason)
        self.tracker.set_tags(run_id, {"fail_reason": reason})
        self.tracker.end_trial(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        self._notify(TrialReport(trial.number, method, trial.params, rungs, FAILED, reason=reason))

    def _notify(self, report: TrialReport) -> None:
        """The progress line; a failure to print never fails the trial."""
        try:
            self.on_done(report)
        except Exception as err:  # noqa: BLE001
            import sys

            print(f"(progress line of trial {report.number} failed: {type(err).__name__}: {err})",
                  file=sys.stderr)

    def _run(self, trial: Any, recipe: dict[str, Any], run_id: str | None,
             rungs: list[tuple[int, float]]) -> float | tuple[float, ...]:
        import optuna

        start = time.perf_counter()
        with self.interruptible():
            self.resident.merge(recipe, seed=self.seed)
        merge_s = time.perf_counter() - start
        trial.set_user_attr("merge_s", merge_s)
        eval_start = time.perf_counter()
        result = None
        for result in self._rungs():
            rungs.append((result.n_items, result.score))
            metrics = {"score": result.score, **result.components}
            self.tracker.log_metrics(run_id, metrics, step=result.n_items)
            if self.multi_objective:
                continue
            self._report(trial, result)
            if trial.should_prune():
                trial.set_user_attr("eval_s", time.perf_counter() - eval_start)
                raise optuna.TrialPruned(f"pruned at {result.n_items} items (score {result.score:.4f})")
        eval_s = time.perf_counter() - eval_start
        trial.set_user_attr("eval_s", eval_s)
        trial.set_user_attr("components", dict(result.components))
        trial.set_user_attr("stderr", result.stderr)
        trial.set_user_attr("n_items", result.n_items)
        self.tracker.log_metrics(run_id, {"merge_s": merge_s, "eval_s": eval_s,
                                          "items_per_s": result.n_items / max(eval_s, 1e-9)})
        if self.multi_objective:
            return tuple(result.components.values())
        return result.score

    def _rungs(self) -> Any:
        """The search split's rungs, each computed inside an interruptible window."""
        rungs = self.resident.rungs("search", per_item=self.wilcoxon)
        while True:
            with self.interruptible():
                result = next(rungs, None)
            if result is None:
                return
            yield result

    def _report(self, trial: Any, result: Any) -> None:
        """Successive halving/median prune on the running score; Wilcoxon on per-item values."""
        if self.wilcoxon:
            for item_id, value in result.new_items:
                trial.report(float(value), item_id)
        else:
            trial.report(result.score, result.n_items)


def _find_completed(study: Any, key: str) -> Any:
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("recipe_key") == key:
            return t
    return None


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return float(value[0]) if len(value) == 1 else None
    return float(value)
