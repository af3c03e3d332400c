"""LoRA benchmarks: adapter-sweep trial cost vs a full-model merge; PEFT's factor-wise gap.

``sweep`` (default): one random Llama of the given size stays resident; ``n`` random LoRA
adapters target some of its modules. Per trial, ``AdapterMerger.apply`` merges the cached
updates of the targeted parameters only; the full-model path merges every tensor of the same
model from ``n`` fine-tuned copies (``base + baked adapter``). The full path is the engine's
``InMemoryMerger`` (models written as safetensors to a temporary folder, tensors and task
vectors cached after the first merge), or with ``--full plain`` a stand-in with the same
method function applied to in-memory task vectors of every parameter. Both use the same
registry method, seed and weights; the script prints how far apart their weights end up.

``gap``: how far PEFT's factor-wise ``linear`` (A and B combined separately) is from the exact
weighted sum of the updates, on adapters trained with PEFT on a small Llama (default init,
B = 0) for different toy tasks, and on random-factor adapters. Needs PEFT (a test dependency).
The factor-wise result comes from ``peft_weighted_adapter``, which the tests check equal to
PEFT's ``add_weighted_adapter``.

Examples::

    python benchmarks/lora_bench.py sweep --hidden 768 --layers 12 --trials 5
    python benchmarks/lora_bench.py sweep --full plain --targets q_proj,k_proj,v_proj,o_proj
    python benchmarks/lora_bench.py gap
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.lora import Adapter, AdapterMerger, LoraModule, bake  # noqa: E402
from orchestrator.lora.save import make_config, with_config  # noqa: E402


# -- shared -------------------------------------------------------------------------------------
def make_llama(hidden: int, layers: int, intermediate: int, vocab: int, seed: int = 0):
    """A randomly initialised Llama (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def random_adapter(model, targets: list[str], rank: int, alpha: float, seed: int) -> Adapter:
    """An in-memory LoRA adapter with random factors on every module named in ``targets``."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            a = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            b = torch.randn(out_f, rank, generator=gen) * 0.01
            modules[f"{name}.weight"] = LoraModule(name, "linear", a, b, alpha / rank)
    template = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha}
    adapter = Adapter(f"random{seed}", modules, template)
    return with_config(adapter, make_config(template, modules))


def timed(fn, repeats: int) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn(i)``."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def trial_params(method: str, n: int, i: int, density: float) -> list[dict]:
    """Per-adapter parameters of trial ``i`` (weights vary per trial, as in a sweep)."""
    gen = torch.Generator().manual_seed(1000 + i)
    weights = (torch.rand(n, generator=gen) * 1.5 - 0.25).tolist()
    return [{"weight": w, **({"density": density} if method != "task_arithmetic" else {})}
            for w in weights]


# -- sweep --------------------------------------------------------------------------------------
def full_engine(model, adapters, args, tmp: Path):
    """The engine's InMemoryMerger over base + n baked fine-tunes; returns (setup s, trial times)."""
    from safetensors.torch import save_file

    from orchestrator.engine import InMemoryMerger

    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    folders = []
    for i, adapter in enumerate([None, *adapters]):
        state = dict(base)
        if adapter is not None:
            bake(state, adapter.deltas())
        folder = tmp / f"m{i}"
        folder.mkdir()
        model.config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"))
        folders.append(str(folder))

    def recipe(i: int) -> dict:
        params = trial_params(args.method, len(adapters), i, args.density)
        return {"merge_method": args.method, "base_model": folders[0], "dtype": "float32",
                "models": [{"model": f, "parameters": p} for f, p in zip(folders[1:], params)]}

    start = time.perf_counter()
    merger = InMemoryMerger(recipe(0), model)
    merger.merge_into(recipe(0), seed=args.seed)  # fills the cache
    setup = time.perf_counter() - start
    times = timed(lambda i: merger.merge_into(recipe(i), seed=args.seed), args.trials)
    cache = merger.cache_bytes()
    merger.close()
    return setup, times, cache


def full_plain(model, adapters, args):
    """Stand-in full merge: the registry method on every parameter's in-memory task vectors."""
    from orchestrator.merge.seeding import make_generator
    from orchestrator.merge import get_method

    spec = get_method(args.method)
    start = time.perf_counter()
    params = dict(model.named_parameters())
    base = {k: p.detach().clone() for k, p in params.items()}
    deltas = {k: [a.delta(k) if k in a.modules else torch.zeros_like(base[k]) for a in adapters]
              for k in params}
    setup = time.perf_counter() - start
    gparams = spec.make_params({})

    def trial(i: int) -> None:
        models = [spec.make_model_params(p) for p in trial_params(args.method, len(adapters), i, args.density)]
        with torch.no_grad():
            for k, p in params.items():
                gen = make_generator(args.seed, k, p.device) if spec.random else None
                p.copy_(spec.fn(deltas[k], base[k], models, gparams, gen) + base[k])

    times = timed(trial, args.trials)
    cache = sum(t.numel() * 4 for ts in deltas.values() for t in ts) + sum(
        t.numel() * 4 for t in base.values())
    return setup, times, cache


def run_sweep(args) -> dict:
    torch.set_num_threads(args.threads)
    targets = args.targets.split(",")
    start = time.perf_counter()
    model = make_llama(args.hidden, args.layers, args.intermediate, args.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M params (built in {time.perf_counter() - start:.1f} s); "
          f"{args.adapters} adapters, rank {args.rank}, targets {targets}; method {args.method}; "
          f"{args.trials} trials; {torch.get_num_threads()} threads")
    adapters = [random_adapter(model, targets, args.rank, 2.0 * args.rank, seed=i + 1)
                for i in range(args.adapters)]
    targeted = sum(m.a.new_empty(m.shape).numel() for m in adapters[0].modules.values())

    start = time.perf_counter()
    merger = AdapterMerger(model, adapters)
    setup = time.perf_counter() - start
    times = timed(lambda i: merger.apply(args.method, trial_params(args.method, len(adapters), i,
                                                                    args.density), seed=args.seed),
                  args.trials)
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cache = sum(d.numel() * 4 for n in merger.names for d in merger.deltas(n))
    rows = [("adapter sweep (AdapterMerger)", setup, times, cache, targeted)]
    merger.restore()

    if args.full != "none":
        with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
            if args.full == "engine":
                full = full_engine(model, adapters, args, Path(tmp))
            else:
                full = full_plain(model, adapters, args)
        rows.append((f"full-model merge ({args.full})", *full, n_params))
        diffs = [(model.state_dict()[k] - v).abs() for k, v in ours.items()]
        diff = max(d.max().item() for d in diffs)
        off = sum(int((d > 1e-5).sum()) for d in diffs)
        print(f"last trial, max |adapter path - full path| over all weights: {diff:.2e}; "
              f"weights differing by more than 1e-5: {off} of {sum(d.numel() for d in diffs)} "
              "(top-k and sign ties flipped by float32 rounding of base + update - base)")
    return report(rows)


def report(rows) -> dict:
    print(f"\n{'path':34} {'setup s':>8} {'trial ms (median)':>18} {'min':>8} "
          f"{'params written':>15} {'cache MB':>9}")
    out = {}
    for name, setup, times, cache, written in rows:
        med = statistics.median(times) * 1e3
        print(f"{name:34} {setup:8.2f} {med:18.1f} {min(times) * 1e3:8.1f} "
              f"{written / 1e6:13.1f} M {cache / 2**20:9.0f}")
        out[name] = {"setup_s": setup, "trial_ms_median": med, "params_written": written,
                     "cache_mb": cache / 2**20}
    if len(rows) == 2:
        ratio = statistics.median(rows[1][2]) / statistics.median(rows[0][2])
        print(f"\nper-trial speed-up of the adapter sweep: {ratio:.0f}x")
    return out


# -- gap ----------------------------------------------------------------------------------------
def toy_batch(perm: torch.Tensor, gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """Sequences following ``x[t+1] = perm[x[t]]`` from random starts."""
    x = torch.randint(3, len(perm), (batch, 1), generator=gen)
    seq = [x]
    for _ in range(length - 1):
        seq.append(perm[seq[-1]])
    return torch.cat(seq, dim=1)


def lm_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def train_adapter(base, perm, out: Path, args, seed: int) -> Path:
    """Train a PEFT LoRA adapter (default init, B = 0) on one toy task; save it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        ids = toy_batch(perm, gen, 32, 16)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def gap_numbers(adapters, weights) -> dict:
    """Relative Frobenius distance of PEFT's factor-wise linear from the exact weighted sum."""
    from orchestrator.lora import peft_weighted_adapter, weighted_sum_deltas

    exact = weighted_sum_deltas(adapters, weights)
    peft = peft_weighted_adapter(adapters, weights, "linear").deltas()
    shared = [p for p in exact if all(p in a.modules for a in adapters)]
    num = sum(torch.linalg.matrix_norm(peft[p] - exact[p]).square() for p in shared)
    den = sum(torch.linalg.matrix_norm(exact[p]).square() for p in shared)
    per_module = [(torch.linalg.matrix_norm(peft[p] - exact[p]) / torch.linalg.matrix_norm(exact[p])).item()
                  for p in shared]
    return {"rel_frobenius": (num / den).sqrt().item(), "per_module_median": statistics.median(per_module),
            "per_module_max": max(per_module), "exact": exact, "peft": peft}


def run_gap(args) -> dict:
    from orchestrator.lora import load_adapter

    torch.set_num_threads(args.threads)
    base = make_llama(64, 2, 128, 40, seed=0)
    gen = torch.Generator().manual_seed(0)
    perms = [torch.cat([torch.arange(3), 3 + torch.randperm(37, generator=gen)]) for _ in range(2)]
    evals = [toy_batch(p, torch.Generator().manual_seed(99), 64, 16) for p in perms]
    results = {}
    with tempfile.TemporaryDirectory(prefix="lora-gap-") as tmp:
        trained = [load_adapter(train_adapter(base, p, Path(tmp) / f"t{i}", args, seed=i + 1))
                   for i, p in enumerate(perms)]
    rand = [random_adapter(base, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj"], args.rank, 2.0 * args.rank, seed=i + 1) for i in range(2)]
    print(f"{'adapters':10} {'weights':>12} {'rel. Frobenius':>15} {'module median':>14} {'module max':>11}")
    for label, adapters in (("trained", trained), ("random", rand)):
        for weights in ([0.5, 0.5], [1.0, 1.0], [0.7, -0.4]):
            g = gap_numbers(adapters, weights)
            print(f"{label:10} {str(weights):>12} {g['rel_frobenius']:15.3f} "
                  f"{g['per_module_median']:14.3f} {g['per_module_max']:11.3f}")
            results[f"{label} {weights}"] = {k: v for k, v in g.items() if k not in ("exact", "peft")}
            if label == "trained" and weights == [1.0, 1.0]:
                kept = g
    results["task_loss"] = task_losses(base, trained, kept, evals)
    return results


def task_losses(base, adapters, gap, evals) -> dict:
    """Toy-task losses of the base, each adapter, and the two merges of weights (1, 1)."""
    import copy

    rows = {"base": {}, **{f"adapter {i + 1}": {} for i in range(len(adapters))},
            "exact sum": {}, "PEFT linear": {}}
    models = {"base": base}
    for i, adapter in enumerate(adapters):
        models[f"adapter {i + 1}"] = copy.deepcopy(base)
        bake(models[f"adapter {i + 1}"], adapter.deltas())
    for label, key in (("exact sum", "exact"), ("PEFT linear", "peft")):
        models[label] = copy.deepcopy(base)
        bake(models[label], gap[key])
    print("\ntoy-task loss (weights 1, 1)   " + "  ".join(f"task {i + 1}" for i in range(len(evals))))
    for label, model in models.items():
        rows[label] = [lm_loss(model, ids) for ids in evals]
        print(f"{label:30} " + "  ".join(f"{v:6.3f}" for v in rows[label]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("sweep", "gap"), default="sweep")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", choices=("engine", "plain", "none"), default="engine")
    parser.add_argument("--steps", type=int, default=300, help="gap: training steps per adapter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    out = run_sweep(args) if args.mode == "sweep" else run_gap(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
