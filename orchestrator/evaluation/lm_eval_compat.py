"""Every use of lm-eval beyond its public API, in one place (lm-eval 0.4.13, pinned).

The rest of the package calls lm-eval's public API only: ``TaskManager(...).load``,
``lm_eval.evaluator.evaluate``, ``HFLM``, and the task objects' ``set_config`` /
``get_config`` / ``set_fewshot_seed`` / ``aggregation`` / ``higher_is_better``. What this
module relies on instead, and why:

1. **Per-item evaluation** (``run_items``): ``evaluate(samples={task: doc ids})`` scores only
   the given documents; lm-eval tests ``doc_id in samples[task]`` for every document of the
   split, so the ids are wrapped in a list with a set's membership test (``IndexList``). Its
   per-item records (``log_samples=True``: ``doc_id``, ``filter``, ``filtered_resps`` and one
   key per metric) are what rungs, pruning and paired statistics are built from.
2. **Metrics from items** (``leaf_metrics``, ``group_metrics``): scores are recomputed from
   the kept items of a prefix, so the aggregations of ``lm_eval.api.metrics`` are applied here
   the way ``Task.aggregation`` and ``Group.aggregate`` would (group weighting by size, pooled
   standard errors).
3. **Tokenizer cache** (``token_caching_hflm``): an ``HFLM`` subclass whose ``tok_encode``
   remembers each prompt's tokens across trials (only the weights change between trials).
4. **Task index** (``builtin_task_folders``, ``refs_known``, ``dataset_of``): indexing all
   ~14,000 built-in tasks costs ~6.5 s, so the built-in folder named like a task is indexed
   first; that walks lm-eval's installed ``tasks`` folder and reads ``TaskManager.task_index``.
5. **Task splits** (``eval_split``, ``dataset_splits``): the split lm-eval evaluates by default
   and the splits of a task's loaded dataset, from ``task.config`` and ``task.dataset``.
6. **Noise** (``quiet``): the messages lm-eval logs on every use that are expected here.

``tests/test_lm_eval_compat.py`` checks each of these against the installed lm-eval and fails
loudly, naming what changed, when a new version breaks one.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PINNED_VERSION = "0.4.13"
HFLM_NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")
TASK_NOISE = ("Custom kwargs can be passed to `--metadata`",)


# ----------------------------------------------------------------------------- 1. per-item runs


class IndexList(list):
    """Sorted doc indices for ``samples=``; lm-eval tests ``i in samples`` for every document."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__(sorted(indices))
        self._set = frozenset(self)

    def __contains__(self, item: object) -> bool:
        return item in self._set


def run_items(lm: Any, tasks: Mapping[str, Any], samples: Mapping[str, Sequence[int]],
              fewshot_seed: int) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Evaluate the given documents of each leaf task; yields (leaf, doc id, record).

    A record holds one ``metric,filter`` key per metric and ``resps``: {filter: filtered
    responses} ((loglikelihood, is_greedy) per choice for multiple choice).
    """
    from lm_eval.evaluator import evaluate

    for task in tasks.values():
        task.set_fewshot_seed(seed=fewshot_seed)  # as simple_evaluate does before each run
    results = evaluate(lm=lm, task_dict={"tasks": dict(tasks)},
                       samples={leaf: IndexList(docs) for leaf, docs in samples.items()},
                       bootstrap_iters=0, log_samples=True)
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for leaf, rows in results["samples"].items():
        for rec in rows:
            item = records.setdefault((leaf, rec["doc_id"]), {"resps": {}})
            item["resps"][rec["filter"]] = rec["filtered_resps"]
            for metric in rec["metrics"]:
                item[f"{metric},{rec['filter']}"] = rec[metric]
    for (leaf, doc), record in records.items():
        yield leaf, doc, record


# ----------------------------------------------------------------------------- 2. metrics


def leaf_metrics(task: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
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


def group_metrics(group: Any, leaves: dict[str, dict[str, Any]],
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


# ----------------------------------------------------------------------------- 3. HFLM


@functools.cache
def token_caching_hflm() -> type:
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


# ----------------------------------------------------------------------------- 4. task index


def builtin_task_folders(names: list[str]) -> list[Path]:
    """Built-in task folders whose name starts the task name (``mmlu`` for ``mmlu_anatomy``)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    folders = set()
    for name in names:
        low = name.lower()
        for sub in root.iterdir():
            if sub.is_dir() and low.startswith(sub.name.lower()) and not sub.name.startswith("_"):
                folders.add(sub)
        if not any(low.startswith(f.name.lower()) for f in folders):
            return []
    return sorted(folders)


def refs_known(tm: Any, name: str, depth: int = 0) -> bool:
    """True if ``name`` and the members its group YAML names are all in ``tm``'s index."""
    entry = tm.task_index.get(name)
    if entry is None or depth > 8:
        return False
    if name not in tm.all_groups:
        return True
    members = (entry.cfg or {}).get("task") or []
    return all(refs_known(tm, m, depth + 1) for m in members if isinstance(m, str))


def dataset_of(tm: Any, name: str) -> str | None:
    """The ``dataset_path`` a task's YAML names, if any (for error messages)."""
    entry = tm.task_index.get(name)
    return (entry.cfg or {}).get("dataset_path") if entry is not None else None


# ----------------------------------------------------------------------------- 5. splits


def eval_split(task: Any) -> str:
    """The split lm-eval evaluates by default (test, else validation)."""
    cfg = task.config
    return cfg.test_split if cfg.test_split is not None else cfg.validation_split


def dataset_splits(task: Any) -> list[str]:
    """Names of the splits in the task's loaded dataset."""
    return list(getattr(task, "dataset", None) or {})


# ----------------------------------------------------------------------------- 6. noise


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with (or contains) one of ``needles``."""

    def __init__(self, needles: Sequence[str]) -> None:
        super().__init__()
        self.needles = tuple(needles)

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not any(needle in text for needle in self.needles)


def quiet() -> None:
    """Drop lm-eval's messages that every use here triggers (idempotent).

    HFLM warns on every pre-built model that other arguments are ignored; the demo tasks' local
    datasets (``custom_dataset``) make every task load warn about ``--metadata``.
    """
    for name, needles in (("lm_eval.models.huggingface", HFLM_NOISE), ("lm_eval.api.task", TASK_NOISE)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(needles))
