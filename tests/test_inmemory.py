"""In-memory merging into a resident model: equal to the on-disk merge, in place, cached."""

from __future__ import annotations

import pytest
import torch

from orchestrator import engine
from orchestrator.engine import InMemoryMerger, merge_to_disk
from orchestrator.errors import UserError
from orchestrator.engine.recipe import Recipe
from tests.test_mergekit_agreement import RECIPES, extended_copy
from tests.tiny import make_tiny_family


@pytest.fixture(scope="module")
def family(tiny_family, tmp_path_factory):
    """The tiny family plus ft_ext (ft_b with two extra tokens)."""
    return {**tiny_family, "ft_ext": extended_copy(tiny_family["ft_b"],
                                                   tmp_path_factory.mktemp("ext") / "ft_ext")}


def _resident(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _identity(model) -> dict[str, tuple[int, int]]:
    return {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _layers(case: str) -> bool:
    return "slices" not in case or case == "slerp_slices_gradient_filters"


@pytest.mark.parametrize("case", [c for c in RECIPES if _layers(c)])
def test_in_memory_equals_disk_bit_for_bit(case, family, tmp_path):
    recipe = Recipe.from_dict(RECIPES[case][1](family))
    # The resident model has the output's architecture (a grown vocabulary for ft_ext's).
    model = _resident(family["ft_ext" if recipe.tokenizer_source else "base"])
    before = _identity(model)
    merger = InMemoryMerger(recipe, model, seed=5)
    stats = merger.merge_into()
    assert stats.tensors == len(before)
    assert _identity(model) == before  # same Parameter objects, same storage
    out = merge_to_disk(recipe, tmp_path / "out", seed=5).out_dir
    fresh = _resident(out)
    if recipe.out_dtype or recipe.dtype:  # compare at the recipe's output precision
        fresh = fresh.to(model.dtype)
    _assert_same_state(model, fresh)


def test_repeated_merges_reuse_the_cache(tiny_family, monkeypatch):
    build = RECIPES["ties"][1]
    recipe = Recipe.from_dict(build(tiny_family))
    model = _resident(tiny_family["base"])
    merger = InMemoryMerger(recipe, model)
    merger.merge_into()
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    cached = merger.cache_bytes()
    assert cached > 0
    reads = []
    monkeypatch.setattr(engine.CachedReader, "_read", lambda *a: reads.append(a))
    merger.merge_into(recipe)  # same recipe again: identical, nothing read or subtracted
    assert reads == [] and merger.cache_bytes() == cached
    assert all(torch.equal(first[n], p) for n, p in model.named_parameters())
    other = recipe.with_parameters({"lambda": 0.5}, {str(tiny_family["ft_a"]): {"density": 0.9}})
    merger.merge_into(other)
    assert reads == []
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"],
                           model.model.layers[0].mlp.up_proj.weight)


def test_methods_leave_cached_inputs_untouched(tiny_family):
    """A method that wrote into its inputs would corrupt the cache: merge twice, compare."""
    model = _resident(tiny_family["base"])
    for case in [c for c in RECIPES if _layers(c) and "tokenizer" not in c]:
        recipe = Recipe.from_dict(RECIPES[case][1](tiny_family))
        merger = InMemoryMerger(recipe, model, seed=1)
        merger.merge_into()
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
        merger.merge_into()
        assert all(torch.equal(first[n], p) for n, p in model.named_parameters()), case


def test_tied_embeddings_written_once_and_stay_tied(tmp_path):
    family = make_tiny_family(tmp_path / "tied", tie=True)
    recipe = Recipe.from_dict(RECIPES["task_arithmetic"][1](family))
    model = _resident(family["base"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    InMemoryMerger(recipe, model).merge_into()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = _resident(merge_to_disk(recipe, tmp_path / "out").out_dir)
    _assert_same_state(model, fresh)


def test_accepts_recipe_dicts_and_checks_the_model_set(tiny_family, tmp_path):
    build = RECIPES["linear"][1]
    model = _resident(tiny_family["base"])
    merger = InMemoryMerger(build(tiny_family), model)
    merger.merge_into(build(tiny_family))
    outsider = build(tiny_family)
    outsider["models"][0]["model"] = str(tiny_family["base"])
    with pytest.raises(UserError, match="outside this merger's set"):
        merger.merge_into(outsider)
    bad = build(tiny_family)
    bad["models"][0]["parameters"] = {"weight": "heavy"}
    with pytest.raises(UserError, match="weight"):
        merger.merge_into(bad)


def test_resident_architecture_must_match(tiny_family):
    recipe = RECIPES["passthrough_slices"][1](tiny_family)  # 4 layers out, the model has 2
    merger = InMemoryMerger(recipe, _resident(tiny_family["base"]))
    with pytest.raises(UserError, match="no parameter model.layers.2"):
        merger.merge_into()


def test_cuda_requested_without_cuda(tiny_family):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match="cuda.*not available"):
        InMemoryMerger(RECIPES["linear"][1](tiny_family), device="cuda")


# the NaN check after every trial's merge -----------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "both infinities"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_finds_one_bad_entry(bad, dtype):
    from orchestrator.engine import all_finite

    good = torch.randn(300, 7).to(dtype)
    t = torch.randn(1000).to(dtype)
    if bad == "both infinities":  # their sum is NaN
        t[10], t[900] = float("inf"), float("-inf")
    else:
        t[537] = bad
    assert all_finite([good, good.clone()])
    assert not all_finite([good, t])
    assert not all_finite([torch.nn.Parameter(t)])  # as a model's parameters come


def test_all_finite_is_not_fooled_by_a_sum_that_overflows():
    from orchestrator.engine import all_finite

    big = torch.full((4,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)  # sums to inf
    assert all_finite([big, torch.full((3,), 3e38), torch.empty(0), torch.arange(5)])
    big[2] = float("nan")
    assert not all_finite([big])
