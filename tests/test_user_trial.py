"""Defects found by trying every command as a new user (issue 10), each pinned by a test.

The signal tests inject SIGINT deterministically at each boundary of a trial (no timing); the
resume tests go through the CLI on the micro zoo.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from orchestrator.cli import main
from orchestrator.config import compose, load_config
from orchestrator.errors import UserError
from orchestrator.study import records
from orchestrator.study.group import StudyGroup
from orchestrator.study.objective import Objective
from orchestrator.study.records import INTERRUPTED, Rung
from orchestrator.study.spaces import parse_space, space_as_dict
from orchestrator.study.storage import StudyLock, make_storage, open_study
from orchestrator.study.workers import Liveness, Signals, StaleTrials, Worker

# ----------------------------------------------------------------------------- 1. Ctrl-C


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class StubResident:
    """Two rungs of fixed scores; sends SIGINT at ``at`` (merge, rung0, rung1)."""

    def __init__(self, at: str) -> None:
        self.at = at

    def merge(self, recipe, seed) -> None:
        if self.at == "merge":
            _sigint()

    def rungs(self, split, per_item=False):
        for i, (n, score) in enumerate(((10, 0.5), (20, 0.6))):
            if self.at == f"rung{i}":
                _sigint()
            yield Rung(n, score, 0.1, {"t": score})


class KillWhenLogging:
    """A listener that sends SIGINT while a rung or the end of a trial is being logged."""

    def __init__(self, at: str) -> None:
        self.at = at

    def trial_started(self, record) -> None:
        if self.at == "log_start":
            _sigint()

    def trial_rung(self, record, rung) -> None:
        if self.at == f"log_rung{0 if rung.n_items == 10 else 1}":
            _sigint()

    def trial_finished(self, record) -> None:
        if self.at == "log_end" and record.state is records.State.COMPLETE:
            _sigint()


def run_one_trial(tmp_path: Path, at: str) -> list:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    stale = StaleTrials(3)
    storage = make_storage(url, 30)
    study = open_study("sig", storage, optuna.samplers.RandomSampler(0), optuna.pruners.NopPruner(), ["maximize"])
    group = StudyGroup("sig", study, {None: study})
    space = parse_space({"method": "linear", "per_model": {"weight": {"low": 0.0, "high": 1.0}}}, "test")
    signals = Signals()
    objective = Objective({"linear": space}, StubResident(at), lambda m, g, p: {"merge_method": m, "p": dict(p)},
                          seed=0, n_rungs=2, listeners=[KillWhenLogging(at)], interruptible=signals.interruptible,
                          model_names=["a", "b"])

    def run(trial, method):
        value = objective(trial, method)
        if at == "before_tell":
            _sigint()
        return value
    signals.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            Worker(group, StudyLock(url, "sig"), Liveness(storage, 30, None, stale, "test"), signals, 1).run(run)
    finally:
        signals.restore()
    return study.get_trials()


@pytest.mark.parametrize("at", ["merge", "rung0", "log_rung0", "rung1", "log_start"])
def test_a_signal_before_the_evaluation_ends_abandons_the_trial_for_a_retry(tmp_path, at):
    trials = run_one_trial(tmp_path, at)
    first = trials[0]
    assert first.state == optuna.trial.TrialState.FAIL
    assert records.load(first).reason == f"{INTERRUPTED} (SIGINT)"
    retry = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == first.params


@pytest.mark.parametrize("at", ["log_rung1", "log_end", "before_tell"])
def test_a_signal_after_the_evaluation_ended_still_tells_the_trial_complete(tmp_path, at):
    trials = run_one_trial(tmp_path, at)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert trials[0].value == 0.6
    assert records.load(trials[0]).state is records.State.COMPLETE


# ----------------------------------------------------------------------------- 4. last rung


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_trial_that_reached_the_last_rung_is_complete_whatever_the_pruner_says(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    space = parse_space({"method": "linear", "per_model": {"weight": {"low": 0.0, "high": 1.0}}}, "test")
    one_rung = Objective({"linear": space}, StubResident("none"), lambda m, g, p: {"m": m, "p": dict(p)}, seed=0,
                         n_rungs=2, model_names=["a"])
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):  # the first rung may be pruned
        one_rung(trial, None)
    last_only = Objective({"linear": space}, _OneRung(), lambda m, g, p: {"m": m, "p": dict(p)}, seed=0, n_rungs=1,
                          model_names=["a"])
    assert last_only(study.ask(), None) == 0.5  # the whole split evaluated: complete, never pruned


class _OneRung(StubResident):
    def __init__(self) -> None:
        super().__init__("none")

    def rungs(self, split, per_item=False):
        yield Rung(10, 0.5, 0.1, {"t": 0.5})


# ----------------------------------------------------------------------------- 5. rungs


@pytest.mark.parametrize("rungs, needle", [
    ((300, 90), "strictly increasing"),
    ((100, 200, 300), "give task 'demo_mmlu' [100, 180, 180] items"),  # its validation split has 180
])
def test_rungs_must_increase_and_fit_the_split(rungs, needle):
    from orchestrator.evaluation import EvalSpec, check_tasks_available

    with pytest.raises(UserError) as err:
        check_tasks_available(EvalSpec.from_names("demo_mmlu,demo_hellaswag", rungs=rungs))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_last_rung_larger_than_the_split_evaluates_the_whole_split():
    from orchestrator.evaluation import EvalSpec, check_tasks_available

    suite = check_tasks_available(EvalSpec.from_names("demo_mmlu,demo_hellaswag", rungs=(30, 90, 300)))
    assert suite.rung_counts("search") == [[30, 30], [90, 90], [180, 300]]


# ----------------------------------------------------------------------------- 6. CMA-ES


def test_cmaes_choosing_among_methods_is_refused_and_per_method_is_fine(tmp_path):
    from orchestrator.sweep.setup import check_sampler_fits, load_spaces
    from orchestrator.study.group import member_methods

    free = load_config(["experiment=debug", "study.compare=free", "study.sampler.name=cmaes", f"runs_dir={tmp_path}"])
    spaces = load_spaces(free)
    with pytest.raises(UserError, match="would search every method's parameters at random") as err:
        check_sampler_fits(free, spaces, member_methods(list(spaces), "free"))
    assert "study.compare=fair" in str(err.value)
    fair = load_config(["experiment=debug", "study.sampler.name=cmaes", f"runs_dir={tmp_path}"])
    check_sampler_fits(fair, spaces, member_methods(list(spaces), fair.study.compare))


# ----------------------------------------------------------------------------- 7. typos


@pytest.mark.parametrize("override, message", [
    ("study.n_trail=5", "unknown key study.n_trail; did you mean study.n_trials?"),
    ("+study.n_trail=5", "unknown key study.n_trail; did you mean study.n_trials?"),
    ("eval.rung=[1,2]", "unknown key eval.rung; did you mean eval.rungs?"),
    ("study.sampler.n_startup=3", "unknown key study.sampler.n_startup; did you mean study.sampler.n_startup_trials?"),
])
def test_a_mistyped_key_names_the_key_it_meant(override, message):
    with pytest.raises(UserError) as err:
        load_config([override])
    assert str(err.value) == message


def test_sampler_options_can_be_set_without_a_plus():
    cfg = load_config(["study.sampler.name=cmaes", "study.sampler.with_margin=true", "study.pruner.name=median",
                       "study.pruner.n_startup_trials=2"])
    assert cfg.study.sampler.params.with_margin is True and cfg.study.pruner.params.n_startup_trials == 2


# ----------------------------------------------------------------------------- 10. GPU examples


def test_a_candidate_equal_to_the_base_is_warned_for_delta_methods():
    from orchestrator.study.candidates import Candidates, base_as_candidate

    cand = Candidates({"base": "/m/base", "instruct": "/m/instruct"}, base="/m/base")
    warning = base_as_candidate(cand, ["linear", "ties"])
    assert warning and "candidates.models.base" in warning and "ties" in warning and "linear" not in warning.split(":")[1]
    assert base_as_candidate(cand, ["linear", "slerp"]) is None


@pytest.mark.parametrize("experiment", ["qwen_chat_code", "qwen_base_instruct", "olmo_dpo_sft"])
def test_chat_examples_take_the_tokenizer_and_generation_config_from_the_chat_model(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.candidates.tokenizer_source, experiment
    assert cfg.candidates.tokenizer_source != cfg.candidates.base
    if experiment == "qwen_base_instruct":
        assert cfg.candidates.base not in cfg.candidates.models.values()


def test_generation_config_comes_from_the_tokenizer_source(tiny_family, tmp_path):
    from orchestrator.engine import merge_to_disk

    (tiny_family["ft_a"] / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    try:
        recipe = {"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]),
                  "tokenizer_source": str(tiny_family["ft_a"]),
                  "models": [{"model": str(tiny_family["ft_a"]), "parameters": {"weight": 1.0}}]}
        out = merge_to_disk(recipe, tmp_path / "out").out_dir
        assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [2, 7]}
    finally:
        (tiny_family["ft_a"] / "generation_config.json").unlink()


# ----------------------------------------------------------------------------- 11. messages


def test_yaml_errors_name_the_file_and_the_line(tmp_path, capsys):
    bad = tmp_path / "recipe.yml"
    bad.write_text("merge_method: ties\nmodels:\n  - model: a\n   parameters: {x: 1\n")
    assert main(["merge", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "<unicode string>" not in err
    assert f"{bad}, line 4, column 4: not valid YAML" in err and "parameters: {x: 1" in err


def test_sweep_multirun_says_what_to_do_instead(capsys):
    assert main(["sweep", "-m", "method=ties,linear"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Hydra multirun" in err and "study.name" in err


def test_top_level_help_describes_the_tool(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Search model merges" in out and "COMMAND --help" in out
    for command in ("sweep", "compare", "ui", "export", "merge", "eval", "zoo"):
        assert command in out


def test_unknown_task_points_to_the_sweeps_own_option():
    from orchestrator.evaluation import EvalSpec, check_tasks_available

    with pytest.raises(UserError) as err:
        check_tasks_available(EvalSpec.from_names("demo_mmlu_nonexistent_xyz"))
    assert "eval.include" in str(err.value) and "eval --include" in str(err.value)


# ----------------------------------------------------------------------------- 12. search space dump


def test_the_logged_search_space_keeps_zero_bounds():
    space = parse_space({"method": "linear", "per_model": {"weight": {"low": 0.0, "high": 1.0}}}, "test")
    assert space_as_dict(space)["per_model"]["weight"] == {"low": 0.0, "high": 1.0}
    slerp = parse_space({"method": "slerp", "global": {"t": {"low": 0, "high": 1, "gradient": 3}}}, "test")
    assert space_as_dict(slerp)["global"]["t"] == {"low": 0, "high": 1, "gradient": 3}


# ----------------------------------------------------------------------------- 2, 3, 9, 11: the CLI


def _sweep(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "sweep", *args], capture_output=True, text=True,
                          timeout=timeout)


def _micro(micro_zoo: Path, runs: Path, *extra: str) -> list[str]:
    return ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", f"candidates.base={micro_zoo / 'base'}",
            f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
            f"candidates.models.commonsense={micro_zoo / 'commonsense'}", "eval.rungs=[10,30]",
            "eval.confirm_seeds=2", "study.n_trials=3", "method.methods=[linear,ties]", *extra]


def _snapshot(runs: Path) -> dict[str, str]:
    """Every file under ``runs`` with a digest of its bytes."""
    return {str(p.relative_to(runs)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(runs.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_study(micro_zoo, tmp_path_factory) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("resume") / "runs"
    proc = _sweep(_micro(micro_zoo, runs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("change, key", [
    ("candidates.models.knowledge={zoo}/knowledge2", "candidates.models.knowledge"),
    ("method.methods=[linear,task_arithmetic]", "method.methods"),
    ("eval.rungs=[10,40]", "eval.rungs"),
    ("study.seed=3", "study.seed"),
    ("study.compare=free", "study.compare"),
])
def test_resuming_with_another_config_is_refused_before_anything_is_written(finished_study, micro_zoo, change, key):
    runs, _ = finished_study
    before = _snapshot(runs)
    proc = _sweep(_micro(micro_zoo, runs, change.format(zoo=micro_zoo), "study.n_trials=5"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: study 'debug' was created with other settings")
    assert key in err and "study.name=debug-2" in err
    assert _snapshot(runs) == before  # nothing written: not the store, not MLflow, not runs/


@pytest.mark.slow
def test_resuming_with_another_sampler_or_more_trials_works_and_a_finished_study_says_so(finished_study, micro_zoo):
    runs, _ = finished_study
    again = _sweep(_micro(micro_zoo, runs))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already has its 3 trials" in again.stdout and "raise study.n_trials" in again.stdout
    more = _sweep(_micro(micro_zoo, runs, "study.n_trials=4", "study.sampler.name=random"))
    assert more.returncode == 0, more.stderr[-2000:]
    assert more.stdout.count("\ntrial ") + more.stdout.startswith("trial ") == 1


@pytest.mark.slow
def test_the_card_names_the_final_folder_and_says_when_no_merge_beat_a_parent(finished_study):
    runs, out = finished_study
    card = (runs / "debug" / "best" / "README.md").read_text()
    assert ".stage" not in card and ".partial" not in card
    folder = runs / "debug" / "best"  # outside the working folder: shown as an absolute path
    assert f"# {folder} (best merge of study debug)" in card
    assert f'from_pretrained("{folder}")' in card
    assert "(this folder)" in card  # its row of the score table is marked
    summary = json.loads((runs / "debug" / "summary.json").read_text())
    if not summary["best"]["beats_best_parent_on_confirm"]:  # the micro zoo's merges do not beat a parent
        assert "does not beat the best parent model" in card
        assert "no merge beat" in summary["verdict"] and "no merge beat" in out
