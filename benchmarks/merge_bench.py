"""Benchmark the streaming merge: seconds, peak anonymous memory and the I/O floor.

Generates a float32 Llama-shaped base and fine-tunes of a given size, then merges them with
linear, task_arithmetic, ties, dare_ties and slerp through ``merge_to_disk`` (each in a fresh
subprocess), and with ``mergekit-yaml`` on the same recipe when it is installed. For each run
it prints the wall time, the peak RssAnon of the process (sampled every 10 ms from
``/proc/<pid>/status``; RssAnon leaves out the memory-mapped page cache, so it is the memory
the merge itself allocates) and the ratio of the time to an I/O floor measured in the same
run: reading the inputs' bytes from the page cache and writing the output with safetensors.

    .venv/bin/python benchmarks/merge_bench.py --params 100M
    .venv/bin/python benchmarks/merge_bench.py --params 50M --methods linear,ties --no-mergekit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.weights import parse_size, save_state_dict  # noqa: E402

VOCAB = 32000
LAYERS = 12


# -- models ---------------------------------------------------------------------------------------
def shape_for(params: int) -> tuple[int, int]:
    """Hidden size (a multiple of 64) and layers giving about ``params`` parameters.

    Per layer: attention 4h^2 + MLP 3*h*(4h) = 16h^2; plus embeddings and lm_head 2*V*h.
    """
    layers = LAYERS
    a, b = 16 * layers, 2 * VOCAB
    hidden = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return max(64, int(round(hidden / 64)) * 64), layers


def make_model(folder: Path, hidden: int, layers: int, seed: int, base: Path | None) -> None:
    """Write a Llama-shaped float32 model (config + safetensors), one tensor at a time."""
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": 4 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": hidden // 64, "vocab_size": VOCAB,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes(hidden, layers)
    if base is None:
        state = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
    else:
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            state = {n: f.get_tensor(n) + torch.randn(s, generator=gen) * 0.002
                     for n, s in shapes.items()}
    save_state_dict(state, folder, max_shard_bytes=10**12)


def _shapes(h: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{k}_proj.weight": (h, h) for k in "qkvo"},
                       p + "mlp.gate_proj.weight": (4 * h, h), p + "mlp.up_proj.weight": (4 * h, h),
                       p + "mlp.down_proj.weight": (h, 4 * h)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)})
    return shapes


def recipes(root: Path) -> dict[str, dict]:
    """The benchmarked recipes over base + ft_0..ft_2 under ``root``."""
    ft = [str(root / f"ft_{i}") for i in range(3)]
    base = str(root / "base")

    def models(**kw) -> list[dict]:
        return [{"model": m, "parameters": {"weight": w, **kw}}
                for m, w in zip(ft, (0.5, 0.3, 0.2), strict=True)]

    def gta(method: str, **kw) -> dict:
        return {"models": models(**kw), "base_model": base, "merge_method": method}

    return {
        "linear": {"models": models(), "merge_method": "linear"},
        "task_arithmetic": gta("task_arithmetic"),
        "ties": gta("ties", density=0.5),
        "dare_ties": gta("dare_ties", density=0.5),
        "slerp": {"models": [{"model": base}, {"model": ft[0]}], "base_model": base,
                  "merge_method": "slerp", "parameters": {"t": 0.4}},
    }


# -- measuring ------------------------------------------------------------------------------------
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
    """Run ``cmd``; wall seconds and peak RssAnon (sampled every 10 ms), plus its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_anon(proc.pid))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{err[-2000:]}")
    return {"seconds": seconds, "peak_anon": peak[0], "stdout": out}


CHILD_MERGE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from orchestrator.engine import merge_to_disk
from orchestrator.weights import ModelWeights
import torch
torch.set_num_threads({threads})
start = time.perf_counter()
res = merge_to_disk(json.loads({recipe!r}), {out!r}, seed=0)
print(json.dumps({{"inner_seconds": time.perf_counter() - start, "tensors": res.tensors}}))
"""

CHILD_BASELINE = """
import sys
sys.path.insert(0, {repo!r})
import orchestrator.engine, torch, time
"""

CHILD_MK_IMPORT = """
import mergekit.scripts.run_yaml
"""

CHILD_FLOOR = """
import json, sys, time
import torch
torch.set_num_threads({threads})
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
folders = json.loads({folders!r})
reads = {{}}
for folder in folders:
    start = time.perf_counter()
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            f.get_tensor(name).clone()  # get_tensor may map without copying: touch every byte
    reads[folder] = time.perf_counter() - start
with safe_open(str(Path(folders[0]) / "model.safetensors"), "pt") as f:
    names = list(f.keys())
    start = time.perf_counter()
    # Written one shard-sized dict at a time would be the same bytes; one file is the floor.
    save_file({{n: f.get_tensor(n) for n in names}}, {out!r}, metadata={{"format": "pt"}})
    write = time.perf_counter() - start
print(json.dumps({{"reads": reads, "write": write}}))
"""


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def warm_cache(folders: list[Path]) -> None:
    """Read every file once so every run sees the same (warm) page cache."""
    for folder in folders:
        for file in folder.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="300M", help="parameters per model (e.g. 50M, 300M)")
    parser.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,slerp")
    parser.add_argument("--dir", default=None, help="where to generate models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit-yaml")
    # One thread by default: on a shared, oversubscribed machine OpenMP threads spin-wait on
    # descheduled peers and elementwise ops get ~100x slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both tools)")
    args = parser.parse_args(argv)

    params = parse_size(args.params.upper().rstrip("B").replace("M", "MB").replace("G", "GB"))
    hidden, layers = shape_for(params)
    root = Path(args.dir or tempfile.mkdtemp(prefix="merge-bench-"))
    mergekit = Path(sys.executable).parent / "mergekit-yaml"
    use_mergekit = mergekit.exists() and not args.no_mergekit
    try:
        return _bench(args, root, hidden, layers, mergekit if use_mergekit else None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _bench(args, root: Path, hidden: int, layers: int, mergekit: Path | None) -> int:
    numel = sum(math.prod(s) for s in _shapes(hidden, layers).values())
    print(f"models: hidden {hidden}, {layers} layers, {numel / 1e6:.0f}M params "
          f"({numel * 4 / 2**20:.0f} MiB float32 each); dir {root}; torch threads {args.threads}")
    t0 = time.perf_counter()
    make_model(root / "base", hidden, layers, 0, None)
    for i in range(3):
        make_model(root / f"ft_{i}", hidden, layers, i + 1, root / "base")
    print(f"generated base + 3 fine-tunes in {time.perf_counter() - t0:.0f}s")
    folders = [root / "base", *(root / f"ft_{i}" for i in range(3))]
    warm_cache(folders)
    floor = json.loads(run_measured(python_cmd(CHILD_FLOOR.format(
        folders=json.dumps([str(f) for f in folders]), out=str(root / "floor.safetensors"),
        threads=args.threads)))["stdout"])
    (root / "floor.safetensors").unlink(missing_ok=True)
    base_run = run_measured(python_cmd(CHILD_BASELINE.format(repo=str(REPO))))
    baseline = base_run["peak_anon"]
    mk_start = run_measured(python_cmd(CHILD_MK_IMPORT))["seconds"] if mergekit else float("nan")
    print(f"I/O floor: read {', '.join(f'{Path(k).name} {v:.2f}s' for k, v in floor['reads'].items())}"
          f"; write {floor['write']:.2f}s")
    print(f"start-up: ours {base_run['seconds']:.1f}s (RssAnon {fmt_bytes(baseline).strip()}), "
          f"mergekit {mk_start:.1f}s (imports only; 'wall' columns include them)")
    largest = max(math.prod(s) for s in _shapes(hidden, layers).values()) * 4
    print(f"largest tensor {fmt_bytes(largest)}; model {fmt_bytes(numel * 4)}\n")
    header = (f"{'method':16} {'merge s':>7} {'floor s':>7} {'ratio':>5} {'wall s':>6} "
              f"{'peak anon':>10} {'- import':>10} {'mk wall s':>9} {'mk peak anon':>12}")
    print(header)
    print("-" * len(header))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for method in args.methods.split(","):
        _bench_method(method, recipes(root)[method], root, floor, (baseline, mk_start), mergekit,
                      env, args)
    return 0


def _bench_method(method, recipe, root, floor, start, mergekit, env, args) -> None:
    """One method: our merge (subprocess) and mergekit-yaml's, one table row."""
    baseline, mk_start = start
    used = {recipe.get("base_model")} | {m["model"] for m in recipe["models"]}
    used.discard(None)
    floor_s = sum(floor["reads"][m] for m in used) + floor["write"]
    out = root / f"out_{method}"
    warm_cache([Path(m) for m in used])
    ours = run_measured(python_cmd(CHILD_MERGE.format(
        repo=str(REPO), recipe=json.dumps(recipe), out=str(out), threads=args.threads)), env)
    shutil.rmtree(out, ignore_errors=True)
    mk = {"seconds": float("nan"), "peak_anon": 0}
    if mergekit is not None:
        (root / "recipe.yml").write_text(json.dumps(recipe))  # JSON is YAML
        mk = run_measured([str(mergekit), str(root / "recipe.yml"), str(out), "--quiet",
                           "--device", "cpu", "-j", str(args.threads), "--no-copy-tokenizer",
                           "--random-seed", "0"], env)
        shutil.rmtree(out, ignore_errors=True)
    seconds = json.loads(ours["stdout"].strip().splitlines()[-1])["inner_seconds"]
    print(f"{method:16} {seconds:7.2f} {floor_s:7.2f} {seconds / floor_s:5.2f} "
          f"{ours['seconds']:6.1f} {fmt_bytes(ours['peak_anon']):>10} "
          f"{fmt_bytes(ours['peak_anon'] - baseline):>10} {mk['seconds']:9.1f} "
          f"{fmt_bytes(mk['peak_anon']) if mk['peak_anon'] else '-':>12}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
