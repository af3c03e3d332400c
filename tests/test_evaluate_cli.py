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
