"""The package's shape: layers import downward only, no cycles, small modules and functions.

Walks every module's imports with ``ast`` (module-level and function-level alike).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "orchestrator"
# Bottom up. A module may import its own package and any package of a lower rank.
RANKS = {"errors": 0, "merge": 1, "lora": 2, "engine": 3, "zoo": 3, "evaluation": 4, "study": 5,
         "tracking": 6, "report": 7, "config": 8, "sweep": 9, "commands": 10, "cli": 10, "__main__": 11,
         "__init__": 0}
HEAVY = ("torch", "lm_eval", "mlflow", "transformers", "peft", "datasets", "matplotlib", "plotly", "optuna",
         "hydra", "omegaconf", "scipy", "sqlalchemy")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 50


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every ``orchestrator`` or heavy import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.If) for c in n.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            out += [(n if n.removeprefix("orchestrator.") and _is_module(n) else node.module, id(node) in top)
                    for n in names]
    return [(m, level) for m, level in out if m.split(".")[0] in ("orchestrator", *HEAVY)]


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name):
    src = package(name)
    assert src in RANKS, f"{name}: package {src!r} has no rank in RANKS (add the new layer)"
    for target, _ in imports(MODULES[name]):
        if not target.startswith("orchestrator"):
            continue
        dst = package(target)
        if dst == src or target == "orchestrator":
            continue
        assert RANKS[dst] < RANKS[src], f"{name} imports {target}: {src} (rank {RANKS[src]}) may not import {dst}"


def test_no_import_cycles_between_modules():
    graph = {name: {t for t, top in imports(path) if top and t in MODULES and t != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _heavy(name: str, seen: set[str] | None = None) -> bool:
    """Whether importing ``name`` imports a heavy library (torch, lm-eval, MLflow...)."""
    seen = seen if seen is not None else set()
    if name in seen or name not in MODULES:
        return False
    seen.add(name)
    for target, top in imports(MODULES[name]):
        if top and (target.split(".")[0] in HEAVY or _heavy(target, seen)):
            return True
    return False


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_level_imports_only_defer_heavy_modules(name):
    """Inside a function, an ``orchestrator`` module is imported only to put off torch, lm-eval, MLflow."""
    for target, top in imports(MODULES[name]):
        if not top and target.startswith("orchestrator.") and target in MODULES:
            assert _heavy(target), f"{name} imports {target} inside a function, but it is cheap: import it at the top"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    path = MODULES[name]
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{name}: {text.count(chr(10))} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {lines} lines"


def test_sweep_is_a_page():
    assert (ROOT / "sweep" / "run.py").read_text().count("\n") <= 150
