"""The main job, one worker: check, load, join, run trials, and conclude if this worker ends it.

A page on purpose; each step is a layer's own work:

1. ``setup.prepare``: every check that needs no model (seconds, nothing written).
2. ``study.resident.Resident``: the model loaded once, its merger and evaluator.
3. ``session.join``: the study's Optuna studies, the fingerprint check, the MLflow parent run.
4. baselines (one worker), then ``study.workers.Worker`` runs ``study.objective.Objective``
   until the study has ``n_trials`` and none is running anywhere.
5. ``finish.conclude`` (the worker that ends the study): confirm, compare, best merge, report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import SweepConfig
from orchestrator.study.candidates import recipe_builder
from orchestrator.study.objective import Objective
from orchestrator.study.resident import Resident
from orchestrator.study.workers import Liveness, Signals, Worker
from orchestrator.sweep import finish
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.session import Session, join
from orchestrator.sweep.setup import Setup, prepare
from orchestrator.tracking.ui import ui_hint


@dataclass
class SweepOutcome:
    """What a worker's sweep returns; ``final``: this worker ended the study and reported it."""

    study_name: str
    final: bool
    ran: int
    worker: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    rows: list[Any] = field(default_factory=list)
    best: Any = None
    best_dir: Path | None = None
    summary: dict[str, Any] | None = None
    parent_run_id: str | None = None
    registered: str | None = None
    ui: str = ""


def run_sweep(cfg: SweepConfig, overrides: list[str] | None = None, out: Any = sys.stdout) -> SweepOutcome:
    """One worker: check everything, load the model, join the study, run trials, maybe conclude."""
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    setup = prepare(cfg, say)
    for warning in setup.warnings:
        say(warning)
    if cfg.eval.threads:
        import torch

        torch.set_num_threads(cfg.eval.threads)
    start = time.perf_counter()
    fast = all(space.spec.merges_deltas for space in setup.spaces.values())
    resident = Resident(setup.candidates, setup.spec, setup.suite, cfg.study.seed, adapter_fast=fast)
    if resident.adapters is not None:
        say(f"adapter sweep: each trial rewrites the {len(resident.adapters.names)} adapted parameters only")
    say(f"resident model loaded in {time.perf_counter() - start:.1f}s")
    signals = Signals()
    signals.install()
    try:
        session = join(cfg, setup, overrides)
        if session.done_at_join:
            say(f"study {cfg.study.name!r} already has its {setup.n_trials} trials (study.n_trials): nothing "
                "to run; raise study.n_trials to add trials. Repeating the final steps.")
        return work(cfg, setup, session, resident, signals, say)
    finally:
        signals.restore()


def work(cfg: SweepConfig, setup: Setup, session: Session, resident: Resident, signals: Signals,
         say: Any) -> SweepOutcome:
    """Baselines (if this worker claimed them), trials, then the conclusion if it is the last."""
    status = "FAILED"
    try:
        if session.baselines_mine:
            finish.run_baselines(session.group.notes, resident, setup, session.tracker, say)
        objective = Objective(setup.spaces, resident, recipe_builder(setup.candidates), cfg.study.seed,
                              len(setup.spec.rungs), multi_objective=cfg.study.multi_objective,
                              per_item=cfg.study.pruner.entry.per_item, interruptible=signals.interruptible,
                              listeners=[session.tracker, Progress(session.group, say, cfg.study.multi_objective)],
                              worker=session.worker, model_names=list(setup.candidates.models))
        liveness = Liveness(session.storage, cfg.study.heartbeat_s, cfg.study.grace_s, session.stale,
                            session.worker)
        worker = Worker(session.group, session.lock, liveness, signals, setup.n_trials, cfg.study.timeout_s,
                        on_abandoned=session.tracker.sync_trial)
        worker.run(objective)
        outcome = conclude_if_last(cfg, setup, session, resident, worker.ran, say)
        status = "FINISHED" if outcome.final else ""
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status and (status == "FINISHED" or not session.group.running()):
            session.tracker.end_study(status)  # other workers carry on under the same parent otherwise


def conclude_if_last(cfg: SweepConfig, setup: Setup, session: Session, resident: Resident, ran: int,
                     say: Any) -> SweepOutcome:
    """Conclude if this worker ends the study (once per state of it, or on an explicit re-run)."""
    group = session.group
    with session.lock:
        busy = bool(group.running())
        mine = not busy and group.notes.take_final(group.finished_state(), force=session.done_at_join)
    outcome = SweepOutcome(cfg.study.name, mine, ran, session.worker, counts=group.counts_by_method(),
                           parent_run_id=session.tracker.parent_id)
    if not mine:
        say(f"worker {session.worker} done ({ran} trials); " + (
            "other workers are still running trials; the last one writes the report" if busy
            else "another worker writes the report"))
        return outcome
    result = finish.conclude(cfg, setup, session, resident, say)
    outcome.rows, outcome.best, outcome.best_dir = result["rows"], result["best"], result["best_dir"]
    outcome.summary, outcome.registered = result["summary"], result["registered"]
    if cfg.tracking.enabled:
        outcome.ui = ui_hint(cfg.tracking.uri, Path(cfg.runs_dir), getattr(session.tracker, "experiment_id", None),
                             cfg.study.name)
    return outcome
