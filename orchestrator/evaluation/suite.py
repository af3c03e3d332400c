"""The study's tasks resolved before any model loads, and the fixed order of their items.

``TaskSuite`` builds every task once (datasets included) and gives, per task and split, a
``TaskItems``: the task objects, the metric, and the items in a fixed, seeded, stratified order
(subjects of a group interleaved in proportion to their sizes). Rung r evaluates the first n_r
items of that order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.errors import UserError
from orchestrator.evaluation.lm_eval_compat import dataset_splits
from orchestrator.evaluation.spec import FEWSHOT_SEED, ROLES, EvalSpec, TaskSpec
from orchestrator.evaluation.tasks import (
    LoadedTask,
    SplitRef,
    default_metric,
    default_splits,
    include_paths,
    load_task,
    make_task_manager,
    metric_key,
    parse_split,
    split_indices,
)


@dataclass
class TaskItems:
    """One task on one split, ready to evaluate: its objects, metric and item order."""

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
        search = parse_split(task.search_split or search_default)
        confirm = parse_split(task.confirm_split or confirm_default)
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

    def items(self, task: TaskSpec, split: str) -> TaskItems:
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
        return TaskItems(task, loaded, ref, self.metrics[task.name], self._orders[key])


    def cap(self, items: TaskItems) -> int:
        """Items of ``items`` evaluated at most (its split, cut at ``spec.limit``)."""
        n = len(items.order)
        return min(n, self.spec.limit) if self.spec.limit else n

    def rung_counts(self, split: str) -> list[list[int]]:
        """Items per task (in ``spec.tasks`` order) at each rung of ``spec.rungs``."""
        counts = []
        for rung in self.spec.rungs:
            row = []
            for task in self.spec.tasks:
                cap = self.cap(self.items(task, split))
                # the epsilon keeps 0.3 * 10 at 3 items (float products overshoot)
                row.append(min(cap, rung) if isinstance(rung, int) else math.ceil(rung * cap - 1e-9))
            counts.append(row)
        return counts

    def check_rungs(self, split: str = "search") -> None:
        """Every rung must evaluate more items of every task than the one before.

        A rung larger than a task's split evaluates the whole split; only the last rung may.
        """
        counts = self.rung_counts(split)
        for i, task in enumerate(self.spec.tasks):
            per_rung = [row[i] for row in counts]
            if any(b <= a for a, b in zip(per_rung, per_rung[1:])):
                size = self.cap(self.items(task, split))
                raise UserError(f"eval.rungs {list(self.spec.rungs)} give task {task.name!r} {per_rung} items on "
                                f"its {split} split of {size}: every rung must evaluate more items than "
                                f"the one before; use rungs up to {size} (only the last may be larger)")


def check_tasks_available(spec: EvalSpec) -> TaskSuite:
    """Resolve and build every task of ``spec`` (datasets included) before any model is loaded.

    Raises:
        UserError: unknown task (with close matches), dataset not available offline, missing
            split or metric, or a search split overlapping the confirm split.
    """
    suite = TaskSuite(spec)
    suite.check_rungs("search")
    return suite


def stratified_order(per_leaf: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    """Interleave each leaf's ordered items in proportion to the leaf sizes.

    Item k of a leaf with m items gets the key (k + 0.5) / m, so every prefix holds each leaf
    in proportion to its size (within one item).
    """
    keyed = [((k + 0.5) / len(ids), i, leaf, doc)
             for i, (leaf, ids) in enumerate(per_leaf.items()) for k, doc in enumerate(ids)]
    keyed.sort(key=lambda x: (x[0], x[1]))
    return [(leaf, doc) for _, _, leaf, doc in keyed]
