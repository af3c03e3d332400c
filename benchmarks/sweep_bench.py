"""Sweep throughput and the value of pruning, on the demo zoo (or the micro zoo).

Runs the same study twice through the CLI, side by side in one run: once with the configured
pruner (successive halving) and once without pruning, same sampler seed and trial count. Prints
trials per minute, the share of trial time spent merging, and the items evaluated with and
without pruning against the best search and confirm scores each run found.

    .venv/bin/python benchmarks/sweep_bench.py [--trials 60] [--experiment demo] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_study(runs: Path, name: str, experiment: str, trials: int, pruner: str, seed: int) -> float:
    """Run one study through the CLI; return its wall-clock seconds."""
    cmd = [sys.executable, "-m", "orchestrator", "sweep", f"experiment={experiment}", f"runs_dir={runs}",
           f"study.name={name}", f"study.n_trials={trials}", f"study.pruner.name={pruner}",
           f"study.sampler.seed={seed}", "tracking=none", "study.save_best=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def summarize(runs: Path, name: str, wall: float) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'optuna.db'}")
    trials = [t for t in study.trials if t.state.is_finished()]
    items = sum(max(t.intermediate_values, default=0) for t in trials)
    merge_s = sum(t.user_attrs.get("merge_s", 0.0) for t in trials)
    eval_s = sum(t.user_attrs.get("eval_s", 0.0) for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    confirm = study.user_attrs.get(f"confirm:{best.user_attrs['recipe_key']}", {}).get("score", float("nan"))
    trial_wall = sum(t.duration.total_seconds() for t in trials)
    return {"trials": len(trials), "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "wall": wall, "trials_per_min": 60 * len(trials) / trial_wall, "merge_share": merge_s / (merge_s + eval_s),
            "trial_s": (merge_s + eval_s) / len(trials), "items": items, "best": best.value,
            "best_method": best.user_attrs["method"], "confirm": confirm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    rows = {}
    for label, pruner in (("successive halving", "successive_halving"), ("no pruning", "none")):
        name = f"bench_{pruner}"
        rows[label] = summarize(runs, name, run_study(runs, name, args.experiment, args.trials, pruner, args.seed))
    print(f"experiment={args.experiment}, {args.trials} trials, sampler seed {args.seed}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| pruner | trials/min (trial time) | whole run s | s/trial (merge+eval) | merge share | pruned | items evaluated "
          "| best search | method | its confirm |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['trials_per_min']:.1f} | {r['wall']:.0f} | {r['trial_s']:.2f} | "
              f"{100 * r['merge_share']:.1f}% | {r['pruned']} | {r['items']} | {r['best']:.4f} | "
              f"{r['best_method']} | {r['confirm']:.4f} |")
    a, b = rows["successive halving"], rows["no pruning"]
    print(f"\npruning evaluated {a['items'] / b['items']:.2f}x the items of the unpruned study "
          f"(best search {a['best']:.4f} vs {b['best']:.4f})")


if __name__ == "__main__":
    main()
