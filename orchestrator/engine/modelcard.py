"""Model card (README.md) for a merged model, in the LazyMergekit style."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import yaml

from orchestrator.engine.recipe import Recipe, dump_setting


def _link(ref: str, hub_ids: Collection[str]) -> str:
    """A reference as Markdown: Hub ids linked; ``model+adapter`` as its two parts."""
    return " + ".join(f"[{part}](https://huggingface.co/{part})" if part in hub_ids else f"`{part}`"
                      for part in ref.split("+"))


def _param_lines(recipe: Recipe) -> list[str]:
    lines = [f"- `{k}`: `{dump_setting(v)}`" for k, v in recipe.parameters.items()]
    entries = [(m.model, m.parameters) for m in recipe.models]
    entries += [(f"{s.model} {list(s.layer_range)}", s.parameters)
                for sl in recipe.slices for s in sl.sources]
    for name, params in entries:
        if params:
            values = ", ".join(f"`{k}`: `{dump_setting(v)}`" for k, v in params.items())
            lines.append(f"- {name}: {values}")
    return lines or ["- (method defaults)"]


def render_model_card(recipe: Recipe, name: str, *, description: str = "", reference_url: str = "",
                      hub_ids: Collection[str] = (), extra: Mapping[str, Any] | None = None,
                      path: str | None = None) -> str:
    """Markdown card: front matter, models, method, parameters and the recipe YAML.

    Args:
        recipe: the merge.
        name: the model's name (the card's title).
        description: one line about the method (the registry's ``description``).
        reference_url: the method's paper or page (linked from its name).
        hub_ids: references (or sides of ``model+adapter``) that are Hugging Face Hub ids
            (linked, listed as base models).
        extra: more facts to list (seed, dtype...).
        path: the folder the usage snippet loads (default: ``name``).
    """
    models = [m for m in recipe.referenced_models() if m != recipe.base_model]
    hub = list(dict.fromkeys(p for m in recipe.referenced_models() for p in m.split("+") if p in hub_ids))
    front = {"tags": ["merge", "mergekit", "lazymergekit", "merge-orchestrator", *hub]}
    if hub:
        front["base_model"] = hub
    method = f"[{recipe.merge_method}]({reference_url})" if reference_url else recipe.merge_method
    method += f": {description}" if description else ""
    base = f"\n\nBase model: {_link(recipe.base_model, hub_ids)}" if recipe.base_model else ""
    facts = "".join(f"- {k}: `{v}`\n" for k, v in (extra or {}).items())
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {name}\n\n"
        f"{name} is a merge of the following models using merge-orchestrator "
        f"(mergekit-compatible recipe):\n"
        + "".join(f"* {_link(m, hub_ids)}\n" for m in models)
        + f"\n## 🧬 Merge method\n\n{method}{base}\n\n"
        f"## ⚙️ Parameters\n\n" + "\n".join(_param_lines(recipe)) + "\n"
        + (f"\n{facts}" if facts else "")
        + f"\n## 🧩 Configuration\n\n```yaml\n{recipe.to_yaml()}```\n\n"
        f"## 💻 Usage\n\n```python\n"
        f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{path or name}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{path or name}\")\n```\n"
    )
