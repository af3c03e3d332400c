"""Training of the zoo's models: a small Llama pretrained on the world, experts fine-tuned from it,
and LoRA adapters (PEFT) trained on it with the experts' data.

Every model trains in one thread (``torch.set_num_threads(1)``): on a 2-core machine two
single-thread processes side by side are far faster than one process with two threads
(measured: 0.07 s against 0.2 s per base step).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.zoo import ADAPTER_NAMES, MODEL_NAMES
from orchestrator.zoo.corpus import mixture
from orchestrator.zoo.world import build_world

ALL_NAMES = MODEL_NAMES + ADAPTER_NAMES
"""Every trained folder of a zoo; a name's index here offsets its training seed."""
ADAPTER_DATA = {"lora_knowledge": "knowledge", "lora_commonsense": "commonsense"}
"""Adapter -> the full expert whose training mixture it is trained on."""
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_BASE_PATH = "../base"
"""``base_model_name_or_path`` of a saved adapter: the zoo's base, relative to the adapter folder."""


@dataclass(frozen=True)
class Profile:
    """Model size and training schedule of one kind of zoo.

    Attributes:
        hidden: hidden size; layers: decoder layers; heads: attention heads.
        steps: model name -> optimizer steps; lr: model name -> peak learning rate (adapters
            included: LoRA factors need a learning rate several times the full experts').
        batch: sequences per step; warmup: linear warm-up steps (capped at a tenth of the run).
        pack: tokens per packed sequence when pretraining the base.
    """

    hidden: int
    layers: int
    heads: int
    steps: dict
    lr: dict
    batch: int = 32
    warmup: int = 50
    pack: int = 48


PROFILES = {
    "demo": Profile(hidden=96, layers=3, heads=4,
                    steps={"base": 1500, "knowledge": 400, "knowledge2": 400, "commonsense": 200,
                           "lora_knowledge": 400, "lora_commonsense": 200},
                    lr={"base": 3e-3, "knowledge": 5e-4, "knowledge2": 5e-4, "commonsense": 5e-4,
                        "lora_knowledge": 3e-3, "lora_commonsense": 3e-3}),
    "micro": Profile(hidden=32, layers=2, heads=2,
                     steps={"base": 400, "knowledge": 80, "knowledge2": 80, "commonsense": 80,
                            "lora_knowledge": 80, "lora_commonsense": 80},
                     lr={"base": 1e-2, "knowledge": 3e-3, "knowledge2": 3e-3, "commonsense": 3e-3,
                         "lora_knowledge": 1e-2, "lora_commonsense": 1e-2},
                     batch=16, warmup=10),
}


def llama_config(profile: Profile, vocab_size: int):
    """The Llama config of every model of a zoo (tied embeddings, no BOS)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=profile.hidden,
                       intermediate_size=4 * profile.hidden, num_hidden_layers=profile.layers,
                       num_attention_heads=profile.heads, num_key_value_heads=profile.heads,
                       max_position_embeddings=128, tie_word_embeddings=True,
                       pad_token_id=0, eos_token_id=2, bos_token_id=2)


def encode(tokenizer, examples) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 where no loss is taken) of (prompt, target) examples."""
    out = []
    for prompt, target in examples:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        out.append((p_ids + t_ids, [-100] * len(p_ids) + t_ids))
    return out


def _packed(pools, weights, rng: random.Random, length: int) -> tuple[list[int], list[int]]:
    """One sequence of examples drawn from the pools, EOS-separated, up to ``length`` tokens.

    With ``length`` 0 the sequence is a single example. Packing avoids the padding that short
    statements next to long scripts would otherwise cost.
    """
    ids: list[int] = []
    labels: list[int] = []
    while True:
        ex_ids, ex_labels = rng.choice(rng.choices(pools, weights)[0][1])
        if ids and len(ids) + 1 + len(ex_ids) > length:
            return ids, labels
        sep = [2] if ids else []  # EOS between examples, no loss on it
        ids += sep + ex_ids
        labels += [-100] * len(sep) + ex_labels
        if not length:
            return ids, labels


def sample_batch(pools, rng: random.Random, size: int, pack: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch drawn from weighted pools of encoded examples (packed to ``pack`` tokens)."""
    weights = [w for w, _ in pools]
    rows = [_packed(pools, weights, rng, pack) for _ in range(size)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(size, width, dtype=torch.long)           # [B, T], pad id 0
    labels = torch.full((size, width), -100, dtype=torch.long)  # [B, T]
    mask = torch.zeros(size, width, dtype=torch.long)          # [B, T]
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
        mask[i, :len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, min(warmup, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, pools, *, steps: int, lr: float, batch: int, warmup: int, seed: int,
          pack: int = 0) -> float:
    """AdamW training in place; returns the mean loss of the last 50 steps.

    Only parameters that require a gradient are optimised and clipped (a LoRA model's base
    weights are frozen).
    """
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(**sample_batch(pools, rng, batch, pack)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


def train_zoo_model(name: str, zoo_dir: Path, profile_name: str, seed: int) -> dict:
    """Train one zoo model or adapter and save it as ``zoo_dir/name`` (a worker-process entry point).

    Adapters (``ADAPTER_NAMES``) need ``zoo_dir/base``. The caller sets torch to one thread
    (the builder's workers do; see ``build.one_thread``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    profile = PROFILES[profile_name]
    model_seed = seed * 1000 + ALL_NAMES.index(name)
    torch.manual_seed(model_seed)
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "tokenizer")
    if name == "base":
        model = LlamaForCausalLM(llama_config(profile, len(tokenizer)))
    else:
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base", dtype=torch.float32)
    if name in ADAPTER_NAMES:
        model = lora_model(model)
    pools = [(w, encode(tokenizer, ex)) for w, ex in mixture(build_world(), ADAPTER_DATA.get(name, name))]
    loss = train(model, pools, steps=profile.steps[name], lr=profile.lr[name],
                 batch=profile.batch, warmup=profile.warmup, seed=model_seed,
                 pack=profile.pack if name == "base" else 0)
    if name in ADAPTER_NAMES:
        save_adapter_folder(model, zoo_dir / name)
    else:
        model.save_pretrained(zoo_dir / name, safe_serialization=True)
        tokenizer.save_pretrained(zoo_dir / name)
    return {"name": name, "seconds": round(time.perf_counter() - start, 1), "final_loss": round(loss, 4)}


def lora_model(model):
    """``model`` wrapped by PEFT with a fresh LoRA adapter on every attention and MLP projection.

    Initialisation (PEFT's default: ``lora_A`` Kaiming-uniform, ``lora_B`` zero) draws from
    torch's global generator, so the caller's ``torch.manual_seed`` fixes it.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def save_adapter_folder(model, folder: Path) -> None:
    """Save a PEFT model's adapter as a portable, byte-reproducible PEFT adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (float32) only:
    PEFT's generated README (which names the absolute base path) is dropped, the config names
    the base as ``../base`` and lists the target modules in a fixed order (PEFT stores them as a
    set, whose order changes with the process's string hashing).
    """
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = ADAPTER_BASE_PATH
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
