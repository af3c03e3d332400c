"""Per-trial cost of a data-flow trial against a parameter-space trial, side by side in one run.

On the demo zoo (3-layer Llama, float32) and, when ``orchestrator.zoo.real_pair`` can build or
find it, on the real pair (SmolLM2-135M and two bf16 fine-tunes; 30 layers). For each model set,
in one process, as a sweep's ``Resident`` runs them (baselines merged first, so the merger's
cache holds every candidate, as it does after a sweep's baselines):

* **PS trial**: ``task_arithmetic`` with weights 0.5/0.5 merged into the resident model
  (median of ``--repeat``), then evaluated on the search split (``--rungs all``: every rung,
  an unpruned trial; ``first``: the first rung, what a pruned trial costs);
Recipes are written in the models' own dtype (``candidates.dtype`` should be too: the
resident model is loaded in it, so a float32 recipe over bf16 models saves another model than
the one evaluated in memory, for any method).

* **DFS trial**: a 4/3-depth path (SOLAR-style: ft_a's first 2/3 of the layers then ft_b's
  last 2/3, one layer with its output projections scaled by 0.9), wired in place (first wire:
  the bank of candidate modules is built; then the median of ``--repeat`` re-wires), then
  evaluated the same way;
* **DFS on disk**: the same path as mergekit-evolve runs a trial: ``merge_to_disk`` then a
  fresh ``ResidentEvaluator`` (load + HFLM) before the same evaluation (not for the real pair
  unless ``--disk-real``);
* **memory**: the process's RSS before the first data-flow trial, after it and after all;
  the bytes the path model references and how many of them are not the merger's cached inputs.

    .venv/bin/python benchmarks/dataflow_bench.py [--zoo demo|real|both] [--repeat 5] [--rungs all|first]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_sets(which: str) -> dict[str, dict[str, str]]:
    """{label: {"base", "ft_a", "ft_b"}} of the model sets to run."""
    out = {}
    if which in ("demo", "both"):
        demo = ROOT / "demo_zoo"
        out["demo zoo (3 layers, f32)"] = {"base": str(demo / "base"), "ft_a": str(demo / "knowledge"),
                                           "ft_b": str(demo / "commonsense")}
    if which in ("real", "both"):
        from orchestrator.zoo.real_pair import build_real_pair, real_pair_available

        reason = real_pair_available()
        if reason:
            print(f"real pair skipped: {reason}")
        else:
            out["real pair (SmolLM2-135M, 30 layers, bf16)"] = {k: str(v) for k, v in build_real_pair().items()}
    return out


def path_recipe(models: dict[str, str], layers: int, dtype: str) -> dict:
    """ft_a [0, 2L/3) + ft_b [L/3, L): 4L/3 layers; ft_b's first layer scaled 0.9 (o_proj, down_proj)."""
    cut, start = 2 * layers // 3, layers // 3
    scale = [{"filter": "o_proj", "value": 0.9}, {"filter": "down_proj", "value": 0.9}, {"value": 1.0}]
    return {"merge_method": "passthrough", "dtype": dtype, "slices": [
        {"sources": [{"model": models["ft_a"], "layer_range": [0, cut]}]},
        {"sources": [{"model": models["ft_b"], "layer_range": [start, start + 1], "parameters": {"scale": scale}}]},
        {"sources": [{"model": models["ft_b"], "layer_range": [start + 1, layers]}]}]}


def ps_recipe(models: dict[str, str], dtype: str = "float32") -> dict:
    return {"merge_method": "task_arithmetic", "base_model": models["base"], "dtype": dtype,
            "models": [{"model": models["ft_a"], "parameters": {"weight": 0.5}},
                       {"model": models["ft_b"], "parameters": {"weight": 0.5}}]}


def evaluate(resident, rungs: str) -> tuple[float, float, int]:
    """(seconds, score, items) of one search-split evaluation of the model the resident holds."""
    start = time.perf_counter()
    last = None
    for last in resident.rungs("search"):
        if rungs == "first":
            break
    return time.perf_counter() - start, last.score, last.n_items


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_resident(models: dict[str, str], threads: int):
    import torch

    from orchestrator.config import load_config
    from orchestrator.evaluation.suite import check_tasks_available
    from orchestrator.study.candidates import Candidates, baseline_recipes, resolve_candidates
    from orchestrator.study.resident import Resident
    from orchestrator.sweep.setup import eval_spec

    torch.set_num_threads(threads)
    spec = eval_spec(load_config(["experiment=demo"]))
    cand = resolve_candidates(Candidates({"ft_a": models["ft_a"], "ft_b": models["ft_b"]}, base=models["base"]))
    resident = Resident(cand, spec, check_tasks_available(spec), 0)
    for recipe in baseline_recipes(cand).values():  # as a sweep's baselines: every candidate cached
        resident.merge(recipe, 0)
    resident.merge(ps_recipe({**cand.models, "base": cand.base}), 0)
    evaluate(resident, "first")  # warm the tokenizer cache, as the baselines' evaluations do
    return resident, cand


def held_bytes(resident) -> tuple[int, int]:
    """(bytes the path model references, bytes of them outside the merger's cached inputs)."""
    model = resident.evaluator.model
    cached = resident.merger.cached_storages()
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values()), sum(n for ptr, n in storages.items() if ptr not in cached)


def run_set(label: str, models: dict[str, str], args) -> list[str]:
    from orchestrator.engine.weights import read_config

    config = read_config(Path(models["base"]))
    layers, dtype = config["num_hidden_layers"], config.get("dtype") or config.get("torch_dtype") or "float32"
    resident, cand = make_resident(models, args.threads)
    ps = ps_recipe({**cand.models, "base": cand.base}, dtype)
    path = path_recipe(cand.models, layers, dtype)  # the models' dtype, as the resident model has it
    ps_merge = timed(lambda: resident.merge(ps, 0), args.repeat)
    ps_eval, ps_score, items = evaluate(resident, args.rungs)
    rss0 = rss_mib()
    start = time.perf_counter()
    resident.merge(path, 0)
    first_wire = time.perf_counter() - start
    rss1 = rss_mib()
    df_wire = timed(lambda: resident.merge(path, 0), args.repeat)
    df_eval, df_score, _ = evaluate(resident, args.rungs)
    depth = resident.evaluator.model.config.num_hidden_layers
    referenced, extra = held_bytes(resident)
    disk = disk_trial(path, resident, args) if args.disk_real or layers < 10 else None
    rss2 = rss_mib()
    rows = [f"| {label} | PS: task_arithmetic ({layers} layers) | {ps_merge * 1e3:.1f} ms | - | "
            f"{ps_eval:.2f} s | {ps_score:.4f} | {items} | - |",
            f"| {label} | DFS in place ({depth} layers) | {df_wire * 1e3:.1f} ms | {first_wire * 1e3:.0f} ms | "
            f"{df_eval:.2f} s | {df_score:.4f} | {items} | RSS {rss0:.0f} -> {rss1:.0f} -> {rss2:.0f} MiB; "
            f"references {referenced / 2**20:.1f} MiB, {extra / 2**20:.1f} MiB outside the merger's cache |"]
    if disk is not None:
        rows.append(f"| {label} | DFS on disk (merge_to_disk + load) | {disk[0] * 1e3:.0f} ms | - | "
                    f"{disk[1]:.2f} s | {disk[2]:.4f} | {items} | same score as in place: {disk[2] == df_score} |")
    return rows


def disk_trial(path: dict, resident, args) -> tuple[float, float, float]:
    """(write + load seconds, eval seconds, score) of the path merged to disk and loaded fresh."""
    from orchestrator.engine import merge_to_disk
    from orchestrator.evaluation import ResidentEvaluator

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = merge_to_disk(path, Path(tmp) / "path", seed=0).out_dir
        fresh = ResidentEvaluator(out, resident.main.spec, suite=resident.main.suite)
        ready = time.perf_counter() - start
        start = time.perf_counter()
        last = None
        for last in fresh.evaluate_rungs("search"):
            if args.rungs == "first":
                break
        return ready, time.perf_counter() - start, last.score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=["demo", "real", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rungs", choices=["all", "first"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--disk-real", action="store_true", help="also time the on-disk path on the real pair")
    args = parser.parse_args()
    rows = ["| models | trial | merge / wire (median) | first wire (bank built) | eval | search score | items | memory |",
            "|---|---|---|---|---|---|---|---|"]
    for label, models in model_sets(args.zoo).items():
        rows += run_set(label, models, args)
    print(f"threads {args.threads}, repeat {args.repeat}, rungs {args.rungs}, load {os.getloadavg()[0]:.1f}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
