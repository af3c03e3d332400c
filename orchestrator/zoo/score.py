"""Scores of zoo models on the demo tasks, through lm-eval's public API.

``score_loaded`` is the one place that calls lm-eval, so it can be switched to the project's
evaluation layer (``orchestrator/evaluate.py``) later.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from orchestrator.zoo import ADAPTER_NAMES, TASKS_DIR

DEMO_TASKS = ("demo_mmlu", "demo_hellaswag")
# Result keys reported in zoo.json: the two tasks and the two knowledge domains.
REPORTED = ("demo_mmlu", "demo_mmlu_nature", "demo_mmlu_society", "demo_hellaswag")
METRICS = ("acc", "acc_norm")


def _quiet_lm_eval() -> None:
    """lm-eval logs a warning per task and per model object; keep the build output readable."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def score_model(model_dir: Path, tasks=DEMO_TASKS) -> dict:
    """Scores of a model folder on the tasks' test splits: ``{task: {metric: value}}``."""
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars of transformers
        model, tokenizer = _load(model_dir)
    return score_loaded(model, tokenizer, tasks)


def score_adapter(adapter_dir: Path, base_dir: Path | None = None, tasks=DEMO_TASKS) -> dict:
    """Scores of a LoRA adapter merged into its base (default: the zoo's ``base`` beside it).

    The update ``scaling * B @ A`` is added to the base weights with ``orchestrator.lora.bake``
    (bit for bit PEFT's ``merge_and_unload`` in float32); the base's tokenizer is used.
    """
    from orchestrator.lora import bake, load_adapter

    base_dir = base_dir or adapter_dir.parent / "base"
    with contextlib.redirect_stderr(io.StringIO()):
        model, tokenizer = _load(base_dir)
    bake(model, load_adapter(adapter_dir).deltas())
    return score_loaded(model, tokenizer, tasks)


def score_zoo_entry(zoo_dir: Path, name: str, tasks=DEMO_TASKS) -> dict:
    """Scores of a zoo's model or adapter folder by name (a worker-process entry point)."""
    if name in ADAPTER_NAMES:
        return score_adapter(zoo_dir / name, zoo_dir / "base", tasks)
    return score_model(zoo_dir / name, tasks)


def _load(model_dir: Path):
    """A model folder's float32 model (eval mode) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def score_loaded(model, tokenizer, tasks=DEMO_TASKS, *, batch_size: int = 64) -> dict:
    """Scores of a loaded model on the tasks' test splits: ``{task: {metric: value}}``."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars of lm-eval
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        results = evaluate(lm=lm, task_dict=manager.load(list(tasks)),
                           bootstrap_iters=0, log_samples=False, verbosity="ERROR")["results"]
    return {task: {m: round(float(results[task][f"{m},none"]), 4) for m in METRICS}
            for task in REPORTED if task in results}
