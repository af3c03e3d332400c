"""Task resolution: names -> lm-eval task objects per split, checked before any model is loaded.

lm-eval's public API (``TaskManager``, ``Task.set_config``) plus the task-index and split
helpers of ``lm_eval_compat``. Indexing all ~14,000 built-in tasks costs ~6.5 s, so local
folders are indexed first and the built-ins only when a name is not local: first the built-in
folder named like the task (``hellaswag``, ``mmlu``, ``arc``: milliseconds), then, only if that
misses, the whole built-in tree.

Split expressions name a dataset split, optionally a slice of it: ``validation``,
``validation[:50%]``, ``validation[50%:]``. A slice is taken over a fixed seeded permutation of
the split (per leaf task), so two halves are disjoint random halves, not storage-order blocks.
"""

from __future__ import annotations

import difflib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UserError
from orchestrator import zoo
from orchestrator.evaluation import lm_eval_compat as compat

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

_SPLIT_RE = re.compile(r"^\s*([A-Za-z0-9_\-.]+)\s*(?:\[\s*(\d*)%?\s*:\s*(\d*)%?\s*\])?\s*$")
OFFLINE_FIX = ("run once with network access (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to fill the "
               "Hugging Face cache, or point the task at local files (dataset_path: json with "
               "dataset_kwargs.data_files) in a task folder given with `eval --include DIR` or "
               "`sweep eval.include=[DIR]`")


@dataclass(frozen=True)
class SplitRef:
    """A dataset split, or the [lo, hi) fraction of a seeded permutation of it."""

    base: str
    lo: float = 0.0
    hi: float = 1.0

    def overlaps(self, other: SplitRef) -> bool:
        """True if the two parts can share an item."""
        return self.base == other.base and self.lo < other.hi and other.lo < self.hi

    @property
    def is_whole(self) -> bool:
        return self.lo == 0.0 and self.hi == 1.0

    def __str__(self) -> str:
        if self.is_whole:
            return self.base
        lo = f"{round(self.lo * 100)}%" if self.lo > 0 else ""
        hi = f"{round(self.hi * 100)}%" if self.hi < 1 else ""
        return f"{self.base}[{lo}:{hi}]"


def parse_split(expr: str) -> SplitRef:
    """Parse ``name`` or ``name[a%:b%]`` (either bound may be omitted)."""
    match = _SPLIT_RE.match(str(expr))
    if not match:
        raise UserError(f"split must look like 'validation' or 'validation[:50%]', got {expr!r}")
    base, lo, hi = match.groups()
    lo_f = int(lo) / 100 if lo else 0.0
    hi_f = int(hi) / 100 if hi else 1.0
    if not 0.0 <= lo_f < hi_f <= 1.0:
        raise UserError(f"split slice must satisfy 0% <= start < end <= 100%, got {expr!r}")
    return SplitRef(base, lo_f, hi_f)


def split_indices(n_docs: int, split: SplitRef, seed: int, leaf: str) -> list[int]:
    """Doc indices of ``split`` in a fixed seeded order (a permutation of the whole split)."""
    import random

    order = list(range(n_docs))
    random.Random(seed * 1_000_003 + zlib.crc32(leaf.encode())).shuffle(order)
    return order[int(split.lo * n_docs):int(split.hi * n_docs)]


# ----------------------------------------------------------------------------- task manager


def include_paths(extra: tuple[str, ...] | list[str] = ()) -> list[Path]:
    """The zoo's task folder (when it exists) followed by ``extra`` folders (later ones win)."""
    paths = []
    zoo_dir = _zoo_tasks_dir()
    if zoo_dir is not None:
        paths.append(zoo_dir)
    for raw in extra:
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"task folder {raw!r} (eval --include / eval.include) does not exist")
        paths.append(path)
    return paths


def _zoo_tasks_dir() -> Path | None:
    tasks_dir = getattr(zoo, "TASKS_DIR", None)
    return Path(tasks_dir) if tasks_dir is not None and Path(tasks_dir).is_dir() else None


def make_task_manager(names: list[str], include: list[Path]) -> TaskManager:
    """A TaskManager that knows all ``names``, indexing as little as possible."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[str(p) for p in include] or None, include_defaults=False)
    missing = [n for n in names if n not in local.all_tasks]
    if not missing:
        return local
    folders = compat.builtin_task_folders(missing)
    if folders:
        partial = TaskManager(include_path=[*map(str, folders), *map(str, include)],
                              include_defaults=False)
        if all(compat.refs_known(partial, n) for n in names):
            return partial
    full = TaskManager(include_path=[str(p) for p in include] or None)
    unknown = [n for n in names if n not in full.all_tasks]
    if unknown:
        raise UserError(_unknown_message(unknown[0], full.all_tasks))
    return full


def _unknown_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return (f"unknown lm-eval task {name!r}{hint} (local task folders are added with `eval --include DIR` "
            "or `sweep eval.include=[DIR]`; "
            "`lm-eval ls tasks` lists the built-in ones)")


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedTask:
    """One requested task (a single task, a group or a tag) built for one dataset split."""

    name: str
    split: str
    leaves: dict[str, Task]
    group: Group | None

    def n_docs(self, leaf: str) -> int:
        return len(self.leaves[leaf].eval_docs)

    def metric_keys(self) -> list[str]:
        """Metric keys (``metric,filter``) the leaves produce, in the first leaf's order."""
        task = next(iter(self.leaves.values()))
        filters = [f["name"] for f in task.get_config("filter_list") or []] or ["none"]
        return [f"{m},{f}" for f in filters for m in task.aggregation()]

    def higher_is_better(self, metric: str) -> bool:
        task = next(iter(self.leaves.values()))
        return bool(task.higher_is_better().get(metric, True))


def load_task(tm: TaskManager, name: str, split: str | None,
              num_fewshot: int | None, fewshot_seed: int) -> LoadedTask:
    """Build the task objects of ``name`` with their test split set to ``split`` (None: default).

    Raises UserError naming the task and its dataset when the data is not available locally.
    """
    loaded = _load_or_explain(tm, name)
    leaves = loaded["tasks"]
    group = loaded.get("groups", {}).get(name)
    for leaf, task in leaves.items():
        if split is not None:
            _check_split(name, leaf, task, split)
            if split != compat.eval_split(task):
                task.set_config(key="test_split", value=split)
        _apply_fewshot(task, num_fewshot, fewshot_seed)
    return LoadedTask(name, split or compat.eval_split(next(iter(leaves.values()))), leaves, group)


def _load_or_explain(tm: TaskManager, name: str) -> dict[str, Any]:
    import datasets

    try:
        return tm.load([name])
    except ConnectionError as err:
        raise UserError(f"task {name!r}: its dataset{_dataset_of(tm, name)} is not available "
                        f"locally ({_first_line(err)}); {OFFLINE_FIX}") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise UserError(f"task {name!r}: its dataset{_dataset_of(tm, name)} was not found "
                        f"({_first_line(err)}); {OFFLINE_FIX}") from None
    except ImportError as err:
        raise UserError(f"task {name!r} needs a Python package that is not installed "
                        f"({_first_line(err)})") from None
    except FileNotFoundError as err:
        raise UserError(f"task {name!r}: a data file of its dataset is missing "
                        f"({_first_line(err)}); data_files paths must be absolute") from None


def _dataset_of(tm: TaskManager, name: str) -> str:
    path = compat.dataset_of(tm, name)
    return f" {path!r}" if path else ""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _check_split(name: str, leaf: str, task: Task, split: str) -> None:
    available = compat.dataset_splits(task)
    if split not in available:
        where = f"task {name!r}" if leaf == name else f"task {name!r} (subtask {leaf!r})"
        raise UserError(f"{where} has no split {split!r}; its dataset has: {', '.join(available)}")


def _apply_fewshot(task: Task, num_fewshot: int | None, seed: int) -> None:
    """Same rule as ``simple_evaluate``: a task config that fixes 0 shots keeps 0."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)


def default_splits(loaded: LoadedTask) -> tuple[str, str]:
    """(search, confirm) split expressions for a task built on its default split.

    A task evaluated on ``test`` whose dataset also has a ``validation`` split (not used for
    few-shot examples) searches on validation and confirms on test (MMLU, the demo tasks,
    ARC); any other task searches on one half of its evaluation split and confirms on the
    other (HellaSwag: two halves of validation).
    """
    task = next(iter(loaded.leaves.values()))
    eval_split = loaded.split
    fewshot_split = task.get_config("fewshot_split")
    if (eval_split == "test" and fewshot_split != "validation"
            and all("validation" in compat.dataset_splits(t) for t in loaded.leaves.values())):
        return "validation", "test"
    return f"{eval_split}[:50%]", f"{eval_split}[50%:]"


def default_metric(name: str, loaded: LoadedTask) -> str:
    """``acc_norm`` for HellaSwag-style tasks, else ``acc``, else the task's first metric."""
    keys = loaded.metric_keys()
    preferred = "acc_norm,none" if "hellaswag" in name.lower() else "acc,none"
    for key in (preferred, "acc,none", "acc_norm,none"):
        if key in keys:
            return key
    return keys[0]


def metric_key(metric: str) -> str:
    """``acc`` -> ``acc,none``; keys that already name a filter are kept."""
    return metric if "," in metric else f"{metric},none"
