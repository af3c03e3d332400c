"""Opening the MLflow UI on a study: the server command and the URL of the study's runs.

``python -m orchestrator ui`` runs ``mlflow server`` on 127.0.0.1 over the project's store,
serving the artifacts of ``<runs_dir>/mlartifacts`` (the movable store of ``store.py``). The URL
opens the experiment's runs in MLflow's model-training view (``workflowType=machine_learning``;
the experiment is also tagged as model development, so it never opens on Traces), listing the
study's trials and baselines sorted by their full search score (pruned trials, which have no
``score``, come last); the verdict is the experiment's description above the table.
"""

from __future__ import annotations

import sys
import urllib.parse
from pathlib import Path

from orchestrator.tracking.store import ARTIFACTS_DIR, is_remote, tracking_uri


def server_command(uri: str | None, runs_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """``mlflow server`` over the local store, proxying its artifacts (one worker, no jobs)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(uri, runs_dir),
            "--artifacts-destination", str((runs_dir / ARTIFACTS_DIR).resolve()), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", "1"]


def study_url(base: str, experiment_id: str | None, study: str | None) -> str:
    """The runs page of the experiment, model-training view, filtered to one study's runs."""
    if experiment_id is None:
        return base.rstrip("/") + "/"
    query = {"workflowType": "machine_learning", "orderByKey": "metrics.`score`", "orderByAsc": "false"}
    if study:  # the trials and baselines, flat, best score first (the verdict is the experiment's note)
        query["searchFilter"] = f"tags.`mo.study` = '{study}' and tags.`mo.kind` != 'study'"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def ui_hint(uri: str | None, runs_dir: Path, experiment_id: str | None, study: str, port: int = 5000) -> str:
    """What the end of a sweep prints: how to open the study in the UI."""
    if uri and is_remote(uri):
        return f"MLflow UI: {study_url(uri, experiment_id, study)}"
    cmd = "python -m orchestrator ui" + (f" --runs-dir {runs_dir}" if Path(runs_dir) != Path("runs") else "")
    return (f"MLflow UI: `{cmd} --study {study}` then open "
            f"{study_url(f'http://127.0.0.1:{port}', experiment_id, study)}")
