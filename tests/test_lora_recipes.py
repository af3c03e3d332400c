"""LoRA adapters as recipe sources: ``model+adapter`` and bare adapter entries on ``base_model``.

Every merge method of the engine takes them (the full-tensor ones too), and the result equals
the same recipe over the models PEFT's ``merge_and_unload`` makes from them, written to disk.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.cli import main
from orchestrator.engine import merge_to_disk
from orchestrator.errors import UserError
from orchestrator.lora import AdapterMerger, load_adapter
from orchestrator.engine.recipe import Recipe
from tests.test_lora import ATOL, load_base, peft_model
from tests.tiny import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")


@pytest.fixture(scope="module")
def peft_merged(lora_zoo, tmp_path_factory) -> dict[str, Path]:
    """PEFT's ``merge_and_unload`` of each adapter on the base, saved as model folders."""
    root = tmp_path_factory.mktemp("peft_merged")
    out = {}
    for name in ("ad1", "ad2", "ad3"):
        peft_model(lora_zoo, [name]).merge_and_unload().save_pretrained(root / name)
        out[name] = root / name
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_model_plus_adapter_through_the_cli_equals_merge_and_unload(lora_zoo, peft_merged, tmp_path,
                                                                    monkeypatch, capsys):
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{lora_zoo['base']}+{lora_zoo['ad2']}", "parameters": {"weight": 1.0}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "merge", str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 0
    assert "merged" in capsys.readouterr().out
    assert_same(tensors(tmp_path / "out"), tensors(peft_merged["ad2"]))
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "huggingface.co/" not in card  # local folders are not listed as Hub models
    dumped = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert dumped["models"][0]["model"] == f"{lora_zoo['base']}+{lora_zoo['ad2']}"


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.5}]),
    ("ties", [{"weight": 0.7, "density": 0.5}, {"weight": 0.9, "density": 0.6}]),
    ("slerp", None),  # a full-tensor method: adapters enter through their baked models
])
def test_adapter_entries_merge_like_the_baked_models(lora_zoo, peft_merged, tmp_path, method, params):
    base = str(lora_zoo["base"])
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": f"{base}+{lora_zoo['ad1']}", "dtype": "float32",
                  "parameters": {"t": 0.3}, "models": [f"{base}+{lora_zoo['ad1']}", str(lora_zoo["ad3"])]}
        # the bare adapter is on base_model, itself model+adapter: refused (ambiguous)
        with pytest.raises(UserError, match="not a plain model folder"):
            merge_to_disk(recipe, tmp_path / "x")
        recipe["models"][1] = f"{base}+{lora_zoo['ad3']}"
        baked = {**recipe, "base_model": str(peft_merged["ad1"]),
                 "models": [str(peft_merged["ad1"]), str(peft_merged["ad3"])]}
    else:
        recipe = {"merge_method": method, "base_model": base, "dtype": "float32",
                  "models": [{"model": str(lora_zoo[n]), "parameters": p} for n, p in zip(("ad1", "ad3"), params)]}
        baked = {**recipe, "models": [{"model": str(peft_merged[n]), "parameters": p}
                                      for n, p in zip(("ad1", "ad3"), params)]}
    merge_to_disk(recipe, tmp_path / "ours", seed=3)
    merge_to_disk(baked, tmp_path / "baked", seed=3)
    assert_same(tensors(tmp_path / "ours"), tensors(tmp_path / "baked"), atol=1e-5)
    if method != "slerp":  # and the resident adapter sweep writes the same tensors
        model = load_base(lora_zoo["base"])
        AdapterMerger(model, [load_adapter(lora_zoo[n]) for n in ("ad1", "ad3")]).apply(method, params, seed=3)
        assert_same({k: v for k, v in model.state_dict().items()}, tensors(tmp_path / "ours"), atol=1e-5)


def test_bad_adapter_references_fail_in_one_line(lora_zoo, tmp_path):
    base, ad1 = str(lora_zoo["base"]), str(lora_zoo["ad1"])

    def fails(recipe: dict, needle: str) -> None:
        models = [{"model": m, "parameters": {"weight": 1.0}} for m in recipe.pop("models")]
        with pytest.raises(UserError, match=needle) as err:
            merge_to_disk({"merge_method": "linear", "models": models, **recipe}, tmp_path / "out")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()

    fails({"models": [ad1]}, "is a LoRA adapter but the recipe has no base_model")
    fails({"models": [f"{ad1}+{base}"]}, "is a LoRA adapter, not a model")
    fails({"models": [f"{base}+{base}"]}, "is not a LoRA adapter folder")
    fails({"models": [f"{base}+{tmp_path / 'nowhere'}"]}, "not found")
    other = make_tiny_llama(tmp_path / "wider", seed=1, hidden=24)
    fails({"models": [f"{other}+{ad1}"]}, f"model '{other}\\+{ad1}'.*")
    dora = tmp_path / "dora"
    shutil.copytree(ad1, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    fails({"models": [f"{base}+{dora}"]}, "DoRA")
    with pytest.raises(UserError, match="needs both a model and a LoRA adapter"):
        Recipe.from_dict({"merge_method": "linear", "models": [f"+{ad1}"]})


def test_bad_adapter_reference_in_the_cli_exits_2(lora_zoo, tmp_path, capsys):
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(lora_zoo["ad1"]), "parameters": {"weight": 1.0}}]}))
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no base_model" in err
    assert not (tmp_path / "out").exists()


# merge --adapter: one combined PEFT adapter --------------------------------------------------------

def _merge_adapter(tmp_path: Path, recipe: dict, *args: str) -> tuple[int, Path]:
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    return main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "ad"), "--adapter", *args]), tmp_path / "ad"


def test_combined_adapter_cat_is_exact_and_loads_in_peft(lora_zoo, tmp_path, capsys):
    from peft import PeftModel

    from orchestrator.lora import weighted_sum_deltas
    from tests.test_lora import logits

    recipe = {"merge_method": "cat", "base_model": str(lora_zoo["base"]),
              "models": [{"model": str(lora_zoo["ad1"]), "parameters": {"weight": 0.6}},
                         {"model": f"{lora_zoo['base']}+{lora_zoo['ad3']}", "parameters": {"weight": -1.1}}]}
    rc, out = _merge_adapter(tmp_path, recipe)
    assert rc == 0 and "combined 2 adapters with cat" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "mergekit_config.yml"]
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad3")]
    exact = weighted_sum_deltas(adapters, [0.6, -1.1])
    ours = load_adapter(out).deltas()
    assert sorted(ours) == sorted(exact)
    for name in exact:
        torch.testing.assert_close(ours[name], exact[name], atol=ATOL, rtol=0, msg=name)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lora_zoo["base"])
    model = PeftModel.from_pretrained(load_base(lora_zoo["base"]), out).merge_and_unload()
    baked = load_base(lora_zoo["base"])
    AdapterMerger(baked, adapters).apply("cat", [{"weight": 0.6}, {"weight": -1.1}])
    ids = torch.tensor([[3, 5, 7, 9, 4]])
    torch.testing.assert_close(logits(model, ids), logits(baked, ids), atol=1e-5, rtol=0)


def test_combined_adapter_peft_compatible_and_rank(lora_zoo, tmp_path):
    from orchestrator.lora import merge_deltas, peft_weighted_adapter

    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    models = [{"model": str(lora_zoo[n]), "parameters": {"weight": w}} for n, w in (("ad1", 0.7), ("ad2", -0.4))]
    recipe = {"merge_method": "ties", "base_model": str(lora_zoo["base"]), "models": models,
              "parameters": {"peft_compatible": True, "density": 0.5}}
    (tmp_path / "peft").mkdir()
    rc, out = _merge_adapter(tmp_path / "peft", recipe)
    assert rc == 0
    theirs = peft_weighted_adapter(adapters, [0.7, -0.4], "ties", density=0.5).deltas()
    ours = load_adapter(out).deltas()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=ATOL, rtol=0, msg=name)
    # exact task arithmetic truncated to rank 2: every module has rank 2 and is the best rank-2 fit
    recipe = {"merge_method": "task_arithmetic", "base_model": str(lora_zoo["base"]), "models": models,
              "parameters": {"rank": 2}}
    (tmp_path / "ta").mkdir()
    rc, out = _merge_adapter(tmp_path / "ta", recipe)
    assert rc == 0
    low = load_adapter(out)
    assert {m.rank for m in low.modules.values()} == {2}
    full = merge_deltas(adapters, "task_arithmetic", [{"weight": 0.7}, {"weight": -0.4}])
    for name, delta in full.items():
        s = torch.linalg.svdvals(delta.float())
        err = torch.linalg.matrix_norm(low.delta(name) - delta)
        assert err == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-3, abs=1e-5), name


@pytest.mark.parametrize("recipe, args, needle", [
    ({"merge_method": "cat", "models": ["BASE"]}, (), "not a LoRA adapter folder"),
    ({"merge_method": "cat", "models": ["AD1"]}, (), "needs base_model"),
    ({"merge_method": "svd", "base_model": "BASE", "models": ["AD1"], "parameters": {"rank": 0}}, (),
     "rank must be a positive integer"),
    ({"merge_method": "slerp", "base_model": "BASE", "models": ["AD1", "AD2"], "parameters": {"t": 0.5}}, (),
     "merges full tensors"),
    ({"merge_method": "cat", "base_model": "BASE", "models": ["AD1"]}, ("--device", "cuda"), "takes no --device"),
])
def test_combined_adapter_bad_inputs_exit_2(lora_zoo, tmp_path, capsys, recipe, args, needle):
    names = {"BASE": str(lora_zoo["base"]), "AD1": str(lora_zoo["ad1"]), "AD2": str(lora_zoo["ad2"])}
    recipe = {**recipe, "models": [{"model": names[m], "parameters": {"weight": 1.0}} for m in recipe["models"]]}
    if "base_model" in recipe:
        recipe["base_model"] = names[recipe["base_model"]]
    rc, out = _merge_adapter(tmp_path, recipe, *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".ad*"))


def test_adapter_keys_without_the_adapter_flag_exit_2(lora_zoo, tmp_path, capsys):
    recipe = {"merge_method": "ties", "base_model": str(lora_zoo["base"]),
              "models": [{"model": str(lora_zoo["ad1"]), "parameters": {"weight": 1.0, "density": 0.5}}],
              "parameters": {"peft_compatible": True}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    assert "pass --adapter" in capsys.readouterr().err


def test_model_card_links_each_hub_side_of_model_plus_adapter():
    from orchestrator.engine.modelcard import render_model_card

    recipe = Recipe.from_dict({"merge_method": "linear", "models": [
        {"model": "org/base+org/lora", "parameters": {"weight": 1.0}},
        {"model": "local/folder", "parameters": {"weight": 1.0}}]})
    card = render_model_card(recipe, "out", hub_ids={"org/base", "org/lora"})
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/lora"]
    assert "* [org/base](https://huggingface.co/org/base) + [org/lora](https://huggingface.co/org/lora)" in card
    assert "* `local/folder`" in card
