"""What a reviewer sees in the MLflow UI, in a real headless browser (Debian's chromium).

Runs ``scripts/ui_screens.py`` on a micro-zoo study: the runs table in the model-training view
sorted by score, the parent run with the verdict, the best trial, the compare view and the
registered model, each saved as a screenshot.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.sweep.run import run_sweep

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="chromium is not installed")]


def test_the_ui_shows_the_verdict_the_trials_and_the_registered_model(micro_zoo, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import ui_screens

    runs = tmp_path / "runs"
    args = ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", f"candidates.base={micro_zoo / 'base'}",
            f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
            f"candidates.models.commonsense={micro_zoo / 'commonsense'}", "method.methods=[task_arithmetic,ties]",
            "eval.rungs=[10,30]", "eval.confirm_seeds=1", "study.n_trials=4"]
    outcome = run_sweep(load_config(args), args, out=io.StringIO())
    out = tmp_path / "screens"
    assert ui_screens.main(["--runs-dir", str(runs), "--study", "debug", "--out", str(out)]) == 0
    texts = json.loads((out / "pages.json").read_text())
    for name in ("runs", "parent", "best_trial", "compare", "registry"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
        assert "Model training" in texts[name], name  # not the GenAI view
    assert "trial-" in texts["runs"] and "score" in texts["runs"]
    assert "Verdict:" in texts["parent"] and outcome.summary["verdict"][:40] in texts["parent"]
    assert "mo.best" in texts["best_trial"] and "weight.knowledge" in texts["best_trial"]
    assert "Comparing" in texts["compare"]
    assert "merge-debug" in texts["registry"] and "best" in texts["registry"]
