"""``eval``: evaluate a model on lm-eval tasks, print a table, optionally write JSON.

The model is any reference the engine takes: a folder, a Hub id ``org/name[@revision]`` (from
the Hugging Face cache offline), ``model+adapter`` (a LoRA adapter baked in, in memory), or a
bare adapter folder with ``--base``. Example::

    python -m orchestrator eval runs/zoo/base --tasks demo_mmlu,demo_hellaswag --limit 100
    python -m orchestrator eval runs/zoo/lora_knowledge --base runs/zoo/base --tasks demo_mmlu
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.evaluation import lm_eval_compat


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the eval command's arguments."""
    parser.add_argument("model", help="model folder, Hub id org/name[@rev], MODEL+ADAPTER, or an adapter "
                                      "folder with --base")
    parser.add_argument("--base", default=None,
                        help="the model a bare LoRA adapter was trained on (folder or Hub id)")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated lm-eval tasks or groups "
                             "(e.g. demo_mmlu,demo_hellaswag)")
    parser.add_argument("--split", default="default",
                        help="split to evaluate for every task: validation, test, validation[:50%%]"
                             "..., or search/confirm (each task's split for that role); "
                             "default: the split lm-eval evaluates for each task")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N items per task, from a seeded stratified order")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--include", action="append", default=[], metavar="DIR",
                        help="extra lm-eval task folder (repeatable)")
    parser.add_argument("--batch-size", default="16", help="int, auto or auto:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item order")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="write {task: {metric: value, metric_stderr: value}} to FILE")


def run(args: argparse.Namespace) -> int:
    """Evaluate and report; UserError for anything the user can fix."""
    from orchestrator.evaluation.spec import EvalSpec
    from orchestrator.evaluation.suite import check_tasks_available

    spec = EvalSpec.from_names(args.tasks, rungs=(1.0,), limit=args.limit,
                               batch_size=_batch_size(args.batch_size),
                               num_fewshot=args.num_fewshot, include=tuple(args.include),
                               device=args.device, dtype=args.dtype, seed=args.seed)
    folder, adapter = resolve_model(args.model, args.base)
    quiet()
    suite = check_tasks_available(spec)  # every task and the split, before the model loads
    suite.check_split(args.split)
    evaluator = _evaluator(folder, adapter, spec, suite)
    result = evaluate_with_progress(evaluator, args.split)
    print(format_table(result))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(to_json(result), indent=2) + "\n")
        tmp.replace(path)
    return 0


def resolve_model(ref: str, base: str | None) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) for any model reference the engine takes."""
    from orchestrator.engine.sources import resolve_reference
    from orchestrator.engine.weights import is_model_folder
    from orchestrator.lora import is_adapter_folder

    try:
        folder, adapter = resolve_reference(ref)
    except UserError as err:
        raise UserError(f"{ref} does not exist as a model folder or a cached Hub id ({err})") from None
    if adapter is None and is_adapter_folder(folder):
        if base is None:
            raise UserError(f"{ref} is a LoRA adapter: pass --base MODEL (the model it was trained on), "
                            f"or write MODEL+{ref}")
        base_folder, base_adapter = resolve_reference(base)
        if base_adapter is not None or is_adapter_folder(base_folder):
            raise UserError(f"--base {base} must be a model, not an adapter")
        folder, adapter = base_folder, folder
    elif base is not None:
        raise UserError(f"--base is for a bare adapter, but {ref} is a model")
    if not is_model_folder(folder):
        raise UserError(f"{folder} is not a Hugging Face model folder (no config.json and weights)")
    return folder, adapter


def _evaluator(folder: Path, adapter: Path | None, spec, suite):
    from orchestrator.evaluation.evaluator import ResidentEvaluator
    from orchestrator.evaluation.models import load_model

    if adapter is None:
        return ResidentEvaluator(folder, spec, suite=suite)
    from orchestrator.lora import bake, load_adapter, model_layout

    model, tokenizer = load_model(folder, spec.device, spec.dtype)
    shapes, conv1d = model_layout(model)
    bake(model, load_adapter(adapter).for_base(shapes, conv1d).deltas())
    return ResidentEvaluator(model, spec, tokenizer=tokenizer, suite=suite)


def evaluate_with_progress(evaluator, split: str, steps: int = 10):
    """Evaluate in growing prefixes (each item once), printing our progress, not lm-eval's bars."""
    import math
    import os
    import sys
    import time
    from contextlib import redirect_stderr

    views = [evaluator.suite.items(t, split) for t in evaluator.spec.tasks]
    cap = max(evaluator.suite.cap(v) for v in views)
    total = sum(evaluator.suite.cap(v) for v in views)
    start, result = time.perf_counter(), None
    tty = sys.stderr.isatty()
    for step in range(1, steps + 1):
        limit = max(1, math.ceil(cap * step / steps))
        with open(os.devnull, "w") as sink, redirect_stderr(sink):
            result = evaluator.evaluate(split, limit=limit)
        line = f"scored {result.n_items}/{total} items ({time.perf_counter() - start:.1f}s)"
        if tty:
            print(f"\r{line}", end="" if step < steps else "\n", file=sys.stderr, flush=True)
        elif step == steps:
            print(line, file=sys.stderr, flush=True)
    return result


def quiet() -> None:
    """No library progress bars or per-task warnings: the progress line is ours."""
    import os

    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lm_eval_compat.quiet()


def _batch_size(raw: str) -> int | str:
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    if raw == "auto" or (raw.startswith("auto:") and raw[5:].isdigit()):
        return raw
    raise UserError(f"--batch-size must be a positive int, 'auto' or 'auto:N', got {raw!r}")


def _short(key: str) -> str:
    """``acc,none`` -> ``acc``; keys with another filter keep it."""
    return key[:-5] if key.endswith(",none") else key


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def to_json(result) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value, metric_stderr: value}} (NaN becomes null)."""
    return {name: {_short(k): _num(v) for k, v in comp.metrics.items()}
            for name, comp in result.components.items()}


def format_table(result) -> str:
    """A markdown table of every task's metrics with stderr, then the objective."""
    lines = ["| task | split | items | metric | value | stderr |",
             "|---|---|---:|---|---:|---:|"]
    for name, comp in result.components.items():
        for key, value in comp.metrics.items():
            if "_stderr," in key:
                continue
            metric, filter_key = key.split(",", 1)
            stderr = comp.metrics.get(f"{metric}_stderr,{filter_key}", math.nan)
            lines.append(f"| {name} | {comp.split} | {comp.n_items} | {_short(key)} | "
                         f"{_fmt(value)} | {_fmt(stderr)} |")
    parts = ", ".join(f"{n} {_short(c.metric)}" for n, c in result.components.items())
    lines.append(f"\nobjective {_fmt(result.score)} ± {_fmt(result.stderr)} "
                 f"(weighted mean of {parts})")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
