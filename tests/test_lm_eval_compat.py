"""The lm-eval internals ``evaluation/lm_eval_compat.py`` relies on, checked on the installed lm-eval.

When the pinned lm-eval changes, one of these fails and names what moved, instead of an
evaluation silently scoring the wrong items or aggregating differently.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest

from orchestrator.evaluation import lm_eval_compat as compat
from tests.toy_tasks import write_toy_tasks


def test_the_pinned_version_is_installed():
    assert version("lm_eval") == compat.PINNED_VERSION, (
        f"lm-eval {version('lm_eval')} is installed, lm_eval_compat was checked against {compat.PINNED_VERSION}: "
        "run this file, fix what fails, then update PINNED_VERSION")


def test_evaluate_takes_samples_and_logs_per_item_records():
    from lm_eval.evaluator import evaluate

    params = inspect.signature(evaluate).parameters
    for name in ("lm", "task_dict", "samples", "bootstrap_iters", "log_samples"):
        assert name in params, f"lm_eval.evaluator.evaluate lost its {name!r} argument"


def test_the_metric_aggregations_we_rebuild_still_exist():
    from lm_eval.api import metrics

    for name in ("acc_all", "acc_all_stderr", "mean", "mean_stderr", "aggregate_subtask_metrics",
                 "pooled_sample_stderr", "unweighted_mean_stderr"):
        assert callable(getattr(metrics, name, None)), f"lm_eval.api.metrics.{name} is gone"
    assert metrics.aggregate_subtask_metrics([0.5, 1.0], [1, 3], True) == pytest.approx(0.875)
    assert metrics.aggregate_subtask_metrics([0.5, 1.0], [1, 3], False) == pytest.approx(0.75)


def test_hflm_tok_encode_has_the_signature_we_override():
    from lm_eval.models.huggingface import HFLM

    params = list(inspect.signature(HFLM.tok_encode).parameters)
    assert params[:4] == ["self", "string", "add_special_tokens", "left_truncate_len"], params
    assert issubclass(compat.token_caching_hflm(), HFLM)


def test_the_builtin_task_folders_and_the_index_we_read():
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    assert (root / "hellaswag").is_dir() and (root / "mmlu").is_dir()
    assert compat.builtin_task_folders(["hellaswag"]) == [root / "hellaswag"]
    tm = TaskManager(include_path=str(root / "hellaswag"), include_defaults=False)
    assert hasattr(tm, "task_index") and hasattr(tm, "all_groups") and "hellaswag" in tm.task_index
    assert compat.refs_known(tm, "hellaswag") and compat.dataset_of(tm, "hellaswag") == "Rowan/hellaswag"


def test_samples_score_exactly_the_given_items_with_per_item_records(tiny_family, tmp_path_factory):
    """The behaviour behind rungs: ``samples`` picks documents by id; records name them."""
    from orchestrator.evaluation import EvalSpec, check_tasks_available
    from orchestrator.evaluation.models import load_model, wrap_model

    tasks_dir = write_toy_tasks(tmp_path_factory.mktemp("toy"))
    spec = EvalSpec.from_names("toy_hellaswag", include=(str(tasks_dir),))
    suite = check_tasks_available(spec)
    task = suite.loaded("toy_hellaswag", None)
    leaf, obj = next(iter(task.leaves.items()))
    assert compat.eval_split(obj) in compat.dataset_splits(obj)
    model, tokenizer = load_model(tiny_family["base"])
    lm = wrap_model(model, tokenizer, 8)
    got = list(compat.run_items(lm, {leaf: obj}, {leaf: [3, 0, 5]}, 1234))
    assert sorted(doc for _, doc, _ in got) == [0, 3, 5]
    for _, _, record in got:
        assert "acc_norm,none" in record and "resps" in record and "none" in record["resps"]
        assert record["acc_norm,none"] in (0.0, 1.0)
