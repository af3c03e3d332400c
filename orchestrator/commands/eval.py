"""``eval``: evaluate a model folder on lm-eval tasks, print a table, optionally write JSON.

Example: ``python -m orchestrator eval runs/zoo/base --tasks demo_mmlu,demo_hellaswag --limit 100``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from orchestrator.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the eval command's arguments."""
    parser.add_argument("model_dir", help="Hugging Face model folder (config.json, safetensors)")
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
    from orchestrator.evaluate import (
        EvalSpec,
        ResidentEvaluator,
        check_device,
        check_model_dir,
        check_tasks_available,
    )

    spec = EvalSpec.from_names(args.tasks, rungs=(1.0,), limit=args.limit,
                               batch_size=_batch_size(args.batch_size),
                               num_fewshot=args.num_fewshot, include=tuple(args.include),
                               device=args.device, dtype=args.dtype, seed=args.seed)
    check_model_dir(args.model_dir)
    check_device(spec.device)
    suite = check_tasks_available(spec)  # every task and the split, before the model loads
    suite.check_split(args.split)
    result = ResidentEvaluator(args.model_dir, spec, suite=suite).evaluate(split=args.split)
    print(format_table(result))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_json(result), indent=2) + "\n")
    return 0


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
