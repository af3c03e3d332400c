"""LoRA adapters: loading, baking, exact merging, saving, sweeps; equivalence with real PEFT.

Adapters are made with PEFT's public API on a tiny Llama, with random A and B (PEFT's default
B = 0 would make every update zero), of different ranks and alphas, one with rslora, one with
rank_pattern/alpha_pattern, one targeting the embedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.lora import (
    AdapterMerger,
    bake,
    cat_adapters,
    combine_adapters,
    load_adapter,
    merge_deltas,
    model_layout,
    save_adapter,
    weighted_sum_deltas,
)
from orchestrator.lora.adapter import natural_key, pattern_value
from tests.tiny import ADAPTERS, load_base, make_adapter

ATOL = 1e-6  # float32 rounding on updates of size ~0.1-1
pytestmark = [pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to")]

def peft_model(zoo: dict[str, Path], names: list[str]):
    """A PeftModel with the named adapters loaded under their names."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(zoo["base"]), zoo[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(zoo[name], adapter_name=name)
    return model


def peft_deltas(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """{base parameter name: PEFT's get_delta_weight} for one adapter of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            out[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight(adapter_name)
    return out


def base_state(zoo) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_base(zoo["base"]).state_dict().items()}


def assert_deltas_close(ours: dict, theirs: dict, atol: float = ATOL) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].float(), atol=atol, rtol=0, msg=name)


# Loading ---------------------------------------------------------------------------------------

def test_load_maps_names_ranks_and_scalings_like_peft(lora_zoo):
    model = peft_model(lora_zoo, list(ADAPTERS))
    from peft.tuners.lora import LoraLayer

    for name in ADAPTERS:
        adapter = load_adapter(lora_zoo[name])
        theirs = {n.removeprefix("base_model.model.") + ".weight": (m.r[name], m.scaling[name])
                  for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.r}
        ours = {p: (m.rank, m.scaling) for p, m in adapter.modules.items()}
        assert ours == theirs, name
    d = load_adapter(lora_zoo["ad4"]).modules
    assert d["model.layers.1.self_attn.q_proj.weight"].rank == 2
    assert d["model.layers.0.self_attn.v_proj.weight"].scaling == 3 / 4
    assert load_adapter(lora_zoo["ad3"]).modules["model.layers.0.mlp.up_proj.weight"].scaling == 8 / 8 ** 0.5


def test_pattern_matching_and_order_follow_peft():
    assert pattern_value({"q_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value({"layers.1.self_attn.q_proj": 2}, "model.layers.11.self_attn.q_proj", 8) == 8
    assert pattern_value({r"layers\.[01]\..*q_proj": 2}, "model.layers.1.self_attn.q_proj", 8) == 2
    assert pattern_value({"proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8  # suffix at a dot
    names = ["model.layers.10.a.weight", "model.layers.2.a.weight", "lm_head.weight"]
    assert sorted(names, key=natural_key) == ["lm_head.weight", "model.layers.2.a.weight",
                                              "model.layers.10.a.weight"]


# Baking ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ADAPTERS))
def test_bake_equals_merge_and_unload(lora_zoo, name):
    merged = peft_model(lora_zoo, [name]).merge_and_unload().state_dict()
    state = base_state(lora_zoo)
    bake(state, load_adapter(lora_zoo[name]).deltas())
    assert sorted(state) == sorted(merged)
    for key in state:
        assert torch.equal(state[key], merged[key]), key  # same float32 ops: bit for bit


def test_bake_into_a_module_and_a_weight(lora_zoo):
    adapter = load_adapter(lora_zoo["ad1"])
    model, state = load_base(lora_zoo["base"]), base_state(lora_zoo)
    bake(model, adapter.deltas(), weight=0.5)
    bake(state, adapter.deltas(), weight=0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    p = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(state[p] - base_state(lora_zoo)[p], 0.5 * adapter.delta(p), atol=ATOL, rtol=0)


def test_bake_bf16_rounds_once(lora_zoo):
    adapter = load_adapter(lora_zoo["ad1"])
    state = {k: v.to(torch.bfloat16) for k, v in base_state(lora_zoo).items()}
    p = "model.layers.0.self_attn.q_proj.weight"
    expected = (state[p].float() + adapter.delta(p)).to(torch.bfloat16)
    bake(state, adapter.deltas())
    assert state[p].dtype == torch.bfloat16 and torch.equal(state[p], expected)


# Exact merging ---------------------------------------------------------------------------------

def baked_updates(zoo, name) -> dict[str, torch.Tensor]:
    """PEFT-baked model minus base, on the parameters the adapter changes."""
    merged = peft_model(zoo, [name]).merge_and_unload().state_dict()
    base = base_state(zoo)
    return {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}


def test_exact_linear_is_the_weighted_sum_of_baked_updates(lora_zoo):
    names, weights = ["ad1", "ad2", "ad3"], [0.7, -0.4, 1.3]
    adapters = [load_adapter(lora_zoo[n]) for n in names]
    expected: dict[str, torch.Tensor] = {}
    for n, w in zip(names, weights):
        for k, d in baked_updates(lora_zoo, n).items():
            expected[k] = expected.get(k, torch.zeros_like(d)) + w * d
    params = [{"weight": w} for w in weights]
    ta = merge_deltas(adapters, "task_arithmetic", params)
    assert_deltas_close(ta, expected, atol=1e-5)  # baked updates carry base-magnitude rounding
    assert_deltas_close(merge_deltas(adapters, "linear", params, {"normalize": False}), ta)
    assert_deltas_close(weighted_sum_deltas(adapters, weights), ta)
    normalized = merge_deltas(adapters, "linear", params)
    assert_deltas_close(normalized, {k: v / sum(weights) for k, v in ta.items()})


def test_engine_methods_merge_updates_over_the_union(lora_zoo):
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    ties = merge_deltas(adapters, "ties", params)
    assert set(ties) == set(adapters[0].modules) | set(adapters[1].modules)
    only_a = "model.layers.0.mlp.gate_proj.weight"
    assert torch.count_nonzero(ties[only_a]) <= ties[only_a].numel() // 2 + 1
    d1 = merge_deltas(adapters, "dare_linear", params, seed=3)
    d2 = merge_deltas(adapters, "dare_linear", params, seed=3)
    d3 = merge_deltas(adapters, "dare_linear", params, seed=4)
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert any(not torch.equal(d1[k], d3[k]) for k in d1)


@pytest.mark.parametrize("method, needle", [("slerp", "full tensors"), ("tiez", "tiez"),
                                             ("model_stock", "full tensors")])
def test_methods_on_full_tensors_are_refused(lora_zoo, method, needle):
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    with pytest.raises(UserError, match=needle):
        merge_deltas(adapters, method, [{}, {}])


def test_bad_parameters_name_adapter_and_method(lora_zoo):
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    with pytest.raises(UserError, match=r"adapter .*ad2 in method ties: density"):
        merge_deltas(adapters, "ties", [{"weight": 1.0}, {"weight": 1.0, "density": 1.5}])
    with pytest.raises(UserError, match="2 adapters but 1"):
        merge_deltas(adapters, "ties", [{"weight": 1.0}])


# Combined adapters -----------------------------------------------------------------------------

def test_cat_is_exact_and_equals_peft_cat(lora_zoo):
    names, weights = ["ad1", "ad3"], [0.6, -1.1]  # ad3 has rank 8 and rslora: ranks 4 + 8
    adapters = [load_adapter(lora_zoo[n]) for n in names]
    cat = cat_adapters(adapters, weights)
    assert_deltas_close(cat.deltas(), weighted_sum_deltas(adapters, weights))
    assert cat.modules["model.layers.0.self_attn.q_proj.weight"].rank == 12
    assert cat.modules["model.layers.0.mlp.gate_proj.weight"].rank == 4  # only ad1 targets it
    model = peft_model(lora_zoo, names)
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    assert_deltas_close(cat.deltas(), peft_deltas(model, "cat"))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method, params, rank", [
    ("cat", [{"weight": 0.6}, {"weight": 0.8}, {"weight": -0.5}], None),
    ("svd", [{"weight": 0.6}, {"weight": 0.8}, {"weight": -0.5}], 3),
    ("ties", [{"weight": 0.6, "density": 0.5}] * 3, 6),
])
def test_saved_combined_adapter_loads_in_peft_and_matches_the_baked_model(lora_zoo, tmp_path, method,
                                                                         params, rank):
    from peft import PeftModel

    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2", "ad4")]
    combined = combine_adapters(adapters, method, params, rank=rank)
    out = save_adapter(combined, tmp_path / "combined")
    assert load_adapter(out).deltas().keys() == combined.deltas().keys()
    peft = PeftModel.from_pretrained(load_base(lora_zoo["base"]), out).eval()
    baked = load_base(lora_zoo["base"]).eval()
    bake(baked, combined.deltas())
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    torch.testing.assert_close(logits(peft, ids), logits(baked, ids), atol=1e-5, rtol=1e-5)
    if method == "cat":  # exact: the baked model is the weighted sum of the three updates
        exact = load_base(lora_zoo["base"]).eval()
        bake(exact, weighted_sum_deltas(adapters, [0.6, 0.8, -0.5]))
        torch.testing.assert_close(logits(peft, ids), logits(exact, ids), atol=1e-5, rtol=1e-5)


def test_svd_truncation_is_exact_at_full_rank_and_optimal_below(lora_zoo):
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad3")]
    params = [{"weight": 1.0}, {"weight": 0.5}]
    exact = weighted_sum_deltas(adapters, [1.0, 0.5])
    assert_deltas_close(combine_adapters(adapters, "svd", params).deltas(), exact, atol=1e-5)
    low = combine_adapters(adapters, "svd", params, rank=2).deltas()
    p = "model.layers.0.self_attn.q_proj.weight"
    s = torch.linalg.svdvals(exact[p])
    err = torch.linalg.matrix_norm(low[p] - exact[p])
    torch.testing.assert_close(err, s[2:].square().sum().sqrt(), atol=1e-5, rtol=1e-4)


def test_save_refuses_an_existing_folder(lora_zoo, tmp_path):
    adapter = load_adapter(lora_zoo["ad1"])
    save_adapter(adapter, tmp_path / "x")
    with pytest.raises(UserError, match="exists"):
        save_adapter(adapter, tmp_path / "x")
    save_adapter(adapter, tmp_path / "x", overwrite=True)


# Refusals --------------------------------------------------------------------------------------

def test_dora_is_refused_clearly(lora_zoo, tmp_path):
    path = make_adapter(lora_zoo["base"], tmp_path / "dora", seed=9, r=4, use_dora=True,
                        target_modules=["q_proj"])
    with pytest.raises(UserError, match=r"^adapter .*dora uses DoRA \(use_dora\)") as err:
        load_adapter(path)
    assert "\n" not in str(err.value)


def edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize("changes, needle", [
    ({"lora_bias": True}, "LoRA biases"),
    ({"init_lora_weights": "pissa"}, "pissa"),
    ({"init_lora_weights": "loftq"}, "loftq"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"alora_invocation_tokens": [5]}, "aLoRA"),
    ({"r": 8}, "rank 4/4 but its config"),
])
def test_unsupported_variants_are_refused(lora_zoo, tmp_path, changes, needle):
    with pytest.raises(UserError, match=needle):
        load_adapter(edited_copy(lora_zoo["ad1"], tmp_path / "x", **changes))


def test_full_tensors_are_refused(lora_zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    path = edited_copy(lora_zoo["ad1"], tmp_path / "mts", modules_to_save=["lm_head"])
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(23, 16)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"full tensor lm_head.weight \(modules_to_save\)"):
        load_adapter(path)


def test_saved_embedding_base_copy_is_checked(lora_zoo):
    adapter = load_adapter(lora_zoo["ad2"])
    assert list(adapter.base_copies) == ["model.embed_tokens.weight"]
    base = base_state(lora_zoo)
    adapter.check_base_copies(base)
    base["model.embed_tokens.weight"] = torch.zeros(30, 16)
    with pytest.raises(UserError, match="resized vocabulary"):
        adapter.check_base_copies(base)


def test_missing_files_and_wrong_base(lora_zoo, tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(tmp_path)
    adapter = load_adapter(lora_zoo["ad1"])
    shapes, conv1d = model_layout(load_base(lora_zoo["base"]))
    del shapes["model.layers.1.mlp.gate_proj.weight"]
    with pytest.raises(UserError, match="gate_proj.weight, which the base model does not have"):
        adapter.for_base(shapes, conv1d)


# fan_in_fan_out (GPT-2 Conv1D) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=23, n_embd=16, n_layer=1, n_head=2, n_positions=32)
                    ).save_pretrained(out)
    return out


@pytest.mark.parametrize("flag", [True, False])
def test_fan_in_fan_out_conv1d_bakes_like_peft(tiny_gpt2, tmp_path, flag):
    """Conv1D weights are (in, out); PEFT transposes, whatever the config flag says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_adapter(tiny_gpt2, tmp_path / "fifo", seed=5, r=2, lora_alpha=4,
                        fan_in_fan_out=flag, target_modules=["c_attn", "c_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    adapter = load_adapter(path).for_base(*model_layout(model))
    assert all(m.fan_in_fan_out for m in adapter.modules.values())
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), path
                                       ).merge_and_unload().state_dict()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bake(state, adapter.deltas())
    for key in state:
        assert torch.equal(state[key], merged[key]), key


# Adapter sweeps ---------------------------------------------------------------------------------

def test_adapter_merger_rewrites_only_the_targets_and_restores(lora_zoo):
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2", "ad3")]
    model = load_base(lora_zoo["base"])
    base = base_state(lora_zoo)
    merger = AdapterMerger(model, adapters)
    cached = {n: [d.clone() for d in merger.deltas(n)] for n in merger.names}
    params = [{"weight": 0.5, "density": 0.4}, {"weight": 1.0, "density": 0.7}, {"weight": -0.3, "density": 1.0}]
    for method in ("ties", "dare_ties", "della", "task_arithmetic"):
        merger.apply(method, params, seed=1)
        expected = dict(base)
        bake(expected, merge_deltas(adapters, method, params, seed=1))
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), (method, key)
    assert all(torch.equal(a, b) for n in cached for a, b in zip(cached[n], merger.deltas(n)))
    merger.restore()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_adapter_merger_without_cache_and_in_peft_mode(lora_zoo):
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    model = load_base(lora_zoo["base"])
    merger = AdapterMerger(model, adapters, base_state(lora_zoo), cache_deltas=False)
    merger.apply("linear", [{"weight": 2.0}, {"weight": 1.0}], {"normalize": False})
    p = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[p] - base_state(lora_zoo)[p],
                               2 * adapters[0].delta(p) + adapters[1].delta(p), atol=ATOL, rtol=0)
    merger.apply("cat", [{"weight": 2.0}, {"weight": 1.0}], peft_compatible=True)
    torch.testing.assert_close(model.state_dict()[p] - base_state(lora_zoo)[p],
                               2 * adapters[0].delta(p) + adapters[1].delta(p), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", [{"weight": 0.7}, {"weight": -0.4}]),
    ("dare_ties", [{"weight": 0.7, "density": 0.5}, {"weight": 0.9, "density": 0.6}]),
])
def test_adapter_sweep_equals_the_engine_merge_of_baked_models(lora_zoo, tmp_path, method, params):
    """Merging adapters = merging the models they bake into (same seeds, float32 rounding)."""
    from orchestrator.engine import InMemoryMerger

    names = ["ad1", "ad3"]
    for n in names:
        peft_model(lora_zoo, [n]).merge_and_unload().save_pretrained(tmp_path / n)
    recipe = {"merge_method": method, "base_model": str(lora_zoo["base"]), "dtype": "float32",
              "models": [{"model": str(tmp_path / n), "parameters": p} for n, p in zip(names, params)]}
    full = load_base(lora_zoo["base"])
    InMemoryMerger(recipe, full).merge_into(seed=5)
    ours = load_base(lora_zoo["base"])
    AdapterMerger(ours, [load_adapter(lora_zoo[n]) for n in names]).apply(method, params, seed=5)
    for (key, a), b in zip(ours.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=key)


def test_merge_adapters_dispatches_exact_and_peft_modes(lora_zoo):
    from orchestrator.lora import merge_adapters, peft_weighted_adapter

    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    params = [{"weight": 0.7, "density": 0.5}, {"weight": -0.4, "density": 0.5}]
    exact = weighted_sum_deltas(adapters, [0.7, -0.4])
    assert_deltas_close(merge_adapters(adapters, "cat", params), exact)
    ties = merge_adapters(adapters, "ties", params, peft_compatible=True)
    assert_deltas_close(ties, peft_weighted_adapter(adapters, [0.7, -0.4], "ties", density=0.5).deltas())
    combined = combine_adapters(adapters, "magnitude_prune", params, peft_compatible=True)
    assert combined.config["r"] == 4
    with pytest.raises(UserError, match="one density"):
        merge_adapters(adapters, "ties", [{"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.6}],
                       peft_compatible=True)
    with pytest.raises(UserError, match="unknown parameter.*lambda"):
        merge_adapters(adapters, "linear", params, {"lambda": 1.0}, peft_compatible=True)
    model = load_base(lora_zoo["base"])
    AdapterMerger(model, adapters).apply("cat", params)
    p = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[p], base_state(lora_zoo)[p] + exact[p], atol=ATOL, rtol=0)


def test_baked_weights_view_reads_like_the_merged_model(lora_zoo):
    from orchestrator.lora.view import BakedWeights
    from orchestrator.engine.weights import ModelWeights

    merged = peft_model(lora_zoo, ["ad2"]).merge_and_unload().state_dict()
    with BakedWeights(ModelWeights(lora_zoo["base"]), [load_adapter(lora_zoo["ad2"])]) as view:
        assert view.names() == ModelWeights(lora_zoo["base"]).names()
        for name in view.names():
            assert torch.equal(view.get(name), merged[name]), name
        half = view.get("model.embed_tokens.weight", dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16


def test_adapter_merger_subset_leaves_no_stale_update(lora_zoo):
    """A merge of some adapters rewrites every targeted parameter: the others' updates vanish."""
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    model = load_base(lora_zoo["base"])
    merger = AdapterMerger(model, adapters)
    merger.apply("task_arithmetic", [{"weight": 1.0}, {"weight": 1.0}])
    merger.apply("linear", [{"weight": 2.0}], subset=[1])  # normalised: adapter 2 alone
    state, base = model.state_dict(), base_state(lora_zoo)
    only_ad1 = "model.layers.0.self_attn.v_proj.weight"  # ad1 targets v_proj, ad2 does not
    assert only_ad1 in adapters[0].modules and only_ad1 not in adapters[1].modules
    assert torch.equal(state[only_ad1], base[only_ad1])
    for p in adapters[1].modules:
        torch.testing.assert_close(state[p], base[p] + adapters[1].delta(p), atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="distinct adapters among 0..1"):
        merger.apply("linear", [{"weight": 1.0}], subset=[2])
