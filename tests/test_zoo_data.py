"""Demo task data and the local lm-eval tasks: committed data, formats, loading by name."""

from __future__ import annotations

import json

import pytest

from orchestrator.zoo import TASKS_DIR, default_model_paths
from orchestrator.zoo.taskdata import (DATA_FILES, HELLASWAG_SIZES, MMLU_SPLITS, fact_split,
                                       render_task_data)
from orchestrator.zoo.world import DOMAINS, build_world


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / "data" / name).read_text().splitlines()]


def test_builder_regenerates_committed_data_byte_identically():
    rendered = render_task_data()
    assert sorted(rendered) == sorted(DATA_FILES)
    for name, content in rendered.items():
        assert (TASKS_DIR / "data" / name).read_bytes() == content, name


def test_mmlu_rows_have_the_mmlu_shape_and_split_sizes():
    rows = _rows("demo_mmlu.jsonl")
    sizes = dict(MMLU_SPLITS)
    subjects = [r.name for rels in DOMAINS.values() for r in rels]
    for subject in subjects:
        for split in ("dev", "validation", "test"):
            mine = [r for r in rows if r["subject"] == subject and r["split"] == split]
            assert len(mine) == sizes[split]
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert 0 <= row["answer"] < 4
    answers = [r["answer"] for r in rows if r["split"] == "test"]
    assert max(answers.count(i) for i in range(4)) < 0.4 * len(answers)  # no letter bias


def test_benchmark_facts_are_never_in_expert_training_questions():
    world = build_world()
    for domain, rel in world.relations():
        split = fact_split(world, rel.name, domain)
        asked = set(split["train_qa"])
        assert not asked & set(split["validation"]) and not asked & set(split["test"])


def test_hellaswag_rows_have_four_endings_of_similar_length():
    rows = _rows("demo_hellaswag.jsonl")
    for split, size in HELLASWAG_SIZES.items():
        assert sum(r["split"] == split for r in rows) == size
    for row in rows:
        gold = row["endings"][row["label"]]
        assert len(row["endings"]) == 4 and len(set(row["endings"])) == 4
        assert all(abs(len(e) - len(gold)) <= 4 for e in row["endings"])
    actors = {s: {r["ctx"].split()[0] for r in rows if r["split"] == s} for s in HELLASWAG_SIZES}
    assert not actors["train"] & (actors["validation"] | actors["test"])
    assert not actors["validation"] & actors["test"]


def test_every_benchmark_word_is_in_the_vocabulary():
    from orchestrator.zoo.corpus import make_tokenizer

    tok = make_tokenizer(build_world())
    texts = [r["question"] + " " + " ".join(r["choices"]) for r in _rows("demo_mmlu.jsonl")]
    texts += [r["ctx"] + " " + " ".join(r["endings"]) for r in _rows("demo_hellaswag.jsonl")]
    texts += ["Question: the\nAnswer:"]
    ids = {i for text in texts for i in tok(text)["input_ids"]}
    assert tok("qqq")["input_ids"] == [tok.unk_token_id]
    assert tok.unk_token_id not in ids


def test_tasks_load_by_name_from_any_working_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    for name in ("demo_mmlu", "demo_mmlu_nature", "demo_mmlu_society", "demo_hellaswag",
                 "demo_mmlu_creature_color"):
        assert name in manager.all_tasks, name
    loaded = manager.load(["demo_mmlu", "demo_hellaswag"])["tasks"]
    assert len(loaded) == 7
    hellaswag = next(t for name, t in loaded.items() if "hellaswag" in str(name))
    assert len(hellaswag.test_docs()) == HELLASWAG_SIZES["test"]
    assert len(hellaswag.validation_docs()) == HELLASWAG_SIZES["validation"]
    subject = next(t for name, t in loaded.items() if "creature_color" in str(name))
    doc = subject.test_docs()[0]
    assert subject.doc_to_text(doc).startswith("Question: ") and subject.doc_to_text(doc).endswith("\nAnswer:")
    assert subject.doc_to_choice(doc) == doc["choices"]
    assert len(subject.fewshot_docs()) == dict(MMLU_SPLITS)["dev"]


@pytest.mark.parametrize("root", ["runs/zoo", "/some/zoo"])
def test_default_model_paths(root):
    paths = default_model_paths(root)
    assert list(paths) == ["base", "knowledge", "knowledge2", "commonsense"]
    assert all(str(p).startswith(root) and p.name == name for name, p in paths.items())
