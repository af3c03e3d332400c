"""The one registry of pruners: a name, a params dataclass, what the pruner reads.

Steps are items evaluated: a trial reports its running score after each rung of the search
split (``per_item`` pruners get each item's value instead, keyed by a stable item id). In a
fair comparison every method has its own Optuna study, so a pruner only ever compares trials
of the same method at the same rung.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from orchestrator.errors import UserError
from orchestrator.study.options import build_params, close_matches


@dataclass(frozen=True)
class HalvingParams:
    """Successive halving: keep the best 1/``reduction_factor`` at each rung, after
    ``n_startup_trials`` completed trials (before that, a rung holds a handful of points)."""

    reduction_factor: int = 3
    n_startup_trials: int = 4


@dataclass(frozen=True)
class MedianParams:
    """Median: prune below the median of earlier trials at the same rung, after
    ``n_startup_trials`` completed trials."""

    n_startup_trials: int = 4


@dataclass(frozen=True)
class WilcoxonParams:
    """Wilcoxon signed-rank test against the best trial, item by item, at ``p_threshold``."""

    p_threshold: float = 0.1


@dataclass(frozen=True)
class NoOptions:
    """A pruner without options."""


@dataclass(frozen=True)
class PrunerEntry:
    """Registry entry for one pruner.

    Attributes:
        name: the key written in ``study.pruner.name``.
        params: frozen dataclass of its options.
        build: ``build(params, first_rung_items) -> optuna pruner``.
        per_item: reports each item's value (step = stable item id), not the running score.
        description: one line for the README.
    """

    name: str
    params: type
    build: Callable[[Any, int], Any]
    per_item: bool = False
    description: str = ""


@dataclass(frozen=True)
class PrunerChoice:
    """A checked ``study.pruner``: the registry name and its options."""

    name: str
    params: Any

    @property
    def entry(self) -> PrunerEntry:
        return PRUNERS[self.name]


class StartupPruner(optuna.pruners.BasePruner):
    """Never prunes before ``n_startup_trials`` trials completed, then defers to ``wrapped``.

    Successive halving compares a trial with those that reached the same rung; in the first
    trials of a study that is a handful of points, and it prunes nearly everything.
    """

    def __init__(self, wrapped: Any, n_startup_trials: int) -> None:
        self.wrapped = wrapped
        self.n_startup_trials = n_startup_trials

    def prune(self, study: Any, trial: Any) -> bool:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < self.n_startup_trials:
            return False
        return self.wrapped.prune(study, trial)


def _positive(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _halving(p: HalvingParams, first_rung_items: int) -> Any:
    _positive("reduction_factor", p.reduction_factor, 2)
    _positive("n_startup_trials", p.n_startup_trials, 0)
    sha = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, first_rung_items),
                                                 reduction_factor=p.reduction_factor)
    return StartupPruner(sha, p.n_startup_trials)


def _median(p: MedianParams, first_rung_items: int) -> Any:
    _positive("n_startup_trials", p.n_startup_trials, 0)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=0)


def _wilcoxon(p: WilcoxonParams, first_rung_items: int) -> Any:
    if not 0 < p.p_threshold < 1:
        raise ValueError(f"p_threshold must be in (0, 1), got {p.p_threshold!r}")
    return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold, n_startup_steps=2)


_ENTRIES = (
    PrunerEntry("successive_halving", HalvingParams, _halving,
                description="Successive halving over the rungs (the default)."),
    PrunerEntry("median", MedianParams, _median, description="Below the median at the same rung."),
    PrunerEntry("wilcoxon", WilcoxonParams, _wilcoxon, per_item=True,
                description="Wilcoxon signed-rank test item by item against the best trial."),
    PrunerEntry("none", NoOptions, lambda p, n: optuna.pruners.NopPruner(), description="No pruning."),
)
PRUNERS: dict[str, PrunerEntry] = {e.name: e for e in _ENTRIES}


def get_pruner(name: str) -> PrunerEntry:
    """The registry entry called ``name``; UserError with close matches otherwise."""
    try:
        return PRUNERS[name]
    except KeyError:
        raise UserError(f"unknown pruner {name!r} in study.pruner.name{close_matches(name, PRUNERS)}; "
                        f"valid: {', '.join(PRUNERS)}") from None


def option_names() -> set[str]:
    """Every option of every registered pruner (schema keys ``study.pruner.<option>``)."""
    return {f.name for e in _ENTRIES for f in dataclasses.fields(e.params)} | {"name"}


def parse_pruner(raw: Mapping[str, Any], where: str = "study.pruner") -> PrunerChoice:
    """Check a ``study.pruner`` mapping against the registry; one line on any mistake."""
    data = dict(raw)
    entry = get_pruner(str(data.pop("name", "successive_halving")))
    params = build_params(entry.params, data, where, f"pruner {entry.name!r}", sorted(option_names()))
    return PrunerChoice(entry.name, params)


def make_pruner(choice: PrunerChoice, first_rung_items: int, multi_objective: bool) -> Any:
    """The Optuna pruner of ``choice`` (none for multi-objective studies)."""
    if multi_objective:
        return optuna.pruners.NopPruner()
    try:
        return choice.entry.build(choice.params, first_rung_items)
    except ValueError as err:
        raise UserError(f"study.pruner: {err} (pruner {choice.name!r})") from None
