"""TEMPORARY shim while the package moves land (removed before the stop)."""
import sys

from orchestrator.engine import recipe as _module

sys.modules[__name__] = _module
