"""Differential tests against the reference implementations: mergekit 0.1.5's merge methods
(called as pure functions on tensor groups) and PEFT's ``merge_utils.ties`` (the paper variant).

Random methods (DARE, DELLA) draw from our generator, not mergekit's global RNG, so only their
deterministic parts are compared here; their masks are checked in test_merge_oracle.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from orchestrator.merge import REGISTRY
from tests.test_mergekit_agreement import BEYOND_MERGEKIT

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")

OUR_EXTRAS = {"rescale_mode": "l1", "sign_method": "weighted_sum"}  # defaults = mergekit behaviour


def mergekit_merge(name: str, xs, base, params: dict) -> torch.Tensor:
    """mergekit's result for one tensor (the base, when given, goes first)."""
    tensors = [base, *xs] if base is not None else list(xs)
    group = mk_base.TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    return mk_registry.get(name)([group], parameters=params)[0]


def our_merge(name: str, xs, base, glob: dict, models: list[dict]) -> torch.Tensor:
    method = REGISTRY[name]
    params = method.make_params(glob)
    per_model = [method.make_model_params(m) for m in models]
    if method.inputs == "deltas":
        return method.fn([x - base for x in xs], base, per_model, params, None) + base
    return method.fn(xs, base, per_model, params, None)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - BEYOND_MERGEKIT))
def test_parameter_names_and_defaults_match_mergekit(name):
    method = REGISTRY[name]
    spec = mk_registry.get(name).spec
    ours_global = {k: _default(method.params, k) for k in method.global_keys()}
    ours_model = {k: _default(method.model_params, k) for k in method.model_keys()}
    theirs = {p.name: (None if p.required else p.default) for p in spec.parameters}
    shared = {p.name for p in spec.parameters if p.scope.value == "shared"}
    assert {k: theirs[k] for k in shared} == {k: v for k, v in ours_global.items() if k not in OUR_EXTRAS}
    assert {k: v for k, v in theirs.items() if k not in shared} == ours_model
    assert {k: v for k, v in ours_global.items() if k in OUR_EXTRAS} == {
        k: v for k, v in OUR_EXTRAS.items() if k in ours_global}


def _default(cls, key: str):
    from dataclasses import MISSING, fields
    field = next(f for f in fields(cls) if f.name.rstrip("_") == key)
    return None if field.default is MISSING else field.default


W3 = [1.0, 0.5, 0.3]
D3 = [0.5, 0.3, 0.7]
GTA_MODELS = [{"weight": w, "density": d} for w, d in zip(W3, D3)]
CRUMB_MODELS = [{**m, "gamma": 0.05} for m in GTA_MODELS]
MK_GTA = {"weight": W3, "density": D3}
MK_CRUMB = {**MK_GTA, "gamma": [0.05] * 3}

# (method, our global params, our per-model params, mergekit params, n models, use base)
CASES = [
    ("linear", {}, [{"weight": w} for w in W3], {"weight": W3}, 3, False),
    ("linear", {"normalize": False}, [{"weight": w} for w in W3],
     {"weight": W3, "normalize": False}, 3, False),
    ("slerp", {"t": 0.3}, [{}], {"t": 0.3}, 1, True),
    ("nuslerp", {}, [{"weight": 0.3}, {"weight": 0.9}], {"weight": [0.3, 0.9]}, 2, True),
    ("nuslerp", {"nuslerp_flatten": False}, [{"weight": 0.3}, {"weight": 0.9}],
     {"weight": [0.3, 0.9], "nuslerp_flatten": False}, 2, False),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 0.3}, {"weight": 0.9}],
     {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, True),
    ("multislerp", {}, [{"weight": w} for w in W3], {"weight": W3}, 3, True),
    ("multislerp", {"normalize_weights": False}, [{"weight": w} for w in W3],
     {"weight": W3, "normalize_weights": False}, 3, False),
    ("karcher", {}, [{}] * 3, {}, 3, False),
    ("task_arithmetic", {"lambda": 0.8}, GTA_MODELS, {**MK_GTA, "lambda": 0.8}, 3, True),
    ("task_arithmetic", {"normalize": True}, GTA_MODELS, {**MK_GTA, "normalize": True}, 3, True),
    ("ties", {}, GTA_MODELS, MK_GTA, 3, True),
    ("ties", {"normalize": False, "rescale": True, "lambda": 1.3}, GTA_MODELS,
     {**MK_GTA, "normalize": False, "rescale": True, "lambda": 1.3}, 3, True),
    ("ties", {}, [{"weight": -0.5, "density": 0.4}, {"weight": 1.0, "density": 0.6}],
     {"weight": [-0.5, 1.0], "density": [0.4, 0.6]}, 2, True),
    ("breadcrumbs", {}, CRUMB_MODELS, MK_CRUMB, 3, True),
    ("breadcrumbs", {"rescale": True, "normalize": True}, CRUMB_MODELS,
     {**MK_CRUMB, "rescale": True, "normalize": True}, 3, True),
    ("breadcrumbs_ties", {}, CRUMB_MODELS, MK_CRUMB, 3, True),
    ("breadcrumbs_ties", {"normalize": True}, [{**m, "gamma": 0.0} for m in GTA_MODELS],
     {**MK_GTA, "gamma": [0.0] * 3, "normalize": True}, 3, True),
    ("model_stock", {}, [{}] * 3, {}, 3, True),
    ("model_stock", {"filter_wise": True}, [{}] * 3, {"filter_wise": True}, 3, True),
    ("passthrough", {}, [{"scale": 0.5}], {"scale": 0.5}, 1, False),
]


@pytest.mark.parametrize("shape", [(64, 48), (37,)])
@pytest.mark.parametrize(("name", "glob", "models", "mk_params", "n", "use_base"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_mergekit(name, glob, models, mk_params, n, use_base, shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    ours = our_merge(name, xs, base if use_base else None, glob, models)
    theirs = mergekit_merge(name, xs, base if use_base else None, mk_params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_karcher_base_is_averaged_in_like_mergekit():
    g = torch.Generator().manual_seed(1)
    base, *xs = [torch.randn(20, 10, generator=g) for _ in range(3)]
    ours = our_merge("karcher", xs, base, {}, [{}, {}])
    # mergekit's planner appends the base model to the inputs of a method that ignores bases.
    theirs = mergekit_merge("karcher", [*xs, base], None, {})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_large_tensor_selection_matches_mergekit(name):
    """Over 2**20 entries our sampled order statistics replace kthvalue; mergekit argsorts.

    Magnitudes are distinct by construction (a permutation of 1..n times 2**-20, exact in
    float32): at tied magnitudes each implementation keeps its own choice of entries.
    """
    g = torch.Generator().manual_seed(2)
    shape, n = (1025, 1024), 1025 * 1024
    base = torch.zeros(shape)
    xs = [((torch.randperm(n, generator=g) + 1) * 2.0**-20
           * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).float().view(shape) for _ in range(2)]
    models = [{"weight": 1.0, "density": 0.2}, {"weight": 0.7, "density": 0.6}]
    mk_params = {"weight": [1.0, 0.7], "density": [0.2, 0.6]}
    if name == "breadcrumbs_ties":
        models = [{**m, "gamma": 0.02} for m in models]
        mk_params["gamma"] = [0.02, 0.02]
    ours = our_merge(name, xs, base, {}, models)
    torch.testing.assert_close(ours, mergekit_merge(name, xs, base, mk_params), rtol=1e-5, atol=1e-6)


def _peft_merge_utils():
    """PEFT's merge_utils module alone (it imports only torch), skipping PEFT's slow package import."""
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        pytest.skip("peft is not installed")
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_ties_sum_variant_matches_peft():
    peft = _peft_merge_utils()
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(40, 30, generator=g) for _ in range(3)]
    weights = [1.0, 0.4, 1.7]
    expected = peft.ties(deltas, torch.tensor(weights), density=0.4, majority_sign_method="total")
    method = REGISTRY["ties"]
    ours = method.fn(deltas, torch.zeros(40, 30),
                     [method.make_model_params({"weight": w, "density": 0.4}) for w in weights],
                     method.make_params({"sign_method": "sum"}), None)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
