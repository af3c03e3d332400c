"""Loading a model folder for evaluation and wrapping it in lm-eval's ``HFLM`` once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.devices import resolve_device
from orchestrator.errors import UserError
from orchestrator.evaluation import lm_eval_compat as compat


def check_model_dir(model_dir: str | Path) -> Path:
    """The model folder as a Path, or UserError if it is not a Hugging Face model folder."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"model folder {str(model_dir)!r} does not exist")
    if not (path / "config.json").is_file():
        raise UserError(f"{str(model_dir)!r} is not a Hugging Face model folder (no config.json)")
    return path


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) from a model folder onto ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(model_dir)
    resolve_device(device)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise UserError(f"dtype must be 'auto' or a torch dtype name, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the model in {str(model_dir)!r}: {first}") from None
    return model.to(device).eval(), tokenizer


def check_model_device(model: Any, device: str) -> None:
    """A model passed in must already be where the spec says (the merger caches there)."""
    actual = next(model.parameters()).device
    if actual.type != torch.device(device).type:
        raise UserError(f"the model is on {actual} but the evaluation spec says device "
                        f"{device!r}; move the model first (model.to({device!r}))")


def wrap_model(model: Any, tokenizer: Any, batch_size: int | str) -> Any:
    """Wrap a loaded model in lm-eval's HFLM (once per study; it keeps the same object)."""
    compat.quiet()
    return compat.token_caching_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
