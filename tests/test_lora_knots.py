"""KnOTS (orchestrator.lora.knots): merging LoRA updates in their shared SVD basis."""

from __future__ import annotations

import pytest
import torch

from orchestrator.errors import UserError
from orchestrator.lora.knots import knots_basis, knots_merge
from orchestrator.merge import get_method



def factors(out: int, inp: int, ranks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(out, r, generator=g) for r in ranks]
    as_ = [torch.randn(r, inp, generator=g) for r in ranks]
    return bs, as_, [0.5 + 0.25 * i for i in range(len(ranks))]


def updates(bs, as_, scalings):
    return [s * b.double() @ a.double() for b, a, s in zip(bs, as_, scalings)]


def test_basis_reconstructs_every_update():
    bs, as_, scalings = factors(12, 9, [3, 2, 4], seed=1)
    u, s, vhs = knots_basis(bs, as_, scalings)
    assert u.shape == (12, 9) and s.shape == (9,) and all(v.shape == (9, 9) for v in vhs)
    torch.testing.assert_close(u.T @ u, torch.eye(9, dtype=torch.float64))
    for delta, vh in zip(updates(bs, as_, scalings), vhs):
        torch.testing.assert_close(u @ torch.diag(s) @ vh, delta)
    # The basis is the SVD of the concatenation [Delta_1 ... Delta_T] (out, T in).
    cat = torch.cat(updates(bs, as_, scalings), dim=1)
    torch.testing.assert_close(s, torch.linalg.svdvals(cat)[:9])


@pytest.mark.parametrize(("method", "params", "models"), [
    ("task_arithmetic", {"lambda": 0.8}, [{"weight": 0.7}, {"weight": -0.4}, {"weight": 1.2}]),
    ("linear", {"normalize": True}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]),
])
@pytest.mark.parametrize("scale_coefficients", [True, False])
def test_linear_combinations_equal_the_weighted_sum_of_the_updates(method, params, models,
                                                                   scale_coefficients):
    bs, as_, scalings = factors(10, 7, [2, 4, 3], seed=2)
    got = knots_merge(bs, as_, scalings, get_method(method), models, params,
                      scale_coefficients=scale_coefficients)
    weights = [m["weight"] for m in models]
    scale = params.get("lambda", 1.0) / (sum(weights) if params.get("normalize") else 1.0)
    want = scale * sum(w * d for w, d in zip(weights, updates(bs, as_, scalings)))
    assert got.dtype == torch.float32 and got.shape == (10, 7)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


# Two rank-1 updates of a 2 x 1 weight: Delta_1 = (3, 1), Delta_2 = (1, 3); weights 1 and 2.
# Raw entries all agree in sign, so TIES on the raw updates is their weighted mean:
#   ((1*3 + 2*1)/3, (1*1 + 2*3)/3) = (5/3, 7/3).
# The concatenation [[3, 1], [1, 3]] has singular vectors (1, 1)/sqrt2 (sigma 4) and
# (1, -1)/sqrt2 (sigma 2). In that basis the coefficients are S V_i^T = U^T Delta_i:
#   task 1: (4/sqrt2, 2/sqrt2), task 2: (4/sqrt2, -2/sqrt2).
# They disagree on the second direction, a conflict no raw entry shows: TIES elects the sign of
# 1*(2/sqrt2) + 2*(-2/sqrt2) < 0, keeps task 2's coefficient there, and averages the first:
#   merged = (2 sqrt2, -sqrt2) -> U merged = (2, 2) + (-1, 1) = (1, 3).
TIES_MODELS = [{"weight": 1.0, "density": 1.0}, {"weight": 2.0, "density": 1.0}]


def test_ties_in_the_shared_basis_sees_conflicts_the_raw_entries_hide():
    bs, as_ = [torch.tensor([[3.0], [1.0]]), torch.tensor([[1.0], [3.0]])], [torch.ones(1, 1)] * 2
    ties = get_method("ties")
    got = knots_merge(bs, as_, [1.0, 1.0], ties, TIES_MODELS)
    torch.testing.assert_close(got, torch.tensor([[1.0], [3.0]]))
    raw = ties.fn([b @ a for b, a in zip(bs, as_)], None, [ties.make_model_params(m)
                                                         for m in TIES_MODELS],
                  ties.make_params({}), None)
    torch.testing.assert_close(raw, torch.tensor([[5 / 3], [7 / 3]]))
    # Without the conflict (equal directions) both agree with the weighted mean.
    same = knots_merge([bs[0], bs[0]], as_, [1.0, 1.0], ties, TIES_MODELS)
    torch.testing.assert_close(same, torch.tensor([[3.0], [1.0]]))


def test_random_methods_draw_from_the_generator_and_names_are_accepted():
    bs, as_, scalings = factors(8, 6, [2, 2], seed=3)
    models = [{"weight": 1.0, "density": 0.5}] * 2

    def run(seed):
        return knots_merge(bs, as_, scalings, "dare_ties", models,
                           generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_zero_updates_merge_to_zero():
    bs = [torch.zeros(4, 2), torch.zeros(4, 3)]
    as_ = [torch.randn(2, 5), torch.randn(3, 5)]
    out = knots_merge(bs, as_, [1.0, 2.0], "ties", [{"weight": 1.0}] * 2)
    assert torch.equal(out, torch.zeros(4, 5))


@pytest.mark.parametrize(("call", "message"), [
    (lambda bs, as_: knots_merge(bs, as_, [1.0, 1.0], "slerp", [{}, {}], {"t": 0.5}),
     "does not merge updates"),
    (lambda bs, as_: knots_merge(bs, as_, [1.0, 1.0], "linear", [{"weight": 1.0}] * 2,
                                 {"normalize": False}), "does not merge updates"),
    (lambda bs, as_: knots_merge(bs, as_, [1.0], "ties", [{"weight": 1.0}] * 2),
     "one B, A and scaling per adapter"),
    (lambda bs, as_: knots_merge(bs, [as_[0], as_[1][:, :3]], [1.0, 1.0], "ties",
                                 [{"weight": 1.0}] * 2), "adapter 1 updates a"),
    (lambda bs, as_: knots_merge(bs, as_, [1.0, 1.0], "ties", [{"weight": 1.0}]),
     "2 adapters but 1 sets"),
    (lambda bs, as_: knots_merge(bs, as_, [1.0, 1.0], "ties", [{"weight": 1.0, "density": 2}] * 2),
     r"density must be in \(0, 1\]"),
])
def test_refusals_are_user_errors(call, message):
    bs, as_, _ = factors(6, 4, [2, 2])
    with pytest.raises(UserError, match=message):
        call(bs, as_)


def test_merge_adapter_with_knots_writes_the_knots_merge(lora_zoo, tmp_path):
    """``merge --adapter`` with ``knots: true``: the combined adapter's update is the KnOTS merge."""
    import yaml

    from orchestrator.cli import main
    from orchestrator.lora import load_adapter
    from orchestrator.lora.combine import knots_deltas

    recipe = {"merge_method": "ties", "base_model": str(lora_zoo["base"]),
              "models": [{"model": str(lora_zoo[n]), "parameters": {"weight": w, "density": 0.5}}
                         for n, w in (("ad1", 1.0), ("ad3", 0.7))],
              "parameters": {"knots": True}}
    path = tmp_path / "knots.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out"), "--adapter", "--quiet"]) == 0
    written = load_adapter(tmp_path / "out")
    adapters = [load_adapter(lora_zoo[n]) for n in ("ad1", "ad3")]
    want = knots_deltas(adapters, "ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.5}])
    got = written.deltas()
    assert set(got) == set(want)
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=1e-4)
    plain = knots_deltas(adapters, "task_arithmetic", [{"weight": 1.0}, {"weight": 0.7}])
    assert any(not torch.allclose(plain[n], want[n], atol=1e-6) for n in want)  # ties acted in the shared basis


def test_knots_refuses_combinations_it_does_not_apply_to(lora_zoo, tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    recipe = {"merge_method": "cat", "base_model": str(lora_zoo["base"]),
              "models": [{"model": str(lora_zoo["ad1"]), "parameters": {"weight": 1.0}}], "parameters": {"knots": True}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out"), "--adapter"]) == 2
    assert "does not apply to cat" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_of_a_knots_recipe_bakes_the_knots_update_into_the_base(lora_zoo, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from orchestrator.cli import main
    from orchestrator.lora import load_adapter
    from orchestrator.lora.combine import knots_deltas

    recipe = {"merge_method": "ties", "base_model": str(lora_zoo["base"]), "parameters": {"knots": True},
              "models": [{"model": str(lora_zoo[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in ("ad1", "ad3")]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "model"), "--quiet"]) == 0
    merged, base = load_file(tmp_path / "model" / "model.safetensors"), load_file(lora_zoo["base"] / "model.safetensors")
    want = knots_deltas([load_adapter(lora_zoo[n]) for n in ("ad1", "ad3")], "ties",
                        [{"weight": 1.0, "density": 0.5}] * 2)
    for name, tensor in base.items():
        expected = tensor.float() + want[name] if name in want else tensor.float()
        torch.testing.assert_close(merged[name].float(), expected, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "model" / "knots_recipe.yml").is_file()
