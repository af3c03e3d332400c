"""End-to-end ``python -m orchestrator merge`` on the tiny family, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.engine import streaming
from orchestrator.cli import main
from orchestrator.engine import StreamReader, compute_tensor, open_models
from orchestrator.engine.plan import build_plan
from orchestrator.engine.recipe import Recipe
from tests.test_mergekit_agreement import extended_copy
from tests.tiny import make_tiny_family, make_tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _linear(family, **extra) -> dict:
    return {"models": [{"model": str(family["ft_a"]), "parameters": {"weight": 0.25}},
                       {"model": str(family["ft_b"]), "parameters": {"weight": 0.75}}],
            "merge_method": "linear", **extra}


def _run(tmp_path, recipe: dict | str, *args: str, out: str = "out", capsys=None,
         monkeypatch=None) -> tuple[int, Path]:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    argv = ["merge", str(path), str(tmp_path / out), *args]
    monkeypatch.setattr(sys, "argv", [sys.argv[0], *argv])
    return main(argv), tmp_path / out


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _no_leftovers(tmp_path: Path, out: Path) -> bool:
    return not out.exists() and not list(tmp_path.glob(".*partial*"))


# -- happy paths ---------------------------------------------------------------------------------
def test_linear_merge_end_to_end(tiny_family, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    rc, out = _run(tmp_path, _linear(tiny_family), capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0
    summary = capsys.readouterr().out
    assert "merged 21 tensors with linear" in summary and "KB" in summary
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md",
            "mergekit_config.yml"} <= {p.name for p in out.iterdir()}
    merged, a, b = _load(out), _load(tiny_family["ft_a"]), _load(tiny_family["ft_b"])
    assert merged.keys() == a.keys()
    for name in merged:
        assert torch.allclose(merged[name], 0.25 * a[name] + 0.75 * b[name], atol=1e-7), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.norm.weight, merged["model.norm.weight"])
    saved = Recipe.from_yaml((out / "mergekit_config.yml").read_text())
    assert saved == Recipe.from_dict(_linear(tiny_family))
    card = (out / "README.md").read_text()
    assert "linear" in card and "```yaml" in card and str(tiny_family["ft_a"]) in card


def test_sharded_output_loads_and_matches(tiny_family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    rc, single = _run(tmp_path, _linear(tiny_family), out="single", monkeypatch=monkeypatch)
    rc2, sharded = _run(tmp_path, _linear(tiny_family), "--shard-size", "4KB", out="sharded",
                        monkeypatch=monkeypatch)
    assert rc == rc2 == 0
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 3 and (sharded / "model.safetensors.index.json").exists()
    a, b = _load(single), _load(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert torch.equal(model.lm_head.weight, a["lm_head.weight"])


def test_tied_embeddings_write_no_lm_head(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    family = make_tiny_family(tmp_path / "tied", tie=True)
    rc, out = _run(tmp_path, _linear(family), monkeypatch=monkeypatch)
    assert rc == 0
    assert "lm_head.weight" not in _load(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_passthrough_slices_load_with_more_layers(tiny_family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    recipe = {"slices": [{"sources": [{"model": str(tiny_family["ft_a"]), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(tiny_family["ft_b"]), "layer_range": [1, 2]}]}],
              "merge_method": "passthrough", "dtype": "bfloat16"}
    rc, out = _run(tmp_path, recipe, monkeypatch=monkeypatch)
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3 and model.dtype == torch.bfloat16
    b = _load(tiny_family["ft_b"])
    assert torch.equal(model.model.layers[2].mlp.up_proj.weight,
                       b["model.layers.1.mlp.up_proj.weight"].bfloat16())


def test_overwrite(tiny_family, tmp_path, monkeypatch, capsys):
    rc, out = _run(tmp_path, _linear(tiny_family), monkeypatch=monkeypatch)
    assert rc == 0
    capsys.readouterr()
    rc, out = _run(tmp_path, _linear(tiny_family), monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and "exists and is not empty" in err and "--overwrite" in err
    rc, out = _run(tmp_path, _linear(tiny_family), "--overwrite", monkeypatch=monkeypatch)
    assert rc == 0 and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yml"]


def test_failure_mid_merge_leaves_nothing(tiny_family, tmp_path, monkeypatch):
    calls = []
    real = streaming.compute_tensor

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "compute_tensor", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _run(tmp_path, _linear(tiny_family), monkeypatch=monkeypatch)
    assert _no_leftovers(tmp_path, tmp_path / "out")


def test_random_method_is_byte_identical_in_any_tensor_order(tiny_family, tmp_path, monkeypatch):
    recipe = {"models": [{"model": str(tiny_family["ft_a"]),
                          "parameters": {"weight": 1.0, "density": 0.5}}],
              "base_model": str(tiny_family["base"]), "merge_method": "dare_linear"}
    r = Recipe.from_dict(recipe)
    weights = open_models(r)
    plan = build_plan(r, weights)
    reader = StreamReader(weights, torch.device("cpu"))
    forward = {t.name: compute_tensor(t, plan.method, reader, 7) for t in plan.tasks}
    backward = {t.name: compute_tensor(t, plan.method, reader, 7) for t in reversed(plan.tasks)}
    assert all(torch.equal(forward[k], backward[k]) for k in forward)
    other = {t.name: compute_tensor(t, plan.method, reader, 8) for t in plan.tasks}
    assert not torch.equal(forward["model.layers.0.mlp.up_proj.weight"],
                           other["model.layers.0.mlp.up_proj.weight"])
    rc1, out1 = _run(tmp_path, recipe, "--seed", "7", out="o1", monkeypatch=monkeypatch)
    rc2, out2 = _run(tmp_path, recipe, "--seed", "7", out="o2", monkeypatch=monkeypatch)
    assert rc1 == rc2 == 0
    assert (out1 / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


def test_bf16_inputs_compute_in_float32_and_keep_base_dtype(tmp_path, monkeypatch):
    family = make_tiny_family(tmp_path / "bf16", dtype=torch.bfloat16)
    rc, out = _run(tmp_path, _linear(family), monkeypatch=monkeypatch)
    assert rc == 0
    merged, a, b = _load(out), _load(family["ft_a"]), _load(family["ft_b"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    expected = 0.25 * a[name].float() + 0.75 * b[name].float()
    assert torch.allclose(merged[name].float(), expected, rtol=1e-2, atol=1e-3)


def test_allow_pickle_merges_bin_checkpoints(tiny_family, tmp_path, monkeypatch):
    pickled = _pickled_copy(tiny_family["ft_a"], tmp_path / "pickled")
    rc, ref = _run(tmp_path, _linear(tiny_family), out="ref", monkeypatch=monkeypatch)
    recipe = _linear(tiny_family)
    recipe["models"][0]["model"] = str(pickled)
    rc2, out = _run(tmp_path, recipe, "--allow-pickle", monkeypatch=monkeypatch)
    assert rc == rc2 == 0
    a, b = _load(ref), _load(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_module_entry_point(tiny_family, tmp_path):
    """The real ``python -m orchestrator merge`` in a subprocess (once; slower)."""
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(_linear(tiny_family)))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "merge", str(path),
                           str(tmp_path / "out"), "--seed", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "merged 21 tensors" in proc.stdout


# -- bad inputs: exit 2, one line naming the facts, no output folder ------------------------------
def _pickled_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


@pytest.fixture(scope="module")
def bad(tiny_family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt"
    shutil.copytree(tiny_family["ft_a"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    mistral = root / "mistral"
    shutil.copytree(tiny_family["ft_b"], mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    (root / "notmodel").mkdir()
    (root / "notmodel" / "notes.txt").write_text("hi")
    return {"wide": make_tiny_llama(root / "wide", hidden=32), "corrupt": corrupt,
            "vocab": make_tiny_llama(root / "vocab", vocab_size=30), "mistral": mistral,
            "pickled": _pickled_copy(tiny_family["ft_a"], root / "pickled"),
            "notmodel": root / "notmodel"}


def _ta(family, second, **extra) -> dict:
    recipe = {"models": [{"model": str(family["ft_a"]), "parameters": {"weight": 0.5}},
                         {"model": str(second), "parameters": {"weight": 0.5}}],
              "base_model": str(family["base"]), "merge_method": "task_arithmetic"}
    recipe.update(extra)
    return recipe


def _bad_cases(f, bad, tmp):
    ta = {"models": [{"model": str(f["ft_a"]), "parameters": {"weight": 0.5}}],
          "base_model": str(f["base"]), "merge_method": "task_arithmetic"}
    return {
        "missing path": (_ta(f, tmp / "nope"), [], ["model", "nope", "not found"]),
        "not a model folder": (_ta(f, bad["notmodel"]), [], ["notmodel", "not a model folder",
                                                             "config.json"]),
        "unknown method": ({**ta, "merge_method": "tiez"}, [], ["unknown merge method 'tiez'",
                                                               "ties", "valid:", "linear"]),
        "unknown parameter": (_ta(f, f["ft_b"], parameters={"lamda": 1}), [],
                              ["unknown parameter 'lamda'", "task_arithmetic", "valid:", "lambda"]),
        "out-of-range value": ({**ta, "merge_method": "dare_linear",
                                "models": [{"model": str(f["ft_a"]),
                                            "parameters": {"weight": 1, "density": 1.5}}]}, [],
                               ["density", "1.5", f"for model '{f['ft_a']}'", "dare_linear"]),
        "base missing": ({k: v for k, v in ta.items() if k != "base_model"}, [],
                         ["task_arithmetic", "needs a base_model"]),
        "shape mismatch": (_ta(f, bad["wide"]), [], ["shape mismatch", "model.embed_tokens.weight",
                                                     "[23, 16]", "[23, 32]", "wide"]),
        "architecture mismatch": (_ta(f, bad["mistral"]), [], ["architecture mismatch",
                                                              "LlamaForCausalLM", "Mistral"]),
        "vocab mismatch": (_ta(f, bad["vocab"]), [], ["vocab size mismatch", "23", "30",
                                                      "tokenizer_source"]),
        "layer_range out of bounds": (
            {"slices": [{"sources": [{"model": str(f["ft_a"]), "layer_range": [0, 5]}]}],
             "merge_method": "passthrough"}, [], ["layer_range [0, 5]", "out of bounds", "2 layers"]),
        "corrupt safetensors": (_ta(f, bad["corrupt"]), [], ["corrupt", "model.safetensors",
                                                            str(bad["corrupt"])]),
        ".bin without --allow-pickle": (_ta(f, bad["pickled"]), [], ["pytorch_model.bin",
                                                                     "--allow-pickle"]),
        "bad shard size": (ta, ["--shard-size", "lots"], ["size must look like"]),
        "cuda absent": (ta, ["--device", "cuda"], ["cuda", "not available"]),
        "hub offline": (_ta(f, "some-org/some-model"), [], ["some-org/some-model", "offline"]),
        "bad yaml": ("models: [\n", [], ["not valid YAML"]),
    }


CASES = ["missing path", "not a model folder", "unknown method", "unknown parameter",
         "out-of-range value", "base missing", "shape mismatch", "architecture mismatch",
         "vocab mismatch", "layer_range out of bounds", "corrupt safetensors",
         ".bin without --allow-pickle", "bad shard size", "cuda absent", "hub offline", "bad yaml"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tiny_family, bad, tmp_path, capsys, monkeypatch):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe, args, facts = _bad_cases(tiny_family, bad, tmp_path)[case]
    rc, out = _run(tmp_path, recipe, *args, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fact in facts:
        assert fact in err, (fact, err)
    assert _no_leftovers(tmp_path, out)


# -- tokenizer_source: vocabularies aligned by token ------------------------------------------------
def _permuted_copy(src: Path, dst: Path, a: str, b: str) -> Path:
    """``src`` with tokens ``a`` and ``b`` swapped in the tokenizer and in the embedding rows."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    ia, ib = vocab[a], vocab[b]
    vocab[a], vocab[b] = ib, ia
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    state = load_file(dst / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name][[ia, ib]] = state[name][[ib, ia]]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tokenizer_source_aligns_vocabularies_by_token(tiny_family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ext = extended_copy(tiny_family["ft_b"], tmp_path / "ext")
    plain = _ta(tiny_family, tiny_family["ft_b"])
    rc, ref = _run(tmp_path, plain, out="ref", monkeypatch=monkeypatch)
    rc_base, out_base = _run(tmp_path, _ta(tiny_family, ext, tokenizer_source="base"),
                             out="base_vocab", monkeypatch=monkeypatch)
    rc_ext, out_ext = _run(tmp_path, _ta(tiny_family, ext, tokenizer_source=str(ext)),
                           out="ext_vocab", monkeypatch=monkeypatch)
    assert rc == rc_base == rc_ext == 0
    r, b, e, x = _load(ref), _load(out_base), _load(out_ext), _load(ext)
    assert all(torch.equal(r[k], b[k]) for k in r)  # base vocab: same as without extra tokens
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert e[name].shape[0] == 25 and torch.equal(e[name][:23], r[name])
        # A token only ext has: every model falls back to ext's row, so all deltas vanish.
        assert torch.equal(e[name][23:], x[name][23:])
    assert json.loads((out_ext / "config.json").read_text())["vocab_size"] == 25
    assert len(AutoTokenizer.from_pretrained(out_ext)) == 25
    assert AutoModelForCausalLM.from_pretrained(out_ext).lm_head.weight.shape[0] == 25


def test_tokenizer_source_undoes_a_vocabulary_permutation(tiny_family, tmp_path, monkeypatch):
    perm = _permuted_copy(tiny_family["ft_b"], tmp_path / "perm", "cat", "dog")
    rc, ref = _run(tmp_path, _ta(tiny_family, tiny_family["ft_b"]), out="ref",
                   monkeypatch=monkeypatch)
    rc2, out = _run(tmp_path, _ta(tiny_family, perm, tokenizer_source="base"), out="out",
                    monkeypatch=monkeypatch)
    assert rc == rc2 == 0
    r, o = _load(ref), _load(out)
    assert all(torch.equal(r[k], o[k]) for k in r)


def test_value_error_from_a_method_is_one_line(tiny_family, tmp_path, capsys, monkeypatch):
    recipe = _linear(tiny_family)
    recipe["models"][1]["parameters"]["weight"] = -0.25  # weights sum to zero with normalize
    rc, out = _run(tmp_path, recipe, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "method 'linear', tensor" in err, err
    assert _no_leftovers(tmp_path, out)
