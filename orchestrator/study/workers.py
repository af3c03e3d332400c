"""The worker loop: many workers, one study.

Every worker runs the same command against the same storage URL.

* **Joining** (storage schema, study, first enqueued trial, MLflow parent run) happens under a
  lock, so workers starting at the same moment on a fresh database create everything once:
  a PostgreSQL advisory lock, or ``flock`` on ``<file>.mo-lock`` next to a SQLite database or
  a journal file.
* **Trials** are pulled one at a time (``ask`` under the study's lock, so the total never
  overshoots ``n_trials``; in a fair comparison from the method with the fewest trials
  started, ``group.StudyGroup.next_member``), evaluated with no barrier between workers, and
  told back. Evaluating and telling are one critical block: once a trial's evaluation is
  finished, a signal cannot keep it from being told COMPLETE (the worker stops right after).
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
from collections.abc import Callable, Iterator
from typing import Any

import optuna

from orchestrator.study import records
from orchestrator.study.group import StudyGroup, running, superseded
from orchestrator.study.records import INTERRUPTED
from orchestrator.study.storage import StudyLock, warn

BEAT_ATTR = "mo.heartbeat"     # journal storages: last beat (unix time) of a running trial
WORKER_ATTR = "mo.worker"      # the worker that runs a trial (host:pid)


def retry_trial(study: Any, trial: Any, max_retry: int | None) -> bool:
    """Queue a copy of a failed trial with the same parameters; False past ``max_retry``.

    Same bookkeeping as Optuna's ``RetryHeartbeatStaleTrialCallback`` (``failed_trial`` and
    ``retry_history`` system attributes, so its ``retried_trial_number`` works); the copy keeps
    the trial's merge, not the results of the failed attempt (``records.for_retry``).
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
        user_attrs=records.for_retry(trial),
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
            warn(f"trial {records.number_of(trial)} lost its worker (no heartbeat): failed, queued again")


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
        """The storage's id of Optuna trial ``number`` of ``study``."""
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

    def fail_stale(self, group: StudyGroup) -> None:
        """Mark the silent running trials of other workers FAIL and queue them again."""
        for study in group.members.values():
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

    ``objective(trial, method)`` runs one trial (``method``: the member's method in a fair
    comparison, None when the objective samples it). ``on_abandoned(frozen_trial)`` is called
    after a trial was given up on an interrupt (told FAIL and queued again), e.g. to mark its
    MLflow run KILLED.
    """

    def __init__(self, group: StudyGroup, lock: StudyLock, liveness: Liveness, signals: Signals,
                 n_trials: int, timeout_s: float | None = None,
                 on_abandoned: Callable[[Any], None] | None = None) -> None:
        self.group = group
        self.lock = lock
        self.liveness = liveness
        self.signals = signals
        self.n_trials = n_trials
        self.timeout_s = timeout_s
        self.on_abandoned = on_abandoned or (lambda trial: None)
        self.ran = 0
        self.timed_out = False

    def run(self, objective: Callable[[Any, str | None], Any]) -> int:
        """Run trials; returns how many this worker ran."""
        start = time.monotonic()
        while True:
            with self.lock:
                self.liveness.fail_stale(self.group)
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                self.timed_out = True
                return self.ran
            if self._attempt(objective):
                continue
            if not self.group.running():
                return self.ran
            time.sleep(min(max(self.liveness.heartbeat_s / 2, 0.5), 10))  # wait for the others

    def _attempt(self, objective: Callable[[Any, str | None], Any]) -> bool:
        """Ask, evaluate and tell one trial; False when the study needs no more trials now.

        Evaluating and telling are one critical block: the objective opens ``interruptible()``
        windows around its compute, so a signal stops a merge or a rung at once, but one that
        arrives once the evaluation is over is held until the trial is told COMPLETE. An
        interrupt before that abandons the trial cleanly (``_abandon``).
        """
        asked, beat, told = None, None, False
        try:
            with self.signals.critical():
                asked = self._ask()
                if asked is None:
                    return False
                method, study, trial = asked
                beat = self.liveness.start(study, trial)
            with self.signals.critical():
                value, state = self._evaluate(trial, method, objective)
                beat.stop()
                self._tell(study, trial, value, state)
                told = True
                self.ran += 1
            return True
        except BaseException as err:
            if asked is not None and not told:
                self._abandon(asked[1], asked[2], beat, err)
            raise

    def _ask(self) -> tuple[str | None, Any, Any] | None:
        with self.lock:
            where = self.group.next_member(self.n_trials)
            if where is None:
                return None
            method, study = where
            with warnings.catch_warnings():  # "heartbeat is meant for optimize": we beat ourselves
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask()
            records.set_number(trial, self.group.next_number())
            return method, study, trial

    @staticmethod
    def _evaluate(trial: Any, method: str | None, objective: Callable[[Any, str | None], Any]) -> tuple[Any, Any]:
        states = optuna.trial.TrialState
        try:
            return objective(trial, method), states.COMPLETE
        except optuna.TrialPruned:
            return None, states.PRUNED
        except Exception as err:  # noqa: BLE001 - a failing trial never stops the study
            _record_failure(trial, err)
            return None, states.FAIL

    def _abandon(self, study: Any, trial: Any, beat: Beat | None, err: BaseException) -> None:
        """Interrupted: tell the trial FAIL (reason kept), queue it again, notify."""
        with self.signals.critical():
            if beat is not None:
                beat.stop()
            if not records.reason_of(trial):
                why = self.signals.name() if isinstance(err, KeyboardInterrupt) else type(err).__name__
                records.set_reason(trial, f"{INTERRUPTED} ({why})")
            frozen = self._tell(study, trial, None, optuna.trial.TrialState.FAIL)
            with self.lock:
                retry_trial(study, frozen, self.liveness.stale.max_retry)
            self.on_abandoned(frozen)

    @staticmethod
    def _tell(study: Any, trial: Any, value: Any, state: Any) -> Any:
        frozen = study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None,
                            state=state, skip_if_finished=True)
        if frozen.state != state and state != optuna.trial.TrialState.FAIL:
            warn(f"trial {records.number_of(frozen)} was failed as stale by another worker; its result is "
                 "dropped (a retry with the same parameters runs instead)")
        return frozen


def _record_failure(trial: Any, err: Exception) -> None:
    """Keep the reason of a failure the objective did not record itself (and say it)."""
    if records.reason_of(trial):
        return
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
    with contextlib.suppress(Exception):
        records.set_reason(trial, reason)
    warn(f"trial {records.number_of(trial)} failed: {reason}")
