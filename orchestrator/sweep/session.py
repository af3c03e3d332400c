"""Joining a study: storage, the Optuna studies, the fingerprint check and the MLflow parent run.

Everything happens under the storage's join lock, so workers that start together create the
study, its members and the parent run once. A study that exists is checked against the
fingerprint it was created with *before* anything is written: a resume with other candidates,
methods, spaces, tasks, rungs or seed fails in one line.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from orchestrator.config import SweepConfig
from orchestrator.errors import UserError, redact_text
from orchestrator.study import fingerprint
from orchestrator.study.group import StudyGroup, open_group
from orchestrator.study.records import StudyNotes
from orchestrator.study.spaces import space_as_dict
from orchestrator.study.storage import JOIN, StudyLock, make_storage, open_study, storage_kind
from orchestrator.study.workers import StaleTrials
from orchestrator.sweep.setup import Setup
from orchestrator.tracking.provenance import git_commit, package_versions
from orchestrator.tracking.runs import NullTracker, Tracker


@dataclass
class Session:
    """A worker's place in a study: storage, the study's Optuna studies, tracker and roles."""

    storage: Any
    group: StudyGroup
    tracker: Any
    lock: StudyLock
    stale: StaleTrials
    worker: str
    baselines_mine: bool
    done_at_join: bool = False  # the study had all its trials when this worker joined


def worker_name() -> str:
    """``host:pid``: names a worker in trials and MLflow runs (tag ``mo.worker``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def join(cfg: SweepConfig, setup: Setup, overrides: list[str] | None) -> Session:
    """Open (or create) the study and its parent run under the storage's join lock."""
    name = cfg.study.name
    stale = StaleTrials(cfg.study.max_retry)
    setup.runs_dir.mkdir(parents=True, exist_ok=True)  # the default sqlite stores and their lock live here
    with StudyLock(setup.url, JOIN):
        rdb = storage_kind(setup.url) != "journal"
        storage = make_storage(setup.url, cfg.study.heartbeat_s, cfg.study.grace_s, stale if rdb else None)
        check_resume(storage, name, setup.fingerprint)
        group = open_group(name, list(setup.spaces), cfg.study.compare, _opener(cfg, setup, storage), setup.caps)
        notes = group.notes
        if notes.fingerprint() is None:
            notes.set_fingerprint(setup.fingerprint)
        _own_sampler_seeds(group, cfg, setup, notes.next_join())
        tracker = make_tracker(cfg, setup)
        tracker.start_study(name, study_params(cfg, overrides, setup.url), {
            "config.yaml": config_yaml(cfg), "search_space.json": {k: space_as_dict(v) for k, v in setup.spaces.items()}})
        mine = cfg.study.baselines and notes.claim("baselines", worker_name())
        done = group.counted() >= setup.n_trials and not group.running()
    stale.listeners.append(tracker.close_stale_trial)
    return Session(storage, group, tracker, StudyLock(setup.url, f"merge-orchestrator/study/{name}"),
                   stale, worker_name(), mine, done)


def check_resume(storage: Any, name: str, new: dict[str, Any]) -> None:
    """A study that exists must have been created with the same defining settings."""
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return
    old = StudyNotes(optuna.load_study(study_name=name, storage=storage)).fingerprint()
    if old is None:
        return  # created before fingerprints were kept: nothing to compare with
    diffs = fingerprint.changes(old, new)
    if diffs:
        raise UserError(fingerprint.describe(name, diffs))


def _opener(cfg: SweepConfig, setup: Setup, storage: Any) -> Any:
    def open_one(optuna_name: str, method: str | None, holds_trials: bool) -> Any:
        sampler = setup.sampler(cfg, method) if holds_trials else optuna.samplers.RandomSampler()
        pruner = setup.pruner(cfg) if holds_trials else optuna.pruners.NopPruner()
        return open_study(optuna_name, storage, sampler, pruner, setup.directions)
    return open_one


def _own_sampler_seeds(group: StudyGroup, cfg: SweepConfig, setup: Setup, joins: int) -> None:
    """The k-th worker to join a study samples with seed + k (call under the join lock).

    Workers with one seed would propose the same random start-up points; a resumed study
    would repeat its first ones. The first worker keeps the configured seed (reproducible).
    """
    if joins:
        for method, study in group.members.items():
            study.sampler = setup.sampler(cfg, method, offset=joins)


def make_tracker(cfg: SweepConfig, setup: Setup) -> Any:
    if not cfg.tracking.enabled:
        return NullTracker()
    return Tracker(cfg.tracking.uri, cfg.tracking.experiment, setup.runs_dir, list(setup.candidates.models))


def study_params(cfg: SweepConfig, overrides: list[str] | None, url: str) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    data["study"]["storage"] = redact_text(url)
    return {"config": data, "overrides": " ".join(overrides or []),
            "git_commit": git_commit(Path(__file__).parents[2]), "versions": package_versions(),
            "seeds": {"merge": cfg.study.seed, "sampler": cfg.study.sampler.seed}}


def config_yaml(cfg: SweepConfig) -> str:
    import yaml

    data = dataclasses.asdict(cfg)
    for section in ("study", "tracking"):
        key = "storage" if section == "study" else "uri"
        if data[section][key]:
            data[section][key] = redact_text(data[section][key])
    return yaml.safe_dump(data, sort_keys=False)
