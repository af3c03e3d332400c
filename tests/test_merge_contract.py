"""Contract tests: every registered merge method passes the same invariants.

``SAMPLES`` must name every registered method with exactly its parameter keys, so a method
added to the registry (or a parameter added to a method) fails here until it is covered.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.merge import REGISTRY, MergeMethod, get_method

GTA = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
SPARSE = {**GTA, "rescale_mode": "l1"}
TIES_LIKE = {**SPARSE, "sign_method": "weighted_sum"}

# method -> (global params, per-model params); keys must equal the registry's exactly.
SAMPLES: dict[str, tuple[dict, dict]] = {
    "linear": ({"normalize": True}, {"weight": 0.7}),
    "slerp": ({"t": 0.3}, {}),
    "nuslerp": ({"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": 0.6}),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, {"weight": 0.6}),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, {}),
    "task_arithmetic": ({**GTA, "lambda": 0.9}, {"weight": 0.6, "density": 1.0}),
    "ties": ({**TIES_LIKE, "normalize": True}, {"weight": 0.6, "density": 0.5}),
    "dare_linear": ({**SPARSE, "rescale": True}, {"weight": 0.6, "density": 0.5}),
    "dare_ties": ({**TIES_LIKE, "rescale": True}, {"weight": 0.6, "density": 0.5}),
    "breadcrumbs": (SPARSE, {"weight": 0.6, "density": 0.5, "gamma": 0.1}),
    "breadcrumbs_ties": (TIES_LIKE, {"weight": 0.6, "density": 0.5, "gamma": 0.1}),
    "della": ({**TIES_LIKE, "normalize": True, "rescale": True},
              {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
    "della_linear": ({**SPARSE, "rescale": True}, {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
    "model_stock": ({"filter_wise": False}, {}),
    "passthrough": ({}, {"scale": 1.0}),
    "sce": ({"select_topk": 0.5, "int8_mask": False}, {}),
    "nearswap": ({"t": 0.05}, {}),
    "arcee_fusion": ({}, {}),
    "ram": ({"epsilon": 0.05}, {}),
    "ramplus_tl": ({"r": 0.3, "alpha": 0.5, "epsilon": 0.05}, {}),
    "tsv": ({"alpha": 1.0}, {}),
    "iso_c": ({"alpha": 1.2}, {}),
    "iso_cts": ({"common_space_fraction": 0.5, "alpha": 1.2}, {}),
}
# Fewest entries a method keeps from a 10-entry task vector at density 0.01 (int(0.1) == 0).
TINY_DENSITY_KEPT = {
    "task_arithmetic": 10,  # density is unused
    "ties": 1, "dare_linear": 0, "dare_ties": 0,  # magnitude keeps max(1, k); Bernoulli may keep 0
    "breadcrumbs": 0, "breadcrumbs_ties": 0,  # int(density * n) == 0, as mergekit
    "della": 0, "della_linear": 0,
}
METHODS = sorted(REGISTRY)
TENSOR_METHODS = [n for n in METHODS if REGISTRY[n].inputs == "tensors"]
OPTIONAL_BASE = [n for n in METHODS if REGISTRY[n].base == "optional"]
DENSITY_METHODS = [n for n in METHODS if "density" in REGISTRY[n].model_keys()]
SHAPES = {"vector": (7,), "matrix": (5, 6), "transposed": (6, 5)}


def make_inputs(method: MergeMethod, shape: tuple[int, ...], seed: int = 0,
                layout: str = "matrix") -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Inputs as the caller passes them: deltas for delta methods, else tensors (+ base)."""
    g = torch.Generator().manual_seed(seed)
    n = _n_models(method)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    if layout == "transposed":  # strided views, as a caller slicing a checkpoint may pass
        base, xs = base.t(), [x.t() for x in xs]
    if method.inputs == "deltas":
        return [x - base for x in xs], base
    return xs, (None if method.base == "none" else base)


def run(method: MergeMethod, xs, base, *, seed: int = 0, models: list[dict] | None = None,
        params: dict | None = None) -> torch.Tensor:
    glob, per_model = SAMPLES[method.name]
    models = models or [{**per_model, **({"weight": per_model["weight"] * (1 + 0.5 * i)}
                                         if "weight" in per_model else {})} for i in range(len(xs))]
    return method.fn(xs, base, [method.make_model_params(m) for m in models],
                     method.make_params({**glob, **(params or {})}),
                     torch.Generator().manual_seed(seed) if method.random else None)


def _n_models(method: MergeMethod) -> int:
    return min(max(3, method.min_models), method.max_models or 3)


@pytest.fixture(params=METHODS)
def method(request) -> MergeMethod:
    return REGISTRY[request.param]


def test_samples_cover_the_registry_exactly():
    assert set(SAMPLES) == set(REGISTRY)
    for name, (glob, per_model) in SAMPLES.items():
        assert set(glob) == set(REGISTRY[name].global_keys()), name
        assert set(per_model) == set(REGISTRY[name].model_keys()), name
    assert set(TINY_DENSITY_KEPT) == set(DENSITY_METHODS)


def test_spec_is_consistent(method):
    assert method.base in ("required", "optional", "none")
    assert method.inputs in ("tensors", "deltas")
    assert method.inputs == "tensors" or method.base == "required"
    assert 1 <= method.min_models <= (method.max_models or method.min_models)
    for cls in (method.params, method.model_params):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    glob, per_model = SAMPLES[method.name]
    method.make_params({k: glob[k] for k in method.required_global_keys()})  # others have defaults
    method.make_model_params({k: per_model[k] for k in method.required_model_keys()})


def test_params_are_valid_structured_configs(method):
    """The params dataclasses double as Hydra schemas (no Literal or other unsupported types)."""
    omegaconf = pytest.importorskip("omegaconf")
    glob, per_model = SAMPLES[method.name]
    for cls, sample in ((method.params, glob), (method.model_params, per_model)):
        config = omegaconf.OmegaConf.structured(cls)
        fields = {f.name: sample[f.name.rstrip("_")] for f in dataclasses.fields(cls)}
        assert omegaconf.OmegaConf.to_object(omegaconf.OmegaConf.merge(config, fields)) == cls(**fields)


@pytest.mark.parametrize("layout", SHAPES)
def test_shape_and_dtype(method, layout):
    xs, base = make_inputs(method, SHAPES[layout], layout=layout)
    out = run(method, xs, base)
    assert out.shape == xs[0].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_deterministic_with_a_seeded_generator(method):
    xs, base = make_inputs(method, (16, 12))
    global_rng = torch.get_rng_state()
    first, second = run(method, xs, base, seed=3), run(method, xs, base, seed=3)
    assert torch.equal(torch.get_rng_state(), global_rng)  # the global RNG is never drawn from
    assert first.numpy().tobytes() == second.numpy().tobytes()
    if method.random:
        assert not torch.equal(first, run(method, xs, base, seed=4))


def test_random_methods_refuse_the_global_rng(method):
    xs, base = make_inputs(method, (4, 4))
    glob, per_model = SAMPLES[method.name]
    models = [method.make_model_params(per_model) for _ in xs]
    if method.random:
        with pytest.raises(ValueError, match="torch.Generator"):
            method.fn(xs, base, models, method.make_params(glob), None)
    else:  # deterministic methods need no generator and ignore the global RNG
        torch.manual_seed(0)
        first = method.fn(xs, base, models, method.make_params(glob), None)
        torch.manual_seed(1)
        assert torch.equal(first, method.fn(xs, base, models, method.make_params(glob), None))


def test_inputs_untouched_and_output_new(method):
    xs, base = make_inputs(method, (6, 5))
    before = [x.clone() for x in xs] + ([base.clone()] if base is not None else [])
    out = run(method, xs, base)
    after = list(xs) + ([base] if base is not None else [])
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    assert all(out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in after)


@pytest.mark.parametrize("shape", [(7,), (5, 6)])
def test_zero_task_vectors(method, shape):
    """All models equal the base (or are zero): finite, and the base (zero delta) comes back."""
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    n = _n_models(method)
    if method.inputs == "deltas":
        out = run(method, [torch.zeros(shape)] * n, base)
        assert torch.equal(out, torch.zeros(shape))
    elif method.base == "none":
        out = run(method, [torch.zeros(shape)] * n, None)
        assert torch.equal(out, torch.zeros(shape))
    else:
        out = run(method, [base.clone() for _ in range(n)], base)
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TENSOR_METHODS)  # delta methods: see test_zero_task_vectors
def test_identical_models_give_that_model(name):
    method = REGISTRY[name]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    n = _n_models(method)
    out = run(method, [x.clone() for _ in range(n)], None if method.base == "none" else x.clone())
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIONAL_BASE)
def test_optional_base_may_be_absent(name):
    method = REGISTRY[name]
    xs, _ = make_inputs(method, (5, 6))
    out = run(method, xs, None)
    assert out.shape == (5, 6) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", DENSITY_METHODS)
def test_density_one_keeps_the_whole_task_vector(name):
    method = REGISTRY[name]
    delta = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    models = [{**SAMPLES[method.name][1], "weight": 1.0, "density": 1.0}]
    out = run(method, [delta], delta, models=models, params={"normalize": False, "lambda": 1.0})
    assert torch.equal(out, delta)


@pytest.mark.parametrize("name", DENSITY_METHODS)
def test_tiny_density(name):
    method = REGISTRY[name]
    delta = torch.arange(1.0, 11.0)  # (10,)
    per_model = {**SAMPLES[method.name][1], "weight": 1.0, "density": 0.01}
    if "epsilon" in per_model:
        per_model["epsilon"] = 0.005
    outs = [run(method, [delta], delta, models=[per_model], seed=s) for s in range(5)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert min(int(torch.count_nonzero(o)) for o in outs) == TINY_DENSITY_KEPT[method.name]
    if method.name == "ties":
        assert torch.equal(outs[0], torch.tensor([0.0] * 9 + [10.0]))


def test_model_count_limits_are_declared():
    assert (REGISTRY["slerp"].min_models, REGISTRY["slerp"].max_models) == (1, 1)
    assert (REGISTRY["nuslerp"].min_models, REGISTRY["nuslerp"].max_models) == (2, 2)
    assert REGISTRY["model_stock"].min_models == 2
    assert REGISTRY["passthrough"].max_models == 1
    for name in ("nearswap", "arcee_fusion"):  # mergekit: the base and exactly one other model
        assert (REGISTRY[name].min_models, REGISTRY[name].max_models) == (1, 1)
        assert REGISTRY[name].base == "required"


def test_unknown_method_is_a_user_error_with_suggestions():
    with pytest.raises(UserError, match=r"unknown merge method 'tie'.*'ties'.*valid: linear"):
        get_method("tie")
    assert get_method("ties") is REGISTRY["ties"]


@pytest.mark.parametrize(("name", "where", "values", "message"), [
    ("ties", "model", {"weight": 1.0, "density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
    ("ties", "model", {"weight": 1.0, "density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    ("ties", "model", {"weight": float("nan")}, "weight must be a finite number"),
    ("ties", "model", {"density": 0.5}, "weight"),
    ("della", "model", {"weight": 1.0, "density": 0.9, "epsilon": 0.15},
     r"density - epsilon and density \+ epsilon must be in \(0, 1\)"),
    ("breadcrumbs", "model", {"weight": 1.0, "gamma": -0.1}, r"gamma must be in \[0, 1\]"),
    ("slerp", "global", {"t": 1.5}, r"t must be in \[0, 1\], got 1.5"),
    ("ties", "global", {"sign_method": "count"}, "sign_method must be one of 'weighted_sum', 'sum'"),
    ("dare_ties", "global", {"rescale_mode": "l2"}, "rescale_mode must be one of 'l1', 'density'"),
    ("linear", "global", {"normalize": "yes"}, "normalize must be true or false, got 'yes'"),
    ("karcher", "global", {"max_iter": 2.5}, "max_iter must be an integer"),
    ("ties", "global", {"lambda": "x"}, "lambda must be a number"),
    ("sce", "global", {"select_topk": 1.5}, r"select_topk must be in \[0, 1\], got 1.5"),
    ("nearswap", "global", {"t": -0.1}, r"t must be in \[0, inf\], got -0.1"),
    ("nearswap", "global", {}, "t"),
    ("ram", "global", {"epsilon": -1e-5}, r"epsilon must be in \[0, inf\]"),
    ("ramplus_tl", "global", {"alpha": -0.2}, r"alpha must be in \[0, inf\], got -0.2"),
    ("tsv", "global", {"alpha": float("inf")}, "alpha must be a finite number"),
    ("iso_cts", "global", {"common_space_fraction": 1.2},
     r"common_space_fraction must be in \[0, 1\], got 1.2"),
])
def test_parameter_errors_state_rule_and_value(name, where, values, message):
    method = REGISTRY[name]
    make = method.make_model_params if where == "model" else method.make_params
    with pytest.raises((ValueError, TypeError), match=message):
        make(values)


def test_lambda_key_maps_to_field():
    params = REGISTRY["ties"].make_params({"lambda": 0.5})
    assert params.lambda_ == 0.5 and "lambda" in REGISTRY["ties"].global_keys()


# -- declared capabilities: what the engine and the sweep read instead of method names --------------
@pytest.mark.parametrize("name", METHODS)
def test_declared_keywords_are_accepted_and_no_more(name):
    import inspect

    method = REGISTRY[name]
    for fn in (method.fn, method.fused):
        if fn is None:
            continue
        accepted = {k for k in ("out", "workspace") if k in inspect.signature(fn).parameters}
        assert accepted == set(method.keywords), name


@pytest.mark.parametrize("name", [n for n in METHODS if REGISTRY[n].fused is not None])
def test_fused_variant_equals_fn_on_task_vectors_plus_base(name):
    method = get_method(name)
    deltas, base = make_inputs(method, (6, 5), seed=3)
    glob, per_model = SAMPLES[name]
    models = [method.make_model_params({**per_model, "weight": 0.3 + 0.2 * i}) for i in range(len(deltas))]
    params = method.make_params(glob)

    def gen():
        return torch.Generator().manual_seed(5) if method.random else None

    want = method.fn(deltas, base, models, params, gen()) + base
    got = method.fused([d + base for d in deltas], base, models, params, gen())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_merges_updates_is_declared_consistently(name):
    method = REGISTRY[name]
    assert method.merges_deltas == (method.inputs == "deltas")
    if method.merges_deltas:
        assert method.merges_updates()
    if method.updates == "when_normalized":
        key = method.normalize_key
        assert method.merges_updates(method.make_params({key: True}))
        assert not method.merges_updates(method.make_params({key: False}))
    if method.normalize_key is not None:
        assert method.normalize_key in method.global_keys()
