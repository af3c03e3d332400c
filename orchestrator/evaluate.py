"""TEMPORARY shim while the package moves land (removed before the stop)."""
from orchestrator.evaluation.evaluator import *  # noqa: F401,F403
from orchestrator.evaluation.models import *  # noqa: F401,F403
from orchestrator.evaluation.spec import *  # noqa: F401,F403
from orchestrator.evaluation.suite import *  # noqa: F401,F403
