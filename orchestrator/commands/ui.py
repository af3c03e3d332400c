"""``ui [--study NAME] [--port N]``: the MLflow UI for the project's store, on 127.0.0.1.

Runs ``mlflow server`` over ``RUNS_DIR/mlflow.db`` with the artifacts of ``RUNS_DIR/mlartifacts``
(so a ``runs/`` folder moved or copied elsewhere still shows every artifact), and prints the URL
that opens the study's runs in MLflow's model-training view. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.tracking.ui import server_command, study_url


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", default=None, help="open this study's runs (default: the experiment)")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--runs-dir", default="runs", help="the sweep's runs_dir (default: runs)")
    parser.add_argument("--experiment", default="merge-orchestrator", help="tracking.experiment of the sweeps")


def run(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    db = runs_dir / "mlflow.db"
    if not db.is_file():
        raise UserError(f"no MLflow store in {runs_dir} (no mlflow.db): run a sweep first, or pass --runs-dir")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    experiment_id = _experiment_id(db, args.experiment, args.study)
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(server_command(None, runs_dir, args.port), env=_env())
    try:
        _wait_healthy(base, proc)
        print(f"MLflow UI: {study_url(base, experiment_id, args.study)}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=20)
        return 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _experiment_id(db: Path, experiment: str, study: str | None) -> str | None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no experiment {experiment!r} in {db}; pass --experiment (the sweep's tracking.experiment)")
    if study is not None:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`mo.study` = '{study}'", max_results=1)
        if not found:
            raise UserError(f"no study {study!r} in experiment {experiment!r} of {db}")
    return exp.experiment_id


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with code {proc.returncode} (is port {base.rsplit(':', 1)[1]} free?)")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:  # noqa: S310
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    print(f"warning: {base} not healthy after {timeout:.0f}s", file=sys.stderr)
