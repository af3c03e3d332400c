"""Many workers, one study: the join race, heartbeats and retries, SIGTERM/SIGKILL, passwords.

Real servers, started here: a throwaway PostgreSQL cluster (``tests/pg.py``) whose role ``mo``
needs a password over SCRAM, so every storage URL below carries a password that must never
show up in output or in MLflow; and, for one test, an ``mlflow server`` on that cluster.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from tests import pg

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not pg.available(), reason="PostgreSQL is not installed")]

PASSWORD = "Pw-7f3kq9ZxTq"
# Small rungs and a small confirm split keep an end-to-end worker to seconds.
SMALL_EVAL = ("eval.rungs=[10,30]", "eval.threads=1",
              "eval.tasks=[{name: demo_mmlu, metric: acc, search_split: validation, confirm_split: 'test[:15%]'}, "
              "{name: demo_hellaswag, metric: acc_norm, search_split: validation, confirm_split: 'test[:15%]'}]")
STATUS = {"COMPLETE": {"FINISHED"}, "PRUNED": {"FINISHED"}, "FAIL": {"FAILED", "KILLED"}}


@pytest.fixture(scope="module")
def cluster():
    with pg.postgres_server(dbnames=(), password=PASSWORD) as server:
        yield server


# ----------------------------------------------------------------------------- helpers


def sweep_args(micro_zoo: Path, runs: Path, *extra: str) -> list[str]:
    """The debug experiment with one sampler choosing the method (one Optuna study, ``debug``)."""
    return ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", "study.compare=free",
            f"candidates.base={micro_zoo / 'base'}", f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
            f"candidates.models.commonsense={micro_zoo / 'commonsense'}", *SMALL_EVAL, *extra]


def start_worker(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", *args], env=env,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def output(log: Path) -> str:
    return log.with_suffix(".out").read_text() + log.with_suffix(".err").read_text()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    rc = proc.wait(timeout=timeout)
    text = output(log)
    assert rc == 0, text[-3000:]
    return text


def storage_of(url: str) -> Any:
    if url.startswith("journal://"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    return url


def trials_of(url: str, name: str) -> list[Any]:
    return optuna.load_study(study_name=name, storage=storage_of(url)).get_trials()


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def mid_trial(url: str, name: str, after: int):
    """A trial (number >= after) that is running and has reported a rung."""
    def check():
        try:
            return next((t for t in trials_of(url, name) if t.state.name == "RUNNING"
                         and t.number >= after and t.intermediate_values), None)
        except KeyError:  # the study does not exist yet
            return None
    return check


def counted(trials: list[Any]) -> int:
    from orchestrator.study.group import counted as count

    return count(trials)


def record(trial: Any) -> Any:
    from orchestrator.study import records

    return records.load(trial)


def mlflow_runs(uri: str, experiment: str = "merge-orchestrator") -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=5000) if exp else []


def check_mlflow_matches(trials: list[Any], runs: list[Any]) -> Any:
    """One parent; one child per trial, under it, with the status of the trial; returns the parent."""
    parents = [r for r in runs if r.data.tags.get("mo.kind") == "study"]
    assert len(parents) == 1, [p.info.run_id for p in parents]
    children = [r for r in runs if r.data.tags.get("mo.kind") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    numbers = [int(r.data.tags["mo.trial"]) for r in children]
    assert sorted(numbers) == sorted(record(t).number for t in trials), "MLflow child runs != Optuna trials"
    status = {int(r.data.tags["mo.trial"]): r.info.status for r in children}
    for t in trials:
        n = record(t).number
        assert status[n] in STATUS[t.state.name], (n, t.state.name, status[n])
    return parents[0]


def assert_no_password(uri: str, texts: list[str], tmp: Path) -> None:
    """The password is in no output, and in no MLflow param, tag or text artifact."""
    from mlflow import MlflowClient

    for text in texts:
        assert PASSWORD not in text
    client = MlflowClient(tracking_uri=uri)
    runs = mlflow_runs(uri)
    assert runs
    for run in runs:
        blob = json.dumps([run.data.params, run.data.tags, run.info.run_name])
        assert PASSWORD not in blob, run.info.run_id
    kinds = {"study", "baseline"}
    for run in [r for r in runs if r.data.tags.get("mo.kind") in kinds][:2] + runs[:3]:
        if uri.startswith("http"):
            folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp / run.info.run_id)))
        else:  # a local store's artifacts are files the `ui` command's server serves
            from orchestrator.tracking.store import LocalArtifacts

            folder = LocalArtifacts(tmp / "runs" / "mlartifacts").folder(run.info.artifact_uri)
        for file in folder.rglob("*"):
            if file.is_file() and file.suffix != ".png":
                assert PASSWORD not in file.read_text(errors="replace"), file
    assert any(r.data.params.get("config.study.storage", "").count("***") for r in runs)


# ----------------------------------------------------------------------------- join race


def _join_child(cfg, overrides, barrier, queue) -> None:
    from orchestrator.study.candidates import Candidates
    from orchestrator.study.storage import storage_url
    from orchestrator.sweep.session import join
    from orchestrator.sweep.setup import Setup, load_spaces

    runs_dir = Path(cfg.runs_dir)
    c = cfg.candidates
    setup = Setup(runs_dir, load_spaces(cfg), None, None, storage_url(cfg.study.storage, runs_dir),
                  Candidates(dict(c.models), c.base), ["maximize"], cfg.study.n_trials, [None], first_rung=10,
                  fingerprint={"test": 1})
    barrier.wait()
    session = join(cfg, setup, overrides)
    queue.put((session.tracker.parent_id, session.baselines_mine))


@pytest.mark.parametrize("storage,tracking", [("postgresql", "sqlite"), ("postgresql", "postgresql"),
                                              ("journal", "sqlite"), ("sqlite", "sqlite")])
def test_workers_starting_together_on_fresh_stores_make_one_study_and_one_parent(
        cluster, micro_zoo, tmp_path, storage, tracking):
    from orchestrator.config import load_config

    tag = f"{storage[:4]}{tracking[:4]}"
    url = {"postgresql": lambda: cluster.create_database(f"race_{tag}"),
           "journal": lambda: f"journal://{tmp_path}/j.log",
           "sqlite": lambda: f"sqlite:///{tmp_path}/runs/optuna.db"}[storage]()
    uri = (cluster.create_database(f"mlf_{tag}") if tracking == "postgresql"
           else f"sqlite:///{tmp_path}/runs/mlflow.db")
    overrides = sweep_args(micro_zoo, tmp_path / "runs", f"study.storage={url}", f"tracking.uri={uri}")
    cfg = load_config(overrides)
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_join_child, args=(cfg, overrides, barrier, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len({parent for parent, _ in results}) == 1
    assert sum(mine for _, mine in results) == 1  # one worker computes the baselines
    assert len(optuna.get_all_study_summaries(storage_of(url))) == 1
    study = optuna.load_study(study_name="debug", storage=storage_of(url))
    assert study.user_attrs["mo.joins"] == 3  # each worker samples with its own seed
    assert study.user_attrs["mo.fingerprint"] == {"test": 1}  # written once, by the first
    assert len([r for r in mlflow_runs(uri) if r.data.tags.get("mo.kind") == "study"]) == 1


# ----------------------------------------------------------------------------- the worker loop


def _loop_child(url: str, slow_trial: int) -> None:
    from orchestrator.study.group import StudyGroup
    from orchestrator.study.storage import StudyLock, make_storage, open_study
    from orchestrator.study.workers import Liveness, Signals, StaleTrials, Worker

    stale = StaleTrials(3)
    storage = make_storage(url, 1, 3, stale if not url.startswith("journal") else None)
    study = open_study("loop", storage, optuna.samplers.RandomSampler(seed=1), None, ["maximize"])
    signals = Signals()
    signals.install()

    def objective(trial, method):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == slow_trial:
            with signals.interruptible():  # compute: where SIGTERM may cut in
                time.sleep(120)
        return x
    group = StudyGroup("loop", study, {None: study})
    Worker(group, StudyLock(url, "loop"), Liveness(storage, 1, 3, stale, "child"), signals, 6).run(objective)


def _run_loop(url: str, n: int) -> Any:
    from orchestrator.study.group import StudyGroup
    from orchestrator.study.storage import StudyLock, make_storage, open_study
    from orchestrator.study.workers import Liveness, Signals, StaleTrials, Worker

    stale = StaleTrials(3)
    storage = make_storage(url, 1, 3, stale if not url.startswith("journal") else None)
    study = open_study("loop", storage, optuna.samplers.RandomSampler(seed=2), None, ["maximize"])
    group = StudyGroup("loop", study, {None: study})
    Worker(group, StudyLock(url, "loop"), Liveness(storage, 1, 3, stale, "parent"), Signals(), n).run(
        lambda trial, method: trial.suggest_float("x", 0, 1))
    return study.get_trials()


@pytest.mark.parametrize("kind,sig", [("journal", signal.SIGKILL), ("sqlite", signal.SIGKILL),
                                      ("postgresql", signal.SIGKILL), ("journal", signal.SIGTERM)])
def test_a_killed_workers_trial_fails_and_is_retried_with_its_parameters(cluster, tmp_path, kind, sig):
    url = {"journal": f"journal://{tmp_path}/j.log", "sqlite": f"sqlite:///{tmp_path}/o.db",
           "postgresql": None}[kind] or cluster.create_database(f"loop_{kind}_{sig.name.lower()}")
    child = multiprocessing.get_context("fork").Process(target=_loop_child, args=(url, 2))
    child.start()
    slow = wait_for(lambda: next((t for t in _trials_or_empty(url) if t.number == 2 and t.params), None),
                    60, "the slow trial")
    os.kill(child.pid, sig)
    child.join(timeout=30)
    assert child.exitcode == (-9 if sig == signal.SIGKILL else 1)
    trials = _run_loop(url, 6)
    by_number = {t.number: t for t in trials}
    assert by_number[2].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == slow.params
    assert counted(trials) == 6 and len(trials) == 7
    assert not [t for t in trials if not t.state.is_finished()]


def _trials_or_empty(url: str) -> list[Any]:
    try:
        return trials_of(url, "loop")
    except (KeyError, Exception):  # noqa: BLE001 - not created yet
        return []


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mlflow_server(cluster, tmp_path_factory):
    """``mlflow server`` on the PostgreSQL cluster, bound to 127.0.0.1 on a free port."""
    import urllib.request

    port, folder = pg.free_port(), tmp_path_factory.mktemp("mlflow-server")
    store = cluster.create_database("mlflow_server")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
                             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, start_new_session=True,
                            stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
            return False
    wait_for(healthy, 90, "mlflow server", step=0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_two_workers_share_one_study_and_one_parent_run(cluster, mlflow_server, micro_zoo, tmp_path):
    url = cluster.create_database("two_workers")
    args = sweep_args(micro_zoo, tmp_path / "runs", f"study.storage={url}", f"tracking.uri={mlflow_server}",
                      "study.n_trials=20", "study.heartbeat_s=2")
    procs = [(start_worker(args, tmp_path / f"w{i}"), tmp_path / f"w{i}") for i in range(2)]
    texts = [finish(proc, log) for proc, log in procs]
    trials = trials_of(url, "debug")
    assert len(trials) == 20 and counted(trials) == 20
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), [record(t).reason for t in trials]
    assert len({record(t).number for t in trials}) == 20
    workers = {record(t).worker for t in trials if record(t).worker}
    assert len(workers) == 2, workers  # both pulled trials
    runs = mlflow_runs(mlflow_server)
    parent = check_mlflow_matches(trials, runs)
    assert parent.info.status == "FINISHED"
    assert len([r for r in runs if r.data.tags.get("mo.kind") == "baseline"]) == 3  # computed once
    assert sum("best merge:" in text for text in texts) == 1  # one worker writes the report
    assert (tmp_path / "runs" / "debug" / "best" / "scores.json").is_file()
    assert not list((tmp_path / "runs" / "debug").glob(".best*"))
    assert_no_password(mlflow_server, texts, tmp_path)


def interrupt_mid_trial(args: list[str], url: str, log: Path, sig: int, after: int) -> tuple[list[str], Any]:
    """Start a worker, signal it while a trial (number >= after) evaluates; returns (outputs, lost trial).

    A signal can land just after the trial ended (then no trial is lost): try again, at most 3 times.
    """
    texts = []
    for attempt in range(3):
        try:
            before = {t.number for t in trials_of(url, "debug") if t.state.name == "FAIL"}
        except KeyError:  # no study yet
            before = set()
        proc = start_worker(args, log.with_name(f"{log.name}{attempt}"))
        wait_for(mid_trial(url, "debug", after), 120, "a running trial")
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        texts.append(output(log.with_name(f"{log.name}{attempt}")))
        assert rc == (-9 if sig == signal.SIGKILL else 130), texts[-1][-3000:]
        trials = trials_of(url, "debug")
        lost = ([t for t in trials if t.state.name == "RUNNING"] if sig == signal.SIGKILL else
                [t for t in trials if t.state.name == "FAIL" and t.number not in before])
        if lost:
            assert len(lost) == 1
            return texts, lost[0]
    raise AssertionError("no trial was interrupted in 3 attempts")


def test_sigterm_then_sigkill_then_restart_loses_nothing(cluster, micro_zoo, tmp_path):
    url, uri = cluster.create_database("crash"), cluster.create_database("crash_mlflow")
    args = sweep_args(micro_zoo, tmp_path / "runs", f"study.storage={url}", f"tracking.uri={uri}",
                      "study.n_trials=10", "study.heartbeat_s=1", "study.grace_s=3", "study.pruner.name=none",
                      "study.baselines=false", "eval.rungs=[10,60]")
    # 1. SIGTERM mid-trial: the trial ends FAIL (interrupted), is queued again; its run, the parent: KILLED.
    texts, termed = interrupt_mid_trial(args, url, tmp_path / "a", signal.SIGTERM, 2)
    assert "interrupted (SIGTERM)" in texts[-1]
    assert record(termed).reason == "interrupted (SIGTERM)"
    trials = trials_of(url, "debug")
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(waiting) == 1 and waiting[0].params == termed.params
    parent = check_mlflow_matches([t for t in trials if t.state.is_finished()], mlflow_runs(uri))
    assert parent.info.status == "KILLED"
    # 2. SIGKILL mid-trial: nothing can run in the worker; the trial stays RUNNING in storage.
    more, killed = interrupt_mid_trial(args, url, tmp_path / "b", signal.SIGKILL, termed.number + 2)
    texts += more
    before = {t.number: t.values for t in trials_of(url, "debug") if t.state.name == "COMPLETE"}
    # 3. Restart: the stale trial is failed and retried with the same parameters; the study completes.
    texts.append(finish(start_worker(args, tmp_path / "c"), tmp_path / "c"))
    trials = trials_of(url, "debug")
    after = {t.number: t.values for t in trials}
    assert all(after[n] == v for n, v in before.items())
    assert {t.number: t for t in trials}[killed.number].state.name == "FAIL"
    for lost in (termed, killed):
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
        assert len(retry) == 1 and retry[0].params == lost.params and retry[0].state.is_finished()
    assert counted(trials) == 10 and len(trials) == 12
    assert all(t.state.is_finished() for t in trials)
    runs = mlflow_runs(uri)
    assert check_mlflow_matches(trials, runs).info.status == "FINISHED"
    status = {int(r.data.tags["mo.trial"]): r for r in runs if r.data.tags.get("mo.kind") == "trial"}
    assert status[termed.number].info.status == "KILLED"
    assert status[killed.number].info.status == "FAILED"
    assert status[killed.number].data.tags.get("mo.stale") == "true"
    assert_no_password(uri, texts, tmp_path)


def test_a_stale_trials_finished_run_is_marked_failed(tmp_path):
    """A worker killed after closing its run FINISHED but before ``tell``: the value is lost, the run FAILED."""
    from orchestrator.study import records
    from orchestrator.study.records import State, TrialRecord
    from orchestrator.tracking.runs import Tracker

    tracker = Tracker(None, "stale", tmp_path)
    tracker.start_study("stale", {}, {})
    for n, x in ((0, 0.5), (1, 0.7)):
        tracker.trial_started(TrialRecord(n, "linear", State.RUNNING, {"x": x}))
    closed, running = tracker._runs[0], tracker._runs[1]
    tracker.trial_finished(TrialRecord(0, "linear", State.COMPLETE, {"x": 0.5}, values=(0.5,)))
    study = optuna.create_study()
    for n, x in ((0, 0.5), (1, 0.7)):
        study.enqueue_trial({"x": x})
        trial = study.ask()
        records.set_number(trial, n)
        trial.suggest_float("x", 0, 1)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    for trial in study.get_trials():
        tracker.close_stale_trial(trial)
    runs = {r.data.tags["mo.trial"]: r for r in tracker.children()}
    assert {n: (r.info.status, r.data.tags.get("mo.stale")) for n, r in runs.items()} == {
        "0": ("FAILED", "true"), "1": ("FAILED", "true")}
    assert runs["0"].info.run_id == closed and runs["1"].info.run_id == running
