"""Benchmark the streaming merge against the I/O floor and against mergekit, like for like.

Generates a float32 Llama-shaped base and three fine-tunes of a given size, then for each of
linear, task_arithmetic, ties, dare_ties and slerp runs, side by side, each in a fresh process
and through its command-line entry point:

* ours: ``python -m orchestrator merge RECIPE OUT --seed 0 --shard-size 5GB``;
* mergekit: ``mergekit-yaml RECIPE OUT --random-seed 0 --device cpu -j T --out-shard-size 1250M
  --no-copy-tokenizer --quiet`` (1250M parameters = 5 GB of float32: one output file for both).

Each child imports its tool first and times that separately, then calls the same function the
console script calls (``orchestrator.cli.main`` / mergekit's click command), so one run gives
both the whole-process wall time (measured by the parent, interpreter start-up included) and
the merge time with imports excluded. Both run with ``OMP_NUM_THREADS=MKL_NUM_THREADS=T``
(``--threads``, default 1) and mergekit also with ``-j T``. For each run the table shows the
peak RssAnon of the process (sampled every 10 ms from ``/proc/<pid>/status``; RssAnon leaves out
the page cache of memory-mapped inputs, so it is the memory the process allocates), and our
merge time over an I/O floor measured twice in the same run (the lower is used):

* read: every tensor of every input copied from the page cache into one reused buffer;
* write: the output's bytes written as one safetensors file, the faster of ``save_file`` (as
  the issue words it; it copies every tensor to ``bytes`` first) and a plain ``write`` of each
  tensor's memory after the header.

With mergekit installed the outputs of deterministic methods are compared, tensor by tensor:
``|ours - mergekit| / |mergekit - base|`` over the whole model (L2; linear: over ``|mergekit|``).

    .venv/bin/python benchmarks/merge_bench.py                       # 300M, all methods
    .venv/bin/python benchmarks/merge_bench.py --params 50M --methods linear,ties --no-mergekit
    .venv/bin/python benchmarks/merge_bench.py --dir /tmp/mb --keep  # keep (and reuse) models
    .venv/bin/python benchmarks/merge_bench.py --repeat 3 --mergekit-methods linear,slerp
    .venv/bin/python benchmarks/merge_bench.py --bf16-sparse --methods task_arithmetic,ties,breadcrumbs

``--bf16-sparse`` generates bfloat16 models instead, whose fine-tunes change about 30% of the
entries by one or a few bf16 steps: about 70% of every task vector is exactly zero and the
rest takes a few hundred distinct magnitudes, as in real bf16 fine-tunes
(``orchestrator/zoo/real_pair.py``). The recipes then say ``dtype: bfloat16``. Magnitude
selection (ties, breadcrumbs) meets its worst case there: ties at every threshold.

The machine this was written on is shared: with other jobs running, one run's times swing by 2x,
so compare side-by-side ratios, and use ``--repeat`` (minimum of interleaved runs).
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
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.engine.weights import parse_size  # noqa: E402
from orchestrator.engine.writing import save_state_dict  # noqa: E402

VOCAB = 32000
LAYERS = 12
METHODS = "linear,task_arithmetic,ties,dare_ties,slerp"
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


# -- models ---------------------------------------------------------------------------------------
def shape_for(params: int) -> tuple[int, int]:
    """Hidden size (a multiple of 64) and layers giving about ``params`` parameters.

    Per layer: attention 4h^2 + MLP 3*h*(4h) = 16h^2; plus embeddings and lm_head 2*V*h.
    """
    layers = LAYERS
    a, b = 16 * layers, 2 * VOCAB
    hidden = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    return max(64, int(round(hidden / 64)) * 64), layers


def make_model(folder: Path, hidden: int, layers: int, seed: int, base: Path | None,
               bf16_sparse: bool = False) -> None:
    """Write a Llama-shaped model (config + safetensors): float32, or with ``bf16_sparse``
    bfloat16 with mostly-zero task vectors (module docstring)."""
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": 4 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": hidden // 64, "vocab_size": VOCAB,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "dtype": "bfloat16" if bf16_sparse else "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes(hidden, layers)
    if base is None:
        state = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
    elif bf16_sparse:
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            state = {n: f.get_tensor(n).float() + _sparse_step(s, gen) for n, s in shapes.items()}
    else:
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            state = {n: f.get_tensor(n) + torch.randn(s, generator=gen) * 0.002
                     for n, s in shapes.items()}
    if bf16_sparse:
        state = {n: t.bfloat16() for n, t in state.items()}
    save_state_dict(state, folder, max_shard_bytes=10**12)


def _sparse_step(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A fine-tune's update: 0 on 60% of the entries, else N(0, 4e-4), which rounds to 0 in
    bf16 again for about a quarter of them (weights ~N(0, 0.02))."""
    step = torch.randn(shape, generator=gen) * 4e-4
    return step.mul_(torch.rand(shape, generator=gen) >= 0.6)


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


def recipes(root: Path, dtype: str | None = None) -> dict[str, dict]:
    """The benchmarked recipes over base + ft_0..ft_2 under ``root`` (with ``dtype`` if given)."""
    ft = [str(root / f"ft_{i}") for i in range(3)]
    base = str(root / "base")

    def models(**kw) -> list[dict]:
        return [{"model": m, "parameters": {"weight": w, **kw}}
                for m, w in zip(ft, (0.5, 0.3, 0.2), strict=True)]

    def gta(method: str, **kw) -> dict:
        return {"models": models(**kw), "base_model": base, "merge_method": method}

    out = {
        "linear": {"models": models(), "merge_method": "linear"},
        "task_arithmetic": gta("task_arithmetic"),
        "ties": gta("ties", density=0.5),
        "dare_ties": gta("dare_ties", density=0.5),
        "breadcrumbs": gta("breadcrumbs", density=0.5),
        "slerp": {"models": [{"model": base}, {"model": ft[0]}], "base_model": base,
                  "merge_method": "slerp", "parameters": {"t": 0.4}},
    }
    return {k: {**v, "dtype": dtype} if dtype else v for k, v in out.items()}


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
    """Run ``cmd``: wall seconds, peak RssAnon (sampled every 10 ms), and its last stdout line
    parsed as JSON when it is JSON."""
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
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    return {"seconds": seconds, "peak_anon": peak[0], "report": report}


# Both children import their tool up front (timed), then call what the console script calls.
CHILD_OURS = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import orchestrator.cli, orchestrator.commands.merge, orchestrator.engine
t1 = time.perf_counter()
rc = orchestrator.cli.main({argv!r})
t2 = time.perf_counter()
print(json.dumps({{"rc": rc, "imports": t1 - t0, "merge": t2 - t1}}))
"""

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

CHILD_IMPORTS = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import orchestrator.cli, orchestrator.commands.merge, orchestrator.engine
print(json.dumps({{"imports": time.perf_counter() - t0}}))
"""

CHILD_FLOOR = """
import json, struct, time
import torch
torch.set_num_threads({threads})
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
folders = json.loads({folders!r})
reads, buf = {{}}, None
for folder in folders:
    start = time.perf_counter()
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            x = f.get_tensor(name)  # a view of the mapped file: copy its bytes into our memory
            if buf is None or buf.numel() < x.numel():
                buf = torch.empty(x.numel(), dtype=x.dtype)
            buf[: x.numel()].copy_(x.view(-1))
    reads[folder] = time.perf_counter() - start
with safe_open(str(Path(folders[0]) / "model.safetensors"), "pt") as f:
    tensors = {{n: f.get_tensor(n) for n in f.keys()}}
    start = time.perf_counter()
    save_file(tensors, {out!r}, metadata={{"format": "pt"}})
    save = time.perf_counter() - start
    Path({out!r}).unlink()
    start = time.perf_counter()
    header, offset = {{"__metadata__": {{"format": "pt"}}}}, 0
    for n, t in tensors.items():
        header[n] = {{"dtype": "BF16" if t.dtype == torch.bfloat16 else "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open({out!r}, "wb") as fd:
        fd.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            fd.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
    plain = time.perf_counter() - start
    Path({out!r}).unlink()
print(json.dumps({{"reads": reads, "save_file": save, "plain_write": plain}}))
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


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def agreement(ours: Path, theirs: Path, base: Path | None) -> float:
    """``||ours - theirs|| / ||theirs - base||`` over all tensors (``base`` None: ``||theirs||``)."""
    from safetensors import safe_open

    num = den = 0.0
    with safe_open(str(ours / "model.safetensors"), "pt") as a, \
            safe_open(str(_single(theirs)), "pt") as b:
        c = safe_open(str(base / "model.safetensors"), "pt") if base else None
        for name in b.keys():
            y = b.get_tensor(name).float()
            num += float((a.get_tensor(name).float() - y).square().sum())
            ref = y - c.get_tensor(name).float() if c is not None else y
            den += float(ref.square().sum())
    return math.sqrt(num / max(den, 1e-30))


def _single(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one output file in {folder}, found {len(files)}")
    return files[0]


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="300M", help="parameters per model (e.g. 50M, 300M)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--mergekit-methods", default=None,
                        help="methods to run mergekit on (default: all of --methods)")
    parser.add_argument("--dir", default=None,
                        help="where to generate models (default: a temp dir); models already "
                             "there (same shape) are reused")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit-yaml")
    parser.add_argument("--no-check", action="store_true", help="skip comparing outputs")
    # One thread by default: on a shared, oversubscribed machine OpenMP threads spin-wait on
    # descheduled peers and elementwise ops get much slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both tools)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tool and method, interleaved; the table shows the fastest")
    parser.add_argument("--bf16-sparse", action="store_true",
                        help="bfloat16 models with mostly-zero, heavily tied task vectors")
    args = parser.parse_args(argv)

    params = parse_size(args.params.upper().rstrip("B").replace("M", "MB").replace("G", "GB"))
    hidden, layers = shape_for(params)
    root = Path(args.dir or tempfile.mkdtemp(prefix="merge-bench-"))
    mergekit = Path(sys.executable).parent / "mergekit-yaml"
    use_mergekit = mergekit.exists() and not args.no_mergekit
    try:
        return _bench(args, root, hidden, layers, use_mergekit)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _models(root: Path, hidden: int, layers: int, bf16_sparse: bool) -> None:
    config = root / "base" / "config.json"
    dtype = "bfloat16" if bf16_sparse else "float32"
    if config.exists() and all(
            json.loads((root / m / "config.json").read_text()).get("dtype") == dtype
            for m in ("base", "ft_0", "ft_1", "ft_2") if (root / m / "config.json").exists()) \
            and json.loads(config.read_text())["hidden_size"] == hidden and all(
            (root / f"ft_{i}" / "model.safetensors").exists() for i in range(3)):
        print("reusing the models there")
        return
    t0 = time.perf_counter()
    make_model(root / "base", hidden, layers, 0, None, bf16_sparse)
    for i in range(3):
        make_model(root / f"ft_{i}", hidden, layers, i + 1, root / "base", bf16_sparse)
    print(f"generated base + 3 fine-tunes in {time.perf_counter() - t0:.0f}s")


def _floor(root: Path, folders: list[Path], threads: int) -> dict:
    return run_measured(python_cmd(CHILD_FLOOR.format(
        folders=json.dumps([str(f) for f in folders]), out=str(root / "floor.safetensors"),
        threads=threads)))["report"]


def _bench(args, root: Path, hidden: int, layers: int, use_mergekit: bool) -> int:
    numel = sum(math.prod(s) for s in _shapes(hidden, layers).values())
    largest = max(math.prod(s) for s in _shapes(hidden, layers).values()) * 4
    print(f"# merge_bench {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}"
          f"; threads {args.threads}")
    print(f"models: hidden {hidden}, {layers} layers, {numel / 1e6:.0f}M params, "
          + (f"{mib(numel * 2)} bfloat16 each, ~70% of the task vectors exactly zero"
             if args.bf16_sparse else f"{mib(numel * 4)} float32 each")
          + f" (largest tensor {mib(largest)}); dir {root}")
    _models(root, hidden, layers, args.bf16_sparse)
    folders = [root / "base", *(root / f"ft_{i}" for i in range(3))]
    warm_cache(folders)
    floors = [_floor(root, folders, args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    idle = run_measured(python_cmd(CHILD_IMPORTS.format(repo=str(REPO))), env)
    print(f"our imports alone: {idle['seconds']:.1f}s wall, RssAnon {mib(idle['peak_anon'])}")
    mk_methods = set((args.mergekit_methods or args.methods).split(",")) if use_mergekit else set()
    rows = []
    for method in args.methods.split(","):
        recipe = recipes(root, "bfloat16" if args.bf16_sparse else None)[method]
        rows.append(_bench_method(method, recipe, root, env, args, method in mk_methods))
    floors.append(_floor(root, folders, args.threads))
    floor = {"reads": {k: min(f["reads"][k] for f in floors) for k in floors[0]["reads"]},
             "write": min(min(f["save_file"], f["plain_write"]) for f in floors)}
    for i, f in enumerate(floors):
        print(f"I/O floor run {i + 1}: read " + ", ".join(
            f"{Path(k).name} {v:.2f}s" for k, v in f["reads"].items())
            + f"; write: save_file {f['save_file']:.2f}s, plain {f['plain_write']:.2f}s")
    _table(rows, floor)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


def _bench_method(method: str, recipe: dict, root: Path, env: dict, args, with_mergekit: bool) -> dict:
    """One method: our CLI and mergekit's, each in a fresh process, ``--repeat`` times
    interleaved (times: the minimum; memory: the maximum); outputs compared once."""
    used = [m["model"] for m in recipe["models"]] + [recipe.get("base_model")]
    used = sorted({m for m in used if m})
    (root / "recipe.yml").write_text(json.dumps(recipe))  # JSON is YAML
    ours_out, mk_out = root / f"out_{method}", root / f"mk_{method}"
    argv = ["merge", str(root / "recipe.yml"), str(ours_out), "--seed", "0", "--shard-size", "5GB",
            "--quiet"]
    mk_argv = [str(root / "recipe.yml"), str(mk_out), "--random-seed", "0", "--device", "cpu",
               "-j", str(args.threads), "--out-shard-size", "1250M", "--no-copy-tokenizer",
               "--quiet"]
    runs: dict[str, list[dict]] = {"ours": [], "mk": []}
    row = {"method": method, "used": used, "agree": None}
    for i in range(args.repeat):
        for side in ("ours", "mk") if with_mergekit else ("ours",):
            out = ours_out if side == "ours" else mk_out
            shutil.rmtree(out, ignore_errors=True)
            warm_cache([Path(m) for m in used])
            code = (CHILD_OURS.format(repo=str(REPO), argv=argv) if side == "ours"
                    else CHILD_MERGEKIT.format(argv=mk_argv))
            runs[side].append(run_measured(python_cmd(code), env))
        if i == 0 and with_mergekit and not args.no_check and method not in RANDOM:
            base = recipe.get("base_model") if method != "linear" else None
            row["agree"] = agreement(ours_out, mk_out, Path(base) if base else None)
    shutil.rmtree(ours_out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    row["ours"], row["mk"] = _best(runs["ours"]), _best(runs["mk"]) if runs["mk"] else None
    for side in ("ours", "mk"):
        for r in runs[side]:
            print(f"{method} {'ours' if side == 'ours' else 'mergekit'}: {r['seconds']:.1f}s wall, "
                  f"{r['report']['merge']:.2f}s merge, {mib(r['peak_anon'])}", flush=True)
    return row


def _best(runs: list[dict]) -> dict:
    """Fastest wall and merge times, largest peak memory, over repeated runs."""
    return {"seconds": min(r["seconds"] for r in runs),
            "peak_anon": max(r["peak_anon"] for r in runs),
            "report": {"merge": min(r["report"]["merge"] for r in runs)}}


def _table(rows: list[dict], floor: dict) -> None:
    print("\n| method | ours merge s | I/O floor s | merge / floor | ours wall s | ours peak RssAnon "
          "| mergekit merge s | mergekit wall s | mergekit peak RssAnon | speed-up merge | "
          "speed-up wall | vs mergekit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ours, mk = row["ours"], row["mk"]
        merge = ours["report"]["merge"]
        floor_s = sum(floor["reads"][m] for m in row["used"]) + floor["write"]
        cells = [row["method"], f"{merge:.2f}", f"{floor_s:.2f}", f"{merge / floor_s:.2f}",
                 f"{ours['seconds']:.1f}", mib(ours["peak_anon"])]
        if mk:
            mk_merge = mk["report"]["merge"]
            cells += [f"{mk_merge:.2f}", f"{mk['seconds']:.1f}", mib(mk["peak_anon"]),
                      f"{mk_merge / merge:.1f}x", f"{mk['seconds'] / ours['seconds']:.1f}x",
                      "random" if row["agree"] is None else f"{row['agree']:.1e}"]
        else:
            cells += ["-"] * 6
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
