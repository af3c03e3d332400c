"""merge-orchestrator: search model merges with Optuna, score them with lm-eval, track in MLflow."""

__version__ = "0.1.0"
