"""Build, verify or install the demo zoo.

``build_zoo`` returns a valid zoo folder, doing the least work it can:

1. the folder already holds a zoo whose manifest matches (builder version, seed, profile,
   task data) and whose file hashes check out: nothing to do;
2. the committed ``demo_zoo/`` matches the request: copy it (seconds);
3. otherwise train: base first, then the full experts and the LoRA adapters side by side in
   single-thread processes, then score every model and adapter (merged into the base) on
   every task's test split (``zoo.json``) and write the manifest.

The zoo is built in a temporary folder beside the target and renamed into place at the end, so
an interrupted build never leaves a folder that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.zoo import ADAPTER_NAMES, MODEL_NAMES, TASKS_DIR
from orchestrator.zoo.corpus import make_tokenizer
from orchestrator.zoo.score import score_zoo_entry
from orchestrator.zoo.taskdata import data_digest, write_task_data
from orchestrator.zoo.world import build_world

BUILDER_VERSION = "2"  # 2: LoRA adapters lora_knowledge, lora_commonsense
COMMITTED_ZOO = Path(__file__).resolve().parents[2] / "demo_zoo"
MANIFEST = "manifest.json"
SCORES = "zoo.json"


def wanted(seed: int, profile: str) -> dict:
    """The manifest fields a zoo must have to satisfy a request."""
    return {"builder_version": BUILDER_VERSION, "seed": seed, "profile": profile,
            "task_data_sha256": data_digest(TASKS_DIR / "data")}


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def read_manifest(root: Path, name: str = MANIFEST) -> dict | None:
    """A built folder's manifest, or None when absent or unreadable."""
    try:
        return json.loads((root / name).read_text())
    except (OSError, ValueError):
        return None


def manifest_mismatch(manifest: dict | None, want: dict) -> str | None:
    """Why a manifest does not describe what ``want`` asks for (None: it does)."""
    if manifest is None:
        return "no manifest"
    for key, value in want.items():
        if manifest.get(key) != value:
            return f"{key} is {manifest.get(key)!r}, want {value!r}"
    return None


def check_zoo(root: Path, want: dict) -> str | None:
    """Why ``root`` is not a valid zoo for ``want``, or None when it is."""
    manifest = read_manifest(root)
    if (why := manifest_mismatch(manifest, want)) is not None:
        return why
    if any(not (root / name / "model.safetensors").is_file() for name in MODEL_NAMES):
        return "a model folder is missing"
    if any(not (root / name / f).is_file() for name in ADAPTER_NAMES
           for f in ("adapter_config.json", "adapter_model.safetensors")):
        return "an adapter folder is missing"
    if file_hashes(root) != manifest.get("files"):
        return "file hashes differ from the manifest"
    return None


def write_manifest(root: Path, want: dict) -> None:
    """Write the manifest: the request fields plus the hash of every file."""
    manifest = {**want, "files": file_hashes(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@contextmanager
def one_thread():
    """Run torch with one thread inside the block (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_and_score(tmp: Path, profile: str, seed: int, workers: int, log) -> dict:
    """Train every model and adapter into ``tmp`` and score it; returns the zoo.json content."""
    from orchestrator.zoo.train import train_zoo_model

    names = MODEL_NAMES + ADAPTER_NAMES
    experts = [n for n in names if n != "base"]
    if workers == 0:
        with one_thread():
            runs = [train_zoo_model(n, tmp, profile, seed) for n in names]
            scores = [score_zoo_entry(tmp, n) for n in names]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            runs = [pool.submit(train_zoo_model, "base", tmp, profile, seed).result()]
            log(f"  base trained in {runs[0]['seconds']} s; training {', '.join(experts)}")
            jobs = [pool.submit(train_zoo_model, n, tmp, profile, seed) for n in experts]
            base_scores = pool.submit(score_zoo_entry, tmp, "base")
            runs += [job.result() for job in jobs]
            log("  experts trained: " + ", ".join(f"{r['name']} {r['seconds']} s" for r in runs[1:]))
            scores = [base_scores.result(), *pool.map(score_zoo_entry, [tmp] * len(experts), experts)]
    return {"models": dict(zip(names, scores)), "split": "test", "seed": seed,
            "profile": profile, "training": {r["name"]: r for r in runs}}


def _worker_init() -> None:
    """Worker processes: one torch thread each, offline Hugging Face libraries."""
    import torch

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    torch.set_num_threads(1)


def _train_zoo(out: Path, want: dict, workers: int, log) -> None:
    """Train a fresh zoo and move it into ``out``."""
    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        make_tokenizer(build_world()).save_pretrained(tmp / "tokenizer")
        scores = _train_and_score(tmp, want["profile"], want["seed"], workers, log)
        shutil.rmtree(tmp / "tokenizer")
        scores["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / SCORES).write_text(json.dumps(scores, indent=1) + "\n")
        write_manifest(tmp, want)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"zoo built in {scores['build_seconds']} s: {out}")


def _replace(tmp: Path, out: Path, want: dict | None = None) -> None:
    """Move the finished ``tmp`` onto ``out``.

    With ``want``, a valid zoo that a concurrent process put at ``out`` meanwhile is kept.
    """
    if out.exists():
        if want is not None and check_zoo(out, want) is None:
            return
        shutil.rmtree(out)
    tmp.rename(out)


def _install_committed(out: Path, want: dict, log) -> None:
    """Copy the committed demo zoo into ``out`` and verify it."""
    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(COMMITTED_ZOO, tmp)
        problem = check_zoo(tmp, want)
        if problem:
            raise UserError(f"the copy of {COMMITTED_ZOO} is not a valid zoo: {problem}")
        _replace(tmp, out, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"installed the committed demo zoo in {time.perf_counter() - start:.1f} s: {out}")


COLUMNS = (("demo_mmlu", "acc"), ("demo_mmlu_nature", "acc"), ("demo_mmlu_society", "acc"),
           ("demo_hellaswag", "acc"), ("demo_hellaswag", "acc_norm"))


def score_table(models: dict) -> str:
    """A text table of ``{model: {task: {metric: value}}}`` with the mean of the two tasks.

    The mean is that of demo_mmlu acc and demo_hellaswag acc_norm (the search objective's
    default metrics).
    """
    head = ["model", *(f"{t.removeprefix('demo_')} {m}" for t, m in COLUMNS), "mean"]
    rows = [head]
    for name, scores in models.items():
        values = [scores.get(t, {}).get(m, float("nan")) for t, m in COLUMNS]
        mean = (scores["demo_mmlu"]["acc"] + scores["demo_hellaswag"]["acc_norm"]) / 2
        rows.append([name, *(f"{v:.3f}" for v in values), f"{mean:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _check_out(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is no zoo."""
    if out.exists() and not out.is_dir():
        raise UserError(f"zoo output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and read_manifest(out) is None:
        raise UserError(f"zoo output {out} is a non-empty folder without {MANIFEST}; choose another --out")


def build_zoo(out: str | Path = "runs/zoo", *, seed: int = 0, micro: bool = False,
              force: bool = False, workers: int | None = None, log=print) -> Path:
    """Return a valid zoo at ``out``: already there, installed from ``demo_zoo/``, or trained.

    Args:
        out: zoo folder (model folders ``base``, ``knowledge``, ``knowledge2``, ``commonsense``;
            LoRA adapter folders ``lora_knowledge``, ``lora_commonsense`` of ``base``).
        seed: training seed (the world and the task data never change with it).
        micro: tiny models and little training (seconds), for tests.
        force: train even when a valid zoo or a matching committed zoo exists.
        workers: training processes; default 2 for the demo zoo, 0 (in-process) for micro.
        log: where progress lines go.
    """
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"zoo seed must be a non-negative integer, got {seed!r}")
    out = Path(out).resolve()
    _check_out(out)
    written = write_task_data(TASKS_DIR / "data")
    if written:
        log(f"regenerated task data: {', '.join(written)}")
    want = wanted(seed, "micro" if micro else "demo")
    if not force and check_zoo(out, want) is None:
        log(f"zoo up to date: {out}")
    elif not force and out != COMMITTED_ZOO and check_zoo(COMMITTED_ZOO, want) is None:
        _install_committed(out, want, log)
    else:
        log(f"training the {'micro' if micro else 'demo'} zoo (seed {seed}) into {out}")
        _train_zoo(out, want, workers if workers is not None else (0 if micro else 2), log)
    log(f"test-split scores ({out / SCORES}):\n" + score_table(zoo_scores(out)))
    return out


def zoo_scores(root: str | Path) -> dict:
    """``{model: {task: {metric: value}}}`` of a built zoo (from its zoo.json), adapters included."""
    return json.loads((Path(root) / SCORES).read_text())["models"]
