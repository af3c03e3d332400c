"""Optuna plumbing: storage, sampler, pruner, the study lock, liveness and the worker loop.

Storage URLs: ``sqlite:///path.db`` (default, one machine), ``postgresql+psycopg2://...`` (many
workers, many machines), or ``journal:///path.log`` / a path ending in ``.log`` (Optuna's journal
file, for shared filesystems without a database).

Many workers, one study: every worker runs the same command against the same storage URL.

* **Joining** (storage schema, study, first enqueued trial, MLflow parent run) happens under a
  lock, so workers starting at the same moment on a fresh database create everything once:
  a PostgreSQL advisory lock, or ``flock`` on ``<file>.mo-lock`` next to a SQLite database or
  a journal file.
* **Trials** are pulled one at a time (``ask`` under the study's lock, so the total never
  overshoots ``n_trials``), evaluated with no barrier between workers, and told back.
* **Liveness**: a running trial's worker beats a heartbeat every ``heartbeat_s``; a trial
  silent for ``grace_s`` (its worker was killed, its machine lost) is marked FAIL by whichever
  worker notices first and re-queued once with the same parameters (``retry_trial``, the
  bookkeeping of Optuna's ``RetryHeartbeatStaleTrialCallback``). RDB storages use Optuna's own
  heartbeat table; Optuna 5.0's ``JournalStorage`` has no heartbeat, so journal workers write
  the beat as a trial system attribute and this module fails stale trials itself (worker
  clocks must agree to well within ``grace_s``).
* **Counting**: ``n_trials`` counts trials that ran to an end (complete, pruned, failed by an
  error) and those running; a trial that was interrupted and re-queued is replaced by its
  retry, so a crash never costs the study a trial nor counts one twice.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from orchestrator.config import PrunerConfig, SamplerConfig
from orchestrator.errors import UserError

SAMPLERS = ("tpe", "cmaes", "random", "grid", "qmc", "nsga2")
PRUNERS = ("successive_halving", "wilcoxon", "median", "none")
HEARTBEAT_S = 30
BEAT_ATTR = "mo.heartbeat"     # journal storages: last beat (unix time) of a running trial
WORKER_ATTR = "mo.worker"      # the worker that runs a trial (host:pid)
INTERRUPTED = "interrupted"    # fail_reason prefix of a trial abandoned on SIGINT/SIGTERM
RETRY_DROP = {"fail_reason", "duplicate_of", "merge_s", "eval_s", "worker", "components", "stderr", "n_items"}

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
                _log(f"warning: cannot lock {self._file.name} ({err.strerror}); workers that start at "
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


def retry_trial(study: Any, trial: Any, max_retry: int | None) -> bool:
    """Queue a copy of a failed trial with the same parameters; False past ``max_retry``.

    Same bookkeeping as Optuna's ``RetryHeartbeatStaleTrialCallback`` (``failed_trial`` and
    ``retry_history`` system attributes, so its ``retried_trial_number`` works), minus the
    per-run attributes (fail reason, timings) of the failed attempt.
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if max_retry is not None and len(history) > max_retry:
        return False
    if trial.number in superseded(study.get_trials(deepcopy=False)):
        return False  # queued again already
    system = {k: v for k, v in trial.system_attrs.items() if k not in (BEAT_ATTR, WORKER_ATTR)}
    system.update(failed_trial=history[0], retry_history=history)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in RETRY_DROP},
        system_attrs=system))
    return True


class StaleTrials:
    """What happens to a trial whose worker vanished: re-queue it, then tell the listeners."""

    def __init__(self, max_retry: int | None = 3) -> None:
        self.max_retry = max_retry
        self.listeners: list[Callable[[Any], None]] = []

    def __call__(self, study: Any, trial: Any) -> None:
        retried = retry_trial(study, trial, self.max_retry)
        for listener in self.listeners:
            listener(trial)
        if retried:
            _log(f"trial {trial.number} lost its worker (no heartbeat): failed, queued again")


def superseded(trials: Sequence[Any]) -> set[int]:
    """Numbers of failed trials that were queued again (their retry stands in for them)."""
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


# ----------------------------------------------------------------------------- liveness


class Liveness:
    """Heartbeats of this worker's running trial, and failing the stale trials of others."""

    def __init__(self, storage: Any, heartbeat_s: int, grace_s: int | None, stale: StaleTrials,
                 worker: str) -> None:
        self.storage = storage
        self.heartbeat_s = heartbeat_s
        self.grace_s = grace_s or 3 * heartbeat_s
        self.stale = stale
        self.worker = worker
        self.journal = not isinstance(storage, optuna.storages.RDBStorage)
        self._study_ids: dict[str, int] = {}

    def trial_id(self, study: Any, number: int) -> int:
        name = study.study_name
        if name not in self._study_ids:
            self._study_ids[name] = self.storage.get_study_id_from_name(name)
        return self.storage.get_trial_id_from_study_id_trial_number(self._study_ids[name], number)

    def beat(self, trial_id: int) -> None:
        """One heartbeat; a trial finished meanwhile (by us or as stale) is ignored."""
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, KeyError):
            if self.journal:
                self.storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())
            else:
                self.storage.record_heartbeat(trial_id)

    def start(self, study: Any, trial: Any) -> Beat:
        """Beat for ``trial`` now, then every ``heartbeat_s`` in a thread until ``stop()``."""
        trial_id = self.trial_id(study, trial.number)
        self.beat(trial_id)
        self.storage.set_trial_system_attr(trial_id, WORKER_ATTR, self.worker)
        return Beat(self, trial_id, f"heartbeat-{trial.number}")

    def fail_stale(self, study: Any) -> None:
        """Mark the silent running trials of other workers FAIL and queue them again."""
        if not self.journal:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # Optuna's heartbeat table; calls self.stale
        now = time.time()
        for t in running(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))):
            if self._silent_for(t, now) > self.grace_s:
                self._fail(study, t)

    def _silent_for(self, trial: Any, now: float) -> float:
        """Seconds since the trial was last seen alive (journal beat, or start before its first beat)."""
        if not self.journal and WORKER_ATTR in trial.system_attrs:
            return 0.0  # RDB trials with a worker are Optuna's heartbeat's business
        start = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - max(start, float(trial.system_attrs.get(BEAT_ATTR, 0.0)))

    def _fail(self, study: Any, trial: Any) -> None:
        trial_id = self.trial_id(study, trial.number)
        try:
            if not self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker got there first, or the trial just finished
        self.stale(study, self.storage.get_trial(trial_id))


class Beat:
    """The heartbeat thread of one running trial."""

    def __init__(self, liveness: Liveness, trial_id: int, name: str) -> None:
        self.liveness = liveness
        self.trial_id = trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.liveness.heartbeat_s):
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                self.liveness.beat(self.trial_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.liveness.heartbeat_s + 5)


# ----------------------------------------------------------------------------- signals


class Signals:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, except inside ``critical()`` blocks.

    A whole trial runs as a critical block with ``interruptible()`` windows around its compute
    (merging, evaluating a rung): a signal that arrives while the worker talks to the storage
    or to MLflow is held and raised when that talk is over, so no transaction is cut in half
    and no trial is left half-created or half-told; one that arrives during compute stops it
    at once. A second signal while one is held is raised at once.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.received: int | None = None
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self.depth and self.pending is None:  # a second signal does not wait
            self.pending = signum
            return
        self.pending = None
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside a critical block: let signals through here (compute only, no I/O)."""
        saved, self.depth = self.depth, 0
        try:
            if self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(signal.Signals(signum).name)
            yield
        finally:
            self.depth = saved

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "SIGINT"


# ----------------------------------------------------------------------------- the worker loop


class Worker:
    """Pulls trials of one study until it has ``n_trials`` and none is running anywhere.

    ``on_abandoned(frozen_trial)`` is called after a trial was given up on an interrupt (told
    FAIL and queued again), e.g. to mark its MLflow run KILLED.
    """

    def __init__(self, study: Any, lock: StudyLock, liveness: Liveness, signals: Signals,
                 n_trials: int, timeout_s: float | None = None,
                 on_abandoned: Callable[[Any], None] | None = None) -> None:
        self.study = study
        self.lock = lock
        self.liveness = liveness
        self.signals = signals
        self.n_trials = n_trials
        self.timeout_s = timeout_s
        self.on_abandoned = on_abandoned or (lambda trial: None)
        self.ran = 0
        self.timed_out = False

    def run(self, objective: Callable[[Any], Any]) -> int:
        """Run trials; returns how many this worker ran."""
        start = time.monotonic()
        while True:
            self.liveness.fail_stale(self.study)
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                self.timed_out = True
                return self.ran
            if self._attempt(objective):
                continue
            if not running(self.study.get_trials(deepcopy=False)):
                return self.ran
            time.sleep(min(max(self.liveness.heartbeat_s / 2, 0.5), 10))  # wait for the others

    def _attempt(self, objective: Callable[[Any], Any]) -> bool:
        """Ask, evaluate, tell one trial; False when the study needs no more trials now.

        An interrupt at any point after ``ask`` abandons the trial cleanly (``_abandon``).
        """
        trial, beat, told = None, None, False
        try:
            with self.signals.critical():
                trial = self._ask()
                if trial is None:
                    return False
                beat = self.liveness.start(self.study, trial)
            with self.signals.critical():  # the objective opens interruptible() windows itself
                value, state = self._evaluate(trial, objective)
            with self.signals.critical():
                beat.stop()
                self._tell(trial, value, state)
                told = True
            self.ran += 1
            return True
        except BaseException as err:
            if trial is not None and not told:
                self._abandon(trial, beat, err)
            raise

    def _ask(self) -> Any:
        with self.lock:
            if counted(self.study.get_trials(deepcopy=False)) >= self.n_trials:
                return None
            with warnings.catch_warnings():  # "heartbeat is meant for optimize": we beat ourselves
                warnings.simplefilter("ignore", UserWarning)
                return self.study.ask()

    @staticmethod
    def _evaluate(trial: Any, objective: Callable[[Any], Any]) -> tuple[Any, Any]:
        states = optuna.trial.TrialState
        try:
            return objective(trial), states.COMPLETE
        except optuna.TrialPruned:
            return None, states.PRUNED
        except Exception as err:  # noqa: BLE001 - a failing trial never stops the study
            _record_failure(trial, err)
            return None, states.FAIL

    def _abandon(self, trial: Any, beat: Beat | None, err: BaseException) -> None:
        """Interrupted: tell the trial FAIL (reason kept), queue it again, notify."""
        with self.signals.critical():
            if beat is not None:
                beat.stop()
            if "fail_reason" not in trial.user_attrs:
                why = self.signals.name() if isinstance(err, KeyboardInterrupt) else type(err).__name__
                trial.set_user_attr("fail_reason", f"{INTERRUPTED} ({why})")
            frozen = self._tell(trial, None, optuna.trial.TrialState.FAIL)
            retry_trial(self.study, frozen, self.liveness.stale.max_retry)
            self.on_abandoned(frozen)

    def _tell(self, trial: Any, value: Any, state: Any) -> Any:
        frozen = self.study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None,
                                 state=state, skip_if_finished=True)
        if frozen.state != state and state != optuna.trial.TrialState.FAIL:
            _log(f"trial {trial.number} was failed as stale by another worker; its result is dropped "
                 f"(a retry with the same parameters runs instead)")
        return frozen


def _record_failure(trial: Any, err: Exception) -> None:
    """Keep the reason of a failure the objective did not record itself (and say it)."""
    if "fail_reason" in trial.user_attrs:
        return
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
    with contextlib.suppress(Exception):
        trial.set_user_attr("fail_reason", reason)
    _log(f"trial {trial.number} failed: {reason}")


def _log(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)
