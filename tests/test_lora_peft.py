"""PEFT-compatible mode equals PEFT's ``add_weighted_adapter`` for every combination type.

PEFT draws DARE masks from torch's global RNG after creating the new adapter's layers (which
draw too). We align without PEFT internals: a probe call with a non-random type of the same new
rank and targets, from the same seed, tells the RNG state at which PEFT's merge starts.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.lora import (
    load_adapter,
    model_layout,
    peft_weighted_adapter,
    save_adapter,
    weighted_sum_deltas,
)
from tests.test_lora import (
    ATOL,
    assert_deltas_close,
    load_base,
    logits,
    peft_deltas,
    peft_model,
)

CASES = [
    # (combination type, adapters, weights, keyword arguments)
    ("linear", ["ad1", "ad2"], [0.7, -0.4], {}),
    ("linear", ["ad1", "ad2"], [1.0, 1.0], {}),
    ("ties", ["ad1", "ad2"], [0.7, -0.4], {"density": 0.5}),
    ("ties", ["ad1", "ad2"], [1.0, 0.6], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["ad1", "ad2"], [0.7, -0.4], {"density": 0.5}),
    ("dare_linear", ["ad1", "ad2"], [0.7, -0.4], {"density": 0.6}),
    ("dare_ties", ["ad1", "ad2"], [0.7, 0.9], {"density": 0.6}),
    ("cat", ["ad1", "ad3"], [0.6, -1.1], {}),
    ("cat", ["ad3", "ad1"], [0.6, -1.1], {}),  # rslora first: PEFT scales the result by sqrt(12)
    ("svd", ["ad1", "ad3"], [0.6, -1.1], {}),
    ("svd", ["ad3", "ad1", "ad2"], [0.6, -1.1, 0.5], {"svd_rank": 3, "svd_clamp": 0.95}),
    ("ties_svd", ["ad1", "ad3"], [0.6, 1.1], {"density": 0.5}),
    ("dare_linear_svd", ["ad1", "ad3"], [0.6, 1.1], {"density": 0.5}),
    ("dare_ties_svd", ["ad1", "ad2"], [0.6, 1.1], {"density": 0.5}),
    ("magnitude_prune_svd", ["ad1", "ad3"], [0.6, 1.1], {"density": 0.5, "svd_full_matrices": False}),
    ("ties", ["ad1"], [0.5], {"density": 0.5}),  # one adapter: PEFT forces linear
    # same rank_pattern: rank 2 on one module, under a result config that says r = 4
    ("linear", ["ad4", "ad5"], [0.7, 0.5], {}),
    ("magnitude_prune", ["ad4", "ad5"], [0.7, 0.5], {"density": 0.3}),
    ("cat", ["ad4", "ad5"], [0.7, 0.5], {}),
]
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
PROBE = {"dare_linear": "linear", "dare_ties": "linear"}  # else "svd": same rank and targets


def peft_merge(zoo, names, weights, kind, kwargs, seed=0):
    """PEFT's merged adapter 'm' (its model) and the RNG state its merge step started from."""
    state = None
    if kind in RANDOM:
        probe = peft_model(zoo, names)
        torch.manual_seed(seed)
        probe.add_weighted_adapter(names, weights, "m", combination_type=PROBE.get(kind, "svd"),
                                   **{k: v for k, v in kwargs.items() if k.startswith("svd")})
        state = torch.get_rng_state()
    model = peft_model(zoo, names)
    torch.manual_seed(seed)
    model.add_weighted_adapter(names, weights, "m", combination_type=kind, **kwargs)
    return model, state


def ours(zoo, names, weights, kind, kwargs, state):
    generator = None
    if state is not None:
        generator = torch.Generator()
        generator.set_state(state)
    base = load_base(zoo["base"])
    adapters = [load_adapter(zoo[n]).for_base(*model_layout(base)) for n in names]
    return peft_weighted_adapter(adapters, weights, kind, generator=generator,
                                 module_order=[n for n, _ in base.named_modules()], **kwargs)


@pytest.mark.parametrize("kind, names, weights, kwargs", CASES,
                         ids=[f"{c[0]}-{'+'.join(c[1])}-{i}" for i, c in enumerate(CASES)])
def test_peft_compatible_equals_add_weighted_adapter(lora_zoo, kind, names, weights, kwargs):
    from peft.tuners.lora import LoraLayer

    model, state = peft_merge(lora_zoo, names, weights, kind, kwargs)
    combined = ours(lora_zoo, names, weights, kind, kwargs, state)
    assert_deltas_close(combined.deltas(), peft_deltas(model, "m"), atol=1e-5)
    for name, layer in model.named_modules():  # the factors too, where PEFT keeps one layout
        if isinstance(layer, LoraLayer) and "m" in layer.lora_A:
            mod = combined.modules[name.removeprefix("base_model.model.") + ".weight"]
            if not kind.endswith("svd"):  # svd factors are unique only up to signs
                torch.testing.assert_close(mod.a, layer.lora_A["m"].weight, atol=ATOL, rtol=0)
                torch.testing.assert_close(mod.b, layer.lora_B["m"].weight, atol=ATOL, rtol=0)
            assert mod.scaling == layer.scaling["m"]


def test_factorwise_linear_is_not_the_weighted_sum(lora_zoo):
    """PEFT's linear adds cross terms B_i A_j; our exact combination does not."""
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad2")]
    weights = [0.5, 0.5]
    exact = weighted_sum_deltas(adapters, weights)
    peft = peft_weighted_adapter(adapters, weights, "linear").deltas()
    p = "model.layers.0.self_attn.q_proj.weight"  # targeted by both
    rel = torch.linalg.matrix_norm(peft[p] - exact[p]) / torch.linalg.matrix_norm(exact[p])
    assert rel > 0.3
    single = peft_weighted_adapter(adapters[:1], [-0.7], "linear").deltas()  # no cross terms
    assert_deltas_close(single, weighted_sum_deltas(adapters[:1], [-0.7]))


@pytest.mark.parametrize("kind, names, weights", [
    ("cat", ["ad3", "ad1"], [0.6, -1.1]),  # rslora quirk carried into the config
    ("linear", ["ad4", "ad5"], [0.7, 0.5]),  # rank-2 module: patterns added so that it loads
])
def test_peft_compatible_result_saves_and_loads_like_peft_model(lora_zoo, tmp_path, kind, names,
                                                                 weights):
    from peft import PeftModel

    model, _ = peft_merge(lora_zoo, names, weights, kind, {})
    model.set_adapter("m")
    out = save_adapter(ours(lora_zoo, names, weights, kind, {}, None), tmp_path / "m")
    loaded = PeftModel.from_pretrained(load_base(lora_zoo["base"]), out).eval()
    ids = torch.tensor([[4, 6, 8, 10, 2]])
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids), atol=1e-5, rtol=1e-5)


def test_peft_compatible_argument_errors(lora_zoo):
    a, c, d = (load_adapter(lora_zoo[n]) for n in ("ad1", "ad3", "ad4"))
    with pytest.raises(UserError, match="equal r"):
        peft_weighted_adapter([a, c], [1, 1], "linear")
    with pytest.raises(UserError, match="density"):
        peft_weighted_adapter([a, c], [1, 1], "ties_svd")
    with pytest.raises(UserError, match="unknown PEFT combination"):
        peft_weighted_adapter([a, c], [1, 1], "mean")
    with pytest.raises(UserError, match="ranks"):  # ad4's rank_pattern: rank 2 on one module
        peft_weighted_adapter([a, d], [1, 1], "linear")
