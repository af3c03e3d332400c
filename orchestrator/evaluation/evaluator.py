"""Evaluation: lm-eval in-process on a resident model, in fidelity rungs, on search/confirm splits.

A thin layer over lm-eval's public API (``TaskManager``, ``HFLM``, ``lm_eval.evaluator.evaluate``):

* ``check_tasks_available(spec)`` resolves and builds every task before any model is loaded, so a
  missing dataset or an unknown name fails in milliseconds with a clear message.
* ``ResidentEvaluator`` loads the model once, wraps it in ``HFLM`` once and keeps the task objects
  for the whole study. Each trial writes new weights into the same parameters, calls ``reset()``
  and evaluates again. ``simple_evaluate`` is not used in the loop: it collects environment info
  (a ``pip list`` subprocess, ~1 s) on every call. lm-eval's response cache is never used: it is
  not keyed by the model, so it would serve one merge's answers to another.
* Items of each task are taken in a fixed, seeded, stratified order (subjects of a group are
  interleaved in proportion to their sizes). Rung r evaluates the first n_r items of that order;
  per-item results are kept, so a rung only sends lm-eval the items it adds (``samples=``).

Use in a sweep::

    spec = EvalSpec.from_names("demo_mmlu,demo_hellaswag", rungs=(0.1, 0.3, 1.0))
    suite = check_tasks_available(spec)              # fails fast, before any model is loaded
    evaluator = ResidentEvaluator(model, spec, suite=suite)
    for trial in trials:
        merger.merge_into(recipe, evaluator.model)     # new weights, same parameter objects
        evaluator.reset()
        for rung in evaluator.evaluate_rungs("search"):
            trial.report(rung.score, rung.rung)
            if trial.should_prune():
                break
    final = evaluator.evaluate("confirm")            # for the best merge, on held-out items
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.tasks import (
    LoadedTask,
    SplitRef,
    dataset_splits,
    default_metric,
    default_splits,
    include_paths,
    load_task,
    make_task_manager,
    metric_key,
    parse_split,
    split_indices,
)

FEWSHOT_SEED = 1234  # simple_evaluate's default, so both paths build the same few-shot prompts
ROLES = ("search", "confirm")
_HFLM_NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")


# ----------------------------------------------------------------------------- specification


@dataclass(frozen=True)
class TaskSpec:
    """One task of the objective.

    Attributes:
        name: lm-eval task, group or tag name (``demo_mmlu``, ``hellaswag``, ``mmlu``).
        split_search: Split expression searched on; None picks the task's default.
        split_confirm: Split expression the final score is confirmed on; None: default.
        metric: Metric of the objective (``acc``, ``acc_norm``); None: acc_norm for
            HellaSwag-style tasks, else acc.
        weight: Weight of this task in the objective's weighted mean.
    """

    name: str
    split_search: str | None = None
    split_confirm: str | None = None
    metric: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise UserError(f"task name must be a non-empty string, got {self.name!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                and self.weight > 0):
            raise UserError(f"weight must be a finite number > 0, got {self.weight!r} "
                            f"for task {self.name!r}")
        for split in (self.split_search, self.split_confirm):
            if split is not None:
                parse_split(split)


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate and how (one per study).

    Attributes:
        tasks: The tasks (names are accepted and become default TaskSpecs).
        rungs: Items per task at each rung: a float in (0, 1] is a fraction of the split,
            an int a count. Increasing; the last rung is what a full trial evaluates.
        limit: At most this many items per task (the first ones of the stratified order).
        batch_size: HFLM batch size (int, ``"auto"`` or ``"auto:N"``).
        num_fewshot: Few-shot examples; None keeps each task's own setting.
        include: Extra lm-eval task folders (the demo zoo's folder is always included).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: Model dtype when loading from a folder (``auto``, ``float32``, ``bfloat16``...).
        seed: Seed of the item order and of the split halves.
        allow_search_on_confirm_split: Permit a search split that overlaps the confirm split.
    """

    tasks: tuple[TaskSpec, ...]
    rungs: tuple[int | float, ...] = (0.25, 0.5, 1.0)
    limit: int | None = None
    batch_size: int | str = 16
    num_fewshot: int | None = None
    include: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    allow_search_on_confirm_split: bool = False

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, (str, TaskSpec, Mapping)) else self.tasks
        tasks = tuple(_task_spec(t) for t in tasks)
        if not tasks:
            raise UserError("at least one task is required")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise UserError(f"each task may be named once, got {names}")
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "rungs", _check_rungs(self.rungs))
        include = (self.include,) if isinstance(self.include, (str, Path)) else self.include
        object.__setattr__(self, "include", tuple(str(p) for p in include))
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise UserError(f"limit must be an integer >= 1, got {self.limit!r}")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int)
                                             or self.num_fewshot < 0):
            raise UserError(f"num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        _check_device_name(self.device)

    @classmethod
    def from_names(cls, names: str | Sequence[str], **kwargs: Any) -> EvalSpec:
        """Spec from task names (a comma-separated string or a list), defaults for the rest."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        return cls(tasks=tuple(TaskSpec(n) for n in names), **kwargs)


def _task_spec(task: Any) -> TaskSpec:
    """A TaskSpec from a TaskSpec, a name or a mapping of its fields (e.g. from Hydra)."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, Mapping):
        unknown = set(task) - set(TaskSpec.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown task setting(s) {sorted(unknown)}; known: "
                            f"{', '.join(TaskSpec.__dataclass_fields__)}")
        return TaskSpec(**task)
    return TaskSpec(str(task))


def _check_rungs(rungs: Any) -> tuple[int | float, ...]:
    rungs = (rungs,) if isinstance(rungs, (int, float)) else tuple(rungs)
    if not rungs:
        raise UserError("rungs must list at least one size")
    for r in rungs:
        ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
            isinstance(r, float) and 0.0 < r <= 1.0)
        if not ok:
            raise UserError(f"each rung must be an int count >= 1 or a float fraction in (0, 1], "
                            f"got {r!r} in rungs {list(rungs)}")
    return rungs


def _check_device_name(device: str) -> None:
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UserError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TaskScore:
    """One component of the objective.

    Attributes:
        name: Task name. metric: The objective's metric key (``acc,none``).
        value: Metric value. stderr: Its standard error (NaN when undefined, e.g. < 2 items).
        n_items: Items scored. split: Split expression evaluated.
        metrics: Every metric of the task (``acc,none``, ``acc_stderr,none``...).
    """

    name: str
    metric: str
    value: float
    stderr: float
    n_items: int
    split: str
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    """Objective (weighted mean of the task metrics) over the items evaluated so far.

    Attributes:
        split: ``search``, ``confirm`` or the split expression evaluated.
        rung: Rung index (None for a one-shot ``evaluate``).
        n_items: Items scored over all tasks.
        score: Weighted mean of the components' values.
        stderr: Its standard error, components taken as independent.
        components: TaskScore per task name.
        higher_is_better: Direction of the objective.
    """

    split: str
    rung: int | None
    n_items: int
    score: float
    stderr: float
    components: Mapping[str, TaskScore]
    higher_is_better: bool = True


RungResult = EvalResult


# ----------------------------------------------------------------------------- task suite


@dataclass
class _Plan:
    """A task ready to evaluate on one split: its objects, metric and item order."""

    spec: TaskSpec
    loaded: LoadedTask
    split: SplitRef
    metric: str
    order: list[tuple[str, int]]


class TaskSuite:
    """The study's tasks, resolved and built (no model needed); shared by evaluators."""

    def __init__(self, spec: EvalSpec) -> None:
        self.spec = spec
        names = [t.name for t in spec.tasks]
        self.manager = make_task_manager(names, include_paths(spec.include))
        self._loaded: dict[tuple[str, str | None], LoadedTask] = {}
        self._orders: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.splits: dict[str, tuple[SplitRef, SplitRef]] = {}
        self.metrics: dict[str, str] = {}
        for task in spec.tasks:
            self._resolve(task)
        self._check_leaves_unique()
        self.higher_is_better = self._direction()

    def _resolve(self, task: TaskSpec) -> None:
        default = self.loaded(task.name, None)
        search_default, confirm_default = default_splits(default)
        search = parse_split(task.split_search or search_default)
        confirm = parse_split(task.split_confirm or confirm_default)
        if search.overlaps(confirm) and not self.spec.allow_search_on_confirm_split:
            raise UserError(
                f"task {task.name!r}: search split '{search}' overlaps confirm split "
                f"'{confirm}'; searching on the confirm split is refused (set "
                "allow_search_on_confirm_split=true to allow it)")
        for split in (search, confirm):
            self._check_split_exists(task.name, default, split)
        self.splits[task.name] = (search, confirm)
        metric = metric_key(task.metric) if task.metric else default_metric(task.name, default)
        if metric not in default.metric_keys():
            raise UserError(f"task {task.name!r} has no metric {metric!r}; it reports: "
                            f"{', '.join(default.metric_keys())}")
        self.metrics[task.name] = metric
        self.loaded(task.name, search.base)

    @staticmethod
    def _check_split_exists(name: str, default: LoadedTask, split: SplitRef) -> None:
        for leaf, task in default.leaves.items():
            available = dataset_splits(task)
            if split.base not in available:
                where = name if leaf == name else f"{name} (subtask {leaf})"
                raise UserError(f"task {where!r} has no split {split.base!r}; its dataset has: "
                                f"{', '.join(available)}")

    def check_split(self, split: str) -> None:
        """Raise UserError unless every task has ``split`` (a role or a split expression)."""
        if split in (*ROLES, "default"):
            return
        ref = parse_split(split)
        for task in self.spec.tasks:
            self._check_split_exists(task.name, self.loaded(task.name, None), ref)

    def _check_leaves_unique(self) -> None:
        seen: dict[str, str] = {}
        for task in self.spec.tasks:
            for leaf in self.loaded(task.name, None).leaves:
                if leaf in seen:
                    raise UserError(f"subtask {leaf!r} is in both {seen[leaf]!r} and "
                                    f"{task.name!r}; name each task once")
                seen[leaf] = task.name

    def _direction(self) -> bool:
        directions = {name: self.loaded(name, None).higher_is_better(m.split(",")[0])
                      for name, m in self.metrics.items()}
        if len(set(directions.values())) > 1:
            raise UserError(f"objective mixes higher- and lower-is-better metrics: {directions}")
        return next(iter(directions.values()))

    def loaded(self, name: str, base: str | None) -> LoadedTask:
        """Task objects of ``name`` on split ``base`` (None: lm-eval's default), built once."""
        key = (name, base)
        if key not in self._loaded:
            task = load_task(self.manager, name, base, self.spec.num_fewshot, FEWSHOT_SEED)
            self._loaded[key] = task
            self._loaded.setdefault((name, task.split), task)
        return self._loaded[key]

    def plan(self, task: TaskSpec, split: str) -> _Plan:
        """The task on a role (``search``, ``confirm``, ``default``) or a split expression.

        ``default`` is the split lm-eval itself evaluates (test, else validation).
        """
        if split in ROLES:
            ref = self.splits[task.name][ROLES.index(split)]
        elif split == "default":
            ref = parse_split(self.loaded(task.name, None).split)
        else:
            ref = parse_split(split)
        loaded = self.loaded(task.name, ref.base)
        key = (task.name, str(ref))
        if key not in self._orders:
            self._orders[key] = stratified_order(
                {leaf: split_indices(loaded.n_docs(leaf), ref, self.spec.seed, leaf)
                 for leaf in sorted(loaded.leaves)})
        return _Plan(task, loaded, ref, self.metrics[task.name], self._orders[key])


def check_tasks_available(spec: EvalSpec) -> TaskSuite:
    """Resolve and build every task of ``spec`` (datasets included) before any model is loaded.

    Raises:
        UserError: unknown task (with close matches), dataset not available offline, missing
            split or metric, or a search split overlapping the confirm split.
    """
    return TaskSuite(spec)


def stratified_order(per_leaf: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    """Interleave each leaf's ordered items in proportion to the leaf sizes.

    Item k of a leaf with m items gets the key (k + 0.5) / m, so every prefix holds each leaf
    in proportion to its size (within one item).
    """
    keyed = [((k + 0.5) / len(ids), i, leaf, doc)
             for i, (leaf, ids) in enumerate(per_leaf.items()) for k, doc in enumerate(ids)]
    keyed.sort(key=lambda x: (x[0], x[1]))
    return [(leaf, doc) for _, _, leaf, doc in keyed]


# ----------------------------------------------------------------------------- scoring


def _leaf_metrics(task: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """lm-eval style metrics of one leaf task from its per-item metric values."""
    from lm_eval.api.metrics import acc_all, acc_all_stderr, mean, mean_stderr

    closed_form = {mean: mean_stderr, acc_all: acc_all_stderr}
    aggregations = task.aggregation()
    out: dict[str, Any] = {"sample_len": len(entries)}
    for key in entries[0] if entries else ():
        metric, filter_key = key.split(",", 1)
        values = [e[key] for e in entries if key in e]
        agg = aggregations.get(metric, mean)
        out[key] = float(agg(values))
        stderr_fn = closed_form.get(agg)
        out[f"{metric}_stderr,{filter_key}"] = (
            float(stderr_fn(values)) if stderr_fn and len(values) > 1 else math.nan)
    return out


def _group_metrics(group: Any, leaves: dict[str, dict[str, Any]],
                   entries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Aggregate leaf metrics across a group (or tag) the way lm-eval's Group.aggregate does.

    lm-eval's pooled stderr needs every subtask to have 2+ items; on small rungs the stderr of
    the size-weighted mean falls back to the stderr of all items taken together.
    """
    from lm_eval.api.metrics import (
        aggregate_subtask_metrics,
        mean_stderr,
        pooled_sample_stderr,
        unweighted_mean_stderr,
    )

    by_size = {a.metric: a.weight_by_size for a in (getattr(group, "aggregate_metric_list", None)
                                                    or [])}
    keys = [k for k in next(iter(leaves.values())) if k != "sample_len" and "_stderr," not in k]
    out: dict[str, Any] = {"sample_len": sum(m["sample_len"] for m in leaves.values())}
    for key in keys:
        metric, filter_key = key.split(",", 1)
        rows = [(m[key], m.get(f"{metric}_stderr,{filter_key}", math.nan), m["sample_len"])
                for m in leaves.values() if key in m]
        if not rows:
            continue
        values, stderrs, sizes = (list(col) for col in zip(*rows, strict=True))
        weight_by_size = by_size.get(metric, True)
        out[key] = float(aggregate_subtask_metrics(values, sizes, weight_by_size))
        stderr = math.nan
        if all(math.isfinite(s) for s in stderrs):
            stderr = (pooled_sample_stderr(stderrs, sizes) if weight_by_size
                      else unweighted_mean_stderr(stderrs))
        elif weight_by_size and sum(sizes) > 1:
            stderr = mean_stderr([e[key] for rows in entries.values() for e in rows if key in e])
        out[f"{metric}_stderr,{filter_key}"] = float(stderr)
    return out


def _objective(components: dict[str, TaskScore], weights: dict[str, float]) -> tuple[float, float]:
    total = sum(weights.values())
    score = sum(weights[n] * c.value for n, c in components.items()) / total
    var = sum((weights[n] * c.stderr) ** 2 for n, c in components.items())
    return score, math.sqrt(var) / total


# ----------------------------------------------------------------------------- model


def check_device(device: str) -> None:
    """Raise UserError when ``device`` asks for CUDA and none is usable."""
    _check_device_name(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available (torch "
                            f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible)")


def check_model_dir(model_dir: str | Path) -> Path:
    """The model folder as a Path, or UserError if it is not a Hugging Face model folder."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"model folder {str(model_dir)!r} does not exist")
    if not (path / "config.json").is_file():
        raise UserError(f"{str(model_dir)!r} is not a Hugging Face model folder (no config.json)")
    return path


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) from a model folder onto ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(model_dir)
    check_device(device)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise UserError(f"dtype must be 'auto' or a torch dtype name, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the model in {str(model_dir)!r}: {first}") from None
    return model.to(device).eval(), tokenizer


def _check_model_device(model: Any, device: str) -> None:
    """A model passed in must already be where the spec says (the merger caches there)."""
    import torch

    actual = next(model.parameters()).device
    if actual.type != torch.device(device).type:
        raise UserError(f"the model is on {actual} but the evaluation spec says device "
                        f"{device!r}; move the model first (model.to({device!r}))")


class _DropHFLMNoise(logging.Filter):
    """HFLM warns on every pre-built model that other args are ignored: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HFLM_NOISE)


def wrap_model(model: Any, tokenizer: Any, batch_size: int | str) -> Any:
    """Wrap a loaded model in lm-eval's HFLM (once per study; it keeps the same object)."""
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _DropHFLMNoise) for f in hf_logger.filters):
        hf_logger.addFilter(_DropHFLMNoise())
    return _token_caching_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@functools.cache
def _token_caching_hflm() -> type:
    """HFLM whose ``tok_encode`` remembers each string's tokens.

    Across trials only the weights change: the prompts and the tokenizer stay the same, so
    tokenizing every prompt again (about half of a trial's time with small models) is waste.
    """
    from lm_eval.models.huggingface import HFLM

    class TokenCachingHFLM(HFLM):
        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            if kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            cache = self.__dict__.setdefault("_token_cache", {})
            key = (string, add_special_tokens, left_truncate_len)
            tokens = cache.get(key)
            if tokens is None:
                tokens = cache[key] = tuple(
                    super().tok_encode(string, add_special_tokens, left_truncate_len))
            return list(tokens)

    return TokenCachingHFLM


class _IndexList(list):
    """Sorted doc indices for ``samples=``; lm-eval tests ``i in samples`` for every document."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__(sorted(indices))
        self._set = frozenset(self)

    def __contains__(self, item: object) -> bool:
        return item in self._set


# ----------------------------------------------------------------------------- evaluator


class ResidentEvaluator:
    """Evaluates one resident model, trial after trial, without reloading anything.

    Write each trial's weights into the model's existing parameters (``p.copy_``), call
    ``reset()``, then ``evaluate_rungs()`` (search, prunable) or ``evaluate()`` (confirm).

    Args:
        model: A model folder, or a loaded ``PreTrainedModel`` already on its device.
        spec: What to evaluate.
        tokenizer: Tokenizer (object or folder); default: the model folder's.
        suite: Tasks already checked by ``check_tasks_available(spec)``; built here otherwise,
            before the model is loaded.
    """

    def __init__(self, model: Any, spec: EvalSpec, *, tokenizer: Any = None,
                 suite: TaskSuite | None = None) -> None:
        if suite is not None and suite.spec != spec:
            raise ValueError("the task suite was built for another EvalSpec")
        self.spec = spec
        if isinstance(model, (str, Path)):
            check_model_dir(model)
        check_device(spec.device)
        self.suite = suite or check_tasks_available(spec)
        if isinstance(model, (str, Path)):
            model, loaded_tokenizer = load_model(model, spec.device, spec.dtype)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            _check_model_device(model, spec.device)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model.name_or_path)
        self.model, self.tokenizer = model, tokenizer
        self.lm = wrap_model(model, tokenizer, spec.batch_size)
        self._store: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        self.items_evaluated = 0  # documents sent to lm-eval since construction

    def reset(self) -> None:
        """Forget all per-item results (call after writing new weights)."""
        self._store.clear()

    def evaluate_rungs(self, split: str = "search") -> Iterator[EvalResult]:
        """Yield the running objective after each rung; stop iterating to prune.

        Args:
            split: ``search`` (default), ``confirm`` or a split expression. A split that overlaps
                a task's confirm split is refused unless ``allow_search_on_confirm_split``.
        """
        plans = self._plans(split)
        self._guard_search(plans)
        for rung, counts in enumerate(self._rung_counts(plans)):
            self._ensure(plans, counts)
            yield self._result(plans, counts, split, rung)

    def evaluate(self, split: str = "confirm", limit: int | None = None) -> EvalResult:
        """Evaluate every item of ``split`` in one lm-eval call.

        Args:
            split: ``confirm`` (default), ``search``, ``default`` or a split expression.
            limit: At most this many items per task (default ``spec.limit``), taken from the
                front of the stratified order.
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise UserError(f"limit must be an integer >= 1, got {limit!r}")
        plans = self._plans(split)
        counts = [min(self._cap(p), limit or self._cap(p)) for p in plans]
        self._ensure(plans, counts)
        return self._result(plans, counts, split, None)

    def item_results(self, split: str = "search") -> dict[str, dict[int, dict[str, Any]]]:
        """Per-item results kept so far on ``split``: {leaf task: {doc index: record}}.

        A record holds the item's metric values (``acc,none``...) and ``resps`` (lm-eval's
        filtered responses: (loglikelihood, is_greedy) per choice for multiple choice).
        """
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for plan in self._plans(split):
            for leaf, doc in plan.order:
                record = self._store.get((leaf, plan.split.base), {}).get(doc)
                if record is not None:
                    out.setdefault(leaf, {})[doc] = record
        return out

    # ------------------------------------------------------------------ internals

    def _plans(self, split: str) -> list[_Plan]:
        return [self.suite.plan(task, split) for task in self.spec.tasks]

    def _guard_search(self, plans: list[_Plan]) -> None:
        if self.spec.allow_search_on_confirm_split:
            return
        for plan in plans:
            confirm = self.suite.splits[plan.spec.name][1]
            if plan.split.overlaps(confirm):
                raise UserError(
                    f"task {plan.spec.name!r}: searching on '{plan.split}' overlaps the confirm "
                    f"split '{confirm}'; refused (set allow_search_on_confirm_split=true)")

    def _cap(self, plan: _Plan) -> int:
        n = len(plan.order)
        return min(n, self.spec.limit) if self.spec.limit else n

    def _rung_counts(self, plans: list[_Plan]) -> list[list[int]]:
        counts = []
        for rung in self.spec.rungs:
            row = []
            for plan in plans:
                cap = self._cap(plan)
                # the epsilon keeps 0.3 * 10 at 3 items (float products overshoot)
                row.append(min(cap, rung) if isinstance(rung, int)
                           else math.ceil(rung * cap - 1e-9))
            counts.append(row)
        return counts

    def _ensure(self, plans: list[_Plan], counts: list[int]) -> None:
        """Run lm-eval on the items of the prefixes that have no stored result yet."""
        samples: dict[str, set[int]] = {}
        tasks: dict[str, Any] = {}
        for plan, n in zip(plans, counts, strict=True):
            for leaf, doc in plan.order[:n]:
                if doc not in self._store.get((leaf, plan.split.base), {}):
                    samples.setdefault(leaf, set()).add(doc)
                    tasks[leaf] = plan.loaded.leaves[leaf]
        if samples:
            self._run(tasks, {leaf: _IndexList(docs) for leaf, docs in samples.items()},
                      {leaf: p.split.base for p in plans for leaf in p.loaded.leaves})

    def _run(self, tasks: dict[str, Any], samples: dict[str, _IndexList],
             bases: dict[str, str]) -> None:
        from lm_eval.evaluator import evaluate

        for task in tasks.values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # as simple_evaluate does before each run
        results = evaluate(lm=self.lm, task_dict={"tasks": tasks}, samples=samples,
                           bootstrap_iters=0, log_samples=True)
        for leaf, records in results["samples"].items():
            store = self._store.setdefault((leaf, bases[leaf]), {})
            for rec in records:
                item = store.setdefault(rec["doc_id"], {"resps": {}})
                item["resps"][rec["filter"]] = rec["filtered_resps"]
                for metric in rec["metrics"]:
                    item[f"{metric},{rec['filter']}"] = rec[metric]
        self.items_evaluated += sum(len(s) for s in samples.values())

    def _result(self, plans: list[_Plan], counts: list[int], split: str,
                rung: int | None) -> EvalResult:
        components = {p.spec.name: self._task_score(p, n)
                      for p, n in zip(plans, counts, strict=True)}
        weights = {p.spec.name: p.spec.weight for p in plans}
        score, stderr = _objective(components, weights)
        return EvalResult(split=split, rung=rung, n_items=sum(counts), score=score,
                          stderr=stderr, components=components,
                          higher_is_better=self.suite.higher_is_better)

    def _task_score(self, plan: _Plan, n: int) -> TaskScore:
        per_leaf: dict[str, list[dict[str, Any]]] = {}
        for leaf, doc in plan.order[:n]:
            record = self._store[(leaf, plan.split.base)][doc]
            per_leaf.setdefault(leaf, []).append({k: v for k, v in record.items() if k != "resps"})
        leaves = {leaf: _leaf_metrics(plan.loaded.leaves[leaf], entries)
                  for leaf, entries in per_leaf.items()}
        single = plan.loaded.group is None and len(plan.loaded.leaves) == 1
        metrics = next(iter(leaves.values()), {}) if single else (
            _group_metrics(plan.loaded.group, leaves, per_leaf) if leaves else {})
        name, filter_key = plan.metric.split(",", 1)
        return TaskScore(name=plan.spec.name, metric=plan.metric,
                         value=metrics.get(plan.metric, math.nan),
                         stderr=metrics.get(f"{name}_stderr,{filter_key}", math.nan),
                         n_items=n, split=str(plan.split),
                         metrics={k: v for k, v in metrics.items() if k != "sample_len"})
