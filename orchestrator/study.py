"""Optuna plumbing: storage, sampler and pruner from config, and opening a study to resume.

Storage URLs: ``sqlite:///path.db`` (default, one machine), ``postgresql+psycopg2://...`` (many
workers), or ``journal:///path.log`` / a path ending in ``.log`` (Optuna's journal file, for
shared filesystems without a database). RDB storages get heartbeats, so a trial of a killed
worker is marked failed and retried.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from orchestrator.config import PrunerConfig, SamplerConfig
from orchestrator.errors import UserError

SAMPLERS = ("tpe", "cmaes", "random", "grid", "qmc", "nsga2")
PRUNERS = ("successive_halving", "wilcoxon", "median", "none")
HEARTBEAT_S = 30


def redact(url: str) -> str:
    """A storage or tracking URL with any password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def storage_url(storage: str | None, runs_dir: Path) -> str:
    """The study storage URL (default: ``sqlite:///<runs_dir>/optuna.db``)."""
    return storage or f"sqlite:///{(runs_dir / 'optuna.db').resolve()}"


def make_storage(url: str, retries: int = 3) -> Any:
    """An Optuna storage for ``url``; a wrong or unreachable one fails here, in one line."""
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal://") or url.endswith((".log", ".journal")):
        path = Path(url.removeprefix("journal://"))
        if not path.parent.is_dir():
            raise UserError(f"journal storage folder does not exist: {path.parent}")
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise UserError(f"study.storage {url!r} is not a URL: use sqlite:///file.db, "
                        "postgresql+psycopg2://user@host:port/db or journal:///file.log")
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise UserError(f"sqlite storage folder does not exist: {folder}")
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=2 * HEARTBEAT_S,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                                  engine_kwargs=_engine_kwargs(url))
        except Exception as err:  # noqa: BLE001 - any driver error becomes one line below
            last = err
            if not _is_race(err):
                break
            time.sleep(0.2 * (attempt + 1))
    raise UserError(f"cannot open study storage {redact(url)}: {_short(last)}")


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {}


def _is_race(err: Exception) -> bool:
    """Schema creation by two workers at once fails transiently (seen on sqlite and PostgreSQL)."""
    text = str(err).lower()
    return any(s in text for s in ("already exists", "unique constraint", "uniqueviolation", "locked"))


def _short(err: Exception | None) -> str:
    text = " ".join(str(err).split()) if err else "unknown error"
    return text[:300]


def make_sampler(cfg: SamplerConfig, grid: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """An Optuna sampler from config (seeded)."""
    name = cfg.name
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="optuna")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials,
                                          multivariate=cfg.multivariate, group=cfg.multivariate,
                                          constant_liar=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials,
                                            warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if name == "grid":
        return optuna.samplers.GridSampler(dict(grid or {}), seed=cfg.seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=cfg.seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed)
    raise UserError(f"unknown sampler {name!r} in study.sampler.name; valid: {', '.join(SAMPLERS)}")


def make_pruner(cfg: PrunerConfig, first_rung_items: int, multi_objective: bool) -> Any:
    """An Optuna pruner over the evaluator's rungs (steps are items evaluated)."""
    if cfg.name not in PRUNERS:
        raise UserError(f"unknown pruner {cfg.name!r} in study.pruner.name; valid: {', '.join(PRUNERS)}")
    if multi_objective or cfg.name == "none":
        return optuna.pruners.NopPruner()
    if cfg.name == "successive_halving":
        sha = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, first_rung_items),
                                                     reduction_factor=cfg.reduction_factor)
        return StartupPruner(sha, cfg.n_startup_trials)
    if cfg.name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=cfg.p_threshold, n_startup_steps=2)
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=0)


class StartupPruner(optuna.pruners.BasePruner):
    """Never prunes before ``n_startup_trials`` trials completed, then defers to ``wrapped``.

    Successive halving compares a trial with those that reached the same rung; in the first
    trials of a study that is a handful of points, and it prunes nearly everything.
    """

    def __init__(self, wrapped: Any, n_startup_trials: int) -> None:
        self.wrapped = wrapped
        self.n_startup_trials = n_startup_trials

    def prune(self, study: Any, trial: Any) -> bool:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < self.n_startup_trials:
            return False
        return self.wrapped.prune(study, trial)


def open_study(name: str, storage: Any, sampler: Any, pruner: Any, directions: Sequence[str]) -> Any:
    """Create the study, or load it to resume; safe when several workers start at once."""
    for attempt in range(5):
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        directions=list(directions), load_if_exists=True)
            break
        except Exception as err:  # noqa: BLE001 - the create/create race, retried below
            if attempt == 4 or not _is_race(err):
                raise
            time.sleep(0.2 * (attempt + 1))
    if list(study.directions) != [_direction(d) for d in directions]:
        raise UserError(f"study {name!r} already exists with {len(study.directions)} objective(s); "
                        f"this run wants {len(directions)}: use another study.name")
    return study


def _direction(text: str) -> Any:
    return optuna.study.StudyDirection.MAXIMIZE if text == "maximize" else optuna.study.StudyDirection.MINIMIZE
