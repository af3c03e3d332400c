#!/usr/bin/env bash
# Create .venv in the checkout and install the project (CPU torch first, then the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first, pinned, so pip takes the CPU build instead of pulling a CUDA one.
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import orchestrator, torch, lm_eval, optuna, mlflow, hydra" \
  || { echo "setup failed: see pip output above" >&2; exit 1; }
echo "setup ok: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
