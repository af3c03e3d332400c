"""MLflow tracking through the client API: one parent run per study, one child run per trial.

Our own logging (optuna-integration's MLflow callback is deprecated and logs no rungs): the
parent run holds the resolved config, overrides, search spaces, seeds, package versions and
the git commit; each child run holds the trial's parameters, per-rung metrics (step = items
evaluated), final state, merge and eval seconds and the recipe YAML.

Several workers: the parent is found by its ``mo.study`` tag or created, under the study's
join lock (``orchestrator.study.StudyLock``), so workers starting together make one parent.
Child runs match Optuna trials one to one (tag ``mo.trial``): a trial re-queued after its
worker died is a new trial with its own run, and the dead trial's run (left RUNNING by the
killed process, or FINISHED when the kill came between closing the run and storing the value)
is closed FAILED (tag ``mo.stale``) by the worker that fails the trial, or by ``reconcile``
when the study is finalised. Passwords in URLs are never logged: every param,
tag and text artifact goes through ``redact_text``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config import TrackingConfig
from orchestrator.errors import UserError
from orchestrator.study import redact, redact_text
from orchestrator.workers import INTERRUPTED

STUDY_TAG = "mo.study"
KIND_TAG = "mo.kind"
TRIAL_TAG = "mo.trial"
WORKER_TAG = "mo.worker"
MAX_PARAM_LEN = 6000
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def run_status(trial: Any) -> str:
    """The MLflow status of a finished Optuna trial (an interrupted one is KILLED)."""
    if trial.state.name == "FAIL" and str(trial.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED):
        return "KILLED"
    return RUN_STATUS.get(trial.state.name, "FAILED")


def check_tracking(cfg: TrackingConfig, runs_dir: Path) -> None:
    """Fail in one line if the tracking store cannot be reached; creates nothing."""
    if not cfg.enabled:
        return
    uri = cfg.uri or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"
    try:
        if uri.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:  # noqa: S310
                reply.read()
        elif uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).parent
            if not folder.is_dir():
                raise OSError(f"folder {folder} does not exist")
        elif "://" in uri and not uri.startswith(("file:", "databricks")):
            from orchestrator.study import check_storage

            check_storage(uri)
    except UserError as err:
        raise UserError(f"cannot reach MLflow tracking store {redact(uri)}: "
                        f"{str(err).split(': ', 1)[-1]}") from None
    except Exception as err:  # noqa: BLE001 - unreachable server, refused connection, ...
        raise UserError(f"cannot reach MLflow tracking store {redact(uri)}: "
                        f"{redact_text(' '.join(str(err).split()))[:200]}") from None


class Tracker:
    """Logs a study to MLflow; a disabled tracker accepts every call and does nothing."""

    def __init__(self, cfg: TrackingConfig, runs_dir: Path) -> None:
        self.enabled = cfg.enabled
        self.uri = cfg.uri or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"
        self.parent_id: str | None = None
        self.client = None
        if not self.enabled:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(cfg.experiment, runs_dir)

    def _experiment(self, name: str, runs_dir: Path) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = None
            if not self.uri.startswith(("http://", "https://", "databricks")):
                location = (runs_dir / "mlartifacts").resolve().as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:  # noqa: BLE001 - another worker created it first
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - unreachable server, bad URI, ...
            raise UserError(f"cannot reach MLflow tracking store {redact(self.uri)}: "
                            f"{' '.join(str(err).split())[:200]}") from None

    # --- study (parent) -------------------------------------------------------------------
    def start_study(self, study_name: str, params: Mapping[str, Any], artifacts: Mapping[str, Any]) -> str | None:
        """Find or create the study's parent run (call under the join lock); log params once."""
        if not self.enabled:
            return None
        existing = self._find_parent(study_name)
        if existing is not None:
            self.parent_id = existing
            self.client.update_run(existing, status="RUNNING")
            return existing
        run = self.client.create_run(self.experiment_id, run_name=f"study:{study_name}",
                                     tags={STUDY_TAG: study_name, KIND_TAG: "study"})
        self.parent_id = self._find_parent(study_name) or run.info.run_id
        if self.parent_id != run.info.run_id:  # no lock (another database kind) and lost a race
            self.client.delete_run(run.info.run_id)
            return self.parent_id
        self.log_params(self.parent_id, params)
        for name, value in artifacts.items():
            self.log_artifact_data(self.parent_id, name, value)
        return self.parent_id

    def _find_parent(self, study_name: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and "
                                                     f"tags.`{KIND_TAG}` = 'study'",
                                       order_by=["attributes.start_time ASC"], max_results=20)
        oldest = min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
        return oldest.info.run_id if oldest else None

    def end_study(self, status: str = "FINISHED") -> None:
        if self.enabled and self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def children(self, kind: str = "trial") -> list[Any]:
        """All child runs of the parent of one kind (``trial`` or ``baseline``)."""
        if not (self.enabled and self.parent_id):
            return []
        query = f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{KIND_TAG}` = '{kind}'"
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000,
                                           page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def close_stale_trial(self, trial: Any) -> None:
        """Mark FAILED the run of a killed worker's ``trial`` (now FAIL); make one if it had none.

        The run is usually left RUNNING; it is FINISHED when the worker died after closing the
        run but before storing the trial's value, and that value is lost with the worker.
        """
        if not (self.enabled and self.parent_id):
            return
        runs = [r for r in self.children() if r.data.tags.get(TRIAL_TAG) == str(trial.number)]
        for run in runs or [self._reconstruct(trial)]:
            if run.info.status != "FAILED":
                self.set_tags(run.info.run_id, {"mo.stale": "true",
                                                "fail_reason": "worker lost (no heartbeat); trial queued again"})
                self.end_trial(run.info.run_id, "FAILED")

    def sync_trial(self, trial: Any) -> None:
        """Give the runs of a finished trial its status (e.g. KILLED after an interrupt)."""
        self.reconcile([trial], force=True)

    def reconcile(self, trials: list[Any], force: bool = False) -> int:
        """Make child runs match finished trials one to one; returns how many runs it fixed.

        A finished trial without a run (its worker died or was interrupted between asking for
        it and opening its run) gets one; a run left RUNNING (or, with ``force``, any run whose
        status disagrees) gets the trial's status.
        """
        if not (self.enabled and self.parent_id):
            return 0
        by_trial: dict[str, list[Any]] = {}
        for run in self.children():
            by_trial.setdefault(run.data.tags.get(TRIAL_TAG, ""), []).append(run)
        fixed = 0
        for t in (t for t in trials if t.state.is_finished()):
            runs = by_trial.get(str(t.number)) or [self._reconstruct(t)]
            for run in runs:
                if run.info.status == "RUNNING" or (force and run.info.status != run_status(t)):
                    self.end_trial(run.info.run_id, run_status(t))
                    fixed += 1
        return fixed

    def _reconstruct(self, trial: Any) -> Any:
        run_id = self.start_trial(trial.number, {"method": trial.user_attrs.get("method", ""), **trial.params},
                                  worker=trial.user_attrs.get("worker"))
        self.set_tags(run_id, {"mo.reconstructed": "true",
                               **({"fail_reason": trial.user_attrs["fail_reason"]}
                                  if "fail_reason" in trial.user_attrs else {})})
        return self.client.get_run(run_id)

    # --- trials (children) ----------------------------------------------------------------
    def start_trial(self, number: int, params: Mapping[str, Any], kind: str = "trial",
                    name: str | None = None, worker: str | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {"mlflow.parentRunId": self.parent_id, KIND_TAG: kind, TRIAL_TAG: str(number)}
        if worker:
            tags[WORKER_TAG] = worker
        run = self.client.create_run(self.experiment_id, run_name=name or f"trial-{number}", tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(run_id, metrics=batch)

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Param

        flat = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i:i + 100])

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if self.enabled and run_id:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, redact_text(str(v))[:5000])

    def log_artifact_data(self, run_id: str | None, name: str, value: Any) -> None:
        """Log text (``.yaml``/``.md``/``.txt``), a dict (``.json``) or a file path."""
        if not (self.enabled and run_id):
            return
        if isinstance(value, Path):
            self.client.log_artifact(run_id, str(value))
        elif isinstance(value, str):
            self.client.log_text(run_id, redact_text(value), name)
        else:
            self.client.log_dict(run_id, json.loads(redact_text(json.dumps(value, default=str))), name)

    def log_figure(self, run_id: str | None, figure: Any, name: str) -> None:
        import warnings

        if self.enabled and run_id:
            with warnings.catch_warnings():  # Optuna's plots ask for a tight layout that long labels defeat
                warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
                self.client.log_figure(run_id, figure, name)

    def end_trial(self, run_id: str | None, status: str) -> None:
        """status: FINISHED (complete), KILLED (pruned or interrupted), FAILED."""
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status=status)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``study.sampler.name``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return redact_text(text)[:MAX_PARAM_LEN]


def git_commit(repo: Path) -> str:
    """The checkout's commit (with ``-dirty``), or ``unknown`` outside git."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "lm_eval", "optuna", "mlflow", "hydra-core", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
