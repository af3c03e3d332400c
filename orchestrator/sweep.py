"""The main job: a study of merges over the candidates, searched with Optuna, tracked in MLflow.

``run_sweep(cfg)`` is one worker. It checks everything it can before any long work and before
writing anything (config, runs folder, search spaces, sampler, pruner, storage, tracking store,
candidates, tokenizer, tasks), loads one resident model, then joins the study under the
storage's lock (creating the study, the MLflow parent run and the baselines claim once, however
many workers start together), runs trials until the study has ``n_trials`` and none is running
anywhere, and, if it is the worker that ends the study, confirms the best of each method on the
confirm split, writes the best merge to ``runs/<study>/best/`` (staged, then renamed into
place) and logs the summary. Any number of workers may run this against one storage URL.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import SPACES_DIR, CandidatesConfig, EvalConfig, SweepConfig
from orchestrator.errors import UserError

if TYPE_CHECKING:  # torch comes with these: imported where used, after the cheap checks
    from orchestrator.objective import Rung, TrialReport
    from orchestrator.search import MethodSpace


@dataclass
class Row:
    """One line of the final table: a baseline or the best trial of a method."""

    name: str
    method: str
    search: float
    search_se: float
    confirm: float | None = None
    confirm_se: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    confirm_components: dict[str, float] = field(default_factory=dict)
    trial: int | None = None
    recipe: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- set-up checks


def load_spaces(cfg: SweepConfig) -> dict[str, MethodSpace]:
    """The search space of every method in the study, validated."""
    from orchestrator.merge import get_method
    from orchestrator.search import check_model_count, load_space

    if not cfg.method.methods:
        raise UserError("method.methods is empty: name at least one merge method")
    spaces = {}
    for name in cfg.method.methods:
        get_method(name)  # an unknown method fails here, with the registry's suggestions
        space = load_space(Path(cfg.method.spaces_dir or SPACES_DIR) / f"{name}.yaml", name)
        check_model_count(space, len(cfg.candidates.models))
        spaces[name] = space
    if len(spaces) == 1 and next(iter(spaces.values())).is_empty():
        raise UserError(f"the search space of {cfg.method.methods[0]!r} is empty: nothing to search "
                        "(add distributions, or compare it with other methods)")
    for space in spaces.values():
        check_weights_can_normalize(space)
    return spaces


def check_weights_can_normalize(space: MethodSpace) -> None:
    """Weights that are always zero cannot be normalised: every trial would fail."""
    import dataclasses

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_tokenizer(cand: CandidatesConfig) -> None:
    """The folder the evaluator takes the tokenizer from must have one."""
    where, folder = next((w, f) for w, f in (("candidates.tokenizer_source", cand.tokenizer_source),
                                               ("candidates.base", cand.base),
                                               ("candidates.models", next(iter(cand.models.values()))))
                         if f)
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where}: {folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); "
                        "set candidates.tokenizer_source to a folder that has one")


def resolve_candidates(cand: CandidatesConfig, runs_dir: Path) -> CandidatesConfig:
    """Absolute model folders; builds (or installs) the demo/micro zoo first when named."""
    if not cand.models:
        raise UserError("candidates.models is empty: name the models to merge")
    if cand.zoo:
        from orchestrator.zoo.build import build_zoo

        if cand.zoo not in ("demo", "micro"):
            raise UserError(f"candidates.zoo must be 'demo', 'micro' or null, got {cand.zoo!r}")
        zoo_dir = Path(cand.base or next(iter(cand.models.values()))).parent
        build_zoo(zoo_dir, micro=cand.zoo == "micro",
                  log=lambda msg: None if msg.startswith("test-split") else print(msg, flush=True))

    def resolve(ref: str | None, where: str, adapter_ok: bool = False) -> str | None:
        """An absolute model folder; a LoRA adapter becomes ``base+adapter`` (adapter_ok)."""
        from orchestrator.engine import resolve_reference
        from orchestrator.lora import is_adapter_folder
        from orchestrator.weights import is_model_folder

        if ref is None:
            return None
        try:
            path, adapter = resolve_reference(ref)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        if adapter is None and adapter_ok and is_adapter_folder(path):
            if base is None:
                raise UserError(f"{where}: {path} is a LoRA adapter; set candidates.base to the model "
                                f"it was trained on, or write MODEL+{ref}")
            path, adapter = Path(base), path
        if not is_model_folder(path):
            raise UserError(f"{where}: {path} is not a model folder (no config.json and weights)")
        return f"{path}+{adapter}" if adapter is not None else str(path)

    base = resolve(cand.base, "candidates.base")
    if base is not None and "+" in base:
        raise UserError(f"candidates.base must be a plain model folder, got {cand.base!r}")
    return CandidatesConfig(models={k: resolve(v, f"candidates.models.{k}", adapter_ok=True)
                                    for k, v in cand.models.items()},
                            base=base, zoo=cand.zoo, dtype=cand.dtype,
                            tokenizer_source=resolve(cand.tokenizer_source, "candidates.tokenizer_source"),
                            allow_pickle=cand.allow_pickle)


def adapter_candidates(candidates: CandidatesConfig) -> dict[str, str] | None:
    """``{name: adapter folder}`` when every candidate is ``base+adapter`` on the study's base."""
    prefix = f"{candidates.base}+" if candidates.base else None
    if prefix is None or not all(ref.startswith(prefix) for ref in candidates.models.values()):
        return None
    return {name: ref[len(prefix):] for name, ref in candidates.models.items()}


def eval_spec(cfg: EvalConfig, seed: int) -> Any:
    from orchestrator.evaluate import EvalSpec, TaskSpec

    tasks = tuple(TaskSpec(t.name, split_search=t.search_split, split_confirm=t.confirm_split,
                           metric=t.metric, weight=t.weight) for t in cfg.tasks)
    return EvalSpec(tasks=tasks, rungs=tuple(cfg.rungs), batch_size=cfg.batch_size,
                    num_fewshot=cfg.num_fewshot, include=tuple(cfg.include), device=cfg.device,
                    seed=seed, allow_search_on_confirm_split=cfg.allow_search_on_confirm_split)


# ----------------------------------------------------------------------------- resident model


class Resident:
    """The one loaded model, its merger and its evaluator.

    The merger is the engine's ``InMemoryMerger``, or, when every candidate is a LoRA adapter
    on the base and every method merges updates (``adapter_fast``), an ``AdapterMerger`` that
    rewrites only the adapted parameters: a trial then costs the adapters' size, not the model's.
    Both give the tensors ``merge_to_disk`` writes for the same recipe.
    """

    def __init__(self, candidates: CandidatesConfig, spec: Any, suite: Any, seed: int,
                 quiet: bool = True, adapter_fast: bool = False) -> None:
        from orchestrator.evaluate import ResidentEvaluator

        adapters = adapter_candidates(candidates) if adapter_fast else None
        self.merger: Any = None
        if adapters is None:
            self.merger = self._engine_merger(candidates, spec, seed)
        folder = candidates.base or next(iter(candidates.models.values()))
        if "+" in folder:  # no base: the first candidate is model+adapter; load its model
            folder = folder.partition("+")[0]
        self.evaluator = ResidentEvaluator(folder, spec, tokenizer=candidates.tokenizer_source, suite=suite)
        self.adapters = self._adapter_merger(adapters) if adapters is not None else None
        self.adapter_index = {ref: i for i, ref in enumerate(candidates.models.values())} if adapters else {}
        if self.merger is not None:
            self.merger.model = self.evaluator.model
        self.quiet = quiet
        self._leaf_info = {leaf: (t.name, suite.metrics[t.name], t.weight)
                           for t in spec.tasks for leaf in suite.loaded(t.name, None).leaves}

    @staticmethod
    def _engine_merger(candidates: CandidatesConfig, spec: Any, seed: int) -> Any:
        from orchestrator.engine import InMemoryMerger

        try:  # headers, architectures and vocabularies are checked here
            return InMemoryMerger(union_recipe(candidates), device=spec.device, seed=seed,
                                  allow_pickle=candidates.allow_pickle)
        except UserError as err:
            raise UserError(str(err).replace("pass --allow-pickle", "set candidates.allow_pickle=true")) from None

    def _adapter_merger(self, adapters: Mapping[str, str]) -> Any:
        """An ``AdapterMerger`` over the candidates' adapters, on the resident base model."""
        from orchestrator.lora import AdapterMerger, load_adapter

        loaded = []
        for name, path in adapters.items():
            try:
                loaded.append(load_adapter(path, name=name))
            except UserError as err:
                raise UserError(f"candidates.models.{name}: {err}") from None
        try:
            return AdapterMerger(self.evaluator.model, loaded)
        except UserError as err:
            raise UserError(f"candidates: {err}") from None

    def _merge_adapters(self, recipe: Mapping[str, Any], seed: int) -> None:
        """A recipe over ``base+adapter`` candidates, merged by the ``AdapterMerger``."""
        from orchestrator.merge import get_method

        method, entries = recipe["merge_method"], recipe.get("models") or []
        gparams = dict(recipe.get("parameters") or {})
        if recipe.get("slices") or not entries:
            raise UserError("an adapter sweep merges recipes with models:, not slices")
        spec = get_method(method)
        if not spec.merges_updates(spec.make_params(gparams)):
            raise UserError(f"an adapter sweep cannot run {method} with {gparams} (it scales the whole "
                            "model, not only the adapted parameters)")
        subset, params = [], []
        for entry in entries:
            ref = entry["model"] if isinstance(entry, Mapping) else entry
            subset.append(self.adapter_index[ref])
            params.append(dict(entry.get("parameters") or {}) if isinstance(entry, Mapping) else {})
        self.adapters.apply(method, params, gparams, seed, subset=subset)

    def merge(self, recipe: Mapping[str, Any], seed: int) -> None:
        import torch

        if self.adapters is not None:
            self._merge_adapters(recipe, seed)
            written = [self.adapters.params[n] for n in self.adapters.names]  # the rest is the base's
        else:
            self.merger.merge_into(dict(recipe), seed=seed)
            written = self.evaluator.model.parameters()
        if not all(torch.isfinite(p).all() for p in written):
            raise FloatingPointError("the merge produced NaN or inf weights")
        self.evaluator.reset()

    def rungs(self, split: str, per_item: bool = False) -> Iterator[Rung]:
        """The evaluator's rungs as ``Rung``s; with ``per_item``, also the items each one added.

        Per-item values are only needed by the Wilcoxon pruner; collecting them scans every
        stored item at every rung, so the other pruners skip it.
        """
        seen: set[tuple[str, int]] = set()
        for result in _quiet_iter(self.evaluator.evaluate_rungs(split), self.quiet):
            new = self._new_items(split, seen) if per_item else ()
            yield _rung(result.n_items, result.score, result.stderr,
                        {k: c.value for k, c in result.components.items()}, new)

    def _new_items(self, split: str, seen: set[tuple[str, int]]) -> tuple[tuple[int, float], ...]:
        """(stable id, weighted metric value) of the items not in ``seen`` (which it updates)."""
        new = []
        for leaf, docs in self.evaluator.item_results(split).items():
            _, metric, weight = self._leaf_info[leaf]
            for doc, record in docs.items():
                if (leaf, doc) not in seen:
                    seen.add((leaf, doc))
                    new.append((_item_id(leaf, doc), weight * float(record[metric])))
        return tuple(sorted(new))

    def evaluate(self, split: str) -> Any:
        with _quiet(self.quiet):
            return self.evaluator.evaluate(split)


@contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Send lm-eval's progress bars (tqdm on stderr) to nowhere while evaluating."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def _quiet_iter(results: Iterator[Any], on: bool) -> Iterator[Any]:
    while True:
        with _quiet(on):
            result = next(results, None)
        if result is None:
            return
        yield result


def _item_id(leaf: str, doc: int) -> int:
    """A stable integer id of an item (the same in every worker and on resume)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{leaf}/{doc}".encode(), digest_size=6).digest(), "big")


def union_recipe(candidates: CandidatesConfig) -> dict[str, Any]:
    """A recipe naming every candidate (and the base): fixes the merger's model set."""
    from orchestrator.search import build_recipe

    models = {k: v for k, v in candidates.models.items()}
    recipe = build_recipe("task_arithmetic", {}, {k: {"weight": 1.0} for k in models}, models,
                          candidates.base, candidates.dtype, candidates.tokenizer_source)
    if candidates.base is None:
        recipe = build_recipe("linear", {}, {k: {"weight": 1.0} for k in models}, models, None,
                              candidates.dtype, candidates.tokenizer_source)
    return recipe


def baseline_recipes(candidates: CandidatesConfig) -> dict[str, dict[str, Any]]:
    """Each parent model alone, and their uniform average."""
    from orchestrator.search import build_recipe

    models = candidates.models
    out = {}
    for name in models:
        out[f"parent:{name}"] = build_recipe("linear", {}, {name: {"weight": 1.0}}, {name: models[name]},
                                             None, candidates.dtype, candidates.tokenizer_source)
    out["uniform average"] = build_recipe("linear", {"normalize": True}, {k: {"weight": 1.0} for k in models},
                                          models, None, candidates.dtype, candidates.tokenizer_source)
    return out


# ----------------------------------------------------------------------------- the study


@dataclass
class SweepOutcome:
    """What a worker's sweep returns (and prints); ``final``: this worker ended the study."""

    study_name: str
    rows: list[Row]
    best: Row | None
    best_dir: Path | None
    n_trials: dict[str, int]
    parent_run_id: str | None
    final: bool = True
    ran: int = 0
    worker: str = ""


@dataclass
class Setup:
    """Everything checked before the model loads and before anything is written."""

    runs_dir: Path
    spaces: dict[str, MethodSpace]
    sampler: Any
    pruner: Any
    spec: Any
    suite: Any
    url: str
    candidates: CandidatesConfig
    directions: list[str]
    n_trials: int  # study.n_trials, capped at the grid's size for the grid sampler
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Session:
    """A worker's place in a study: storage, study, tracker and its roles."""

    storage: Any
    study: Any
    tracker: Any
    lock: Any
    stale: Any
    worker: str
    baselines_mine: bool
    done_at_join: bool = False  # the study had all its trials when this worker joined


def worker_name() -> str:
    """``host:pid``: names a worker in trials (user attr) and MLflow runs (tag ``mo.worker``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_sweep(cfg: SweepConfig, overrides: list[str] | None = None, out=sys.stdout) -> SweepOutcome:
    """One worker: check everything, load the model, join the study, run trials, maybe finalise."""
    from orchestrator.workers import Signals

    say = _printer(out)
    setup = prepare(cfg, say)
    if cfg.eval.threads:
        import torch

        torch.set_num_threads(cfg.eval.threads)
    start = time.perf_counter()
    fast = all(space.spec.merges_deltas for space in setup.spaces.values())
    resident = Resident(setup.candidates, setup.spec, setup.suite, cfg.study.seed, adapter_fast=fast)
    if resident.adapters is not None:
        say(f"adapter sweep: each trial rewrites the {len(resident.adapters.names)} adapted parameters only")
    say(f"resident model loaded in {time.perf_counter() - start:.1f}s")
    signals = Signals()
    signals.install()
    try:
        session = join(cfg, setup, overrides)
        return work(cfg, setup, session, resident, signals, say)
    finally:
        signals.restore()


def prepare(cfg: SweepConfig, say: Any) -> Setup:
    """Every check that needs no model, in order of cost; writes nothing (the zoo aside)."""
    from orchestrator.evaluate import check_tasks_available
    from orchestrator.study import AskTellGridSampler, check_storage, make_pruner, make_sampler, storage_url
    from orchestrator.tracking import check_tracking

    runs_dir = Path(cfg.runs_dir).resolve()
    check_runs_dir(runs_dir)
    make_sampler(cfg.study.sampler, {})  # names first: no torch imported yet
    pruner = make_pruner(cfg.study.pruner, _first_rung_items(cfg.eval), cfg.study.multi_objective)
    url = storage_url(cfg.study.storage, runs_dir)
    if cfg.study.storage:  # the default lives in runs_dir, checked above
        check_storage(url)
    if cfg.tracking.uri:
        check_tracking(cfg.tracking, runs_dir)
    spaces = load_spaces(cfg)
    names = list(cfg.candidates.models)
    grid = {k: v for s in spaces.values() for k, v in s.param_grid(names, cfg.study.sampler.grid_points).items()}
    if len(spaces) > 1:
        grid["method"] = list(spaces)
    sampler = make_sampler(cfg.study.sampler, grid)
    spec = eval_spec(cfg.eval, cfg.study.seed)
    candidates = resolve_candidates(cfg.candidates, runs_dir)
    check_tokenizer(candidates)
    say(f"study {cfg.study.name!r}: methods {', '.join(spaces)}; candidates {', '.join(names)}")
    suite = check_tasks_available(spec)  # datasets resolved before any model is loaded
    directions = ["maximize"] * (len(spec.tasks) if cfg.study.multi_objective else 1)
    n_trials = cfg.study.n_trials
    if isinstance(sampler, AskTellGridSampler) and sampler.size < n_trials:
        say(f"grid sampler: {sampler.size} grid points, so {sampler.size} trials (not {n_trials})")
        n_trials = sampler.size
    return Setup(runs_dir, spaces, sampler, pruner, spec, suite, url, candidates, directions, n_trials, grid)


def join(cfg: SweepConfig, setup: Setup, overrides: list[str] | None) -> Session:
    """Open (or create) storage, study and parent run under the storage's join lock."""
    from orchestrator.search import space_as_dict
    from orchestrator.study import JOIN, StudyLock, make_storage, open_study, storage_kind
    from orchestrator.workers import StaleTrials, counted, running
    from orchestrator.tracking import Tracker

    name = cfg.study.name
    stale = StaleTrials(cfg.study.max_retry)
    setup.runs_dir.mkdir(parents=True, exist_ok=True)  # the default sqlite stores and their lock live here
    with StudyLock(setup.url, JOIN):
        rdb = storage_kind(setup.url) != "journal"
        storage = make_storage(setup.url, cfg.study.heartbeat_s, cfg.study.grace_s, stale if rdb else None)
        study = open_study(name, storage, setup.sampler, setup.pruner, setup.directions)
        _own_sampler_seed(study, cfg, setup)
        _enqueue_uniform(study, setup.spaces, list(setup.candidates.models))
        tracker = Tracker(cfg.tracking, setup.runs_dir)
        tracker.start_study(name, _study_params(cfg, overrides, setup.url),
                            {"config.yaml": _config_yaml(cfg),
                             "search_space.json": {k: space_as_dict(v) for k, v in setup.spaces.items()}})
        mine = cfg.study.baselines and _claim(study, "mo.baselines_by", worker_name())
        trials = study.get_trials(deepcopy=False)
        done = counted(trials) >= setup.n_trials and not running(trials)
    stale.listeners.append(tracker.close_stale_trial)
    return Session(storage, study, tracker, StudyLock(setup.url, f"merge-orchestrator/study/{name}"),
                   stale, worker_name(), mine, done)


def _own_sampler_seed(study: Any, cfg: SweepConfig, setup: Setup) -> None:
    """The k-th worker to join a study samples with seed + k (call under the join lock).

    Workers with one seed would propose the same random start-up points; a resumed study
    would repeat its first ones. The first worker keeps the configured seed (reproducible).
    """
    import dataclasses

    from orchestrator.study import make_sampler

    joins = int(study.user_attrs.get("mo.joins", 0))
    study.set_user_attr("mo.joins", joins + 1)
    if joins:
        seed = cfg.study.sampler.seed + joins
        study.sampler = make_sampler(dataclasses.replace(cfg.study.sampler, seed=seed), setup.grid)


def _claim(study: Any, key: str, who: str) -> bool:
    """Take a one-time role (call under the lock): True for the first worker to ask."""
    if study.user_attrs.get(key):
        return False
    study.set_user_attr(key, who)
    return True


def work(cfg: SweepConfig, setup: Setup, session: Session, resident: Resident, signals: Any,
         say: Any) -> SweepOutcome:
    """Baselines (if this worker claimed them), trials, then the final report if it is the last."""
    from orchestrator.objective import Objective
    from orchestrator.workers import Liveness, Worker

    status = "FAILED"
    try:
        if session.baselines_mine:
            run_baselines(session.study, resident, setup.candidates, session.tracker, cfg, say)
        objective = Objective(setup.spaces, resident, session.tracker, setup.candidates, cfg.study.seed,
                              cfg.study.multi_objective, cfg.study.pruner.name == "wilcoxon",
                              on_done=_progress(session.study, say), worker=session.worker,
                              interruptible=signals.interruptible)
        liveness = Liveness(session.storage, cfg.study.heartbeat_s, cfg.study.grace_s, session.stale,
                            session.worker)
        worker = Worker(session.study, session.lock, liveness, signals, setup.n_trials, cfg.study.timeout_s,
                        on_abandoned=session.tracker.sync_trial)
        worker.run(objective)
        outcome = finish(cfg, setup, session, resident, worker.ran, say)
        status = "FINISHED" if outcome.final else ""
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_parent(session, status)


def _close_parent(session: Session, status: str) -> None:
    """End the parent run: FINISHED by the finaliser; KILLED/FAILED only if no other worker is busy."""
    from orchestrator.workers import running

    if not status:
        return
    if status != "FINISHED" and running(session.study.get_trials(deepcopy=False)):
        return  # other workers carry on under the same parent
    session.tracker.end_study(status)


def finish(cfg: SweepConfig, setup: Setup, session: Session, resident: Resident, ran: int,
           say: Any) -> SweepOutcome:
    """Confirm, save the best and report, if this worker ends the study (once per state of it)."""
    from orchestrator.workers import running

    study, tracker = session.study, session.tracker
    with session.lock:
        trials = study.get_trials(deepcopy=False)
        busy = running(trials)
        state = f"{sum(t.state.is_finished() for t in trials)}/{len(trials)}"
        # once per state of the study; again on an explicit re-run of a finished study
        mine = not busy and (session.done_at_join or study.user_attrs.get("mo.final") != state)
        if mine:
            study.set_user_attr("mo.final", state)
    if not mine:
        say(f"worker {session.worker} done ({ran} trials); "
            + ("other workers are still running trials; the last one writes the report" if busy
               else "another worker writes the report"))
        return SweepOutcome(cfg.study.name, [], None, None, _counts(study), tracker.parent_id, False, ran,
                            session.worker)
    tracker.reconcile(study.get_trials(deepcopy=False))
    baselines = run_baselines(study, resident, setup.candidates, tracker, cfg, say, quiet=True)
    rows = baselines + best_rows(study, setup.spaces)
    confirm_rows(rows, resident, cfg.study.seed, study, say)
    best = _best(rows)
    best_dir = None
    if best and cfg.study.save_best:
        best_dir = save_best(best, setup.runs_dir / cfg.study.name / "best", cfg, rows)
    report = format_table(rows, setup.spec)
    say(report)
    log_summary(tracker, study, rows, best, best_dir, report)
    return SweepOutcome(cfg.study.name, rows, best, best_dir, _counts(study), tracker.parent_id, True, ran,
                        session.worker)


def _first_rung_items(cfg: EvalConfig) -> int:
    first = cfg.rungs[0] if cfg.rungs else 1
    return int(first) * max(1, len(cfg.tasks)) if isinstance(first, int) else 1


def _counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def _enqueue_uniform(study: Any, spaces: Mapping[str, MethodSpace], names: list[str]) -> None:
    """Start from the uniform average when linear is searched (a known-good point)."""
    if study.get_trials(deepcopy=False) or "linear" not in spaces:
        return
    space = spaces["linear"]
    if "weight" not in space.per_model:
        return
    params = {f"linear.{n}.weight": space.per_model["weight"].high for n in names}
    if len(spaces) > 1:
        params["method"] = "linear"
    study.enqueue_trial(params, user_attrs={"enqueued": "uniform average"})


# ----------------------------------------------------------------------------- baselines and best


def run_baselines(study: Any, resident: Resident, candidates: CandidatesConfig, tracker: Any,
                  cfg: SweepConfig, say: Any, quiet: bool = False) -> list[Row]:
    """Each parent and the uniform average on the search split (stored in the study, once)."""
    if not cfg.study.baselines:
        return []
    stored = dict(study.user_attrs.get("baselines", {}))
    logged = {r.info.run_name for r in tracker.children("baseline")} if tracker.enabled else set()
    rows = []
    for name, recipe in baseline_recipes(candidates).items():
        if name not in stored:
            resident.merge(recipe, cfg.study.seed)
            result = _last(resident.rungs("search"))
            stored[name] = {"search": result.score, "search_se": result.stderr,
                            "components": dict(result.components), "recipe": recipe}
            study.set_user_attr("baselines", stored)
        if f"baseline:{name}" not in logged:
            run_id = tracker.start_trial(-1, {"method": "linear", "baseline": name}, kind="baseline",
                                         name=f"baseline:{name}")
            tracker.log_metrics(run_id, {"score": stored[name]["search"], **stored[name]["components"]})
            tracker.end_trial(run_id, "FINISHED")
        b = stored[name]
        rows.append(Row(name, "baseline", b["search"], b["search_se"], components=dict(b["components"]),
                        recipe=b["recipe"]))
        if not quiet:
            say(f"baseline {name:<22} search {b['search']:.4f} ± {b['search_se']:.4f}")
    return rows


def _last(iterator: Iterator[Any]) -> Any:
    """The final item of an iterator (the last rung: the full search split)."""
    last = None
    for last in iterator:  # noqa: B007 - only the final value is wanted
        pass
    return last


def best_rows(study: Any, spaces: Mapping[str, MethodSpace]) -> list[Row]:
    """The best completed trial of each method (all Pareto-optimal trials when multi-objective)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if "recipe" in t.user_attrs]
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        chosen = [t for t in complete if t.number in front]
        return [_trial_row(t, f"pareto #{t.number}") for t in chosen]
    rows = []
    for method in spaces:
        trials = [t for t in complete if t.user_attrs.get("method") == method]
        if trials:
            best = max(trials, key=lambda t: t.value)
            rows.append(_trial_row(best, f"best {method}"))
    return rows


def _trial_row(t: Any, name: str) -> Row:
    comps = t.user_attrs.get("components", {})
    score = t.values[0] if len(t.values) == 1 else sum(t.values) / len(t.values)
    return Row(name, t.user_attrs["method"], score, float(t.user_attrs.get("stderr", float("nan"))),
               components=dict(comps), trial=t.number, recipe=t.user_attrs["recipe"])


def confirm_rows(rows: list[Row], resident: Resident, seed: int, study: Any, say: Any) -> None:
    """Score each row on the confirm split (cached in the study by recipe key)."""
    from orchestrator.objective import recipe_key

    for row in rows:
        key = f"confirm:{recipe_key(row.recipe, seed)}"
        cached = study.user_attrs.get(key)
        if cached is None:
            resident.merge(row.recipe, seed)
            result = resident.evaluate("confirm")
            cached = {"score": result.score, "se": result.stderr,
                      "components": {k: c.value for k, c in result.components.items()}}
            study.set_user_attr(key, cached)
        row.confirm, row.confirm_se = cached["score"], cached["se"]
        row.confirm_components = dict(cached["components"])
        say(f"confirm {row.name:<24} {row.confirm:.4f} ± {row.confirm_se:.4f}")


def _best(rows: list[Row]) -> Row | None:
    """The best merge is chosen on the search split; the confirm score is what it reports."""
    trials = [r for r in rows if r.trial is not None]
    return max(trials, key=lambda r: r.search) if trials else None


def save_best(best: Row, out_dir: Path, cfg: SweepConfig, rows: list[Row]) -> Path:
    """Write the best merge as a Hugging Face model folder: staged whole, then swapped into place."""
    import json
    import shutil

    from orchestrator.engine import merge_to_disk

    stage = out_dir.with_name(f".{out_dir.name}.stage-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        merge_to_disk(best.recipe, stage, seed=cfg.study.seed, allow_pickle=cfg.candidates.allow_pickle)
        scores = {"study": cfg.study.name, "trial": best.trial, "method": best.method,
                  "search": {"score": best.search, "stderr": best.search_se},
                  "confirm": {"score": best.confirm, "stderr": best.confirm_se},
                  "components": {"search": best.components, "confirm": best.confirm_components},
                  "recipe": best.recipe, "seed": cfg.study.seed}
        (stage / "scores.json").write_text(json.dumps(scores, indent=2))
        with open(stage / "README.md", "a") as card:
            card.write("\n## Scores (merge-orchestrator)\n\n" + format_table(rows, None) + "\n")
        _swap_in(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def _swap_in(stage: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete ``stage`` folder (two renames; never a partial folder)."""
    import shutil

    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reporting


def format_table(rows: list[Row], spec: Any) -> str:
    """Markdown table: search and confirm scores (± standard error) per row."""
    comp_keys = list(dict.fromkeys(k for r in rows for k in r.confirm_components))
    head = ["", "method", "trial", "search", "confirm", *(f"{k} (confirm)" for k in comp_keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, r.method, "" if r.trial is None else str(r.trial), _pm(r.search, r.search_se),
                 _pm(r.confirm, r.confirm_se), *[_num(r.confirm_components.get(k)) for k in comp_keys]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(value: float | None, se: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} ± {se:.4f}" if se is not None and se == se else f"{value:.4f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def log_summary(tracker: Any, study: Any, rows: list[Row], best: Row | None, best_dir: Path | None,
                table: str) -> None:
    """Parent run: confirm metrics of the best, the table, the model card, Optuna's plots."""
    import yaml

    pid = tracker.parent_id
    tracker.log_artifact_data(pid, "comparison.md", table + "\n")
    if best is not None:
        tracker.log_metrics(pid, {"best_search": best.search, "best_confirm": best.confirm or float("nan"),
                                  **{f"best_search.{k}": v for k, v in best.components.items()},
                                  **{f"best_confirm.{k}": v for k, v in best.confirm_components.items()}})
        tracker.set_tags(pid, {"best_trial": best.trial, "best_method": best.method})
        tracker.log_artifact_data(pid, "best/mergekit_config.yml", yaml.safe_dump(best.recipe, sort_keys=False))
    if best_dir is not None:
        tracker.log_artifact_data(pid, "best/README.md", (best_dir / "README.md").read_text())
    for name, fig in _plots(study):
        tracker.log_figure(pid, fig, f"plots/{name}.png")


def _plots(study: Any) -> Iterator[tuple[str, Any]]:
    """Optuna's matplotlib plots; a plot that cannot be drawn is skipped, never fatal."""
    import warnings

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return
    single = len(study.directions) == 1
    plots = {"optimization_history": ovm.plot_optimization_history, "param_importances": ovm.plot_param_importances,
             "intermediate_values": ovm.plot_intermediate_values} if single else {"pareto_front": ovm.plot_pareto_front}
    for name, fn in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = fn(study)
            except Exception:  # noqa: BLE001 - e.g. too few trials for importances
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        yield name, fig
        plt.close(fig)


def _printer(out: Any):
    def say(text: str) -> None:
        print(text, file=out, flush=True)
    return say


def _rung(*args: Any) -> Rung:
    from orchestrator.objective import Rung

    return Rung(*args)


def _progress(study: Any, say: Any):
    """Prints one line per finished trial: method, parameters, rungs, state, best so far."""
    from orchestrator.objective import COMPLETE

    def on_done(r: TrialReport) -> None:
        params = " ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in r.params.items() if k != "method")
        rungs = " ".join(f"{s:.3f}@{n}" for n, s in r.rungs)
        state = r.state if r.state != COMPLETE else f"complete {r.value:.4f}" if r.value is not None else r.state
        best = _best_so_far(study, r)
        say(f"trial {r.number:>3} {r.method:<16} {params}  | {rungs} | {state}{best}"
            + (f" ({r.reason})" if r.reason else ""))
    return on_done


def _best_so_far(study: Any, r: TrialReport) -> str:
    from orchestrator.objective import COMPLETE

    if len(study.directions) > 1:
        return ""
    try:
        best = study.best_trial
    except ValueError:
        return ""
    value = best.value
    if r.state == COMPLETE and r.value is not None and r.value > value:
        return f" | best {r.value:.4f} (#{r.number})"
    return f" | best {value:.4f} (#{best.number})"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _study_params(cfg: SweepConfig, overrides: list[str] | None, url: str) -> dict[str, Any]:
    import dataclasses

    from orchestrator.study import redact
    from orchestrator.tracking import git_commit, package_versions

    data = dataclasses.asdict(cfg)
    data["study"]["storage"] = redact(url)
    return {"config": data, "overrides": " ".join(overrides or []), "git_commit": git_commit(Path(__file__).parents[1]),
            "versions": package_versions(), "seeds": {"merge": cfg.study.seed, "sampler": cfg.study.sampler.seed}}


def _config_yaml(cfg: SweepConfig) -> str:
    import dataclasses

    import yaml

    from orchestrator.study import redact

    data = dataclasses.asdict(cfg)
    if data["study"]["storage"]:
        data["study"]["storage"] = redact(data["study"]["storage"])
    if data["tracking"]["uri"]:
        data["tracking"]["uri"] = redact(data["tracking"]["uri"])
    return yaml.safe_dump(data, sort_keys=False)
