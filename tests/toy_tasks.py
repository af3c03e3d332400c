"""Toy lm-eval task folders for the evaluation tests (written at run time, absolute paths).

``toy_mmlu`` is a group of three subjects of unequal size (MMLU format, splits dev/validation/test);
``toy_hellaswag`` is a single HellaSwag-style task (splits train/validation/test). All words come
from the tiny tokenizer's vocabulary, so the tiny models see real tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.tiny import WORDS

CONTENT = [w for w in WORDS if w not in {"Answer", ":", ".", ","}]
SUBJECT_SIZES = {"toy_mmlu_a": 12, "toy_mmlu_b": 8, "toy_mmlu_c": 4}
SPLIT_SIZES = {"dev": 3, "test": 10}  # validation sizes come from SUBJECT_SIZES
HS_SIZES = {"train": 8, "validation": 20, "test": 12}


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(CONTENT) for _ in range(n))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mmlu_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"question": _sentence(rng, 5), "choices": [_sentence(rng, 2) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(n)]


def _hs_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"ctx": _sentence(rng, 6),
             "endings": [_sentence(rng, rng.randint(2, 4)) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(n)]


def _mmlu_yaml(name: str, files: dict[str, Path]) -> str:
    data = {split: str(p) for split, p in files.items()}
    return "\n".join([
        f"task: {name}", "dataset_path: json", "dataset_name: null",
        f"dataset_kwargs: {{data_files: {json.dumps(data)}}}",
        "test_split: test", "validation_split: validation", "fewshot_split: dev",
        "fewshot_config: {sampler: first_n}", "output_type: multiple_choice",
        'doc_to_text: "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}'
        '\\nD. {{choices[3]}}\\nAnswer:"',
        "doc_to_choice: ['A', 'B', 'C', 'D']", "doc_to_target: answer",
        "metric_list:", "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}", ""])


def _hs_yaml(files: dict[str, Path]) -> str:
    data = {split: str(p) for split, p in files.items()}
    return "\n".join([
        "task: toy_hellaswag", "dataset_path: json", "dataset_name: null",
        f"dataset_kwargs: {{data_files: {json.dumps(data)}}}",
        "training_split: train", "validation_split: validation", "test_split: test",
        "output_type: multiple_choice", 'doc_to_text: "{{ctx}}"', 'doc_to_choice: "{{endings}}"',
        "doc_to_target: label", 'target_delimiter: " "', "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}", ""])


def write_toy_tasks(root: Path, seed: int = 0) -> Path:
    """Write the toy task folder under ``root`` and return it."""
    rng = random.Random(seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n_val in SUBJECT_SIZES.items():
        files = {}
        for split, n in {**SPLIT_SIZES, "validation": n_val}.items():
            files[split] = data / f"{name}_{split}.jsonl"
            _write_jsonl(files[split], _mmlu_rows(rng, n))
        (root / f"{name}.yaml").write_text(_mmlu_yaml(name, files))
    (root / "_toy_mmlu.yaml").write_text(
        "group: toy_mmlu\ntask: [toy_mmlu_a, toy_mmlu_b, toy_mmlu_c]\naggregate_metric_list:\n"
        "  - {metric: acc, weight_by_size: true}\nmetadata: {version: 1.0}\n")
    hs_files = {}
    for split, n in HS_SIZES.items():
        hs_files[split] = data / f"toy_hellaswag_{split}.jsonl"
        _write_jsonl(hs_files[split], _hs_rows(rng, n))
    (root / "toy_hellaswag.yaml").write_text(_hs_yaml(hs_files))
    return root

