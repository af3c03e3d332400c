"""GPU check on the real model pair: a sweep's trial (resident merge, then evaluation) on cuda.

Builds or reuses the real pair (``orchestrator.zoo.real_pair``; the build itself runs on the
CPU), loads the base as the sweep's resident model on ``--device`` (bfloat16, as stored), and
runs ``--trials`` rounds of ``--methods``: each trial merges in memory with ``InMemoryMerger``
(the merge, the NaN check and the evaluator reset of ``Resident.merge``, synchronised) and then
evaluates every search rung of the demo eval config (``conf/eval/demo.yaml``: demo_mmlu +
demo_hellaswag, rungs 30/90/300). It prints merge and eval seconds per trial and the medians;
the first round after loading is a warm-up (CUDA kernels, lm-eval's task and token caches) and
is printed but left out of the medians.

    bash benchmarks/gpu_check.sh                                     # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --trials 1 # end to end on CPU

Exits 2 with one line when the device is cuda and CUDA is not available.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def check_cuda(device: str) -> str | None:
    """None when ``device`` can be used, else the one-line reason."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return (f"CUDA is not available (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'}); run on a GPU machine or pass --device cpu")
    return None


def run_trials(trial, methods: list[str], pair: dict, rounds: int,
               max_rungs: int | None = None) -> list[dict]:
    """``rounds`` x ``methods`` trials (merge then evaluate); one record per trial."""
    from real_bench import recipe_for

    records = []
    for r in range(rounds):
        for method in methods:
            merge_s = trial.merge(recipe_for(method, pair))
            result = trial.evaluate(max_rungs)
            rec = {"round": r, "method": method, "merge_s": merge_s, "eval_s": result["seconds"],
                   "first_rung_s": result["rungs"][0], "items": result["items"],
                   "score": result["score"]}
            records.append(rec)
            print(f"round {r}{' (warm-up)' if r == 0 else ''} {method}: merge {merge_s:.3f}s, "
                  f"eval {rec['eval_s']:.2f}s ({rec['items']} items, first rung "
                  f"{rec['first_rung_s']:.2f}s), score {rec['score']:.3f}, merge share "
                  f"{merge_s / (merge_s + rec['eval_s']):.1%}", flush=True)
    return records


def summary(records: list[dict], methods: list[str]) -> list[str]:
    """Median merge and eval seconds per method over the rounds after the warm-up."""
    timed = [r for r in records if r["round"] > 0] or records
    lines = ["| method | merge s (median) | eval s (median) | merge share of trial |",
             "|---|---:|---:|---:|"]
    for method in methods:
        rows = [r for r in timed if r["method"] == method]
        merge = statistics.median(r["merge_s"] for r in rows)
        ev = statistics.median(r["eval_s"] for r in rows)
        lines.append(f"| {method} | {merge:.3f} | {ev:.2f} | {merge / (merge + ev):.1%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--trials", type=int, default=3,
                        help="timed rounds over the methods, after one warm-up round")
    parser.add_argument("--pair-dir", default=None,
                        help="real pair folder (default $MO_REAL_PAIR_DIR or the user cache)")
    parser.add_argument("--rungs", type=int, default=None,
                        help="evaluate only the first N search rungs (default: all, an unpruned "
                             "trial; 1 is what a pruned trial costs)")
    parser.add_argument("--json", default=None, help="also write every trial's record to FILE")
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    if args.trials < 0 or (args.rungs is not None and args.rungs < 1):
        print(f"error: --trials must be >= 0 and --rungs >= 1 (got {args.trials}, {args.rungs})",
              file=sys.stderr)
        return 2
    reason = check_cuda(args.device)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    return _run(args)


def _run(args) -> int:
    import torch

    from orchestrator.errors import UserError
    from orchestrator.zoo.real_pair import build_real_pair
    from real_bench import Trial

    try:
        pair = build_real_pair(args.pair_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"# gpu_check on {name}: torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads, methods {args.methods}, {args.trials} timed rounds", flush=True)
    start = time.perf_counter()
    trial = Trial(pair, device=args.device)
    print(f"resident model loaded on {args.device} in {time.perf_counter() - start:.1f}s "
          f"({next(trial.evaluator.model.parameters()).dtype})", flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    records = run_trials(trial, methods, pair, args.trials + 1, args.rungs)
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(args.device) / 2**30:.2f} GiB "
              f"(merge cache {trial.merger.cache_bytes() / 2**30:.2f} GiB)")
    print("\n" + "\n".join(summary(records, methods)))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
