"""Acceptance of the committed demo zoo: the experts and LoRA adapters are skilled, merging them
visibly helps, and merge methods differ. Merges of full experts go through the project's merge
CLI; adapters are merged into the base with PEFT (scores) and ``orchestrator.lora`` (sums)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.zoo import default_adapter_paths, default_model_paths
from orchestrator.zoo.build import COMMITTED_ZOO, zoo_scores
from orchestrator.zoo.score import score_loaded, score_model

CHANCE = 0.25
OWN_TASK = {"knowledge": "demo_mmlu_nature", "knowledge2": "demo_mmlu_society",
            "commonsense": "demo_hellaswag"}
EXPERTS = tuple(OWN_TASK)
PATHS = default_model_paths(COMMITTED_ZOO)
# Each adapter's skill: the task and metric of the search objective it is trained for.
ADAPTER_SKILL = {"lora_knowledge": ("demo_mmlu", "acc"), "lora_commonsense": ("demo_hellaswag", "acc_norm")}
ADAPTER_PATHS = default_adapter_paths(COMMITTED_ZOO)


def mean_score(scores: dict) -> float:
    """Mean of the two tasks: demo_mmlu acc and demo_hellaswag acc_norm."""
    return (scores["demo_mmlu"]["acc"] + scores["demo_hellaswag"]["acc_norm"]) / 2


def base_model():
    """The committed base, float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(PATHS["base"], dtype=torch.float32).eval()


def score_with_adapters(weights: dict) -> dict:
    """Scores of base + sum_i w_i delta W_i of the committed adapters (``orchestrator.lora``)."""
    from transformers import AutoTokenizer

    from orchestrator.lora import bake, load_adapter, weighted_sum_deltas

    model = base_model()
    adapters = [load_adapter(ADAPTER_PATHS[n]) for n in weights]
    bake(model, weighted_sum_deltas(adapters, list(weights.values())))
    return score_loaded(model, AutoTokenizer.from_pretrained(PATHS["base"]))


@pytest.fixture(scope="module")
def fresh_scores() -> dict:
    """Every committed model, and every adapter merged into the base by PEFT, scored afresh."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    scores = {name: score_model(path) for name, path in PATHS.items()}
    tokenizer = AutoTokenizer.from_pretrained(PATHS["base"])
    for name, path in ADAPTER_PATHS.items():
        model = PeftModel.from_pretrained(base_model(), path).merge_and_unload().eval()
        scores[name] = score_loaded(model, tokenizer)
    return scores


def merge(tmp_path: Path, method: str, weights: dict, *, base: bool = True, seed: int = 0,
          **params) -> dict:
    """Merge experts with the project's merge CLI and score the result."""
    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(PATHS[n]), "parameters": p} for n, p in weights.items()]}
    if base:
        recipe["base_model"] = str(PATHS["base"])
    if params:
        recipe["parameters"] = params
    name = f"{method}-" + "-".join(f"{n}{p.get('weight')}" for n, p in weights.items())
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "merge", str(tmp_path / f"{name}.yml"),
                           str(tmp_path / name), "--seed", str(seed)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return score_model(tmp_path / name)


def test_zoo_json_matches_fresh_scores(fresh_scores):
    recorded = zoo_scores(COMMITTED_ZOO)
    for name, scores in fresh_scores.items():
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                assert value == pytest.approx(recorded[name][task][metric], abs=0.01), (name, task)


@pytest.mark.parametrize("expert", EXPERTS)
def test_expert_beats_chance_and_base_on_its_own_task(fresh_scores, expert):
    task = OWN_TASK[expert]
    for metric in ("acc", "acc_norm"):
        score = fresh_scores[expert][task][metric]
        assert score >= CHANCE + 0.25, (expert, task, metric, score)
        assert score >= fresh_scores["base"][task][metric] + 0.20, (expert, task, metric, score)


@pytest.mark.parametrize("adapter", list(ADAPTER_SKILL))
def test_adapter_beats_chance_and_base_on_its_task(fresh_scores, adapter):
    task, metric = ADAPTER_SKILL[adapter]
    score = fresh_scores[adapter][task][metric]
    assert score >= CHANCE + 0.25, (adapter, task, metric, score)
    assert score >= fresh_scores["base"][task][metric] + 0.20, (adapter, task, metric, score)


def test_adapter_task_arithmetic_beats_each_adapter_on_the_mean(fresh_scores):
    best_single = max(mean_score(fresh_scores[n]) for n in ADAPTER_SKILL)
    means = {w: round(mean_score(score_with_adapters({n: w for n in ADAPTER_SKILL})), 4)
             for w in (1.0, 0.7)}
    print(json.dumps({"best_single": best_single, "task_arithmetic": means}))
    assert min(means.values()) > best_single, means
    assert max(means.values()) >= best_single + 0.05, means


@pytest.mark.slow
def test_simple_merge_beats_every_expert_on_the_mean(fresh_scores, tmp_path):
    best_single = max(mean_score(fresh_scores[n]) for n in EXPERTS)
    merged = {}
    for weight in (0.5, 0.75, 1.0):
        merged[f"task_arithmetic {weight}"] = merge(
            tmp_path, "task_arithmetic", {n: {"weight": weight} for n in EXPERTS})
    merged["linear"] = merge(tmp_path, "linear", {n: {"weight": 1.0} for n in EXPERTS}, base=False)
    means = {k: round(mean_score(v), 4) for k, v in merged.items()}
    print(json.dumps({"best_single": best_single, "merges": means}))
    assert max(means.values()) >= best_single + 0.05, means


@pytest.mark.slow
def test_merge_methods_differ(tmp_path):
    experts = {n: {"weight": 1.0} for n in EXPERTS}
    sparse = {n: {"weight": 1.0, "density": 0.5} for n in EXPERTS}
    means = {
        "linear": mean_score(merge(tmp_path, "linear", experts, base=False)),
        "ties": mean_score(merge(tmp_path, "ties", sparse)),
        "dare_ties": mean_score(merge(tmp_path, "dare_ties", sparse)),
    }
    print(json.dumps(means))
    assert max(means.values()) - min(means.values()) >= 0.03, means
