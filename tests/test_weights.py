"""Weights I/O: lazy reading, streaming sharded writing, staging, config and tokenizer copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.errors import UserError
from orchestrator.engine.weights import SAFE_INDEX, ModelWeights, parse_size
from orchestrator.engine.writing import ShardedWriter, copy_tokenizer, save_state_dict, staged_output, write_config


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(4, generator=gen).half(),
        "model.layers.0.counter": torch.arange(3),
        "model.norm.weight": torch.randn(4, generator=gen),
        "scalar": torch.tensor(1.5),
    }


def _model_folder(path: Path, state: dict[str, torch.Tensor], max_bytes: int = 10**9) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": 1}))
    save_state_dict(state, path, max_bytes)
    return path


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                        for k in a)


def test_single_file_round_trip(tmp_path):
    state = _state()
    folder = _model_folder(tmp_path / "m", state)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert _equal(load_file(folder / "model.safetensors"), state)  # readable by safetensors
    with ModelWeights(folder) as w:
        info = w.info("model.layers.0.mlp.up_proj.weight")
        assert (info.shape, info.dtype, info.nbytes) == ((8, 4), torch.bfloat16, 64)
        assert set(w.names()) == set(state)
        assert _equal({n: w.get(n) for n in w.names()}, state)
        assert w.get("scalar", dtype=torch.float64).dtype == torch.float64


def test_sharded_round_trip_and_index(tmp_path):
    state = _state()
    folder = _model_folder(tmp_path / "m", state, max_bytes=100)
    files = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((folder / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    with ModelWeights(folder) as w:
        assert _equal({n: w.get(n) for n in w.names()}, state)


def test_writer_accepts_any_order_and_checks_completeness(tmp_path):
    state = _state()
    writer = ShardedWriter(tmp_path, [(n, t.shape, t.dtype) for n, t in state.items()], 10**9)
    for name in reversed(list(state)):
        writer.write(name, state[name])
    writer.close()
    assert _equal(load_file(tmp_path / "model.safetensors"), state)

    other = tmp_path / "incomplete"
    other.mkdir()
    writer = ShardedWriter(other, [(n, t.shape, t.dtype) for n, t in state.items()], 10**9)
    writer.write("scalar", state["scalar"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="layout says"):
        ShardedWriter(other, [("a", (2,), torch.float32)], 10).write("a", torch.zeros(3))


def test_reads_third_party_sharded_checkpoint(tmp_path):
    state = _state()
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    names = list(state)
    save_file({n: state[n] for n in names[:3]}, folder / "a.safetensors", metadata={"format": "pt"})
    save_file({n: state[n] for n in names[3:]}, folder / "b.safetensors", metadata={"format": "pt"})
    weight_map = {n: "a.safetensors" if i < 3 else "b.safetensors" for i, n in enumerate(names)}
    (folder / SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with ModelWeights(folder) as w:
        assert _equal({n: w.get(n) for n in w.names()}, state)


@pytest.mark.parametrize("keep", [0.9, 0.3, 0.0001])
def test_truncated_safetensors_is_a_user_error(tmp_path, keep):
    folder = _model_folder(tmp_path / "m", _state())
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(UserError, match=r"model\.safetensors.*(corrupt|truncated)"):
        ModelWeights(folder)


def test_garbage_and_missing_shard_are_user_errors(tmp_path):
    folder = _model_folder(tmp_path / "m", _state())
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(UserError, match="corrupt"):
        ModelWeights(folder)
    sharded = _model_folder(tmp_path / "s", _state(), max_bytes=100)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UserError, match="missing file.*model-00002"):
        ModelWeights(sharded)


def test_pickle_refused_unless_allowed(tmp_path):
    state = _state()
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*--allow-pickle"):
        ModelWeights(folder)
    with ModelWeights(folder, allow_pickle=True) as w:
        assert _equal({n: w.get(n) for n in w.names()}, state)


def test_malicious_pickle_is_refused_even_when_allowed(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(1), "obj": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        ModelWeights(folder, allow_pickle=True)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ModelWeights(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        ModelWeights(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a model folder: no model.safetensors"):
        ModelWeights(tmp_path)


def test_staged_output_success_failure_and_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "x").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder remain

    with staged_output(out) as stage:
        (stage / "x").write_text("one")
    assert (out / "x").read_text() == "one"
    with pytest.raises(UserError, match="--overwrite"):
        with staged_output(out):
            pass
    with staged_output(out, overwrite=True) as stage:
        (stage / "y").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_config_and_tokenizer_copies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "torch_dtype": "x"}))
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    write_config(src, out, updates={"num_hidden_layers": 5, "dtype": "bfloat16", "torch_dtype": None})
    config = json.loads((out / "config.json").read_text())
    assert config == {"num_hidden_layers": 5, "dtype": "bfloat16"}
    assert (out / "generation_config.json").exists()
    assert copy_tokenizer(src, out) == ["tokenizer.json"]


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                           ("2GiB", 2 * 2**30), ("1.5 kb", 1500), (1000, 1000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1GB", "5XB", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError):
        parse_size(text)
