"""The one registry of Optuna samplers: a name, a params dataclass, what the sampler can do.

``study.sampler`` in the config is a mapping: ``name``, ``seed`` and the options of that
sampler (the fields of its params dataclass). ``parse_sampler`` checks it against the registry
(unknown keys fail with close matches) and returns a ``SamplerChoice``; ``make_sampler`` builds
the Optuna sampler. A sampler added here is picked up by the config check, the README's table
and the tests, which iterate this registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from orchestrator.errors import UserError
from orchestrator.study.options import build_params, close_matches


@dataclass(frozen=True)
class TpeParams:
    """TPE: ``n_startup_trials`` random trials first; ``multivariate`` models parameters jointly."""

    n_startup_trials: int = 8
    multivariate: bool = True


@dataclass(frozen=True)
class CmaesParams:
    """CMA-ES: ``n_startup_trials`` random trials first; ``with_margin`` keeps integer and
    discrete parameters from collapsing (CMA-ES with margin)."""

    n_startup_trials: int = 8
    with_margin: bool = False


@dataclass(frozen=True)
class GridParams:
    """Grid: ``grid_points`` evenly spaced values per numeric parameter."""

    grid_points: int = 3


@dataclass(frozen=True)
class QmcParams:
    """Quasi-Monte Carlo: ``qmc_type`` sobol or halton."""

    qmc_type: str = "sobol"


@dataclass(frozen=True)
class Nsga2Params:
    """NSGA-II (multi-objective): ``population_size`` per generation."""

    population_size: int = 50


@dataclass(frozen=True)
class NoOptions:
    """A sampler without options (random search)."""


@dataclass(frozen=True)
class SamplerEntry:
    """Registry entry for one sampler.

    Attributes:
        name: the key written in ``study.sampler.name``.
        params: frozen dataclass of the sampler's options.
        build: ``build(params, seed, grid) -> optuna sampler``.
        conditional: handles parameters that exist only for some values of another (a
            ``method`` choice with each method's own parameters). Samplers that model only the
            parameters every trial shares (CMA-ES, QMC) would search the rest at random.
        needs_grid: enumerates a finite grid (one method per grid).
        description: one line for the README.
    """

    name: str
    params: type
    build: Callable[[Any, int, Mapping[str, Sequence[Any]]], Any]
    conditional: bool
    needs_grid: bool = False
    description: str = ""


@dataclass(frozen=True)
class SamplerChoice:
    """A checked ``study.sampler``: the registry name, the seed and the options dataclass."""

    name: str
    seed: int
    params: Any

    @property
    def entry(self) -> SamplerEntry:
        return SAMPLERS[self.name]

    def with_seed(self, seed: int) -> SamplerChoice:
        return dataclasses.replace(self, seed=seed)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _tpe(p: TpeParams, seed: int, grid: Mapping[str, Sequence[Any]]) -> Any:
    _check_int("n_startup_trials", p.n_startup_trials, 0)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=p.n_startup_trials,
                                      multivariate=p.multivariate, group=p.multivariate, constant_liar=True)


def _cmaes(p: CmaesParams, seed: int, grid: Mapping[str, Sequence[Any]]) -> Any:
    _check_int("n_startup_trials", p.n_startup_trials, 0)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=p.n_startup_trials,
                                        with_margin=p.with_margin, warn_independent_sampling=False)


def _grid(p: GridParams, seed: int, grid: Mapping[str, Sequence[Any]]) -> Any:
    _check_int("grid_points", p.grid_points, 1)
    check_grid(grid)
    return AskTellGridSampler(grid, seed=seed)


def _qmc(p: QmcParams, seed: int, grid: Mapping[str, Sequence[Any]]) -> Any:
    if p.qmc_type not in ("sobol", "halton"):
        raise ValueError(f"qmc_type must be 'sobol' or 'halton', got {p.qmc_type!r}")
    return optuna.samplers.QMCSampler(qmc_type=p.qmc_type, seed=seed, warn_independent_sampling=False)


def _nsga2(p: Nsga2Params, seed: int, grid: Mapping[str, Sequence[Any]]) -> Any:
    _check_int("population_size", p.population_size, 2)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=p.population_size)


def _random(p: NoOptions, seed: int, grid: Mapping[str, Sequence[Any]]) -> Any:
    return optuna.samplers.RandomSampler(seed=seed)


_ENTRIES = (
    SamplerEntry("tpe", TpeParams, _tpe, conditional=True,
                 description="Tree-structured Parzen estimator (the default)."),
    SamplerEntry("cmaes", CmaesParams, _cmaes, conditional=False,
                 description="CMA-ES over the numeric parameters of one method."),
    SamplerEntry("random", NoOptions, _random, conditional=True, description="Random search."),
    SamplerEntry("grid", GridParams, _grid, conditional=False, needs_grid=True,
                 description="Every point of a grid (one method per grid)."),
    SamplerEntry("qmc", QmcParams, _qmc, conditional=False,
                 description="Quasi-random low-discrepancy points (Sobol, Halton)."),
    SamplerEntry("nsga2", Nsga2Params, _nsga2, conditional=False,
                 description="NSGA-II genetic search, for study.multi_objective."),
)
SAMPLERS: dict[str, SamplerEntry] = {e.name: e for e in _ENTRIES}


def get_sampler(name: str) -> SamplerEntry:
    """The registry entry called ``name``; UserError with close matches otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r} in study.sampler.name{close_matches(name, SAMPLERS)}; "
                        f"valid: {', '.join(SAMPLERS)}") from None


def option_names() -> set[str]:
    """Every option of every registered sampler (schema keys ``study.sampler.<option>``)."""
    return {f.name for e in _ENTRIES for f in dataclasses.fields(e.params)} | {"name", "seed"}


def parse_sampler(raw: Mapping[str, Any], where: str = "study.sampler") -> SamplerChoice:
    """Check a ``study.sampler`` mapping against the registry; one line on any mistake."""
    data = dict(raw)
    entry = get_sampler(str(data.pop("name", "tpe")))
    seed = data.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{where}.seed must be an integer, got {seed!r}")
    params = build_params(entry.params, data, where, f"sampler {entry.name!r}", sorted(option_names()))
    return SamplerChoice(entry.name, seed, params)


def make_sampler(choice: SamplerChoice, grid: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """The Optuna sampler of ``choice`` (seeded); one line for a bad option value."""
    try:
        return choice.entry.build(choice.params, choice.seed, dict(grid or {}))
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"study.sampler: {err} (sampler {choice.name!r})") from None


# ----------------------------------------------------------------------------- grid

MAX_GRID_POINTS = 100_000


def check_grid(grid: Mapping[str, Sequence[Any]]) -> None:
    """A grid Optuna's ``GridSampler`` can enumerate: one method, a sane number of points.

    ``GridSampler`` lists every combination up front; over several methods the grid would be
    the product of all their parameters (most of them unused by any one trial), which for the
    default five methods is ~10^8 points and tens of GB.
    """
    if "method" in grid:
        raise UserError(f"study.sampler.name=grid searches one method's grid, but the study lets one "
                        f"sampler choose among {len(grid['method'])} methods "
                        f"({', '.join(map(str, grid['method']))}); use study.compare=fair (a grid per "
                        "method) or one method (e.g. method=ties)")
    size = grid_size(grid)
    if size > MAX_GRID_POINTS:
        raise UserError(f"study.sampler.name=grid: {size:,} grid points over {len(grid)} parameters exceed "
                        f"{MAX_GRID_POINTS:,}; lower study.sampler.grid_points or search fewer parameters")


def grid_size(grid: Mapping[str, Sequence[Any]]) -> int:
    """Number of points of a grid (the product of each parameter's values)."""
    return math.prod(len(values) for values in grid.values())


class AskTellGridSampler(optuna.samplers.BaseSampler):
    """Optuna's ``GridSampler`` for ask/tell loops.

    ``GridSampler.after_trial`` calls ``study.stop()`` once every point was visited, which
    raises outside ``Study.optimize``; our workers use ask/tell and stop at ``n_trials``, which
    the sweep caps at the grid's size. Everything else is ``GridSampler``'s.
    """

    def __init__(self, grid: Mapping[str, Sequence[Any]], seed: int | None = None) -> None:
        self.grid = optuna.samplers.GridSampler(dict(grid), seed=seed)
        self.size = grid_size(grid)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self.grid.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return self.grid.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self.grid.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.grid.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        """No ``study.stop()``: the worker loop counts trials itself."""

    def reseed_rng(self) -> None:
        self.grid.reseed_rng()
