"""Config tests: every file under conf/ and search_spaces/ composes and validates."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from orchestrator.config import CONF_DIR, SPACES_DIR, compose, load_config, to_sweep_config
from orchestrator.errors import UserError
from orchestrator.study.candidates import Candidates, build_recipe
from orchestrator.study.spaces import check_model_count, load_space, parse_space

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_conf_option_composes(group, option):
    cfg = load_config([f"{group}={option}"])
    assert cfg.study.n_trials > 0
    assert cfg.eval.tasks, "every composition names at least one task"
    for name in cfg.method.methods:
        assert (Path(cfg.method.spaces_dir or SPACES_DIR) / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_search_space_validates(path):
    space = load_space(path)
    assert space.method == path.stem


def test_overrides_work_as_hydra_users_expect():
    cfg = load_config(["method=ties", "study.n_trials=50", "eval=mmlu_hellaswag"])
    assert cfg.method.methods == ["ties"]
    assert cfg.study.n_trials == 50
    assert [t.name for t in cfg.eval.tasks] == ["mmlu", "hellaswag"]
    debug = load_config(["experiment=debug"])
    assert debug.candidates.zoo == "micro" and debug.study.name == "debug"


def test_default_is_the_demo_comparison():
    cfg = load_config([])
    assert cfg.method.methods == ["linear", "slerp", "task_arithmetic", "ties", "dare_ties"]
    assert cfg.candidates.zoo == "demo" and set(cfg.candidates.models) == {"knowledge", "commonsense"}


@pytest.mark.parametrize("override,needle", [
    (["study.n_trial=3"], "n_trial"),
    (["method=tiess"], "tiess"),
    (["study.n_trials=many"], "n_trials"),
])
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(UserError, match=needle):
        to_sweep_config(compose(override))


@pytest.mark.parametrize("data,needle", [
    ({"method": "ties", "per_model": {"wieght": {"low": 0, "high": 1}}}, "did you mean 'weight'"),
    ({"method": "ties", "per_model": {"weight": {"low": 0.1, "high": 1}, "density": {"low": 0.1, "high": 1.5}}},
     "density"),
    ({"method": "linear"}, "needs ['weight']"),
    ({"method": "slerp", "global": {"t": {"low": 0.8, "high": 0.2}}}, "low must be <= high"),
    ({"method": "tie", "per_model": {}}, "tie"),
    ({"method": "ties", "per_model": {"weight": {"low": 0, "high": 1}}, "fixed": {"lamda": 1}}, "lambda"),
    ({"method": "ties", "per_model": {"weight": [0, 1]}}, "mapping"),
])
def test_bad_search_spaces_fail_at_load(data, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_space(data, "space.yaml")


def test_suggest_builds_a_mergekit_recipe():
    space = load_space(SPACES_DIR / "ties.yaml")
    trial = optuna.trial.FixedTrial({"ties.lambda": 1.0, "ties.a.weight": 0.5, "ties.a.density": 0.3,
                                     "ties.b.weight": 1.2, "ties.b.density": 0.9})
    global_values, per_model = space.suggest(trial, ["a", "b"])
    recipe = build_recipe("ties", global_values, per_model, Candidates({"a": "/m/a", "b": "/m/b"}, base="/m/base"))
    assert recipe == {"merge_method": "ties", "dtype": "float32", "base_model": "/m/base",
                      "models": [{"model": "/m/a", "parameters": {"weight": 0.5, "density": 0.3}},
                                 {"model": "/m/b", "parameters": {"weight": 1.2, "density": 0.9}}],
                      "parameters": {"normalize": True, "lambda": 1.0}}


def test_slerp_gradient_and_first_candidate_as_base():
    space = load_space(SPACES_DIR / "slerp.yaml")
    trial = optuna.trial.FixedTrial({"slerp.t.0": 0.1, "slerp.t.1": 0.5, "slerp.t.2": 0.9})
    global_values, per_model = space.suggest(trial, ["a", "b"])
    recipe = build_recipe("slerp", global_values, per_model, Candidates({"a": "/m/a", "b": "/m/b"}, base="/m/base"))
    assert recipe["base_model"] == "/m/a" and recipe["parameters"] == {"t": [0.1, 0.5, 0.9]}
    check_model_count(space, 2)
    with pytest.raises(UserError, match="slerp"):
        check_model_count(space, 3)
