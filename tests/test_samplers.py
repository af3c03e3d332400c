"""Every configured sampler drives the real (conditional) search spaces to valid, seeded recipes.

No model is loaded: each trial's recipe goes through the recipe parser and the merge engine's
static checks, and gets a score from its own parameters, so the samplers see a real landscape.
"""

from __future__ import annotations

import warnings

import optuna
import pytest

from orchestrator.config import load_config
from orchestrator.engine.validate import check_recipe
from orchestrator.engine.recipe import Recipe
from orchestrator.study.candidates import Candidates, recipe_builder
from orchestrator.study.objective import Objective
from orchestrator.study.samplers import SAMPLERS, make_sampler
from orchestrator.sweep.setup import load_spaces


def landscape(recipe: dict) -> float:
    """Best at weights 0.8 (and densities 0.6): a smooth score of the recipe's own numbers."""
    loss = 0.0
    for entry in recipe["models"]:
        params = entry.get("parameters", {})
        loss += (params.get("weight", 0.8) - 0.8) ** 2 + (params.get("density", 0.6) - 0.6) ** 2
    return -loss


def run(name: str, n: int, *extra: str) -> list[tuple[str, dict]]:
    """``n`` trials of one sampler choosing among the debug experiment's methods (one Optuna study).

    Samplers that model only the parameters every trial shares (and grids) get one method.
    """
    entry = SAMPLERS[name]
    one_method = not entry.conditional and not any(e.startswith("method=") for e in extra)
    methods = ("method=ties",) if one_method else ()
    cfg = load_config(["experiment=debug", f"study.sampler.name={name}", "study.sampler.n_startup_trials=3",
                       *methods, *extra])
    spaces = load_spaces(cfg)
    models = list(cfg.candidates.models)
    points = getattr(cfg.study.sampler.params, "grid_points", 3)
    grid = {k: v for s in spaces.values() for k, v in s.param_grid(models, points).items()}
    if len(spaces) > 1:
        grid["method"] = list(spaces)
    study = optuna.create_study(sampler=make_sampler(cfg.study.sampler, grid), direction="maximize")
    c = cfg.candidates
    objective = Objective(spaces, None, recipe_builder(Candidates(dict(c.models), c.base, c.dtype)), seed=0, n_rungs=1,
                          model_names=models)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(n):
            trial = study.ask()
            method, recipe = objective.suggest(trial)
            check_recipe(Recipe.from_dict(recipe))  # parameter names, ranges and model counts
            study.tell(trial, landscape(recipe))
            out.append((method, dict(trial.params)))
    return out


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_makes_valid_recipes_and_is_seeded(name):
    first = run(name, 12)
    assert len(first) == 12
    assert run(name, 12) == first, "the same seed must give the same trials"
    if name != "grid":
        assert run(name, 12, "study.sampler.seed=1") != first, "another seed, other trials"


def test_grid_sampler_visits_distinct_points_of_the_grid():
    trials = run("grid", 30, "method=task_arithmetic", "study.sampler.grid_points=3")
    points = [tuple(sorted(p.items())) for _, p in trials]
    assert len(set(points[:9])) == 9  # 3 weights x 3 weights, each once before any repeat
    weights = {v for _, p in trials for v in p.values()}
    assert weights == {0.0, 0.75, 1.5}


def test_cmaes_approaches_the_optimum_of_a_smooth_landscape():
    trials = run("cmaes", 40, "method=task_arithmetic")
    scores = [landscape({"models": [{"parameters": {"weight": w}} for w in p.values()]}) for _, p in trials]
    assert max(scores[20:]) > max(scores[:5])
    assert max(scores) > -0.02


@pytest.mark.parametrize("extra, needle", [
    (("method=compare",), "choose among 5 methods"),  # one grid over 5 methods: ~10^8 points, no memory
    (("method=ties", "study.sampler.grid_points=11"), "grid points over 5 parameters exceed"),
])
def test_grid_that_cannot_be_enumerated_is_refused_in_one_line(extra, needle):
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match=needle) as err:
        run("grid", 1, *extra)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_grid_sweep_runs_each_grid_point_once_and_stops(micro_zoo, tmp_path):
    """A real sweep: n_trials is capped at the grid's 9 points, and the exhausted grid ends cleanly."""
    import io

    from orchestrator.sweep.run import run_sweep

    overrides = ["experiment=debug", f"runs_dir={tmp_path}", "candidates.zoo=null",
                 f"candidates.base={micro_zoo / 'base'}", f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
                 f"candidates.models.commonsense={micro_zoo / 'commonsense'}", "method=task_arithmetic",
                 "study.sampler.name=grid", "study.n_trials=20", "study.pruner.name=none", "study.baselines=false",
                 "tracking=none", "study.save_best=false", "eval.rungs=[10]"]
    out = io.StringIO()
    outcome = run_sweep(load_config(overrides), overrides, out=out)
    assert "grid sampler: 9 grid points, so 9 trials (not 20)" in out.getvalue()
    study = optuna.load_study(study_name="debug", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    points = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(study.trials) == 9 and len(points) == 9
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert outcome.best is not None
