"""Optuna plumbing: storage, sampler, pruner, and the study lock.

Storage URLs: ``sqlite:///path.db`` (default, one machine), ``postgresql+psycopg2://...`` (many
workers, many machines), or ``journal:///path.log`` / a path ending in ``.log`` (Optuna's journal
file, for shared filesystems without a database).

The worker loop (liveness, signals, counting) lives in ``orchestrator/workers.py``; the
study lock that both use lives here.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from orchestrator.config import PrunerConfig, SamplerConfig
from orchestrator.errors import UserError

SAMPLERS = ("tpe", "cmaes", "random", "grid", "qmc", "nsga2")
PRUNERS = ("successive_halving", "wilcoxon", "median", "none")
HEARTBEAT_S = 30

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ----------------------------------------------------------------------------- URLs


def redact(url: str) -> str:
    """A storage or tracking URL with any password replaced by ``***``."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """Any text with URL passwords (``scheme://user:pw@``, ``password=pw``) replaced by ``***``."""
    import re

    text = re.sub(r"(://[^/\s:@]*:)[^@\s/]*@", r"\1***@", text)
    return re.sub(r"(?i)((?:password|passwd|pwd)=)[^&\s]+", r"\1***", text)


def storage_url(storage: str | None, runs_dir: Path) -> str:
    """The study storage URL (default: ``sqlite:///<runs_dir>/optuna.db``)."""
    return storage or f"sqlite:///{(runs_dir / 'optuna.db').resolve()}"


def storage_kind(url: str) -> str:
    """``journal``, ``sqlite``, ``postgresql`` or ``rdb`` (another SQLAlchemy URL)."""
    if url.startswith("journal://") or url.endswith((".log", ".journal")):
        return "journal"
    if "://" not in url:
        raise UserError(f"study.storage {redact(url)!r} is not a URL: use sqlite:///file.db, "
                        "postgresql+psycopg2://user@host:port/db or journal:///file.log")
    scheme = url.split("://", 1)[0]
    if scheme.startswith("sqlite"):
        return "sqlite"
    return "postgresql" if scheme.startswith("postgres") else "rdb"


def _file_path(url: str) -> Path:
    """The file of a sqlite or journal URL."""
    if url.startswith("journal://"):
        return Path(url.removeprefix("journal://"))
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return Path(url)


def check_storage(url: str) -> None:
    """Fail in one line if the storage cannot work; creates nothing (no schema, no file)."""
    kind = storage_kind(url)
    if kind in ("journal", "sqlite"):
        path = _file_path(url)
        if url.startswith("sqlite") and not url.startswith("sqlite:///"):
            raise UserError(f"study.storage {url!r}: use sqlite:///<absolute or relative path>")
        if not path.parent.is_dir():
            raise UserError(f"{kind} storage folder does not exist: {path.parent}")
        import os

        if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UserError(f"{kind} storage {path} is not writable")
        return
    try:
        with _engine(url).connect():
            pass
    except Exception as err:  # noqa: BLE001 - driver errors of every kind become one line
        raise UserError(f"cannot open study storage {redact(url)}: {_short(err)}") from None


def _engine(url: str) -> Any:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(url, poolclass=NullPool, **_engine_kwargs(url))


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {}


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int | None = None,
                 on_stale: Callable[[Any, Any], None] | None = None, retries: int = 3) -> Any:
    """An Optuna storage for ``url`` (RDB storages with heartbeats); one line on failure.

    Creates the schema of a fresh database: call it under ``StudyLock(url, JOIN)``.
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    check_storage(url)
    if storage_kind(url) == "journal":
        return JournalStorage(JournalFileBackend(str(_file_path(url))))
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=heartbeat_s,
                                  grace_period=grace_s or 3 * heartbeat_s,
                                  heartbeat_stale_trial_callback=on_stale,
                                  engine_kwargs={**_engine_kwargs(url), "pool_pre_ping": True})
        except Exception as err:  # noqa: BLE001 - any driver error becomes one line below
            last = err
            if not _is_race(err):
                break
            time.sleep(0.2 * (attempt + 1))
    raise UserError(f"cannot open study storage {redact(url)}: {_short(last)}")


def _is_race(err: Exception) -> bool:
    """Schema creation by two workers at once fails transiently (seen on sqlite and PostgreSQL)."""
    text = str(err).lower()
    return any(s in text for s in ("already exists", "unique constraint", "uniqueviolation", "locked"))


def _short(err: Exception | None) -> str:
    text = " ".join(str(err).split()) if err else "unknown error"
    text = text.split(" (Background on this error")[0].split(" [SQL:")[0]
    return redact_text(text)[:300]


# ----------------------------------------------------------------------------- the study lock

JOIN = "merge-orchestrator/join"


class StudyLock:
    """A lock shared by every worker of a storage, re-entrant within one process.

    PostgreSQL: a session advisory lock (released by the server if the worker dies). SQLite
    and journal files: ``flock`` on ``<file>.mo-lock`` (released by the kernel if the worker
    dies; on NFS it needs working NFS locks, as Optuna's journal does). Other databases: no
    lock (Optuna's own unique constraints and the retries in ``open_study`` remain).
    """

    def __init__(self, url: str, key: str) -> None:
        self.kind = storage_kind(url)
        self.url = url
        self.key = zlib.crc32(key.encode()) & 0x7FFFFFFF
        self._depth = 0
        self._conn: Any = None
        self._file: Any = None
        self._engine: Any = None
        self._thread_lock = threading.RLock()

    def __enter__(self) -> StudyLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                self._acquire()
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                self._release()
        finally:
            self._thread_lock.release()

    def _acquire(self) -> None:
        import sqlalchemy

        if self.kind == "postgresql":
            self._engine = self._engine or _engine(self.url)
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("select pg_advisory_lock(:k)"), {"k": self.key})
        elif self.kind in ("sqlite", "journal"):
            import fcntl

            self._file = open(f"{_file_path(self.url)}.mo-lock", "a")  # noqa: SIM115 - held until release
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            except OSError as err:  # a filesystem without locks: Optuna's own guards remain
                warn(f"warning: cannot lock {self._file.name} ({err.strerror}); workers that start at "
                     "the same moment may race")

    def _release(self) -> None:
        import sqlalchemy

        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(sqlalchemy.text("select pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


# ----------------------------------------------------------------------------- sampler, pruner


def make_sampler(cfg: SamplerConfig, grid: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """An Optuna sampler from config (seeded)."""
    name = cfg.name
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
        check_grid(dict(grid or {}))
        return AskTellGridSampler(dict(grid or {}), seed=cfg.seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=cfg.seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed)
    raise UserError(f"unknown sampler {name!r} in study.sampler.name; valid: {', '.join(SAMPLERS)}")


MAX_GRID_POINTS = 100_000


def check_grid(grid: Mapping[str, Sequence[Any]]) -> None:
    """A grid Optuna's ``GridSampler`` can enumerate: one method, a sane number of points.

    ``GridSampler`` lists every combination up front; over several methods the grid would be
    the product of all their parameters (most of them unused by any one trial), which for the
    default five methods is ~10^8 points and tens of GB.
    """
    if "method" in grid:
        raise UserError(f"study.sampler.name=grid searches one method's grid, but the study compares "
                        f"{len(grid['method'])} methods ({', '.join(map(str, grid['method']))}); run one "
                        "study per method (e.g. method=ties) or use another sampler")
    size = grid_size(grid)
    if size > MAX_GRID_POINTS:
        raise UserError(f"study.sampler.name=grid: {size:,} grid points over {len(grid)} parameters exceed "
                        f"{MAX_GRID_POINTS:,}; lower study.sampler.grid_points or search fewer parameters")


def grid_size(grid: Mapping[str, Sequence[Any]]) -> int:
    """Number of points of a grid (the product of each parameter's values)."""
    return math.prod(len(values) for values in grid.values())


class AskTellGridSampler(optuna.samplers.BaseSampler):
    """Optuna's ``GridSampler`` for ask/tell loops.

    ``GridSampler.after_trial`` calls ``study.stop()`` once every point was visited, which
    raises outside ``Study.optimize``; our workers use ask/tell and stop at ``n_trials``, which
    the sweep caps at the grid's size. Everything else is ``GridSampler``'s.
    """

    def __init__(self, grid: Mapping[str, Sequence[Any]], seed: int | None = None) -> None:
        self.grid = optuna.samplers.GridSampler(dict(grid), seed=seed)
        self.size = grid_size(grid)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self.grid.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return self.grid.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self.grid.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.grid.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        """No ``study.stop()``: the worker loop counts trials itself."""

    def reseed_rng(self) -> None:
        self.grid.reseed_rng()


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


# ----------------------------------------------------------------------------- opening a study


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


# ----------------------------------------------------------------------------- retries and counting


def warn(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)
