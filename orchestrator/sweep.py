"""The main job: a study of merges over the candidates, searched with Optuna, tracked in MLflow.

``run_sweep(cfg)`` checks everything it can before any long work (config, search spaces,
sampler, pruner, storage, candidates, tasks), then loads one resident model, evaluates the
baselines, runs the trials, confirms the best of each method on the confirm split and writes
the best merge to ``runs/<study>/best/``.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager, redirect_stderr
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import SPACES_DIR, CandidatesConfig, EvalConfig, SweepConfig
from orchestrator.errors import UserError
from orchestrator.objective import COMPLETE, Objective, Rung, TrialReport
from orchestrator.search import MethodSpace, build_recipe, check_model_count, load_space, space_as_dict


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
    if not cfg.method.methods:
        raise UserError("method.methods is empty: name at least one merge method")
    spaces = {}
    for name in cfg.method.methods:
        space = load_space(Path(cfg.method.spaces_dir or SPACES_DIR) / f"{name}.yaml", name)
        check_model_count(space, len(cfg.candidates.models))
        spaces[name] = space
    if len(spaces) == 1 and next(iter(spaces.values())).is_empty():
        raise UserError(f"the search space of {cfg.method.methods[0]!r} is empty: nothing to search "
                        "(add distributions, or compare it with other methods)")
    return spaces


def check_runs_dir(runs_dir: Path) -> None:
    """The output folder must be creatable and writable."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create runs folder {runs_dir}: {err.strerror}") from None
    if not os.access(runs_dir, os.W_OK | os.X_OK):
        raise UserError(f"runs folder {runs_dir} is not writable")


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

    def resolve(ref: str | None, where: str) -> str | None:
        from orchestrator.weights import is_model_folder, resolve_model_path

        if ref is None:
            return None
        try:
            path = resolve_model_path(ref)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        if not is_model_folder(path):
            raise UserError(f"{where}: {path} is not a model folder (no config.json and weights)")
        return str(path)

    return CandidatesConfig(models={k: resolve(v, f"candidates.models.{k}") for k, v in cand.models.items()},
                            base=resolve(cand.base, "candidates.base"), zoo=cand.zoo, dtype=cand.dtype,
                            tokenizer_source=resolve(cand.tokenizer_source, "candidates.tokenizer_source"))


def eval_spec(cfg: EvalConfig, seed: int) -> Any:
    from orchestrator.evaluate import EvalSpec, TaskSpec

    tasks = tuple(TaskSpec(t.name, split_search=t.search_split, split_confirm=t.confirm_split,
                           metric=t.metric, weight=t.weight) for t in cfg.tasks)
    return EvalSpec(tasks=tasks, rungs=tuple(cfg.rungs), batch_size=cfg.batch_size,
                    num_fewshot=cfg.num_fewshot, include=tuple(cfg.include), device=cfg.device,
                    seed=seed, allow_search_on_confirm_split=cfg.allow_search_on_confirm_split)


# ----------------------------------------------------------------------------- resident model


class Resident:
    """The one loaded model, its in-memory merger and its evaluator."""

    def __init__(self, candidates: CandidatesConfig, spec: Any, suite: Any, seed: int,
                 quiet: bool = True) -> None:
        from orchestrator.engine import InMemoryMerger
        from orchestrator.evaluate import ResidentEvaluator

        template = union_recipe(candidates)
        self.merger = InMemoryMerger(template, device=spec.device, seed=seed)  # headers checked here
        folder = candidates.base or next(iter(candidates.models.values()))
        self.evaluator = ResidentEvaluator(folder, spec, tokenizer=candidates.tokenizer_source, suite=suite)
        self.merger.model = self.evaluator.model
        self.quiet = quiet
        self._leaf_info = {leaf: (t.name, suite.metrics[t.name], t.weight)
                           for t in spec.tasks for leaf in suite.loaded(t.name, None).leaves}

    def merge(self, recipe: Mapping[str, Any], seed: int) -> None:
        import torch

        self.merger.merge_into(dict(recipe), seed=seed)
        if not all(torch.isfinite(p).all() for p in self.evaluator.model.parameters()):
            raise FloatingPointError("the merge produced NaN or inf weights")
        self.evaluator.reset()

    def rungs(self, split: str) -> Iterator[Rung]:
        """The evaluator's rungs as ``Rung``s, with the items each one added."""
        seen: set[tuple[str, int]] = set()
        for result in _quiet_iter(self.evaluator.evaluate_rungs(split), self.quiet):
            new = []
            for leaf, docs in self.evaluator.item_results(split).items():
                task, metric, weight = self._leaf_info[leaf]
                for doc, record in docs.items():
                    if (leaf, doc) not in seen:
                        seen.add((leaf, doc))
                        new.append((_item_id(leaf, doc), weight * float(record[metric])))
            yield Rung(result.n_items, result.score, result.stderr,
                       {k: c.value for k, c in result.components.items()}, tuple(sorted(new)))

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
    models = {k: v for k, v in candidates.models.items()}
    recipe = build_recipe("task_arithmetic", {}, {k: {"weight": 1.0} for k in models}, models,
                          candidates.base, candidates.dtype, candidates.tokenizer_source)
    if candidates.base is None:
        recipe = build_recipe("linear", {}, {k: {"weight": 1.0} for k in models}, models, None,
                              candidates.dtype, candidates.tokenizer_source)
    return recipe


def baseline_recipes(candidates: CandidatesConfig) -> dict[str, dict[str, Any]]:
    """Each parent model alone, and their uniform average."""
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
    """What a finished sweep returns (and prints)."""

    study_name: str
    rows: list[Row]
    best: Row | None
    best_dir: Path | None
    n_trials: dict[str, int]
    parent_run_id: str | None


def run_sweep(cfg: SweepConfig, overrides: list[str] | None = None, out=sys.stdout) -> SweepOutcome:
    """Check everything, then run the study to its trial count and report."""
    import optuna

    from orchestrator.evaluate import check_tasks_available
    from orchestrator.study import make_pruner, make_sampler, make_storage, open_study, storage_url
    from orchestrator.tracking import Tracker

    say = _printer(out)
    runs_dir = Path(cfg.runs_dir).resolve()
    check_runs_dir(runs_dir)
    spaces = load_spaces(cfg)
    names = list(cfg.candidates.models)
    grid = {k: v for s in spaces.values() for k, v in s.param_grid(names, cfg.study.sampler.grid_points).items()}
    if len(spaces) > 1:
        grid["method"] = list(spaces)
    sampler = make_sampler(cfg.study.sampler, grid)
    spec = eval_spec(cfg.eval, cfg.study.seed)
    first_rung = _first_rung_items(cfg.eval)
    pruner = make_pruner(cfg.study.pruner, first_rung, cfg.study.multi_objective)
    url = storage_url(cfg.study.storage, runs_dir)
    storage = make_storage(url)
    candidates = resolve_candidates(cfg.candidates, runs_dir)
    say(f"study {cfg.study.name!r}: methods {', '.join(spaces)}; candidates {', '.join(names)}")
    suite = check_tasks_available(spec)  # datasets resolved before any model is loaded
    directions = ["maximize"] * (len(spec.tasks) if cfg.study.multi_objective else 1)
    tracker = Tracker(cfg.tracking, runs_dir)
    start = time.perf_counter()
    resident = Resident(candidates, spec, suite, cfg.study.seed)
    say(f"resident model loaded in {time.perf_counter() - start:.1f}s")
    study = open_study(cfg.study.name, storage, sampler, pruner, directions)
    parent = tracker.start_study(cfg.study.name, _study_params(cfg, overrides, url),
                                 {"config.yaml": _config_yaml(cfg), "search_space.json":
                                  {k: space_as_dict(v) for k, v in spaces.items()}})
    status = "FAILED"
    try:
        baselines = run_baselines(study, resident, candidates, tracker, cfg, say)
        objective = Objective(spaces, resident, tracker, candidates, cfg.study.seed,
                              cfg.study.multi_objective, cfg.study.pruner.name == "wilcoxon",
                              on_done=_progress(study, say))
        _enqueue_uniform(study, spaces, names)
        remaining = _remaining(study, cfg.study.n_trials)
        if remaining:
            study.optimize(objective, n_trials=remaining, timeout=cfg.study.timeout_s, catch=(Exception,),
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.study.n_trials, states=None)])
        rows = baselines + best_rows(study, spaces)
        confirm_rows(rows, resident, cfg.study.seed, study, say)
        best = _best(rows, baselines)
        best_dir = save_best(best, runs_dir / cfg.study.name / "best", cfg, rows) if best and cfg.study.save_best else None
        report = format_table(rows, spec)
        say(report)
        log_summary(tracker, study, rows, best, best_dir, report)
        status = "FINISHED"
        return SweepOutcome(cfg.study.name, rows, best, best_dir, _counts(study), parent)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_study(status)


def _first_rung_items(cfg: EvalConfig) -> int:
    first = cfg.rungs[0] if cfg.rungs else 1
    return int(first) * max(1, len(cfg.tasks)) if isinstance(first, int) else 1


def _remaining(study: Any, n_trials: int) -> int:
    import optuna

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=finished))
    return max(0, n_trials - done)


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
                  cfg: SweepConfig, say: Any) -> list[Row]:
    """Each parent and the uniform average on the search split (stored in the study, once)."""
    if not cfg.study.baselines:
        return []
    stored = dict(study.user_attrs.get("baselines", {}))
    rows = []
    for name, recipe in baseline_recipes(candidates).items():
        if name not in stored:
            resident.merge(recipe, cfg.study.seed)
            result = _last(resident.rungs("search"))
            stored[name] = {"search": result.score, "search_se": result.stderr,
                            "components": dict(result.components), "recipe": recipe}
            run_id = tracker.start_trial(-1, {"method": "linear", "baseline": name}, kind="baseline",
                                         name=f"baseline:{name}")
            tracker.log_metrics(run_id, {"score": result.score, **stored[name]["components"]},
                                step=result.n_items)
            tracker.end_trial(run_id, "FINISHED")
            study.set_user_attr("baselines", stored)
        b = stored[name]
        rows.append(Row(name, "baseline", b["search"], b["search_se"], components=dict(b["components"]),
                        recipe=b["recipe"]))
        say(f"baseline {name:<22} search {b['search']:.4f} ± {b['search_se']:.4f}")
    return rows


def _last(iterator: Iterator[Any]) -> Any:
    result = None
    for result in iterator:
        pass
    return result


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


def _best(rows: list[Row], baselines: list[Row]) -> Row | None:
    """The best merge is chosen on the search split; the confirm score is what it reports."""
    trials = [r for r in rows if r.trial is not None]
    return max(trials, key=lambda r: r.search) if trials else None


def save_best(best: Row, out_dir: Path, cfg: SweepConfig, rows: list[Row]) -> Path:
    """Write the best merge as a Hugging Face model folder (atomically replaced)."""
    import json

    from orchestrator.engine import merge_to_disk

    merge_to_disk(best.recipe, out_dir, seed=cfg.study.seed, overwrite=True)
    scores = {"study": cfg.study.name, "trial": best.trial, "method": best.method,
              "search": {"score": best.search, "stderr": best.search_se},
              "confirm": {"score": best.confirm, "stderr": best.confirm_se},
              "components": {"search": best.components, "confirm": best.confirm_components},
              "recipe": best.recipe, "seed": cfg.study.seed}
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    with open(out_dir / "README.md", "a") as card:
        card.write("\n## Scores (merge-orchestrator)\n\n" + format_table(rows, None) + "\n")
    return out_dir


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


def _progress(study: Any, say: Any):
    """Prints one line per finished trial: method, parameters, rungs, state, best so far."""
    def on_done(r: TrialReport) -> None:
        params = " ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in r.params.items() if k != "method")
        rungs = " ".join(f"{s:.3f}@{n}" for n, s in r.rungs)
        state = r.state if r.state != COMPLETE else f"complete {r.value:.4f}" if r.value is not None else r.state
        best = _best_so_far(study, r)
        say(f"trial {r.number:>3} {r.method:<16} {params}  | {rungs} | {state}{best}"
            + (f" ({r.reason})" if r.reason else ""))
    return on_done


def _best_so_far(study: Any, r: TrialReport) -> str:
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
