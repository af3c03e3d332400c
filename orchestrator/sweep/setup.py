"""Everything a worker checks before it loads a model or writes anything.

``prepare`` runs the checks in order of cost, so a typo fails in seconds: the runs folder,
the sampler and pruner, the storage, the tracking store, the search spaces and how methods
share the trials, the candidates (building the demo zoo when named), the tokenizer, the tasks
and their datasets, the rungs. It returns the ``Setup`` the rest of the sweep works from.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import SPACES_DIR, SweepConfig
from orchestrator.errors import UserError
from orchestrator.evaluation.spec import EvalSpec, TaskSpec
from orchestrator.evaluation.suite import TaskSuite, check_tasks_available
from orchestrator.merge import get_method
from orchestrator.study import fingerprint
from orchestrator.study.binding import bind_spaces
from orchestrator.study.candidates import Candidates, base_as_candidate, check_tokenizer, resolve_candidates
from orchestrator.study.group import FAIR, member_methods
from orchestrator.study.pruners import make_pruner
from orchestrator.study.samplers import grid_size, make_sampler
from orchestrator.study.spaces import (
    DATAFLOW,
    MethodSpace,
    check_model_count,
    load_space,
    merge_method_of,
    space_as_dict,
)
from orchestrator.study.storage import check_storage, storage_url
from orchestrator.tracking.store import check_tracking
from orchestrator.zoo.build import build_zoo


@dataclass
class Setup:
    """What the checks found: the spaces, the tasks, the candidates, where the study lives."""

    runs_dir: Path
    spaces: dict[str, Any]  # MethodSpace, or DataflowSpace for data-flow methods
    spec: EvalSpec
    suite: TaskSuite
    url: str
    candidates: Candidates
    directions: list[str]
    n_trials: int
    members: list[str | None]
    first_rung: int = 1
    grids: dict[str | None, dict[str, list[Any]]] = field(default_factory=dict)
    caps: dict[str | None, int] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def pruner(self, cfg: SweepConfig) -> Any:
        return make_pruner(cfg.study.pruner, self.first_rung, cfg.study.multi_objective)

    def sampler(self, cfg: SweepConfig, member: str | None, offset: int = 0) -> Any:
        """The sampler of one member, seeded with the study's seed + ``offset`` + its place."""
        place = self.members.index(member) if member in self.members else 0
        choice = cfg.study.sampler.with_seed(cfg.study.sampler.seed + offset + 1009 * place)
        return make_sampler(choice, self.grids.get(member, {}))


def prepare(cfg: SweepConfig, say: Any) -> Setup:
    """Every check that needs no model, in order of cost; writes nothing (the zoo aside)."""
    runs_dir = Path(cfg.runs_dir).resolve()
    check_runs_dir(runs_dir)
    url = storage_url(cfg.study.storage, runs_dir)
    if cfg.study.storage:  # the default lives in runs_dir, checked above
        check_storage(url)
    if cfg.tracking.enabled and cfg.tracking.uri:
        check_tracking(cfg.tracking.uri, runs_dir)
    spaces = load_spaces(cfg)
    members = member_methods(list(spaces), cfg.study.compare)
    check_sampler_fits(cfg, spaces, members)
    spec = eval_spec(cfg)
    candidates = resolve_candidates(_candidates(cfg, runs_dir))
    check_tokenizer(candidates)
    spaces = bind_spaces(spaces, candidates, runs_dir / cfg.study.name / "ps", cfg.study.seed)
    check_adapter_sweep(spaces, candidates)
    grids, caps = _grids(cfg, spaces, members)
    warnings = [w for w in (base_as_candidate(candidates, list(spaces)),) if w]
    say(f"study {cfg.study.name!r}: methods {', '.join(spaces)}"
        f"{' (fair: equal trials each)' if members != [None] else ''}; candidates {', '.join(candidates.models)}")
    suite = check_tasks_available(spec)  # datasets and rungs checked before any model is loaded
    directions = ["maximize"] * (len(spec.tasks) if cfg.study.multi_objective else 1)
    setup = Setup(runs_dir, spaces, spec, suite, url, candidates, directions, cfg.study.n_trials, members,
                  first_rung_items(suite), grids, caps, warnings=warnings)
    setup.pruner(cfg)  # a bad pruner option fails here
    for member in members:
        setup.sampler(cfg, member)  # a bad sampler option or an impossible grid fails here
    setup.n_trials = _capped(cfg.study.n_trials, caps, members, say)
    setup.fingerprint = study_fingerprint(cfg, setup)
    return setup


def _candidates(cfg: SweepConfig, runs_dir: Path) -> Candidates:
    c = cfg.candidates
    if c.zoo:
        build_named_zoo(c.zoo, c.base or next(iter(c.models.values()), None))
    return Candidates(dict(c.models), c.base, c.dtype, c.tokenizer_source, c.allow_pickle, c.knots)


def build_named_zoo(zoo: str, first_model: str | None) -> None:
    """Build (or install) the demo or micro zoo the candidates live in."""
    if zoo not in ("demo", "micro"):
        raise UserError(f"candidates.zoo must be 'demo', 'micro' or null, got {zoo!r}")
    if first_model is None:
        raise UserError("candidates.models is empty: name the models to merge")
    build_zoo(Path(first_model).parent, micro=zoo == "micro",
              log=lambda msg: None if msg.startswith("test-split") else print(msg, flush=True))


def load_spaces(cfg: SweepConfig) -> dict[str, MethodSpace]:
    """The search space of every method in the study, validated."""
    if not cfg.method.methods:
        raise UserError("method.methods is empty: name at least one merge method")
    spaces = {}
    for name in cfg.method.methods:
        if merge_method_of(name) != DATAFLOW:
            get_method(merge_method_of(name))  # an unknown method fails here, with the registry's suggestions
        space = load_space(Path(cfg.method.spaces_dir or SPACES_DIR) / f"{name}.yaml", name)
        check_model_count(space, len(cfg.candidates.models))
        spaces[name] = space
    if len(spaces) == 1 and next(iter(spaces.values())).is_empty():
        raise UserError(f"the search space of {cfg.method.methods[0]!r} is empty: nothing to search "
                        "(add distributions, or compare it with other methods)")
    for space in spaces.values():
        for part in (space, getattr(space, "ps", None)):
            if isinstance(part, MethodSpace):
                check_weights_can_normalize(part)
    return spaces


def check_adapter_sweep(spaces: Mapping[str, Any], candidates: Candidates) -> None:
    """The adapter fast path merges per-model scalars over ``models:``: no layer groups, no filters.

    ``candidates.knots`` needs that path: every candidate an adapter on the base, every method
    merging updates (KnOTS aligns adapter factors, which a full-model merge does not have).
    """
    if candidates.knots and (candidates.adapters() is None
                             or not all(space.spec.merges_deltas for space in spaces.values())):
        raise UserError("candidates.knots=true merges LoRA adapters in their joint SVD basis: every candidate "
                        "must be an adapter on candidates.base and every method must merge updates "
                        f"(methods: {', '.join(spaces)})")
    if candidates.adapters() is None or not all(space.spec.merges_deltas for space in spaces.values()):
        return
    for name, space in spaces.items():
        layered = [k for k, lay in space.layouts().items() if not lay.trivial]
        if layered:
            raise UserError(f"search space of {name!r}: {layered[0]} has layer groups or filters, which the "
                            "adapter sweep (every candidate a LoRA adapter on the base) does not merge; "
                            "search the adapters' weights per model, or bake the adapters into models")


def check_sampler_fits(cfg: SweepConfig, spaces: Mapping[str, MethodSpace], members: list[str | None]) -> None:
    """A sampler that models only shared parameters cannot choose among methods itself."""
    entry = cfg.study.sampler.entry
    if len(spaces) > 1 and members == [None] and not entry.conditional and not entry.needs_grid:
        raise UserError(f"study.sampler.name={entry.name} with study.compare=free over {len(spaces)} methods would "
                        f"search every method's parameters at random ({entry.name} models only the parameters "
                        "all trials share); use study.compare=fair (a sampler per method) or a sampler that "
                        "handles conditional spaces (tpe, random)")


def check_weights_can_normalize(space: MethodSpace) -> None:
    """Weights that are always zero cannot be normalised: every trial would fail."""
    dist, fixed = space.per_model.get("weight"), space.fixed.get("weight")
    corners = dist.corners() if dist is not None else [fixed] if fixed is not None else [1.0]
    if any(not isinstance(v, (int, float)) or v != 0 for v in corners):
        return
    key = space.spec.normalize_key
    defaults = {f.name: f.default for f in dataclasses.fields(space.spec.params)}
    if key is not None and space.fixed.get(key, defaults[key]):
        raise UserError(f"search space of {space.method!r}: the weights are always 0 but {key} is true, "
                        "so they sum to zero and every trial would fail; widen the weight range "
                        f"or set {key}: false")


def check_runs_dir(runs_dir: Path) -> None:
    """The output folder must be creatable and writable (probed without creating it)."""
    existing = runs_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create runs folder {runs_dir}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"runs folder {runs_dir} is not writable ({err.strerror} in {existing})") from None


def eval_spec(cfg: SweepConfig) -> EvalSpec:
    """What the study evaluates; the resident model loads in ``candidates.dtype``, the dtype the
    merges are written in, so the model scored is the model saved."""
    e = cfg.eval
    tasks = tuple(TaskSpec(t.name, search_split=t.search_split, confirm_split=t.confirm_split,
                           metric=t.metric, weight=t.weight) for t in e.tasks)
    return EvalSpec(tasks=tasks, rungs=tuple(e.rungs), batch_size=e.batch_size, num_fewshot=e.num_fewshot,
                    include=tuple(e.include), device=e.device, dtype=cfg.candidates.dtype, seed=cfg.study.seed,
                    allow_search_on_confirm_split=e.allow_search_on_confirm_split)


def first_rung_items(suite: TaskSuite) -> int:
    """Items (all tasks) of the first rung: the pruner's smallest resource."""
    return max(1, sum(suite.rung_counts("search")[0]))


def _grids(cfg: SweepConfig, spaces: Mapping[str, MethodSpace],
           members: list[str | None]) -> tuple[dict[str | None, dict[str, list[Any]]], dict[str | None, int]]:
    """The grid of each member (grid sampler only) and how many trials it can run."""
    if not cfg.study.sampler.entry.needs_grid:
        return {}, {}
    names, points = list(cfg.candidates.models), cfg.study.sampler.params.grid_points
    grids: dict[str | None, dict[str, list[Any]]] = {}
    for member in members:
        methods = list(spaces) if member is None else [member]
        grid = {k: v for m in methods for k, v in spaces[m].param_grid(names, points).items()}
        if len(methods) > 1:
            grid["method"] = methods
        grids[member] = grid
    return grids, {m: grid_size(g) for m, g in grids.items()}


def _capped(n_trials: int, caps: Mapping[str | None, int], members: list[str | None], say: Any) -> int:
    total = sum(caps.get(m, n_trials) for m in members) if caps else n_trials
    if total < n_trials:
        say(f"grid sampler: {total} grid points, so {total} trials (not {n_trials})")
        return total
    return n_trials


def study_fingerprint(cfg: SweepConfig, setup: Setup) -> dict[str, Any]:
    c = setup.candidates
    tasks = [{"name": t.name, "metric": t.metric, "weight": t.weight, "search_split": t.search_split,
              "confirm_split": t.confirm_split} for t in cfg.eval.tasks]
    return fingerprint.fingerprint(
        models=c.models, base=c.base, dtype=c.dtype, tokenizer_source=c.tokenizer_source,
        spaces={k: space_as_dict(v) for k, v in setup.spaces.items()}, tasks=tasks, rungs=cfg.eval.rungs,
        num_fewshot=cfg.eval.num_fewshot, seed=cfg.study.seed, knots=c.knots,
        compare=FAIR if setup.members != [None] else "one sampler", directions=setup.directions)
