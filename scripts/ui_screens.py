"""Screenshots of what a reviewer sees in the MLflow UI for a study (headless Chromium).

Starts ``python -m orchestrator ui`` on the study's store, drives Debian's ``chromium`` with
Playwright (``executable_path``: Playwright's own browser download does not work offline), and
saves, for the study: the experiment's runs, the parent run (its description is the verdict),
the best trial's run, the compare view of the best trials, and the registered model.

    .venv/bin/python scripts/ui_screens.py --runs-dir runs --study demo --out docs/ui

Prints one line per screenshot, and what each page showed (the checks a test reads).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ML = "?workflowType=machine_learning"  # MLflow's model-training view, not GenAI
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(runs_dir: Path, study: str, port: int) -> tuple[subprocess.Popen, str]:
    """The ui command in its own process group; returns it and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", "--runs-dir", str(runs_dir), "--study",
                             study, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if line.startswith("MLflow UI: "):
            return proc, line.removeprefix("MLflow UI: ").strip()
        if not line and proc.poll() is not None:
            break
    stop(proc)
    raise SystemExit(f"the ui command did not start (exit {proc.poll()})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def pages(runs_dir: Path, study: str, base: str, runs_url: str) -> dict[str, str]:
    """Name -> URL of each page to capture."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(exp_ids, f"tags.`mo.study` = '{study}' and tags.`mo.kind` = 'study'",
                                max_results=1) or None
    exp_id = parent[0].info.experiment_id if parent else None
    out = {"runs": runs_url}
    if parent:
        pid = parent[0].info.run_id
        out["parent"] = f"{base}/#/experiments/{exp_id}/runs/{pid}{ML}"
        kids = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{pid}' and tags.`mo.kind` = 'trial'",
                                  max_results=1000)
        best = [r for r in kids if r.data.tags.get("mo.best") == "true"]
        if best:
            out["best_trial"] = f"{base}/#/experiments/{exp_id}/runs/{best[0].info.run_id}{ML}"
        complete = sorted((r for r in kids if "score" in r.data.metrics), key=lambda r: -r.data.metrics["score"])
        ids = json.dumps([r.info.run_id for r in complete[:6]])
        out["compare"] = (f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}"
                          f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}&workflowType=machine_learning")
    out["registry"] = f"{base}/#/models/{urllib.parse.quote('merge-' + study)}{ML}"
    return out


def capture(urls: dict[str, str], out: Path, width: int = 1800, height: int = 1100) -> dict[str, str]:
    """Screenshot each page; returns name -> the page's visible text (for checks)."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        for name, url in urls.items():
            page.goto(url)
            page.wait_for_load_state("load")
            page.wait_for_timeout(5000)  # the UI renders tables and charts after its data arrives (it polls: no idle)
            _tidy(page, name)
            page.screenshot(path=str(out / f"{name}.png"))
            texts[name] = page.inner_text("body")
            print(f"{name}: {out / (name + '.png')} ({url})")
        browser.close()
    return texts


def _tidy(page, name: str) -> None:
    """Close MLflow's assistant panel; on the runs page, open the experiment's description (the verdict)."""
    for label in ("Close", "close"):
        buttons = page.get_by_role("button", name=label)
        if buttons.count():
            buttons.first.click()
            break
    if name == "runs":
        _columns(page, off=("Dataset", "Source", "Models"),
                 on=("score", "demo_mmlu", "demo_hellaswag", "merge_s", "mo.state", "mo.method"))
    page.wait_for_timeout(800)


def _columns(page, off: tuple[str, ...], on: tuple[str, ...]) -> None:
    """Pick the runs table's columns (MLflow keeps this choice in the browser, not in the URL)."""
    page.get_by_role("button", name="Columns").first.click()
    page.wait_for_timeout(500)
    search = page.get_by_placeholder("Search columns")
    for label in (*off, *on):
        search.fill(label)
        page.wait_for_timeout(300)
        text = page.get_by_text(label, exact=True)  # defaults: attributes shown, metrics and tags hidden
        if text.count():
            text.last.click()
    page.keyboard.press("Escape")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--study", default="demo")
    parser.add_argument("--out", default="docs/ui")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is not installed (apt-get install chromium)")
    runs_dir = Path(args.runs_dir)
    port = free_port()
    proc, runs_url = start_ui(runs_dir, args.study, port)
    try:
        texts = capture(pages(runs_dir, args.study, f"http://127.0.0.1:{port}", runs_url), Path(args.out))
    finally:
        stop(proc)
    (Path(args.out) / "pages.json").write_text(json.dumps(texts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
