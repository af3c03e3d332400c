"""Demo-zoo scores of the SVD-based methods (tsv, iso_c, iso_cts) next to task arithmetic.

Merges the zoo's ``knowledge`` and ``commonsense`` experts over ``base`` with each method at its
default parameters and a few alphas, and scores every merge and the parents with the CLI's
``eval`` command (``demo_mmlu``, ``demo_hellaswag``, test split). Prints a Markdown table.

Usage (after ``python -m orchestrator zoo``, which installs the zoo into ``runs/zoo``)::

    .venv/bin/python benchmarks/new_methods_demo.py [--zoo runs/zoo] [--work runs/new_methods_demo]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

TASKS = ("demo_mmlu", "demo_hellaswag")
EXPERTS = ("knowledge", "commonsense")
# label -> (method, global parameters, per-model parameters)
MERGES: dict[str, tuple[str, dict, dict]] = {
    "task_arithmetic (w 1,1)": ("task_arithmetic", {}, {"weight": 1.0}),
    "task_arithmetic (w .5,.5)": ("task_arithmetic", {}, {"weight": 0.5}),
    **{f"tsv alpha={a}": ("tsv", {"alpha": a}, {}) for a in (1.0, 0.5, 0.75, 1.5, 2.0)},
    **{f"iso_c alpha={a}": ("iso_c", {"alpha": a}, {}) for a in (1.0, 0.5, 1.5, 2.0, 3.0)},
    **{f"iso_cts alpha={a}": ("iso_cts", {"alpha": a}, {}) for a in (1.0, 0.5, 1.5, 2.0, 3.0)},
}


def recipe(zoo: Path, method: str, params: dict, per_model: dict) -> dict:
    models = [{"model": str(zoo / e), **({"parameters": per_model} if per_model else {})}
              for e in EXPERTS]
    out = {"merge_method": method, "base_model": str(zoo / "base"), "models": models,
           "dtype": "float32"}
    return {**out, "parameters": params} if params else out


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def scores(folder: Path, work: Path) -> dict[str, float]:
    """``{task: acc}`` of one model folder (cached in ``work``)."""
    cache = work / f"{folder.name}.scores.json"
    if not cache.exists():
        out = work / f"{folder.name}.eval.json"  # {task: {metric: value, ...}}
        run("eval", str(folder), "--tasks", ",".join(TASKS), "--split", "test",
            "--json", str(out))
        results = json.loads(out.read_text())
        cache.write_text(json.dumps({t: float(results[t]["acc"]) for t in TASKS}))
    return json.loads(cache.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("runs/zoo"))
    parser.add_argument("--work", type=Path, default=Path("runs/new_methods_demo"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {name: scores(args.zoo / name, args.work) for name in ("base", *EXPERTS)}
    for label, (method, params, per_model) in MERGES.items():
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")
        folder = args.work / slug  # merged once, kept (with its scores) for reruns
        if not folder.exists():
            path = args.work / f"{slug}.yml"
            path.write_text(yaml.safe_dump(recipe(args.zoo, method, params, per_model)))
            run("merge", str(path), str(folder), "--quiet")
        rows[label] = scores(folder, args.work)
    print("| model | " + " | ".join(TASKS) + " | mean |")
    print("|---|" + "---:|" * (len(TASKS) + 1))
    for label, row in rows.items():
        values = [row[t] for t in TASKS]
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {sum(values) / len(values):.4f} |")


if __name__ == "__main__":
    main()
