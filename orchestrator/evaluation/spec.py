"""What to evaluate (``EvalSpec``, ``TaskSpec``) and what an evaluation returns (``EvalResult``).

Pure data with its checks: nothing here loads a task or a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.engine.devices import check_device_name
from orchestrator.errors import UserError
from orchestrator.evaluation.tasks import parse_split

FEWSHOT_SEED = 1234  # simple_evaluate's default, so both paths build the same few-shot prompts
ROLES = ("search", "confirm")


@dataclass(frozen=True)
class TaskSpec:
    """One task of the objective.

    Attributes:
        name: lm-eval task, group or tag name (``demo_mmlu``, ``hellaswag``, ``mmlu``).
        search_split: Split expression searched on; None picks the task's default.
        confirm_split: Split expression the final score is confirmed on; None: default.
        metric: Metric of the objective (``acc``, ``acc_norm``); None: acc_norm for
            HellaSwag-style tasks, else acc.
        weight: Weight of this task in the objective's weighted mean.
    """

    name: str
    search_split: str | None = None
    confirm_split: str | None = None
    metric: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise UserError(f"task name must be a non-empty string, got {self.name!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                and self.weight > 0):
            raise UserError(f"weight must be a finite number > 0, got {self.weight!r} "
                            f"for task {self.name!r}")
        for split in (self.search_split, self.confirm_split):
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
        check_device_name(self.device)

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
    for kind in (int, float):  # counts and fractions each strictly increasing
        sizes = [r for r in rungs if isinstance(r, kind)]
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise UserError(f"eval.rungs must be strictly increasing (each rung evaluates more items than "
                            f"the one before), got {list(rungs)}")
    return rungs


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

