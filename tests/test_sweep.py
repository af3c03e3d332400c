"""End-to-end sweeps on the micro zoo: Optuna storage, MLflow runs, pruning, resume, best merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from orchestrator.config import load_config
from orchestrator.study import records
from orchestrator.sweep.run import run_sweep

pytestmark = pytest.mark.slow


def sweep_config(micro_zoo: Path, runs: Path, *extra: str):
    overrides = ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null",
                 f"candidates.base={micro_zoo / 'base'}",
                 f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
                 f"candidates.models.commonsense={micro_zoo / 'commonsense'}", *extra]
    return load_config(overrides), overrides


def study_trials(runs: Path, name: str) -> list:
    """Every Optuna trial of a study: its home study and, in a fair comparison, each method's."""
    storage = f"sqlite:///{runs / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)
             if s.study_name == name or s.study_name.startswith(f"{name}/")]
    return [t for n in names for t in optuna.load_study(study_name=n, storage=storage).trials]


def mlflow_runs(runs: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("merge-orchestrator")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def first_sweep(micro_zoo, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg, overrides = sweep_config(micro_zoo, runs, "study.n_trials=8", "method=compare",
                                  "study.pruner.reduction_factor=2")
    return runs, run_sweep(cfg, overrides)


def test_trials_are_in_optuna_and_mlflow(first_sweep):
    runs, outcome = first_sweep
    finished = [t for t in study_trials(runs, "debug") if t.state.is_finished()]
    assert len(finished) == 8
    all_runs = mlflow_runs(runs)
    parents = [r for r in all_runs if r.data.tags.get("mo.kind") == "study"]
    children = [r for r in all_runs if r.data.tags.get("mo.kind") == "trial"]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    numbers = [records.load(t).number for t in finished]
    assert sorted(int(r.data.tags["mo.trial"]) for r in children) == sorted(numbers)
    states = {int(r.data.tags["mo.trial"]): r for r in children}
    for t, number in zip(finished, numbers):
        want = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}[t.state.name]
        run = states[number]
        assert run.info.status == want, number
        assert run.data.tags["mo.state"] == records.load(t).state.value
        assert ("score" in run.data.metrics) == (t.state.name == "COMPLETE")  # never a partial score
    complete = next(r for r in children if r.info.status == "FINISHED")
    assert "score" in complete.data.metrics and "merge_s" in complete.data.metrics
    assert parents[0].data.params["config.study.name"] == "debug"
    assert "sqlite" in parents[0].data.params["config.study.storage"]
    assert "best_confirm" in parents[0].data.metrics


def test_best_folder_loads_and_reproduces_its_score(first_sweep):
    from orchestrator.evaluation import ResidentEvaluator
    from orchestrator.sweep.setup import eval_spec

    runs, outcome = first_sweep
    assert outcome.best_dir == runs / "debug" / "best"
    scores = json.loads((outcome.best_dir / "scores.json").read_text())
    cfg = load_config(["experiment=debug"])
    fresh = ResidentEvaluator(outcome.best_dir, eval_spec(cfg))
    confirm = fresh.evaluate("confirm")
    assert confirm.score == pytest.approx(scores["confirm"]["seed_score"], abs=1e-9)
    assert (outcome.best_dir / "mergekit_config.yml").is_file()
    assert "Scores (merge-orchestrator)" in (outcome.best_dir / "README.md").read_text()


def test_table_has_baselines_and_best_per_method(first_sweep):
    _, outcome = first_sweep
    names = [r.name for r in outcome.rows]
    assert names[:3] == ["parent:knowledge", "parent:commonsense", "uniform average"]
    assert any(n.startswith("best ") for n in names)
    assert all(r.confirm is not None for r in outcome.rows)


def test_same_study_name_resumes_and_pruning_happens(first_sweep, micro_zoo):
    runs, _ = first_sweep
    # Pruning compares trials of one method: 12 trials over 5 methods need an early start.
    cfg, overrides = sweep_config(micro_zoo, runs, "study.n_trials=16", "method=compare",
                                  "study.pruner.reduction_factor=2", "study.pruner.n_startup_trials=1")
    run_sweep(cfg, overrides)
    states = [t.state for t in study_trials(runs, "debug")]
    assert len(states) == 16
    assert optuna.trial.TrialState.PRUNED in states
    parents = [r for r in mlflow_runs(runs) if r.data.tags.get("mo.kind") == "study"]
    assert len(parents) == 1


def test_failing_trials_do_not_stop_the_study(micro_zoo, tmp_path, monkeypatch):
    from orchestrator.study.resident import Resident

    merge = Resident.merge

    def flaky(self, recipe, seed):  # every linear trial fails at merge time
        if recipe["merge_method"] == "linear":
            raise FloatingPointError("the merge produced NaN or inf weights")
        return merge(self, recipe, seed)
    monkeypatch.setattr(Resident, "merge", flaky)
    cfg, overrides = sweep_config(micro_zoo, tmp_path / "runs", "study.n_trials=6",
                                  "method.methods=[linear,task_arithmetic]", "study.pruner.name=none",
                                  "study.baselines=false", "study.name=failing")
    outcome = run_sweep(cfg, overrides)
    trials = study_trials(tmp_path / "runs", "failing")
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(records.load(t).reason for t in failed)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len(trials) == 6  # failed trials count toward n_trials (they are not retried)
    assert outcome.best is not None and outcome.best.method == "task_arithmetic"
    runs = {int(r.data.tags["mo.trial"]): r.info.status for r in mlflow_runs(tmp_path / "runs")
            if r.data.tags.get("mo.kind") == "trial"}
    assert all(runs[records.load(t).number] == "FAILED" for t in failed)


def test_cli_bad_override_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "study.sampler.name=annealing",
                           f"runs_dir={tmp_path / 'runs'}", "candidates.zoo=null"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "annealing" in proc.stderr


def test_wilcoxon_pruner_gets_one_value_per_item(micro_zoo, tmp_path):
    runs = tmp_path / "runs"
    cfg, overrides = sweep_config(micro_zoo, runs, "study.n_trials=5", "method=task_arithmetic",
                                  "study.pruner.name=wilcoxon", "study.baselines=false",
                                  "tracking=none", "study.save_best=false", "study.name=wilcoxon")
    run_sweep(cfg, overrides)
    study = optuna.load_study(study_name="wilcoxon", storage=f"sqlite:///{runs / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    first = complete[0]
    # Steps are stable item ids, one per item of the search split actually evaluated.
    assert len(first.intermediate_values) == records.load(first).items_evaluated
    assert set(first.intermediate_values.values()) <= {0.0, 1.0}
    for t in study.trials[1:]:
        assert set(t.intermediate_values) <= set(first.intermediate_values)


@pytest.fixture(scope="module")
def micro_adapters(micro_zoo, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT LoRA adapters with small random factors on the micro zoo's base."""
    from tests.tiny import make_adapter

    root = tmp_path_factory.mktemp("micro_adapters")
    configs = {"ad_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "ad_mlp": dict(r=2, lora_alpha=4, target_modules=["up_proj", "down_proj", "q_proj"])}
    return {name: make_adapter(micro_zoo / "base", root / name, seed=i, **config)
            for i, (name, config) in enumerate(configs.items(), start=1)}


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_adapter_sweep_rewrites_adapted_parameters_and_saves_the_same_merge(micro_zoo, micro_adapters, tmp_path):
    """LoRA candidates: trials run on the AdapterMerger; the best folder is the engine's merge."""
    import io

    from orchestrator.evaluation import ResidentEvaluator
    from orchestrator.sweep.setup import eval_spec

    runs = tmp_path / "runs"
    overrides = ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", f"candidates.base={micro_zoo / 'base'}",
                 "~candidates.models", "+candidates.models={" + ",".join(f"{n}:'{p}'" for n, p in micro_adapters.items()) + "}",
                 "method=adapters",
                 "study.n_trials=6", "study.name=lora"]
    out = io.StringIO()
    outcome = run_sweep(load_config(overrides), overrides, out=out)
    text = out.getvalue()
    assert "adapter sweep: each trial rewrites the 8 adapted parameters only" in text  # q, v, up, down x 2 layers
    names = [r.name for r in outcome.rows]
    assert names[:3] == ["parent:ad_qv", "parent:ad_mlp", "uniform average"]
    for row in outcome.rows:
        assert row.confirm is not None
    best = outcome.best.recipe
    assert all(m["model"].startswith(f"{micro_zoo / 'base'}+") for m in best["models"])
    # The saved best (engine over base+adapter, on disk) scores what the resident merge scored.
    scores = json.loads((outcome.best_dir / "scores.json").read_text())
    cfg = load_config(overrides)
    confirm = ResidentEvaluator(outcome.best_dir, eval_spec(cfg)).evaluate("confirm")
    assert confirm.score == pytest.approx(scores["confirm"]["seed_score"], abs=1e-9)


def test_demo_lora_best_beats_each_single_adapter(tmp_path):
    """``experiment=demo_lora`` end to end on the committed demo zoo's LoRA experts."""
    import io

    runs = tmp_path / "runs"
    overrides = ["experiment=demo_lora", f"runs_dir={runs}"]
    out = io.StringIO()
    outcome = run_sweep(load_config(overrides), overrides, out=out)
    assert "adapter sweep: each trial rewrites the 21 adapted parameters only" in out.getvalue()
    singles = {r.name: r.confirm.score for r in outcome.rows if r.name.startswith("parent:")}
    assert set(singles) == {"parent:lora_knowledge", "parent:lora_commonsense"}
    assert outcome.best.confirm.score > max(singles.values()) + 0.05, (outcome.best.confirm.score, singles)
    assert all("+" in m["model"] and m["model"].startswith(str(runs / "zoo" / "base"))
               for m in outcome.best.recipe["models"])
    assert (outcome.best_dir / "model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_adapter_sweep_with_knots_saves_what_it_scored(micro_zoo, micro_adapters, tmp_path):
    """``candidates.knots=true``: trials merge the adapters in their joint SVD basis; ``best/`` bakes that merge."""
    import io

    from orchestrator.evaluation import ResidentEvaluator
    from orchestrator.sweep.setup import eval_spec

    runs = tmp_path / "runs"
    overrides = ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", f"candidates.base={micro_zoo / 'base'}",
                 "~candidates.models", "+candidates.models={" + ",".join(f"{n}:'{p}'" for n, p in micro_adapters.items()) + "}",
                 "method.methods=[ties,task_arithmetic]", "candidates.knots=true", "study.n_trials=4", "study.name=knots",
                 "eval.confirm_seeds=1", "tracking=none"]
    outcome = run_sweep(load_config(overrides), overrides, out=io.StringIO())
    assert outcome.best.recipe["parameters"]["knots"] is True
    assert (outcome.best_dir / "knots_recipe.yml").is_file()
    scores = json.loads((outcome.best_dir / "scores.json").read_text())
    fresh = ResidentEvaluator(outcome.best_dir, eval_spec(load_config(overrides))).evaluate("confirm")
    assert fresh.score == pytest.approx(scores["confirm"]["seed_score"], abs=0.01)  # float32 rounding of the bake


def test_knots_needs_adapter_candidates(micro_zoo, tmp_path):
    from orchestrator.errors import UserError
    from orchestrator.sweep.setup import prepare

    cfg, _ = sweep_config(micro_zoo, tmp_path / "runs", "candidates.knots=true", "method=ties")
    with pytest.raises(UserError, match="candidates.knots=true merges LoRA adapters"):
        prepare(cfg, lambda text: None)
