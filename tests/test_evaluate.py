"""Resident evaluation: in-place weights, rungs, splits, offline and name errors."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from orchestrator.evaluation import models as ev_mod
from orchestrator.errors import UserError
from orchestrator.evaluation import (
    EvalSpec,
    ResidentEvaluator,
    TaskSpec,
    check_tasks_available,
    stratified_order,
)
from orchestrator.evaluation.tasks import parse_split, split_indices
from tests.toy_tasks import SUBJECT_SIZES, write_toy_tasks

TASKS = "toy_mmlu,toy_hellaswag"


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory) -> Path:
    """A folder with the toy tasks ``toy_mmlu`` (group) and ``toy_hellaswag``."""
    return write_toy_tasks(tmp_path_factory.mktemp("toy_tasks"))


def _spec(toy_tasks, **kwargs) -> EvalSpec:
    return EvalSpec.from_names(kwargs.pop("names", TASKS), include=(str(toy_tasks),), **kwargs)


def _copy_weights_in_place(model, source_dir) -> None:
    from safetensors.torch import load_file

    state = load_file(str(source_dir / "model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _metrics_only(items):
    return {leaf: {doc: {k: v for k, v in rec.items() if k != "resps"} for doc, rec in docs.items()}
            for leaf, docs in items.items()}


# ----------------------------------------------------------------------------- pure helpers


def test_stratified_order_is_proportional_in_every_prefix():
    per_leaf = {"a": list(range(12)), "b": list(range(100, 108)), "c": list(range(200, 204))}
    order = stratified_order(per_leaf)
    assert sorted(order) == sorted((leaf, d) for leaf, ids in per_leaf.items() for d in ids)
    for n in range(1, len(order) + 1):
        for leaf, ids in per_leaf.items():
            share = sum(1 for name, _ in order[:n] if name == leaf)
            assert abs(share - n * len(ids) / 24) <= 1.0
    for leaf, ids in per_leaf.items():  # each leaf keeps its own (seeded) order
        assert [d for name, d in order if name == leaf] == ids


def test_split_halves_are_disjoint_and_cover_the_split():
    first, second = parse_split("validation[:50%]"), parse_split("validation[50%:]")
    assert not first.overlaps(second) and first.overlaps(parse_split("validation"))
    a, b = (split_indices(101, s, seed=3, leaf="x") for s in (first, second))
    assert not set(a) & set(b) and sorted(a + b) == list(range(101))
    assert a == split_indices(101, first, seed=3, leaf="x")  # fixed for a seed
    assert a != list(range(50))  # a random half, not the first block
    with pytest.raises(UserError):
        parse_split("validation[60%:40%]")


@pytest.mark.parametrize("kwargs", [{"rungs": (0.5, 0)}, {"rungs": (1.5,)}, {"limit": 0},
                                    {"device": "tpu"}, {"num_fewshot": -1}])
def test_spec_rejects_bad_values(kwargs):
    with pytest.raises(UserError):
        EvalSpec.from_names("x", **kwargs)
    with pytest.raises(UserError, match="weight"):
        TaskSpec("x", weight=0)


def test_spec_takes_task_mappings_from_configs():
    spec = EvalSpec(tasks=[{"name": "a", "weight": 2.0}, "b"], include="dir")
    assert spec.tasks == (TaskSpec("a", weight=2.0), TaskSpec("b")) and spec.include == ("dir",)
    with pytest.raises(UserError, match="unknown task setting"):
        EvalSpec(tasks=[{"name": "a", "wieght": 2.0}])


# ----------------------------------------------------------------------------- task checks


def test_default_splits_and_metrics(toy_tasks):
    suite = check_tasks_available(_spec(toy_tasks))
    assert {n: tuple(map(str, s)) for n, s in suite.splits.items()} == {
        "toy_mmlu": ("validation", "test"), "toy_hellaswag": ("validation", "test")}
    assert suite.metrics == {"toy_mmlu": "acc,none", "toy_hellaswag": "acc_norm,none"}


def test_search_on_confirm_split_is_refused(toy_tasks):
    spec = EvalSpec(tasks=(TaskSpec("toy_mmlu", search_split="test"),), include=(str(toy_tasks),))
    with pytest.raises(UserError, match="confirm split"):
        check_tasks_available(spec)
    halves = TaskSpec("toy_hellaswag", search_split="validation[:60%]",
                      confirm_split="validation[50%:]")
    with pytest.raises(UserError, match="overlaps"):
        check_tasks_available(EvalSpec(tasks=(halves,), include=(str(toy_tasks),)))
    allowed = EvalSpec(tasks=spec.tasks, include=spec.include, allow_search_on_confirm_split=True)
    assert str(check_tasks_available(allowed).splits["toy_mmlu"][0]) == "test"


def test_missing_split_and_metric_are_user_errors(toy_tasks):
    with pytest.raises(UserError, match="no split 'dev2'"):
        check_tasks_available(EvalSpec(tasks=(TaskSpec("toy_mmlu", confirm_split="dev2"),),
                                       include=(str(toy_tasks),)))
    with pytest.raises(UserError, match="no metric 'f1,none'.*acc,none"):
        check_tasks_available(EvalSpec(tasks=(TaskSpec("toy_mmlu", metric="f1"),),
                                       include=(str(toy_tasks),)))


def test_hub_task_offline_fails_before_model_load_and_fast(tiny_family, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded before the tasks are checked")

    monkeypatch.setattr(ev_mod, "load_model", no_model)
    import datasets  # noqa: F401  (one-time imports are not what this test times)
    import lm_eval.tasks  # noqa: F401

    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        ResidentEvaluator(tiny_family["base"], EvalSpec.from_names("hellaswag"))
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert "'hellaswag'" in message and "Rowan/hellaswag" in message
    assert "network" in message and "local files" in message


@pytest.mark.slow  # indexes all ~14,000 built-in task names (6-15 s on 2 cores)
def test_unknown_task_lists_close_matches(toy_tasks):
    with pytest.raises(UserError, match="unknown lm-eval task 'toy_mmlx'.*close matches: toy_mmlu"):
        check_tasks_available(_spec(toy_tasks, names="toy_mmlx"))


def test_builtin_task_works_when_its_dataset_is_available(tiny_family, tmp_path, monkeypatch):
    """Built-in ``hellaswag`` (its YAML and process_docs) on a local copy of its dataset.

    ``datasets`` takes a local folder named like the Hub id (``Rowan/hellaswag``) over the Hub,
    which stands in for a filled cache here.
    """
    import json
    import random

    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "red", "blue", "big", "small"]
    folder = tmp_path / "Rowan" / "hellaswag"
    folder.mkdir(parents=True)
    for split, n in (("train", 4), ("validation", 20), ("test", 4)):
        rows = [{"activity_label": "dog", "ctx_a": " ".join(rng.choices(words, k=5)),
                 "ctx_b": "the", "endings": [" ".join(rng.choices(words, k=3)) for _ in range(4)],
                 "label": str(rng.randrange(4))} for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    resident = ResidentEvaluator(tiny_family["base"], EvalSpec.from_names("hellaswag"))
    search, confirm = resident.suite.splits["hellaswag"]
    assert (str(search), str(confirm)) == ("validation[:50%]", "validation[50%:]")
    assert resident.suite.metrics["hellaswag"] == "acc_norm,none"
    assert [r.n_items for r in resident.evaluate_rungs()] == [3, 5, 10]
    assert resident.evaluate("confirm").n_items == 10
    halves = [set(resident.item_results(s)["hellaswag"]) for s in ("search", "confirm")]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(20))


# ----------------------------------------------------------------------------- evaluation


def test_in_place_weights_score_like_a_fresh_load_item_by_item(tiny_family, toy_tasks):
    spec = _spec(toy_tasks)
    resident = ResidentEvaluator(tiny_family["base"], spec)
    base = resident.evaluate("confirm")
    base_items = resident.item_results("confirm")
    pointers = [p.data_ptr() for p in resident.model.parameters()]
    _copy_weights_in_place(resident.model, tiny_family["ft_a"])
    resident.reset()
    merged = resident.evaluate("confirm")
    assert [p.data_ptr() for p in resident.model.parameters()] == pointers

    fresh = ResidentEvaluator(tiny_family["ft_a"], spec)
    expected = fresh.evaluate("confirm")
    assert merged.score == expected.score and merged.n_items == expected.n_items == 42
    got_items, want_items = resident.item_results("confirm"), fresh.item_results("confirm")
    assert _metrics_only(got_items) == _metrics_only(want_items)
    lls = [r["resps"]["none"] for docs in got_items.values() for r in docs.values()]
    assert lls == [r["resps"]["none"] for docs in want_items.values() for r in docs.values()]
    base_lls = [r["resps"]["none"] for docs in base_items.values() for r in docs.values()]
    assert base.n_items == merged.n_items and base_lls != lls  # the new weights did count


def test_in_memory_merge_scores_like_the_merge_on_disk(tiny_family, toy_tasks, tmp_path):
    """The acceptance test of the issue, with the engine's in-memory and on-disk merges."""
    engine = pytest.importorskip("orchestrator.engine")
    recipe = {"merge_method": "ties", "base_model": str(tiny_family["base"]), "dtype": "float32",
              "models": [{"model": str(tiny_family[n]), "parameters": {"weight": w, "density": 0.5}}
                         for n, w in (("ft_a", 0.6), ("ft_b", 0.4))]}
    spec = _spec(toy_tasks)
    model, _ = ev_mod.load_model(tiny_family["base"])  # as the sweep does: it owns the model
    resident = ResidentEvaluator(model, spec)  # tokenizer from model.name_or_path
    resident.evaluate("confirm")
    engine.InMemoryMerger(recipe, model).merge_into()
    resident.reset()
    merged = resident.evaluate("confirm")

    out = engine.merge_to_disk(recipe, tmp_path / "merged").out_dir
    fresh = ResidentEvaluator(out, spec)
    expected = fresh.evaluate("confirm")
    assert merged.score == expected.score
    assert resident.item_results("confirm") == fresh.item_results("confirm")


def test_resident_scores_equal_lm_eval_simple_evaluate(tiny_family, toy_tasks):
    """Our per-item store and aggregation reproduce lm-eval's own fresh-path numbers."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    spec = _spec(toy_tasks)
    resident = ResidentEvaluator(tiny_family["ft_b"], spec)
    ours = resident.evaluate("default")

    model, tokenizer = ev_mod.load_model(tiny_family["ft_b"])
    tm = TaskManager(include_path=str(toy_tasks), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy_mmlu", "toy_hellaswag"], task_manager=tm,
                                  log_samples=True)
    mmlu, hs = out["results"]["toy_mmlu"], out["results"]["toy_hellaswag"]
    assert ours.components["toy_mmlu"].value == pytest.approx(mmlu["acc,none"])
    assert ours.components["toy_hellaswag"].value == pytest.approx(hs["acc_norm,none"])
    assert ours.components["toy_hellaswag"].stderr == pytest.approx(hs["acc_norm_stderr,none"])
    items = resident.item_results("default")
    for leaf, records in out["samples"].items():
        assert {r["doc_id"]: r["acc"] for r in records} == {
            d: rec["acc,none"] for d, rec in items[leaf].items()}


def test_rungs_reach_the_full_score_and_evaluate_each_item_once(tiny_family, toy_tasks):
    spec = _spec(toy_tasks, rungs=(3, 0.5, 1.0))
    resident = ResidentEvaluator(tiny_family["ft_c"], spec)
    calls = []
    real = resident.lm.loglikelihood

    def counting(requests, *args, **kwargs):
        calls.append([(r.args, r.doc_id) for r in requests])
        return real(requests, *args, **kwargs)

    resident.lm.loglikelihood = counting
    rungs = list(resident.evaluate_rungs("search"))
    assert [r.rung for r in rungs] == [0, 1, 2]
    assert [r.components["toy_mmlu"].n_items for r in rungs] == [3, 12, 24]
    assert [r.components["toy_hellaswag"].n_items for r in rungs] == [3, 10, 20]
    requests = [req for call in calls for req in call]
    assert len(calls) == 3 and len(requests) == 4 * 44  # 4 choices per item, each item once
    assert len(set(requests)) == len(requests)
    assert resident.items_evaluated == 44

    again = list(resident.evaluate_rungs("search"))  # same weights: nothing new to evaluate
    assert len(calls) == 3 and again[-1].score == rungs[-1].score

    full = ResidentEvaluator(tiny_family["ft_c"], spec).evaluate("search")
    assert rungs[-1].score == full.score and rungs[-1].stderr == pytest.approx(full.stderr)
    assert rungs[-1].components["toy_mmlu"].metrics == full.components["toy_mmlu"].metrics


def test_rungs_with_fixed_few_shot_examples_match_the_full_evaluation(tiny_family, toy_tasks):
    """toy_mmlu takes its shots from ``dev`` with ``first_n``: prompts do not depend on the rung."""
    spec = _spec(toy_tasks, names="toy_mmlu", num_fewshot=2, rungs=(5, 1.0))
    resident = ResidentEvaluator(tiny_family["ft_a"], spec)
    contexts = []
    real = resident.lm.loglikelihood

    def spy(requests, *args, **kwargs):
        contexts.extend(r.args[0] for r in requests)
        return real(requests, *args, **kwargs)

    resident.lm.loglikelihood = spy
    last = list(resident.evaluate_rungs())[-1]
    assert all(c.count("Answer:") == 3 for c in contexts)  # two shots and the question
    full = ResidentEvaluator(tiny_family["ft_a"], spec).evaluate("search")
    assert last.score == full.score


def test_rung_prefix_is_stratified_over_subjects(tiny_family, toy_tasks):
    spec = _spec(toy_tasks, names="toy_mmlu", rungs=(0.5,))
    resident = ResidentEvaluator(tiny_family["base"], spec)
    first = next(resident.evaluate_rungs())
    assert first.n_items == 12
    counts = {leaf: len(docs) for leaf, docs in resident.item_results().items()}
    assert counts == {leaf: n // 2 for leaf, n in SUBJECT_SIZES.items()}
    resident.reset()
    assert resident.item_results() == {}


def test_objective_is_the_weighted_mean_of_components(tiny_family, toy_tasks):
    spec = EvalSpec(tasks=(TaskSpec("toy_mmlu", weight=3.0),
                           TaskSpec("toy_hellaswag", metric="acc", weight=1.0)),
                    include=(str(toy_tasks),), limit=8)
    result = ResidentEvaluator(tiny_family["ft_a"], spec).evaluate("search")
    mmlu, hs = result.components["toy_mmlu"], result.components["toy_hellaswag"]
    assert hs.metric == "acc,none" and mmlu.n_items == hs.n_items == 8
    assert result.score == pytest.approx((3 * mmlu.value + hs.value) / 4)
    assert result.stderr == pytest.approx(math.hypot(3 * mmlu.stderr, hs.stderr) / 4)


def test_search_call_on_confirm_split_is_refused(tiny_family, toy_tasks):
    resident = ResidentEvaluator(tiny_family["base"], _spec(toy_tasks, names="toy_mmlu"))
    with pytest.raises(UserError, match="confirm"):
        next(resident.evaluate_rungs("confirm"))
    with pytest.raises(UserError, match="confirm"):
        next(resident.evaluate_rungs("test"))


def test_cuda_request_without_cuda_is_a_user_error(tiny_family, toy_tasks):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match="CUDA is not available"):
        ResidentEvaluator(tiny_family["base"], _spec(toy_tasks, device="cuda"))
