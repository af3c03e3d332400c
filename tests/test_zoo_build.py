"""The zoo builder: layout, LoRA adapter folders, manifest, skip and install logic, bad input,
a build from scratch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.zoo import ADAPTER_NAMES, MODEL_NAMES, default_adapter_paths, default_model_paths
from orchestrator.zoo.build import (COMMITTED_ZOO, MANIFEST, build_zoo, check_zoo, read_manifest,
                                    wanted)

REPO = Path(__file__).resolve().parents[1]


def test_micro_zoo_layout_and_scores(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, path in default_model_paths(micro_zoo).items():
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
        assert tok("Question: the\nAnswer:", add_special_tokens=False)["input_ids"][0] != tok.unk_token_id
    models = json.loads((micro_zoo / "zoo.json").read_text())["models"]
    assert list(models) == [*MODEL_NAMES, *ADAPTER_NAMES]
    for scores in models.values():
        for task in ("demo_mmlu", "demo_hellaswag"):
            assert set(scores[task]) == {"acc", "acc_norm"}
            assert 0.0 <= scores[task]["acc"] <= 1.0


def test_micro_zoo_adapters_are_portable_peft_folders(micro_zoo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestrator.lora import bake, is_adapter_folder, load_adapter
    from orchestrator.zoo.train import LORA_TARGETS

    files = read_manifest(micro_zoo)["files"]
    base = micro_zoo / "base"
    for name, path in default_adapter_paths(micro_zoo).items():
        assert is_adapter_folder(path)
        assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert {f"{name}/adapter_config.json", f"{name}/adapter_model.safetensors"} <= set(files)
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../base"
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
        assert config["target_modules"] == sorted(LORA_TARGETS)

        adapter = load_adapter(path)
        layers = AutoModelForCausalLM.from_pretrained(base).config.num_hidden_layers
        assert len(adapter.modules) == layers * len(LORA_TARGETS)
        assert all(m.a.dtype == torch.float32 and m.scaling == 2.0 for m in adapter.modules.values())
        assert any(m.b.abs().max() > 0 for m in adapter.modules.values())  # trained, not the zero init

        # PEFT loads the folder onto the base offline; its merge equals the project's bake.
        peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
        peft_merged = peft_merged.merge_and_unload().state_dict()
        baked = AutoModelForCausalLM.from_pretrained(base)
        bake(baked, adapter.deltas())
        for key, value in baked.state_dict().items():
            assert torch.equal(value, peft_merged[key]), (name, key)


def test_manifest_is_checked(micro_zoo, tmp_path):
    want = wanted(0, "micro")
    assert check_zoo(micro_zoo, want) is None
    assert "seed" in check_zoo(micro_zoo, wanted(1, "micro"))
    assert "profile" in check_zoo(micro_zoo, wanted(0, "demo"))
    copy = shutil.copytree(micro_zoo, tmp_path / "zoo")
    with open(copy / "knowledge" / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    assert "hashes" in check_zoo(copy, want)
    (copy / ADAPTER_NAMES[0] / "adapter_model.safetensors").unlink()
    assert check_zoo(copy, want) == "an adapter folder is missing"
    (copy / MANIFEST).unlink()
    assert check_zoo(copy, want) == "no manifest"


def test_valid_zoo_is_not_rebuilt(micro_zoo):
    lines = []
    stamp = (micro_zoo / "base" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    build_zoo(micro_zoo, micro=True, log=lines.append)
    assert time.perf_counter() - start < 5
    assert lines[0].startswith("zoo up to date")
    assert (micro_zoo / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_committed_demo_zoo_is_valid_and_installs_by_copying(tmp_path):
    assert check_zoo(COMMITTED_ZOO, wanted(0, "demo")) is None
    size = sum(p.stat().st_size for p in COMMITTED_ZOO.rglob("*") if p.is_file())
    assert size < 30 * 2**20
    lines = []
    start = time.perf_counter()
    out = build_zoo(tmp_path / "zoo", log=lines.append)
    assert time.perf_counter() - start < 30
    assert lines[0].startswith("installed the committed demo zoo")
    assert check_zoo(out, wanted(0, "demo")) is None


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(UserError, match="non-negative"):
        build_zoo(tmp_path / "z", seed=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        build_zoo(tmp_path / "file")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "keep.txt").write_text("x")
    assert main(["zoo", "--micro", "--out", str(tmp_path / "stuff")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "manifest.json" in err[0]
    assert (tmp_path / "stuff" / "keep.txt").exists()


@pytest.mark.slow
def test_micro_zoo_builds_from_scratch_deterministically(micro_zoo, tmp_path):
    out = tmp_path / "zoo"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "zoo", "--micro", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zoo built in" in proc.stdout and "hellaswag acc_norm" in proc.stdout
    assert check_zoo(out, wanted(0, "micro")) is None
    ours, theirs = read_manifest(out)["files"], read_manifest(micro_zoo)["files"]
    weights = [k for k in ours if k.endswith(".safetensors")]
    assert len(weights) == len(MODEL_NAMES) + len(ADAPTER_NAMES)
    # Every file but zoo.json (which records timings) is reproduced byte for byte.
    del ours["zoo.json"], theirs["zoo.json"]
    assert ours == theirs
    assert not list(tmp_path.glob(".zoo.tmp-*"))
