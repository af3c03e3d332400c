"""``python -m orchestrator eval``: table, --json, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.toy_tasks import write_toy_tasks


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory) -> Path:
    """A folder with the toy tasks ``toy_mmlu`` (group) and ``toy_hellaswag``."""
    return write_toy_tasks(tmp_path_factory.mktemp("toy_tasks"))


@pytest.fixture(autouse=True)
def _keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def test_eval_prints_table_and_writes_json(tiny_family, toy_tasks, tmp_path, capsys):
    out = tmp_path / "res" / "scores.json"
    rc = main(["eval", str(tiny_family["base"]), "--tasks", "toy_mmlu,toy_hellaswag",
               "--include", str(toy_tasks), "--split", "validation", "--limit", "10",
               "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| toy_mmlu | validation | 10 | acc |" in table
    assert "| toy_hellaswag | validation | 10 | acc_norm |" in table
    assert "objective" in table
    scores = json.loads(out.read_text())
    assert set(scores) == {"toy_mmlu", "toy_hellaswag"}
    assert set(scores["toy_hellaswag"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0.0 <= scores["toy_mmlu"]["acc"] <= 1.0 and scores["toy_mmlu"]["acc_stderr"] > 0


@pytest.mark.parametrize("args, message", [
    (["eval", "{missing}", "--tasks", "toy_mmlu"], "does not exist"),
    (["eval", "{not_a_model}", "--tasks", "toy_mmlu"], "no config.json"),
    (["eval", "{model}", "--tasks", "toy_mmlu", "--batch-size", "0"], "--batch-size"),
    (["eval", "{model}", "--tasks", "toy_mmlu", "--split", "dev2"], "no split 'dev2'"),
])
def test_eval_user_errors_are_one_line_exit_2(args, message, tiny_family, toy_tasks, tmp_path,
                                              capsys):
    paths = {"missing": str(tmp_path / "nope"), "not_a_model": str(tmp_path),
             "model": str(tiny_family["base"])}
    argv = [a.format(**paths) for a in args] + ["--include", str(toy_tasks)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.slow  # builds the micro zoo (about 30 s) unless another test already did
def test_eval_on_the_demo_tasks_matches_the_zoo_scores(micro_zoo, tmp_path, capsys):
    """demo_mmlu (nested groups, custom datasets) and demo_hellaswag, against zoo.json."""
    out = tmp_path / "scores.json"
    assert main(["eval", str(micro_zoo / "knowledge"), "--tasks", "demo_mmlu,demo_hellaswag",
                 "--json", str(out)]) == 0
    assert "| demo_mmlu | test |" in capsys.readouterr().out
    ours = json.loads(out.read_text())
    zoo = json.loads((micro_zoo / "zoo.json").read_text())["models"]["knowledge"]
    for task in ("demo_mmlu", "demo_hellaswag"):
        for metric in ("acc", "acc_norm"):
            assert ours[task][metric] == pytest.approx(zoo[task][metric], abs=1e-4)


def _scores(args: list[str], toy_tasks: Path, tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", *args, "--tasks", "toy_hellaswag", "--include", str(toy_tasks), "--split", "validation",
                 "--limit", "12", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_takes_adapters_as_model_plus_adapter_or_with_base(lora_zoo, toy_tasks, tmp_path, capsys):
    """A LoRA adapter is evaluated baked into its base in memory: the same scores as a merged folder."""
    import yaml

    base, adapter = lora_zoo["base"], lora_zoo["ad1"]
    plus = _scores([f"{base}+{adapter}"], toy_tasks, tmp_path, "plus")
    bare = _scores([str(adapter), "--base", str(base)], toy_tasks, tmp_path, "bare")
    recipe = tmp_path / "bake.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}))
    assert main(["merge", str(recipe), str(tmp_path / "baked"), "--quiet"]) == 0
    folder = _scores([str(tmp_path / "baked")], toy_tasks, tmp_path, "folder")
    assert plus == bare == folder
    from safetensors.torch import load_file

    baked, plain = load_file(tmp_path / "baked" / "model.safetensors"), load_file(base / "model.safetensors")
    assert any(not (baked[k] == plain[k]).all() for k in plain)  # the adapter changed the weights scored
    capsys.readouterr()
    assert main(["eval", str(adapter), "--tasks", "toy_hellaswag", "--include", str(toy_tasks)]) == 2
    assert "is a LoRA adapter: pass --base MODEL" in capsys.readouterr().err


def test_eval_takes_a_hub_id_from_the_hugging_face_cache(tiny_family, toy_tasks, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = Path(constants.HF_HUB_CACHE) / "models--someorg--tiny-eval"
    shutil.copytree(tiny_family["ft_a"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert _scores(["someorg/tiny-eval"], toy_tasks, tmp_path, "hub") == \
        _scores([str(tiny_family["ft_a"])], toy_tasks, tmp_path, "local")


def test_eval_prints_one_progress_line_of_ours_and_no_library_noise(tiny_family, toy_tasks, capfd):
    assert main(["eval", str(tiny_family["base"]), "--tasks", "toy_mmlu,toy_hellaswag", "--include",
                 str(toy_tasks), "--limit", "8"]) == 0
    err = capfd.readouterr().err
    assert "Custom kwargs" not in err and "Running loglikelihood" not in err and "Loading weights" not in err
    assert err.strip().splitlines() == [next(line for line in err.strip().splitlines() if line.startswith("scored"))]
