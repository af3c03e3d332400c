"""Tiny real models for tests: a few-layer Llama with a word-level tokenizer, saved as safetensors.

Fine-tunes are the base plus seeded small perturbations, so task vectors are small and
known, as with real fine-tunes of one base.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the a cat dog sat ran on in red blue green big small and is was Answer : . ,".split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", model_max_length=64)


def make_tiny_llama(out: Path, *, seed: int = 0, layers: int = 2, hidden: int = 16,
                    vocab_size: int | None = None, tie: bool = False, from_model: Path | None = None,
                    delta_scale: float = 0.02, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny Llama (and tokenizer) to ``out``; with ``from_model``, a perturbed copy of it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    if from_model is not None:
        model = AutoModelForCausalLM.from_pretrained(from_model, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * delta_scale)
    else:
        config = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden,
                             intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=tie,
                             pad_token_id=0, eos_token_id=2, bos_token_id=2)
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def make_tiny_family(root: Path, **kwargs) -> dict[str, Path]:
    """Base plus three fine-tunes of it under ``root``."""
    base = make_tiny_llama(root / "base", seed=0, **kwargs)
    family = {"base": base}
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        family[name] = make_tiny_llama(root / name, seed=i, from_model=base, **kwargs)
    return family


# LoRA adapters ---------------------------------------------------------------------------------

ADAPTERS = {
    # name: LoraConfig keywords (different ranks and alphas, rslora, patterns, an embedding target)
    "ad1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "ad2": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"]),
    "ad3": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    "ad4": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}),
    "ad5": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                rank_pattern={"layers.1.self_attn.q_proj": 2}),
}


def load_base(base: Path):
    """A model folder as a float32 causal LM."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter on ``base`` with random factors (PEFT's B = 0 would be a no-op), saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(base), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return out


def make_lora_zoo(root: Path) -> dict[str, Path]:
    """{'base': tiny Llama, 'ad1'..'ad5': adapter folders (see ADAPTERS)}."""
    zoo = {"base": make_tiny_llama(root / "base", seed=0)}
    for i, (name, config) in enumerate(ADAPTERS.items(), start=1):
        zoo[name] = make_adapter(zoo["base"], root / name, seed=i, **config)
    return zoo
