"""MLflow runs through the client API: one parent run per study, one child run per trial.

Our own logging (optuna-integration's MLflow callback is deprecated and logs no rungs): the
parent run holds the resolved config, overrides, search spaces, seeds, package versions, the
git commit and, at the end, the verdict; each child run holds a trial's parameters (with
method-neutral names: ``weight.knowledge``, not Optuna's ``ties.knowledge.weight``, so that
parallel coordinates compare one parameter across methods), its rung scores (``rung_score``, step = items
evaluated), its final state, merge and eval seconds and the recipe YAML.

How a trial ends reads right in the UI: a complete trial is FINISHED with ``score`` (the full
search split); a pruned one is FINISHED too, tagged ``mo.state=pruned`` and ``mo.pruned_at``,
with no ``score`` (so sorting by score never mixes partial evaluations in); a failed one is
FAILED and an interrupted one KILLED, each with its reason.

Several workers: the parent is found by its ``mo.study`` tag or created under the study's join
lock, so workers starting together make one parent. Child runs match trials one to one (tag
``mo.trial``, the study-wide trial number): a trial re-queued after its worker died is a new
trial with its own run, and the dead trial's run is closed FAILED (tag ``mo.stale``). Passwords
in URLs are never logged: every param, tag and text artifact goes through ``redact_text``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError, redact_text
from orchestrator.study import records
from orchestrator.study.records import Rung, State, TrialRecord
from orchestrator.tracking.store import (
    ARTIFACTS_DIR,
    PROXY_SCHEME,
    LocalArtifacts,
    artifact_location,
    is_remote,
    tracking_uri,
)

STUDY_TAG, KIND_TAG, TRIAL_TAG, WORKER_TAG = "mo.study", "mo.kind", "mo.trial", "mo.worker"
STATE_TAG, METHOD_TAG = "mo.state", "mo.method"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # opens on Runs, not Traces
MAX_PARAM_LEN = 6000
RUN_STATUS = {State.COMPLETE: "FINISHED", State.PRUNED: "FINISHED", State.FAILED: "FAILED",
              State.INTERRUPTED: "KILLED", State.RUNNING: "RUNNING", State.WAITING: "SCHEDULED"}


class Tracker:
    """Logs a study to MLflow (see the module docstring); ``NullTracker`` when tracking is off.

    Args:
        uri: the tracking URI (None: ``sqlite:///<runs_dir>/mlflow.db``).
        experiment: the experiment name.
        runs_dir: the runs folder (a local store keeps its artifacts in ``mlartifacts`` there).
        model_names: the candidates' names, for method-neutral parameter names.
    """

    enabled = True

    def __init__(self, uri: str | None, experiment: str, runs_dir: Path, model_names: Sequence[str] = ()) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri(uri, runs_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.local = None if is_remote(self.uri) else LocalArtifacts(runs_dir.resolve() / ARTIFACTS_DIR)
        self.model_names = list(model_names)
        self.parent_id: str | None = None
        self.study: str | None = None
        self._runs: dict[int, str] = {}  # trial number -> run id, for runs this process opened
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = artifact_location(name) if self.local else None
                try:
                    exp_id = self.client.create_experiment(name, artifact_location=location,
                                                           tags=dict([EXPERIMENT_KIND]))
                except Exception:  # noqa: BLE001 - another worker created it first
                    exp_id = self.client.get_experiment_by_name(name).experiment_id
                exp = self.client.get_experiment(exp_id)
            if exp.tags.get(EXPERIMENT_KIND[0]) is None:
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        except Exception as err:  # noqa: BLE001 - unreachable server, bad URI, ...
            raise UserError(f"cannot reach MLflow tracking store {redact_text(self.uri)}: "
                            f"{' '.join(str(err).split())[:200]}") from None

    # --- the study's parent run --------------------------------------------------------------
    def start_study(self, study_name: str, params: Mapping[str, Any], artifacts: Mapping[str, Any]) -> str:
        """Find or create the study's parent run (call under the join lock); log params once."""
        self.study = study_name
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
            self.log_artifact(self.parent_id, name, value)
        return self.parent_id

    def _find_parent(self, study_name: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and "
                                                     f"tags.`{KIND_TAG}` = 'study'",
                                       order_by=["attributes.start_time ASC"], max_results=20)
        oldest = min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
        return oldest.info.run_id if oldest else None

    def end_study(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def children(self, kind: str = "trial") -> list[Any]:
        """All child runs of the parent of one kind (``trial`` or ``baseline``)."""
        if not self.parent_id:
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

    # --- trials (TrialListener) -----------------------------------------------------------------
    def trial_started(self, record: TrialRecord) -> None:
        self._runs[record.number] = self._open_trial_run(record)

    def trial_rung(self, record: TrialRecord, rung: Rung) -> None:
        run_id = self._runs.get(record.number)
        self.log_metrics(run_id, {"rung_score": rung.score, **{f"rung.{k}": v for k, v in rung.components.items()}},
                         step=rung.n_items)

    def trial_finished(self, record: TrialRecord) -> None:
        run_id = self._runs.pop(record.number, None)
        if run_id is None:
            return
        self._close_trial_run(run_id, record)

    def _open_trial_run(self, record: TrialRecord) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, KIND_TAG: "trial", TRIAL_TAG: str(record.number),
                METHOD_TAG: record.method, STUDY_TAG: self.study}
        if record.worker:
            tags[WORKER_TAG] = record.worker
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{record.number} {record.method}",
                                     tags=tags)
        params = {"method": record.method, **neutral_params(record.params, self.model_names)}
        self.log_params(run.info.run_id, params)
        if record.recipe is not None:
            import yaml

            self.log_artifact(run.info.run_id, "recipe.yaml", yaml.safe_dump(dict(record.recipe), sort_keys=False))
        return run.info.run_id

    def _close_trial_run(self, run_id: str, record: TrialRecord) -> None:
        """The run's final metrics, tags and status from the trial's record."""
        tags: dict[str, Any] = {STATE_TAG: record.state.value}
        metrics: dict[str, float | None] = {"merge_s": record.merge_s, "eval_s": record.eval_s}
        if record.state is State.COMPLETE:
            last = record.last
            metrics["score"] = record.value
            if last is not None:
                metrics.update({k: v for k, v in last.components.items()}, stderr=last.stderr,
                               items_per_s=last.n_items / max(record.eval_s or 0, 1e-9) if record.eval_s else None)
        if record.state is State.PRUNED:
            tags["mo.pruned_at"] = record.pruned_at
        if record.duplicate_of is not None:
            tags["duplicate_of"] = record.duplicate_of
        if record.reason and record.state is not State.COMPLETE:
            tags["fail_reason" if record.state in (State.FAILED, State.INTERRUPTED) else "mo.reason"] = record.reason
        self.log_metrics(run_id, metrics)
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status=RUN_STATUS[record.state])

    def log_baseline(self, name: str, recipe: Mapping[str, Any], rung: Rung) -> None:
        """A child run for a baseline (a parent model alone, the uniform average)."""
        run = self.client.create_run(self.experiment_id, run_name=f"baseline:{name}",
                                     tags={"mlflow.parentRunId": self.parent_id, KIND_TAG: "baseline",
                                           TRIAL_TAG: "-1", METHOD_TAG: "baseline", STATE_TAG: "complete",
                                           STUDY_TAG: self.study})
        self.log_params(run.info.run_id, {"method": recipe.get("merge_method", ""), "baseline": name})
        self.log_metrics(run.info.run_id, {"score": rung.score, **rung.components})
        self.client.set_terminated(run.info.run_id, status="FINISHED")

    def logged_baselines(self) -> set[str]:
        return {r.info.run_name.removeprefix("baseline:") for r in self.children("baseline")}

    # --- runs of trials that ended elsewhere ------------------------------------------------------
    def close_stale_trial(self, trial: Any) -> None:
        """Mark FAILED the run of a killed worker's ``trial`` (now FAIL); make one if it had none.

        The run is usually left RUNNING; it is FINISHED when the worker died after closing the
        run but before storing the trial's value, and that value is lost with the worker.
        """
        number = records.number_of(trial)
        runs = [r for r in self.children() if r.data.tags.get(TRIAL_TAG) == str(number)]
        for run in runs or [self._reconstruct(records.load(trial))]:
            if run.info.status != "FAILED":
                self.set_tags(run.info.run_id, {"mo.stale": "true", STATE_TAG: "failed",
                                                "fail_reason": "worker lost (no heartbeat); trial queued again"})
                self.client.set_terminated(run.info.run_id, status="FAILED")

    def sync_trial(self, trial: Any) -> None:
        """Give the run of a finished trial its status (e.g. KILLED after an interrupt)."""
        self.reconcile([records.load(trial)], force=True)

    def reconcile(self, trial_records: Sequence[TrialRecord], force: bool = False) -> int:
        """Make child runs match finished trials one to one; returns how many runs it fixed.

        A finished trial without a run (its worker died or was interrupted between asking for
        it and opening its run) gets one; a run left RUNNING (or, with ``force``, any run whose
        status disagrees) gets the trial's status.
        """
        by_trial: dict[str, list[Any]] = {}
        for run in self.children():
            by_trial.setdefault(run.data.tags.get(TRIAL_TAG, ""), []).append(run)
        fixed = 0
        for record in (r for r in trial_records if r.state.finished):
            for run in by_trial.get(str(record.number)) or [self._reconstruct(record)]:
                if run.info.status == "RUNNING" or (force and run.info.status != RUN_STATUS[record.state]):
                    self._close_trial_run(run.info.run_id, record)
                    fixed += 1
        return fixed

    def _reconstruct(self, record: TrialRecord) -> Any:
        run_id = self._open_trial_run(record)
        self.set_tags(run_id, {"mo.reconstructed": "true"})
        return self.client.get_run(run_id)

    # --- plain logging --------------------------------------------------------------------------
    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float | None], step: int = 0) -> None:
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        flat = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i:i + 100])

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if run_id:
            for k, v in tags.items():
                if v is not None:
                    self.client.set_tag(run_id, k, redact_text(str(v))[:5000])

    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    def log_artifact(self, run_id: str | None, name: str, value: Any) -> None:
        """Log text (``.yaml``/``.md``/``.html``...), a dict (``.json``), a file or a folder (Path)."""
        if not run_id:
            return
        uri = self.artifact_uri(run_id)
        if isinstance(value, str):
            value = redact_text(value)
        elif not isinstance(value, Path):
            value = json.loads(redact_text(json.dumps(value, default=str)))
        if self.local is not None and uri.startswith(PROXY_SCHEME):
            (self.local.copy if isinstance(value, Path) else
             self.local.write_text if isinstance(value, str) else self.local.write_json)(uri, name, value)
        elif isinstance(value, Path):
            parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
            (self.client.log_artifacts if value.is_dir() else self.client.log_artifact)(
                run_id, str(value), *([name] if value.is_dir() else [parent]))
        elif isinstance(value, str):
            self.client.log_text(run_id, value, name)
        else:
            self.client.log_dict(run_id, value, name)

    def log_figure(self, run_id: str | None, figure: Any, name: str) -> None:
        """A matplotlib figure as an image, saved with a tight bounding box (no label cut off)."""
        if not run_id:
            return
        uri = self.artifact_uri(run_id)
        if self.local is not None and uri.startswith(PROXY_SCHEME):
            self.local.write_figure(uri, name, figure)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(name).name
                figure.savefig(path, bbox_inches="tight", dpi=110)
                parent = str(Path(name).parent) if Path(name).parent != Path(".") else None
                self.client.log_artifact(run_id, str(path), parent)


class NullTracker:
    """Tracking off: every call is accepted and does nothing."""

    enabled = False
    parent_id = None
    uri = None

    def __getattr__(self, name: str) -> Any:
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> Any:
    return None


def neutral_params(params: Mapping[str, Any], model_names: Sequence[str]) -> dict[str, Any]:
    """Optuna's method-prefixed names as names every method shares.

    ``ties.knowledge.weight`` -> ``weight.knowledge``; ``ties.lambda`` -> ``lambda``;
    gradient points keep their index (``ties.knowledge.weight.0`` -> ``weight.knowledge.0``).
    So parallel coordinates and scatter plots compare one parameter across methods.
    """
    names = set(model_names)
    out: dict[str, Any] = {}
    for key, value in params.items():
        parts = key.split(".")
        if key == "method" or len(parts) < 2:
            continue
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] in names:  # per model: model.param[.i]
            out[".".join([rest[1], rest[0], *rest[2:]])] = value
        else:
            out[".".join(rest)] = value
    return out


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
