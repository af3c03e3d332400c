"""A study of this tool: a home Optuna study, and the Optuna studies its trials run in.

* **One sampler choosing the method** (``study.compare: free``, or a single method): the
  trials live in the home study, named ``study.name``; a multi-method study samples a
  categorical ``method`` parameter.
* **A fair comparison** (``study.compare: fair``, the default for several methods): each
  method's trials live in an Optuna study of its own, ``<study.name>/<method>``, with its own
  sampler and pruner state, so TPE or CMA-ES model one method's space, and a pruner compares
  trials of the same method at the same rung. The next trial goes to the method with the fewest
  trials started (a queued retry first), so every method gets the same share (±1) whatever
  the number of workers, and after a resume. The home study holds only the study's notes.

Trials get a study-wide number when they start (``records.set_number``), so trial 12 names
one trial whatever Optuna study it lives in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from orchestrator.study import records
from orchestrator.study.records import StudyNotes, TrialRecord

FREE, FAIR = "free", "fair"
_WAITING = optuna.trial.TrialState.WAITING


def member_name(study_name: str, method: str) -> str:
    """The Optuna study of one method's trials in a fair comparison."""
    return f"{study_name}/{method}"


def superseded(trials: Sequence[Any]) -> set[int]:
    """Numbers of failed Optuna trials that were queued again (their retry stands in for them)."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def counted(trials: Sequence[Any]) -> int:
    """Trials that count toward ``n_trials``: finished (less superseded failures) and running."""
    states = optuna.trial.TrialState
    gone = superseded(trials)
    return sum(1 for t in trials if t.state in (states.COMPLETE, states.PRUNED, states.RUNNING)
               or (t.state == states.FAIL and t.number not in gone))


def running(trials: Sequence[Any]) -> list[Any]:
    return [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


@dataclass
class StudyGroup:
    """The home study and the Optuna studies trials run in, keyed by method (None: any method).

    Attributes:
        name: ``study.name``.
        home: the Optuna study named ``name`` (the notes; the trials too unless fair).
        members: ``{method: Optuna study}`` in a fair comparison, else ``{None: home}``.
        caps: most trials a member can run (its grid's size), if limited.
    """

    name: str
    home: Any
    members: dict[str | None, Any]
    caps: dict[str | None, int] = field(default_factory=dict)

    @property
    def fair(self) -> bool:
        return None not in self.members

    @property
    def notes(self) -> StudyNotes:
        return StudyNotes(self.home)

    def member_trials(self) -> Iterator[tuple[str | None, Any, list[Any]]]:
        """(method, Optuna study, its trials) for every member."""
        for method, study in self.members.items():
            yield method, study, study.get_trials(deepcopy=False)

    def trials(self) -> list[Any]:
        """Every Optuna trial of the study."""
        return [t for _, _, trials in self.member_trials() for t in trials]

    def records(self) -> list[TrialRecord]:
        """Every trial's record, by study-wide number (trials not yet started last)."""
        out = [records.load(t, study.study_name) for _, study, trials in self.member_trials() for t in trials]
        return sorted(out, key=lambda r: (r.state is records.State.WAITING, r.number))

    def counted(self) -> int:
        return sum(counted(trials) for _, _, trials in self.member_trials())

    def running(self) -> list[Any]:
        return running(self.trials())

    def next_member(self, n_trials: int) -> tuple[str | None, Any] | None:
        """Where the next trial runs (call under the study lock); None when the study is full.

        The member with a queued retry first, then the one with the fewest trials started
        (ties in the configured order), skipping members whose grid is exhausted.
        """
        if self.counted() >= n_trials:
            return None
        best: tuple[int, int, int] | None = None
        chosen = None
        for order, (method, study, trials) in enumerate(self.member_trials()):
            started = counted(trials)
            if method in self.caps and started >= self.caps[method]:
                continue
            waiting = any(t.state == _WAITING for t in trials)
            key = (0 if waiting else 1, started, order)
            if best is None or key < best:
                best, chosen = key, (method, study)
        return chosen

    def next_number(self) -> int:
        """The study-wide number of the next trial to start (call under the study lock)."""
        numbers = [n for t in self.trials() if (n := records.number_of(t)) is not None]
        return max(numbers, default=-1) + 1

    def finished_state(self) -> str:
        """A short text that changes whenever a trial ends (``finished/total``)."""
        trials = self.trials()
        return f"{sum(t.state.is_finished() for t in trials)}/{len(trials)}"

    def counts_by_method(self) -> dict[str, dict[str, int]]:
        """{method: {state: trials}} over every trial's record."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records():
            per = out.setdefault(r.method or "?", {})
            per[r.state.value] = per.get(r.state.value, 0) + 1
        return out


def member_methods(methods: Sequence[str], compare: str) -> list[str | None]:
    """The member keys of a study comparing ``methods``: one per method when fair, else one."""
    return list(methods) if compare == FAIR and len(methods) > 1 else [None]


def open_group(name: str, methods: Sequence[str], compare: str, open_study: Any,
               caps: Mapping[str | None, int] | None = None) -> StudyGroup:
    """Open (or create) the home study and the members (call under the join lock).

    ``open_study(optuna_name, method, holds_trials)`` opens one Optuna study with the sampler
    and pruner of ``method`` (None: one sampler for every method); the home study of a fair
    comparison holds no trials.
    """
    keys = member_methods(methods, compare)
    if keys == [None]:
        home = open_study(name, None, True)
        return StudyGroup(name, home, {None: home}, dict(caps or {}))
    home = open_study(name, None, False)
    members = {m: open_study(member_name(name, m), m, True) for m in keys}
    return StudyGroup(name, home, members, dict(caps or {}))


def load_group(storage: Any, name: str) -> StudyGroup:
    """An existing study, read from its storage (its home study and any per-method studies).

    Raises:
        KeyError: no study of that name in the storage.
    """
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        raise KeyError(name)
    home = optuna.load_study(study_name=name, storage=storage)
    prefix = f"{name}/"
    members = {n[len(prefix):]: optuna.load_study(study_name=n, storage=storage) for n in names if n.startswith(prefix)}
    return StudyGroup(name, home, members or {None: home})
