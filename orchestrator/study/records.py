"""One typed record per trial, and the one place it is written to and read from Optuna.

The objective produces a ``TrialRecord``; ``save`` stores it as Optuna user attributes of the
trial and ``load`` reads it back (with the trial's state and values) for reporting, tracking,
retries and the confirm step. ``StudyNotes`` does the same for what a study keeps beside its
trials (its fingerprint, baselines, confirm results, one-time roles). No other module reads or
writes Optuna user attributes by name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

ATTR = "mo"                  # the record, one JSON-able dict per trial
INTERRUPTED = "interrupted"  # reason prefix of a trial abandoned on SIGINT/SIGTERM


class State(str, enum.Enum):
    """What became of a trial (Optuna's states, with interrupted failures told apart)."""

    WAITING = "waiting"
    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self not in (State.WAITING, State.RUNNING)


@dataclass(frozen=True)
class Rung:
    """The running objective after one rung of the search split.

    ``new_items``: (stable item id, weighted value) of the items this rung added, kept only for
    pruners that compare trials item by item (Wilcoxon); never stored.
    """

    n_items: int
    score: float
    stderr: float
    components: Mapping[str, float] = field(default_factory=dict)
    new_items: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TrialRecord:
    """One trial: what was merged, how it scored rung by rung, how long it took, how it ended.

    Attributes:
        number: the trial's number in the study (unique over every method's Optuna study).
        method: the merge method.
        state: how the trial ended (or that it runs).
        params: the sampled parameters (Optuna's names).
        recipe: the mergekit recipe merged.
        recipe_key: hash of the recipe and the merge seed (equal recipes, equal keys).
        rungs: the search split's rungs evaluated (the last is the full split when complete).
        values: the objective value(s) of a complete trial.
        merge_s, eval_s: seconds merging and evaluating.
        reason: why the trial failed, was pruned, or reused another's result.
        worker: ``host:pid`` of the worker that ran it.
        duplicate_of: the trial whose result it reused (same recipe).
        optuna: ``(Optuna study name, trial number)`` where the trial lives.
    """

    number: int
    method: str
    state: State
    params: Mapping[str, Any] = field(default_factory=dict)
    recipe: Mapping[str, Any] | None = None
    recipe_key: str | None = None
    rungs: tuple[Rung, ...] = ()
    values: tuple[float, ...] | None = None
    merge_s: float | None = None
    eval_s: float | None = None
    reason: str = ""
    worker: str | None = None
    duplicate_of: int | None = None
    optuna: tuple[str, int] | None = None

    @property
    def value(self) -> float | None:
        """The objective of a complete single-objective trial (the mean of several objectives)."""
        if not self.values:
            return None
        return self.values[0] if len(self.values) == 1 else sum(self.values) / len(self.values)

    @property
    def last(self) -> Rung | None:
        return self.rungs[-1] if self.rungs else None

    @property
    def items_evaluated(self) -> int:
        """Items of the search split this trial cost (its last rung; 0 for a duplicate)."""
        return self.last.n_items if self.last else 0

    @property
    def pruned_at(self) -> int | None:
        return self.items_evaluated if self.state is State.PRUNED else None


# ----------------------------------------------------------------------------- one trial


def recipe_key(recipe: Mapping[str, Any], seed: int) -> str:
    """A canonical hash of a recipe and merge seed: the same merge gets the same key."""
    text = json.dumps({"recipe": recipe, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(trial: Any, record: TrialRecord) -> None:
    """Store ``record`` on an Optuna trial (a ``Trial`` being run, or a ``FrozenTrial``'s study)."""
    trial.set_user_attr(ATTR, _encode(record))


def start(trial: Any, number: int, method: str, recipe: Mapping[str, Any], key: str, worker: str | None,
          params: Mapping[str, Any]) -> TrialRecord:
    """The record of a trial that starts running (stored at once)."""
    record = TrialRecord(number, method, State.RUNNING, dict(params), dict(recipe), key, worker=worker,
                         optuna=(trial.study.study_name, trial.number))
    save(trial, record)
    return record


def load(trial: optuna.trial.FrozenTrial, study_name: str | None = None) -> TrialRecord:
    """The record of an Optuna trial, whatever its state (a trial we never wrote gets defaults)."""
    data = dict(trial.user_attrs.get(ATTR) or {})
    reason = str(data.get("reason", ""))
    return TrialRecord(
        number=int(data.get("number", trial.number)), method=str(data.get("method", "")),
        state=_state(trial.state, reason), params=dict(trial.params), recipe=data.get("recipe"),
        recipe_key=data.get("recipe_key"),
        rungs=tuple(Rung(int(n), _nan(s), _nan(se), dict(c)) for n, s, se, c in data.get("rungs", [])),
        values=tuple(trial.values) if trial.values is not None else None,
        merge_s=data.get("merge_s"), eval_s=data.get("eval_s"), reason=reason, worker=data.get("worker"),
        duplicate_of=data.get("duplicate_of"),
        optuna=(study_name, trial.number) if study_name else _tuple(data.get("optuna")))


def for_retry(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """User attributes of a re-queued copy of ``trial``: the same merge, no results yet.

    The copy gets its own study-wide number when a worker picks it up.
    """
    data = dict(trial.user_attrs.get(ATTR) or {})
    kept = {k: data[k] for k in ("method", "recipe", "recipe_key") if k in data}
    return {ATTR: {**kept, "retry_of": data.get("number", trial.number)}}


def set_number(trial: Any, number: int) -> None:
    """Give a trial that starts its study-wide number (call under the study lock)."""
    data = dict(trial.user_attrs.get(ATTR) or {})
    data["number"] = number
    trial.set_user_attr(ATTR, data)


def number_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The study-wide number given to a trial when it was created (None: not given yet)."""
    value = (trial.user_attrs.get(ATTR) or {}).get("number")
    return None if value is None else int(value)


def reason_of(trial: Any) -> str:
    return str((trial.user_attrs.get(ATTR) or {}).get("reason", ""))


def set_reason(trial: Any, reason: str) -> None:
    """Record why a trial is given up, keeping the rest of its record."""
    data = dict(trial.user_attrs.get(ATTR) or {})
    data["reason"] = reason
    trial.set_user_attr(ATTR, data)


def _encode(record: TrialRecord) -> dict[str, Any]:
    data = {"number": record.number, "method": record.method, "recipe": record.recipe,
            "recipe_key": record.recipe_key,
            "rungs": [[r.n_items, _finite(r.score), _finite(r.stderr), dict(r.components)]
                      for r in record.rungs],
            "merge_s": record.merge_s, "eval_s": record.eval_s, "reason": record.reason,
            "worker": record.worker, "duplicate_of": record.duplicate_of,
            "optuna": list(record.optuna) if record.optuna else None}
    return {k: v for k, v in data.items() if v not in (None, "", [])}


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _tuple(value: Any) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if value else None


def _state(state: optuna.trial.TrialState, reason: str) -> State:
    if state == optuna.trial.TrialState.FAIL:
        return State.INTERRUPTED if reason.startswith(INTERRUPTED) else State.FAILED
    return {optuna.trial.TrialState.COMPLETE: State.COMPLETE, optuna.trial.TrialState.PRUNED: State.PRUNED,
            optuna.trial.TrialState.RUNNING: State.RUNNING}.get(state, State.WAITING)


def finish(record: TrialRecord, state: State, **changes: Any) -> TrialRecord:
    """``record`` in its final ``state`` with the given fields replaced."""
    return dataclasses.replace(record, state=state, **changes)


# ----------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class ConfirmResult:
    """A merge scored on the confirm split (one seed, or the mean over several).

    ``items``: (task, item, value) for every confirm item (item ``leaf/doc``), the value the task's metric
    (0/1 accuracy for multiple choice), averaged over ``seeds`` for random methods.
    ``per_seed``: the objective of each seed, in ``seeds`` order.
    """

    score: float
    stderr: float
    components: Mapping[str, float]
    items: tuple[tuple[str, str, float], ...] = ()
    seeds: tuple[int, ...] = ()
    per_seed: tuple[float, ...] = ()


class StudyNotes:
    """What a study keeps beside its trials, on its home Optuna study.

    The home study is the one named ``study.name``; in a fair comparison each method's trials
    live in a study of their own, and the home study holds only these notes.
    """

    FINGERPRINT, BASELINES, JOINS, FINAL = "mo.fingerprint", "mo.baselines", "mo.joins", "mo.final"

    def __init__(self, home: Any) -> None:
        self.home = home

    def _get(self, key: str, default: Any = None) -> Any:
        return self.home.user_attrs.get(key, default)

    def fingerprint(self) -> dict[str, Any] | None:
        return self._get(self.FINGERPRINT)

    def set_fingerprint(self, value: Mapping[str, Any]) -> None:
        self.home.set_user_attr(self.FINGERPRINT, dict(value))

    def baselines(self) -> dict[str, dict[str, Any]]:
        """{name: {"recipe", "search": Rung fields}} of the baselines scored so far."""
        return dict(self._get(self.BASELINES, {}))

    def set_baseline(self, name: str, recipe: Mapping[str, Any], rung: Rung) -> None:
        stored = self.baselines()
        stored[name] = {"recipe": dict(recipe), "n_items": rung.n_items, "score": rung.score,
                        "stderr": _finite(rung.stderr), "components": dict(rung.components)}
        self.home.set_user_attr(self.BASELINES, stored)

    def claim(self, role: str, who: str) -> bool:
        """Take a one-time role (call under the study lock): True for the first to ask."""
        key = f"mo.claim.{role}"
        if self._get(key):
            return False
        self.home.set_user_attr(key, who)
        return True

    def next_join(self) -> int:
        """How many workers joined before this one (call under the join lock)."""
        joins = int(self._get(self.JOINS, 0))
        self.home.set_user_attr(self.JOINS, joins + 1)
        return joins

    def take_final(self, state: str, force: bool) -> bool:
        """Claim the final report for this state of the study (once per state, or ``force``)."""
        if not force and self._get(self.FINAL) == state:
            return False
        self.home.set_user_attr(self.FINAL, state)
        return True

    def rows(self) -> list[dict[str, Any]]:
        """The rows of the study's last conclusion (``set_rows``), for ``compare`` and ``export``."""
        return list(self._get("mo.rows", []))

    def set_rows(self, rows: Sequence[Mapping[str, Any]], best_seed: int | None) -> None:
        self.home.set_user_attr("mo.rows", [dict(r) for r in rows])
        self.home.set_user_attr("mo.best_seed", best_seed)

    def best_seed(self) -> int | None:
        return self._get("mo.best_seed")

    def confirmed(self, key: str) -> ConfirmResult | None:
        data = self._get(f"mo.confirm.{key}")
        if data is None:
            return None
        return ConfirmResult(data["score"], _nan(data.get("stderr")), dict(data["components"]),
                             tuple((str(t), str(i), float(v)) for t, i, v in data.get("items", [])),
                             tuple(data.get("seeds", [])), tuple(data.get("per_seed", [])))

    def set_confirmed(self, key: str, result: ConfirmResult) -> None:
        self.home.set_user_attr(f"mo.confirm.{key}", {
            "score": result.score, "stderr": _finite(result.stderr), "components": dict(result.components),
            "items": [list(x) for x in result.items], "seeds": list(result.seeds),
            "per_seed": list(result.per_seed)})


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def completed_by_key(trials: Sequence[optuna.trial.FrozenTrial], key: str) -> Any:
    """The first complete trial that merged the recipe with ``key`` (None if none did)."""
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE and (t.user_attrs.get(ATTR) or {}).get("recipe_key") == key:
            return t
    return None
