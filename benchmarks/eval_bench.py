"""Evaluation benchmark: resident evaluator vs the fresh path, per trial, on the demo zoo.

Prints a markdown table:
* fixed overhead per trial (intercept of trial time against items; and a 1-item-per-task trial),
* items per second (marginal, and for a full trial),
* seconds per trial, resident path (new weights copied in place + reset + evaluate) against
  the fresh path (load the model folder + HFLM + TaskManager + ``simple_evaluate``), on the
  same items, side by side.

Usage: ``python benchmarks/eval_bench.py [--zoo runs/zoo] [--repeats 3] [--threads N]``.
Without a zoo at ``--zoo`` it builds the micro zoo in a temporary folder (say so in reports).
"""

from __future__ import annotations

import os

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

TASKS = ("demo_mmlu", "demo_hellaswag")


def _timed(fn) -> tuple[float, object]:
    """(seconds, result) of ``fn()``; lm-eval's progress bars (stderr) are swallowed."""
    with contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out


def _median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call."""
    _timed(fn)
    return statistics.median(_timed(fn)[0] for _ in range(repeats))


def zoo_models(zoo: Path) -> dict[str, Path]:
    """Model folders of the zoo at ``zoo``; the micro zoo is built in a temp folder if absent."""
    from orchestrator.zoo import MODEL_NAMES, default_model_paths

    if not all((zoo / n / "config.json").is_file() for n in MODEL_NAMES):
        from orchestrator.zoo.build import build_zoo

        zoo = Path(tempfile.mkdtemp(prefix="eval-bench-")) / "zoo"
        print(f"(no zoo at the given path: building the MICRO zoo in {zoo})")
        build_zoo(zoo, micro=True, log=lambda *_: None)
    return default_model_paths(zoo)


def state_dicts(models: dict[str, Path]) -> list[dict]:
    from safetensors.torch import load_file

    return [load_file(str(next(path.glob("*.safetensors")))) for path in models.values()]


class Resident:
    """The resident path: one evaluator; each trial copies new weights in place."""

    def __init__(self, model_dir: Path, spec, states: list[dict]) -> None:
        import torch

        from orchestrator.evaluation.evaluator import ResidentEvaluator

        self.torch = torch
        self.setup_s, self.ev = _timed(lambda: ResidentEvaluator(model_dir, spec))
        self.params = dict(self.ev.model.named_parameters())
        self.states, self.trial = states, 0

    def new_weights(self) -> None:
        state = self.states[self.trial % len(self.states)]
        self.trial += 1
        with self.torch.no_grad():
            for name, tensor in state.items():
                if name in self.params:
                    self.params[name].copy_(tensor)
        self.ev.reset()

    def trial_time(self, split: str, limit: int | None) -> float:
        self.new_weights()
        return _timed(lambda: self.ev.evaluate(split, limit=limit))[0]

    def rungs_time(self) -> float:
        self.new_weights()
        return _timed(lambda: list(self.ev.evaluate_rungs("search")))[0]

    def samples(self, split: str, limit: int | None) -> dict[str, list[int]]:
        """The items a trial evaluates, as lm-eval ``samples`` (for the fresh path)."""
        out: dict[str, list[int]] = {}
        for task in self.ev.spec.tasks:
            plan = self.ev.suite.plan(task, split)
            n = min(limit, len(plan.order)) if limit else len(plan.order)
            for leaf, doc in plan.order[:n]:
                out.setdefault(leaf, []).append(doc)
        return {leaf: sorted(docs) for leaf, docs in out.items()}


def fresh_trial(model_dir: Path, samples: dict[str, list[int]], batch_size: int,
                builtins: bool = False) -> None:
    """The peers' path: load from disk, wrap, build tasks, ``simple_evaluate``.

    ``builtins`` indexes lm-eval's built-in tasks too, as the lm-eval CLI and a plain
    ``TaskManager(include_path=...)`` do; without it the fresh path gets our lean index.
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.zoo import TASKS_DIR

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir),
              batch_size=batch_size)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=builtins)
    lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tm, samples=samples,
                            log_samples=False)


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of time against items."""
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("runs/zoo"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both paths (1: tiny models gain nothing from more, "
                             "and the machine is shared); 0 keeps torch's default")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from orchestrator.evaluation.spec import EvalSpec

    models = zoo_models(args.zoo)
    spec = EvalSpec.from_names(list(TASKS), rungs=(0.1, 0.3, 1.0), batch_size=args.batch_size)
    resident = Resident(models["base"], spec, state_dicts(models))
    report(resident, models, args)


def report(resident: Resident, models: dict[str, Path], args) -> None:
    """Measure both paths and print the markdown table."""
    reps, bs, other = args.repeats, args.batch_size, models["knowledge"]
    by_size = {}
    for limit in (1, 10, 50, 150, None):
        n_items = sum(len(v) for v in resident.samples("default", limit).values())
        by_size[limit] = (n_items, _median_time(
            lambda n=limit: resident.trial_time("default", n), reps))
    intercept, slope = fit_line(list(by_size.values()))
    rungs_s = _median_time(resident.rungs_time, reps)
    lean, cli_like = {}, {}
    for limit in (50, None):
        items = resident.samples("default", limit)
        lean[limit] = _median_time(lambda s=items: fresh_trial(other, s, bs), reps)
        cli_like[limit] = _timed(lambda s=items: fresh_trial(other, s, bs, builtins=True))[0]
    print_table(resident, by_size, intercept, slope, lean, cli_like, rungs_s, reps)


def print_table(resident, by_size, intercept, slope, lean, cli_like, rungs_s, reps) -> None:
    import torch

    print(f"\nresident setup, once per study (tasks + model load + HFLM): "
          f"{resident.setup_s:.2f} s; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}; medians of {reps} (built-ins column: 1 run)\n")
    print("| measure | resident | fresh, lean index | fresh, built-ins indexed | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fixed overhead per trial (intercept of time vs items) | {intercept:.3f} s | | | |")
    one_n, one_s = by_size[1]
    print(f"| trial of 1 item per task ({one_n} items) | {one_s:.3f} s | | | |")
    full_n, full_s = by_size[None]
    print(f"| items per second, marginal (1 / slope) | {1 / slope:.0f} | | | |")
    print(f"| items per second, full trial ({full_n} items) | {full_n / full_s:.0f} | "
          f"{full_n / lean[None]:.0f} | {full_n / cli_like[None]:.0f} | |")
    for limit, label in ((50, "50 items per task"), (None, "full test splits")):
        n, res = by_size[limit]
        print(f"| s per trial, {label} ({n} items) | {res:.3f} | {lean[limit]:.3f} | "
              f"{cli_like[limit]:.3f} | {lean[limit] / res:.1f}x / {cli_like[limit] / res:.1f}x |")
    print(f"| s per trial, search rungs 10%/30%/100% (3 lm-eval calls) | {rungs_s:.3f} | | | |")


if __name__ == "__main__":
    main()
