"""Distributed sweeps: trials per minute with 1 and 2 workers, and storage overhead per trial.

    .venv/bin/python benchmarks/workers_bench.py                 # demo zoo, 30 trials, all storages
    .venv/bin/python benchmarks/workers_bench.py --zoo micro --trials 20 --storage-trials 60

Part 1 runs ``python -m orchestrator sweep`` as 1 and as 2 concurrent worker processes on one
study (PostgreSQL storage in a throwaway cluster when PostgreSQL is installed, else a journal
file; MLflow in a local SQLite store; no baselines, no best folder), each worker with
``eval.threads=1`` (``--threads 0``: cores / workers; tiny models run best on one thread each,
and more threads than cores stall on a shared machine). It reports the wall time from start to the last exit and
the trial rate over the trials' own window (first start to last end: without process start,
model load and the final confirm).

Part 2 measures what the storage costs per trial with a trivial objective, one process, side
by side for SQLite, a journal file and PostgreSQL: Optuna's bare ``ask``/``tell``, and the
orchestrator's worker loop (study lock, heartbeat, stale check, trial cap), each trial doing
3 ``suggest_float``, 3 ``report`` and 3 ``set_user_attr`` as a real one does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def zoo_args(zoo: str, scratch: Path) -> list[str]:
    """Overrides naming the demo (committed) or micro (built here) zoo's models."""
    if zoo == "demo":
        folder = ROOT / "demo_zoo"
        extra = []
    else:
        from orchestrator.zoo.build import build_zoo

        folder = build_zoo(scratch / "zoo-micro", micro=True, log=lambda *_: None)
        extra = ["experiment=debug"]
    return [*extra, "candidates.zoo=null", f"candidates.base={folder / 'base'}",
            f"candidates.models.knowledge={folder / 'knowledge'}",
            f"candidates.models.commonsense={folder / 'commonsense'}"]


def sweep_rate(workers: int, trials: int, storage: str, base: list[str], runs: Path, threads: int) -> dict:
    """Run ``workers`` sweep processes on one study; wall time and trials per minute."""
    import optuna

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    args = [*base, f"runs_dir={runs}", f"study.storage={storage}", f"study.n_trials={trials}",
            "study.baselines=false", "study.save_best=false", f"eval.threads={threads}", "study.name=bench"]
    start = time.perf_counter()
    command = [sys.executable, "-m", "orchestrator", "sweep", *args]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed ({proc.returncode}): {err[-2000:]}")
    wall = time.perf_counter() - start
    done = [t for t in optuna.load_study(study_name="bench", storage=_storage(storage)).trials
            if t.datetime_complete]
    window = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"workers": workers, "threads": threads, "trials": len(done), "wall_s": wall,
            "per_min_wall": 60 * len(done) / wall, "per_min_trials": 60 * len(done) / window}


def _storage(url: str):
    if url.startswith("journal://"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    return url


# ----------------------------------------------------------------------------- storage overhead


def _one_trial(trial) -> float:
    xs = [trial.suggest_float(f"x{i}", 0, 1) for i in range(3)]
    for step, x in enumerate(xs):
        trial.report(x, step)
        trial.set_user_attr(f"a{step}", x)
    return sum(xs)


def bare_loop(url: str, n: int) -> float:
    """Seconds per trial of Optuna's ask/tell alone (heartbeats off)."""
    import optuna

    storage = _storage(url) if url.startswith("journal") else optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="bare", storage=storage, sampler=optuna.samplers.RandomSampler(0))
    start = time.perf_counter()
    for _ in range(n):
        trial = study.ask()
        study.tell(trial, _one_trial(trial))
    return (time.perf_counter() - start) / n


def worker_loop(url: str, n: int) -> float:
    """Seconds per trial of the orchestrator's worker loop (lock, heartbeat, stale check, cap)."""
    import optuna

    from orchestrator.study.group import StudyGroup
    from orchestrator.study.storage import JOIN, StudyLock, make_storage, open_study, storage_kind
    from orchestrator.study.workers import Liveness, Signals, StaleTrials, Worker

    stale = StaleTrials(3)
    with StudyLock(url, JOIN):
        storage = make_storage(url, 30, None, stale if storage_kind(url) != "journal" else None)
        study = open_study("loop", storage, optuna.samplers.RandomSampler(0), None, ["minimize"])
    group = StudyGroup("loop", study, {None: study})
    worker = Worker(group, StudyLock(url, "loop"), Liveness(storage, 30, None, stale, "bench"), Signals(), n)
    start = time.perf_counter()
    worker.run(lambda trial, method: _one_trial(trial))
    return (time.perf_counter() - start) / n


def storage_urls(scratch: Path, stack: ExitStack) -> dict[str, str]:
    urls = {"sqlite": f"sqlite:///{scratch / 'bench.db'}", "journal file": f"journal://{scratch / 'bench.log'}"}
    try:
        from tests import pg

        if pg.available():
            cluster = stack.enter_context(pg.postgres_server(dbnames=("bench", "loop")))
            urls["postgresql"] = cluster["bench"]
            urls["postgresql (loop)"] = cluster["loop"]
    except RuntimeError as err:
        print(f"PostgreSQL skipped: {err}")
    return urls


def storage_overhead(scratch: Path, n: int) -> list[tuple[str, float, float]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with ExitStack() as stack:
        urls = storage_urls(scratch, stack)
        for name, url in urls.items():
            if name.endswith("(loop)"):
                continue
            loop_url = urls.get(f"{name} (loop)") or url.replace("bench.", "loop.")
            rows.append((name, bare_loop(url, n), worker_loop(loop_url, n)))
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("demo", "micro"), default="demo")
    parser.add_argument("--trials", type=int, default=30, help="trials per sweep (part 1)")
    parser.add_argument("--storage-trials", type=int, default=100, help="trials per storage (part 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (0: cores / workers)")
    parser.add_argument("--skip-sweep", action="store_true", help="part 2 only")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    scratch = Path(tempfile.mkdtemp(prefix="mo-workers-bench-"))
    try:
        print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}\n")
        if not args.skip_sweep:
            print_sweeps(args, scratch)
        print_overhead(scratch, args.storage_trials)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def print_sweeps(args: argparse.Namespace, scratch: Path) -> None:
    base = zoo_args(args.zoo, scratch)
    with ExitStack() as stack:
        from tests import pg

        cluster = stack.enter_context(pg.postgres_server(dbnames=("w1", "w2"))) if pg.available() else None
        rows = []
        for workers in (1, 2):
            storage = cluster[f"w{workers}"] if cluster else f"journal://{scratch / f'w{workers}.log'}"
            rows.append(sweep_rate(workers, args.trials, storage, base, scratch / f"runs{workers}", args.threads))
    kind = "PostgreSQL" if cluster else "journal file"
    print(f"### Sweep throughput ({args.zoo} zoo, {args.trials} trials, {kind} storage)\n")
    print("| workers | torch threads each | trials | wall s (start to last exit) | trials/min (wall) "
          "| trials/min (trial window) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['threads']} | {r['trials']} | {r['wall_s']:.1f} | {r['per_min_wall']:.1f} "
              f"| {r['per_min_trials']:.1f} |")
    print()


def print_overhead(scratch: Path, n: int) -> None:
    rows = storage_overhead(scratch, n)
    print(f"### Storage overhead per trial ({n} trials, trivial objective: 3 suggest, 3 report, "
          "3 set_user_attr; one process)\n")
    print("| storage | Optuna ask/tell, ms/trial | orchestrator worker loop, ms/trial |\n|---|---|---|")
    for name, bare, loop in rows:
        print(f"| {name} | {1000 * bare:.1f} | {1000 * loop:.1f} |")


if __name__ == "__main__":
    main()
