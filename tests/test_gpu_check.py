"""benchmarks/gpu_check.sh and gpu_check.py stay ready to run when a GPU machine is lent.

No GPU is needed here: on a CPU-only torch the shell script must stop at once with one line
(exit 2), and the Python script runs the same trials end to end with ``--device cpu`` (slow,
on the real pair), so a lent GPU's few minutes are not spent finding a broken script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.zoo.real_pair import real_pair_available

REPO = Path(__file__).resolve().parents[1]
SCRIPT, SHELL = REPO / "benchmarks" / "gpu_check.py", REPO / "benchmarks" / "gpu_check.sh"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "PYTHON": sys.executable}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_summary_takes_medians_after_the_warm_up_round():
    records = [{"round": 0, "method": "ties", "merge_s": 9.0, "eval_s": 90.0},  # warm-up: left out
               *({"round": r, "method": "ties", "merge_s": m, "eval_s": e}
                 for r, m, e in ((1, 1.0, 10.0), (2, 3.0, 30.0), (3, 2.0, 20.0)))]
    table = _module().summary(records, ["ties"])
    assert table[-1] == "| ties | 2.000 | 20.00 | 9.1% |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the script would run")
def test_the_shell_script_stops_with_one_line_without_cuda():
    result = _run(["bash", str(SHELL), "--trials", "1"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: CUDA is not available (torch {torch.__version__}, CUDA build: none); "
        "this check needs a GPU machine"]


@pytest.mark.parametrize("args, bad", [(["--rungs", "0"], "--rungs"), (["--trials", "-1"], "--trials")])
def test_bad_counts_stop_before_any_work(args, bad):
    result = _run([sys.executable, str(SCRIPT), "--device", "cpu", *args], timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and bad in line


@pytest.mark.slow
@pytest.mark.skipif(real_pair_available() is not None, reason=str(real_pair_available()))
def test_the_check_runs_end_to_end_on_cpu(tmp_path):
    # The GPU path with --device cpu: the real pair, a resident merge, the first search rung.
    out = tmp_path / "records.json"
    result = _run([sys.executable, str(SCRIPT), "--device", "cpu", "--trials", "1",
                   "--methods", "task_arithmetic", "--rungs", "1", "--json", str(out)], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(out.read_text())
    assert [(r["round"], r["method"]) for r in records] == [(0, "task_arithmetic"),
                                                          (1, "task_arithmetic")]
    assert all(r["items"] == 60 for r in records)  # the first rung: 30 items per task
    assert all(r["first_rung_s"] == r["eval_s"] for r in records)  # and no further rung
    assert records[0]["score"] == records[1]["score"]  # the same merge scores the same
    assert all(0 < r["merge_s"] < r["eval_s"] for r in records)
    assert "| task_arithmetic |" in result.stdout and "warm-up" in result.stdout
