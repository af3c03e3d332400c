"""What a study ends with: the fair comparison, its statistics and files, the MLflow review.

One micro-zoo sweep (module fixture) comparing three methods, then: equal budgets, seeds of
random methods, the statistics recomputed from ``confirm_items.csv`` alone, the parent run's
note, the best trial's tag, the Model Registry, ``export`` byte-identical to ``best/``,
``compare``, and the store moved to another folder still serving its artifacts through
``python -m orchestrator ui``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.report import stats
from orchestrator.study import records
from orchestrator.sweep.run import run_sweep
from tests import pg

pytestmark = pytest.mark.slow
METHODS = "method.methods=[task_arithmetic,ties,dare_ties]"


def overrides(micro_zoo: Path, runs: Path, *extra: str) -> list[str]:
    return ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", f"candidates.base={micro_zoo / 'base'}",
            f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
            f"candidates.models.commonsense={micro_zoo / 'commonsense'}", METHODS, "eval.rungs=[10,30]",
            "eval.confirm_seeds=3", "study.pruner.n_startup_trials=1", "study.pruner.reduction_factor=2",
            "tracking.prompts=[the dog eats]", "tracking.max_new_tokens=4", *extra]


@pytest.fixture(scope="module")
def study(micro_zoo, tmp_path_factory):
    runs = tmp_path_factory.mktemp("review") / "runs"
    args = overrides(micro_zoo, runs, "study.n_trials=10")
    out = io.StringIO()
    outcome = run_sweep(load_config(args), args, out=out)
    return runs, outcome, out.getvalue()


def client(runs: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")


def group(runs: Path):
    from orchestrator.study.group import load_group
    from orchestrator.study.storage import make_storage

    return load_group(make_storage(f"sqlite:///{runs / 'optuna.db'}"), "debug")


# ----------------------------------------------------------------------------- fair budgets


def test_every_method_gets_the_same_number_of_trials_and_its_own_study(study):
    runs, outcome, _ = study
    g = group(runs)
    assert set(g.members) == {"task_arithmetic", "ties", "dare_ties"}
    started = Counter(r.method for r in g.records())
    assert sum(started.values()) == 10 and max(started.values()) - min(started.values()) <= 1
    for method, optuna_study in g.members.items():  # each method's trials live in its own study
        assert {records.load(t).method for t in optuna_study.trials} == {method}
    summary = outcome.summary
    assert {m: e["trials"]["started"] for m, e in summary["methods"].items()} == dict(started)


def test_a_resume_keeps_the_shares_equal(study, micro_zoo, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(study[0], runs)
    args = overrides(micro_zoo, runs, "study.n_trials=14")
    run_sweep(load_config(args), args, out=io.StringIO())
    started = Counter(r.method for r in group(runs).records())
    assert sum(started.values()) == 14 and max(started.values()) - min(started.values()) <= 1


def test_two_workers_keep_the_shares_equal(micro_zoo, tmp_path):
    runs = tmp_path / "runs"
    args = overrides(micro_zoo, runs, "study.n_trials=9", "study.baselines=false", "tracking=none",
                     "study.save_best=false", "study.heartbeat_s=2", "study.name=two")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", *args], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from orchestrator.study.group import load_group
    from orchestrator.study.storage import make_storage

    recs = load_group(make_storage(f"sqlite:///{runs / 'optuna.db'}"), "two").records()
    assert Counter(r.method for r in recs) == {"task_arithmetic": 3, "ties": 3, "dare_ties": 3}
    assert len({r.worker for r in recs}) == 2  # both workers pulled trials
    assert sorted(r.number for r in recs) == list(range(9))  # one study-wide numbering


# ----------------------------------------------------------------------------- seeds and statistics


def test_random_methods_are_confirmed_on_several_seeds_with_their_spread(study):
    runs, outcome, text = study
    dare = next(r for r in outcome.rows if r.method == "dare_ties")
    assert dare.confirm.seeds == (0, 1, 2) and len(set(dare.confirm.per_seed)) > 1  # other masks, other scores
    assert dare.confirm.score == pytest.approx(sum(dare.confirm.per_seed) / 3)
    entry = outcome.summary["methods"]["dare_ties"]
    assert entry["confirm_seeds"] == [0, 1, 2] and entry["confirm_spread"] > 0
    ta = next(r for r in outcome.rows if r.method == "task_arithmetic")
    assert ta.confirm.seeds == (0,)  # deterministic methods: one seed
    assert "mean of 3 seeds" in text


def test_the_best_folder_uses_the_seed_closest_to_the_mean(study):
    runs, outcome, _ = study
    best = outcome.best
    saved = json.loads((runs / "debug" / "best" / "scores.json").read_text())
    closest = min(zip(best.confirm.seeds, best.confirm.per_seed), key=lambda p: (abs(p[1] - best.confirm.score), p[0]))
    assert saved["seed"] == closest[0] == outcome.summary["best"]["seed"]


def test_the_statistics_can_be_recomputed_from_confirm_items_csv_alone(study):
    runs, outcome, _ = study
    rows: dict[str, list[tuple[str, str, float]]] = {}
    with open(runs / "debug" / "confirm_items.csv") as handle:
        for line in csv.DictReader(handle):
            rows.setdefault(line["row"], []).append((line["task"], line["item"], float(line["value"])))
    summary = json.loads((runs / "debug" / "summary.json").read_text())
    parent = summary["best_parent"]
    ref = sorted(rows[parent])
    for name, entry in {**summary["methods"]}.items():
        if "vs_best_parent" not in entry:
            continue
        mine = sorted(rows[f"best {name}"])
        tasks = [t for t, _, _ in mine]
        comp = stats.compare_paired([v for *_, v in mine], [v for *_, v in ref], tasks, seed=0)
        vs = entry["vs_best_parent"]
        assert vs["diff"] == pytest.approx(comp.diff, abs=1e-6)
        assert vs["ci95"] == pytest.approx([comp.ci_lo, comp.ci_hi], abs=1e-6)
        assert vs["p"] == pytest.approx(comp.p_value, abs=1e-6) and vs["test"] == comp.test
        assert entry["confirm"]["objective"] == pytest.approx(stats.objective([v for *_, v in mine], tasks), abs=1e-6)


def test_the_report_files_are_written(study):
    runs, _, _ = study
    folder = runs / "debug"
    html = (folder / "report.html").read_text()
    assert html.count("<svg") >= 3 and "Budget curves" in html and "Paired differences" in html
    assert "<script" not in html  # self-contained, no external files
    trials = list(csv.DictReader(open(folder / "trials.csv")))
    assert len(trials) == 10 and {"trial", "method", "state", "rungs", "merge_s", "eval_s"} <= set(trials[0])
    answers = (folder / "answers.md").read_text()
    assert "the dog eats" in answers and "parent:knowledge" in answers and "best " in answers


# ----------------------------------------------------------------------------- MLflow review


def test_the_parent_run_carries_the_verdict_and_the_best_trial_is_tagged(study):
    runs, outcome, _ = study
    c = client(runs)
    parent = c.get_run(outcome.parent_run_id)
    note = parent.data.tags["mlflow.note.content"]
    assert outcome.summary["verdict"] in note and str(runs / "debug" / "best") in note
    assert "from_pretrained" in note
    exp = c.get_experiment(parent.info.experiment_id)
    index = exp.tags["mlflow.note.content"]  # the experiment lists its studies, this one included
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "### [debug](#/experiments/" in index and outcome.parent_run_id in index
    assert outcome.summary["verdict"] in index and f"trial {outcome.best.trial} " in index
    for method in ("task_arithmetic", "ties", "dare_ties"):
        assert f"{method}.trials_complete" in parent.data.metrics
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    best = [r for r in children if r.data.tags.get("mo.best") == "true"]
    assert [int(r.data.tags["mo.trial"]) for r in best] == [outcome.best.trial]
    from orchestrator.tracking.store import LocalArtifacts

    folder = LocalArtifacts(runs / "mlartifacts").folder(parent.info.artifact_uri)  # what `ui` serves
    artifacts = {p.name for p in folder.iterdir()}
    assert {"summary.json", "report.html", "confirm_items.csv", "trials.csv", "comparison.md", "plots"} <= artifacts
    plots = {p.name for p in (folder / "plots").iterdir()}
    assert {"budget_curves.png", "optuna_interactive.html", "paired_differences.png"} <= plots


def test_pruned_trials_end_finished_and_only_full_evaluations_have_a_score(study):
    runs, outcome, _ = study
    c = client(runs)
    children = c.search_runs([c.get_run(outcome.parent_run_id).info.experiment_id], "tags.`mo.kind` = 'trial'")
    pruned = [r for r in children if r.data.tags.get("mo.state") == "pruned"]
    assert pruned, "the fixture's settings make successive halving prune"
    for run in pruned:
        assert run.info.status == "FINISHED" and "score" not in run.data.metrics
        assert int(run.data.tags["mo.pruned_at"]) > 0 and "rung_score" in run.data.metrics
        assert "weight.knowledge" in run.data.params and "ties.knowledge.weight" not in run.data.params


def test_the_best_merge_is_registered_with_alias_best(study):
    runs, outcome, _ = study
    c = client(runs)
    version = c.get_model_version_by_alias("merge-debug", "best")
    assert version.tags["mo.trial"] == str(outcome.best.trial) and version.tags["mo.method"] == outcome.best.method
    assert version.source.startswith("mlflow-artifacts:") and version.source.endswith("/best_model")


def test_a_new_best_adds_a_version_and_moves_the_alias(study, tmp_path):
    from orchestrator.tracking.registry import register_best
    from orchestrator.tracking.runs import Tracker

    runs, outcome, _ = study
    tracker = Tracker(None, "merge-orchestrator", runs)
    tracker.parent_id = outcome.parent_run_id
    before = len(tracker.client.search_model_versions("name='merge-debug'"))
    assert register_best(tracker, "debug", outcome.best_dir, outcome.summary) == "merge-debug@best"
    assert len(tracker.client.search_model_versions("name='merge-debug'")) == before  # same best: nothing new
    other = json.loads(json.dumps(outcome.summary))
    other["best"]["trial"], other["best"]["recipe"]["dtype"] = 999, "bfloat16"
    register_best(tracker, "debug", outcome.best_dir, other)
    assert len(tracker.client.search_model_versions("name='merge-debug'")) == before + 1
    assert tracker.client.get_model_version_by_alias("merge-debug", "best").tags["mo.trial"] == "999"


# ----------------------------------------------------------------------------- export, compare


def test_export_of_the_best_trial_is_byte_identical_to_best(study, tmp_path, capsys):
    runs, outcome, _ = study
    assert main(["export", "--study", "debug", "--runs-dir", str(runs), str(tmp_path / "exported")]) == 0
    best = runs / "debug" / "best"
    for name in ("model.safetensors", "config.json", "mergekit_config.yml", "tokenizer.json"):
        assert (tmp_path / "exported" / name).read_bytes() == (best / name).read_bytes(), name
    first = min(r.number for r in group(runs).records())
    assert main(["export", "--study", "debug", "--runs-dir", str(runs), "--trial", str(first),
                 str(tmp_path / "first")]) == 0
    assert load_file(tmp_path / "first" / "model.safetensors")
    assert main(["export", "--study", "debug", "--runs-dir", str(runs), "--trial", "999", str(tmp_path / "x")]) == 2
    assert "has no trial 999" in capsys.readouterr().err


def test_compare_prints_the_table_and_counts_wins_across_studies(study, micro_zoo, capsys):
    runs, _, _ = study
    args = overrides(micro_zoo, runs, "study.n_trials=6", "study.seed=1", "study.sampler.seed=1", "study.name=seed1")
    run_sweep(load_config(args), args, out=io.StringIO())
    assert main(["compare", "--study", "debug", "--study", "seed1", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "## debug" in out and "## seed1" in out and "Across 2 studies" in out
    combined = json.loads((runs / "comparisons" / "debug+seed1" / "summary.json").read_text())
    assert sum(e["wins"] for e in combined.values()) == 2 and all(e["studies"] == 2 for e in combined.values())


# ----------------------------------------------------------------------------- the UI


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310
        return reply.read()


def test_a_moved_store_still_serves_every_artifact_through_the_ui(study, tmp_path):
    runs, outcome, _ = study
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, moved)
    port = pg.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", "--runs-dir", str(moved), "--study",
                             "debug", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        line = ""
        end = time.monotonic() + 120
        while "MLflow UI:" not in line and time.monotonic() < end:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "ui exited"
        assert f"http://127.0.0.1:{port}/#/experiments/" in line and "workflowType=machine_learning" in line
        base = f"http://127.0.0.1:{port}"
        served = _get(f"{base}/get-artifact?path=comparison.md&run_uuid={outcome.parent_run_id}").decode()
        assert served == (moved / "debug" / "comparison.md").read_text()
        listing = json.loads(_get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={outcome.parent_run_id}"
                                  "&path=best_model"))
        assert any(f["path"].endswith("model.safetensors") for f in listing["files"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_experiment_note_lists_every_study_newest_first_within_mlflows_limit():
    """Several studies share one experiment: its description must not show only the last one
    (the demo's runs page was titled "Study demo-s2" while filtered to study demo)."""
    from types import SimpleNamespace as NS

    from orchestrator.tracking.review import NOTE_LIMIT, experiment_note

    def run(name, start, verdict=None):
        tags = {"mo.study": name, "mo.kind": "study"}
        if verdict:
            tags.update({"mo.verdict": verdict, "mo.best_merge": f"best of {name}"})
        return NS(info=NS(run_id=f"id-{name}", run_name=f"study:{name}", start_time=start),
                  data=NS(tags=tags))

    text = experiment_note([run("demo", 1, "demo verdict"), run("demo-s2", 3, "s2 verdict"),
                            run("running", 2)], "7")
    assert text.index("[demo-s2](#/experiments/7/runs/id-demo-s2)") < text.index("[running]") \
        < text.index("[demo](#/experiments/7/runs/id-demo)")
    assert "s2 verdict" in text and "demo verdict" in text and "best of demo" in text
    assert "no verdict yet" in text
    many = [run(f"s{i}", i, "v" * 500) for i in range(100)]
    text = experiment_note(many, "7")
    assert len(text) <= 20000 and "[s99]" in text and "[s0]" not in text and "older studies" in text
    assert len(text) <= NOTE_LIMIT + 100


def test_optuna_figures_stay_readable_with_many_parameters_and_trials():
    """A data-flow study (24+ parameters, 40 trials with rungs) made an 8000-pixel slice plot and
    an intermediate-values legend of every trial that squeezed the axes to nothing."""
    import io
    import warnings

    import optuna

    from orchestrator.report.plots import SLICE_MAX, close, optuna_figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        xs = [trial.suggest_float(f"p{i:02d}", 0, 1) for i in range(30)]
        for step in (60, 180):
            trial.report(xs[3] + 0.1 * xs[7] + step / 1e4, step)
        return xs[3] + 0.1 * xs[7]

    study.optimize(objective, n_trials=40)
    figures = dict(optuna_figures({"": study}, multi_objective=False))
    panels = [ax for ax in figures["slice"].axes if ax.get_xlabel().startswith("p")]
    assert len(panels) == SLICE_MAX and "p03" in {ax.get_xlabel() for ax in panels}
    assert all(ax.get_legend() is None for ax in figures["intermediate_values"].axes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        for fig in figures.values():
            fig.savefig(io.BytesIO(), bbox_inches="tight", dpi=50)
            close(fig)
