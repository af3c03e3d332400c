"""Recipe parsing, dumping, parameter resolution (gradients, filters, precedence) and the plan."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator.engine import open_models
from orchestrator.errors import UserError
from orchestrator.engine.plan import build_plan
from orchestrator.engine.validate import check_recipe
from orchestrator.engine.recipe import (
    MISSING,
    Conditional,
    Recipe,
    evaluate_setting,
    evaluate_value,
    load_recipe,
)
from orchestrator.engine.weights import resolve_model_path

GRADIENT_FILTER_YAML = """
models:
  - model: ft_a
    parameters:
      weight: [{filter: self_attn, value: [0.0, 1.0]}, {filter: mlp, value: 0.25}]
  - model: ft_b
    parameters: {weight: 0.5}
base_model: base
merge_method: task_arithmetic
parameters:
  weight: 0.125
  lambda: [1.0, 0.5]
dtype: float32
"""

SLICES_YAML = """
slices:
  - sources:
      - {model: ft_a, layer_range: [0, 2]}
  - sources:
      - {model: ft_b, layer_range: [1, 2]}
merge_method: passthrough
"""


def _recipe(text: str, family) -> Recipe:
    return Recipe.from_yaml(textwrap.dedent(text), source_dir=family["base"].parent)


def _plan(text: str, family):
    recipe = _recipe(text, family)
    return build_plan(recipe, open_models(recipe))


# -- parsing and dumping ---------------------------------------------------------------------
def test_parse_models_recipe(tiny_family):
    r = _recipe(GRADIENT_FILTER_YAML, tiny_family)
    assert r.merge_method == "task_arithmetic" and r.base_model == "base"
    assert [m.model for m in r.models] == ["ft_a", "ft_b"]
    assert r.models[0].parameters["weight"] == (Conditional((0.0, 1.0), "self_attn"),
                                                Conditional(0.25, "mlp"))
    assert r.parameters["lambda"] == (1.0, 0.5)
    assert r.referenced_models() == ["base", "ft_a", "ft_b"]


@pytest.mark.parametrize("text", [GRADIENT_FILTER_YAML, SLICES_YAML, """
slices:
  - sources:
      - {model: a, layer_range: [0, 4], parameters: {t: 0.5}}
      - {model: b, layer_range: [2, 6]}
    parameters: {t: [{filter: mlp, value: [0, 1, 0.5]}, {value: 0.3}]}
    base_model: a
merge_method: slerp
parameters: {t: 0.1, flag: [true, false]}
out_dtype: bfloat16
tokenizer_source: base
"""])
def test_dump_round_trips(text):
    r = Recipe.from_yaml(text)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r and hash(again) == hash(r)
    assert Recipe.from_dict(r.to_dict()) == r


def test_gradients_dump_in_flow_style():
    r = Recipe.from_yaml(GRADIENT_FILTER_YAML)
    assert "lambda: [1.0, 0.5]" in r.to_yaml()


@pytest.mark.parametrize("text,match", [
    ("merge_method: linear", "exactly one of 'models' or 'slices'"),
    ("models: [{model: a}]", "merge_method"),
    ("models: [{model: a}]\nmerge_method: linear\nfoo: 1", "unknown recipe key 'foo'"),
    ("models: [{model: a, weight: 1}]\nmerge_method: linear", "unknown key 'weight'"),
    ("models: [{model: a}]\nmerge_method: linear\ndtype: float8", "dtype must be one of"),
    ("slices: [{sources: [{model: a, layer_range: [3, 1]}]}]\nmerge_method: passthrough",
     r"layer_range \[3, 1\]"),
    ("slices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n"
     "merge_method: linear", "same number of layers"),
    ("models: [{model: a, parameters: {weight: [{filter: x}]}}]\nmerge_method: linear",
     "needs a value"),
    ("models: [{model: 'a+'}]\nmerge_method: linear", "needs both a model and a LoRA adapter"),
    ("models: [a\nmerge_method: linear", "not valid YAML"),
    ("models: [{model: a}]\nmerge_method: linear\nmodules: {}", "'modules'.*not supported"),
])
def test_structural_errors(text, match):
    with pytest.raises(UserError, match=match):
        Recipe.from_yaml(text)


def test_with_parameters_for_the_sweep():
    r = Recipe.from_yaml(GRADIENT_FILTER_YAML)
    r2 = r.with_parameters({"lambda": 0.7}, {"ft_b": {"weight": 0.9}})
    assert r2.parameters["lambda"] == 0.7 and r2.parameters["weight"] == 0.125
    assert r2.models[1].parameters["weight"] == 0.9
    assert r2.models[0] == r.models[0] and r.parameters["lambda"] == (1.0, 0.5)
    r3 = r.with_parameters({"lambda": 0.7}, merge_method="ties", replace=True)
    assert dict(r3.parameters) == {"lambda": 0.7} and r3.merge_method == "ties"
    with pytest.raises(UserError, match="unknown model"):
        r.with_parameters(models={"nope": {"weight": 1}})


# -- setting evaluation ----------------------------------------------------------------------
def test_gradient_interpolation():
    assert evaluate_value((0.0, 1.0), 0.25) == 0.25
    assert evaluate_value((0.0, 1.0, 0.0), 0.75) == pytest.approx(0.5)
    assert evaluate_value((0.0, 1.0, 0.0), 1.0) == 0.0
    assert evaluate_value((2.0,), 0.7) == 2.0
    assert evaluate_value((True, False), 0.4) is True  # bools select, never interpolate
    assert evaluate_value(0.3, 0.9) == 0.3


def test_filters_first_match_wins_and_fall_through():
    rules = (Conditional(1.0, "self_attn"), Conditional(2.0, "attn"), Conditional(3.0))
    assert evaluate_setting(rules, "model.layers.0.self_attn.q_proj.weight", 0) == 1.0
    assert evaluate_setting(rules, "model.layers.0.cross_attn.q", 0) == 2.0
    assert evaluate_setting(rules, "model.layers.0.mlp.up_proj.weight", 0) == 3.0
    assert evaluate_setting(rules[:2], "model.norm.weight", 0) is MISSING
    assert evaluate_setting((Conditional((0.0, 1.0), "*"),), "x", 0.5) == 0.5


# -- static checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    ("models: [{model: a}]\nmerge_method: tiez", r"unknown merge method 'tiez'.*ties.*valid: .*linear"),
    ("models: [{model: a, parameters: {weigth: 1}}]\nmerge_method: linear",
     r"unknown parameter 'weigth' for model 'a' in method 'linear'; valid: weight"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: linear\nparameters: {x: 1}",
     r"unknown parameter 'x' in method 'linear'; valid: weight \(per model\); normalize"),
    ("models: [{model: a}]\nmerge_method: linear", r"missing parameter 'weight' for model 'a'"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: task_arithmetic",
     "method 'task_arithmetic' needs a base_model"),
    ("models: [{model: a, parameters: {weight: 1, density: 1.5}}]\nbase_model: b\n"
     "merge_method: dare_linear", r"density.*1\.5.* for model 'a' in method 'dare_linear'"),
    ("models: [{model: a, parameters: {weight: 1, density: [0.5, 0]}}]\nbase_model: b\n"
     "merge_method: dare_linear", r"density.*0.* for model 'a' in method 'dare_linear'"),
    ("models: [{model: a}, {model: b}]\nbase_model: a\nmerge_method: slerp\n"
     "parameters: {t: [0, 1.5]}", r"t must be in \[0, 1\], got 1.5 in method 'slerp'"),
    ("models: [{model: a}, {model: b}]\nbase_model: a\nmerge_method: slerp",
     "method 'slerp' needs parameter 't'"),
    ("models: [{model: a, parameters: {t: 0.5}}, {model: b}]\nbase_model: a\n"
     "merge_method: slerp\nparameters: {t: 0.5}", r"parameter 't' for model 'a'.*is global"),
    ("models: [{model: a}, {model: b}, {model: c}]\nbase_model: a\nmerge_method: slerp\n"
     "parameters: {t: 0.5}", r"at most 1 model\(s\) besides the base, got 2"),
    ("slices: [{sources: [{model: a, layer_range: [0, 1]}]}]\nbase_model: b\n"
     "merge_method: task_arithmetic\nparameters: {weight: 1}", "base_model 'b' is not among"),
    ("models: [{model: a, parameters: {weight: 1}}]\nbase_model: b\nmerge_method: linear",
     r"missing parameter 'weight' for model 'b'.*base_model is an input"),
])
def test_check_recipe_errors(text, match):
    with pytest.raises(UserError, match=match):
        check_recipe(Recipe.from_yaml(text))


def test_no_op_mergekit_keys_are_accepted():
    check_recipe(Recipe.from_yaml("models: [{model: a, parameters: {weight: 1}}]\n"
                                  "merge_method: linear\nparameters: {int8_mask: true}"))


# -- model references --------------------------------------------------------------------------
def test_model_paths_resolve_against_recipe_folder_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "m1").mkdir(parents=True)
    (tmp_path / "m2").mkdir()
    monkeypatch.chdir(tmp_path)
    recipe_dir = tmp_path / "recipes"
    assert resolve_model_path("m1", recipe_dir) == (recipe_dir / "m1").resolve()
    assert resolve_model_path("m2", recipe_dir) == (tmp_path / "m2").resolve()
    with pytest.raises(UserError, match=r"model './m3' not found"):
        resolve_model_path("./m3", recipe_dir)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"'org/model' is not a local folder.*offline"):
        resolve_model_path("org/model", tmp_path)


def test_load_recipe_file(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text(SLICES_YAML)
    assert load_recipe(path).source_dir == tmp_path
    with pytest.raises(UserError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yml")


# -- plan: precedence, gradients, slices ----------------------------------------------------------
def _task(plan, name):
    return next(t for t in plan.tasks if t.name == name)


def test_precedence_gradients_and_filters(tiny_family):
    plan = _plan(GRADIENT_FILTER_YAML, tiny_family)
    weights = {t.name: [m.weight for m in t.model_params] for t in plan.tasks}
    lam = {t.name: t.params.lambda_ for t in plan.tasks}
    # ft_a: filter gradient over 2 layers (t = 0, 1); mlp rule; else the top-level 0.125.
    assert weights["model.layers.0.self_attn.q_proj.weight"] == [0.0, 0.5]
    assert weights["model.layers.1.self_attn.q_proj.weight"] == [1.0, 0.5]
    assert weights["model.layers.1.mlp.up_proj.weight"] == [0.25, 0.5]
    assert weights["model.layers.1.input_layernorm.weight"] == [0.125, 0.5]
    # Embeddings, final norm and lm_head take t = 0, i.e. the first gradient value.
    assert weights["model.embed_tokens.weight"] == [0.125, 0.5]
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]:
        assert lam[name] == 1.0
    assert lam["model.layers.0.mlp.up_proj.weight"] == 1.0
    assert lam["model.layers.1.mlp.up_proj.weight"] == 0.5
    task = _task(plan, "model.layers.0.mlp.up_proj.weight")
    assert [r.model for r in task.inputs] == ["ft_a", "ft_b"] and task.base.model == "base"


def test_params_objects_are_cached_by_value(tiny_family):
    plan = _plan(GRADIENT_FILTER_YAML, tiny_family)
    objs = {id(m) for t in plan.tasks for m in t.model_params}
    values = {m for t in plan.tasks for m in t.model_params}
    assert len(objs) == len(values)


def test_slice_parameters_sit_between_top_level_and_model(tiny_family):
    plan = _plan("""
    slices:
      - sources:
          - {model: base, layer_range: [0, 2]}
          - {model: ft_a, layer_range: [0, 2], parameters: {weight: 0.9}}
          - {model: ft_b, layer_range: [0, 2]}
        parameters: {weight: 0.3}
    base_model: base
    merge_method: task_arithmetic
    parameters: {weight: 0.1, lambda: 2.0}
    """, tiny_family)
    task = _task(plan, "model.layers.0.mlp.up_proj.weight")
    assert [m.weight for m in task.model_params] == [0.9, 0.3]
    assert task.params.lambda_ == 2.0


def test_gradient_position_restarts_per_slice(tiny_family):
    plan = _plan("""
    slices:
      - sources: [{model: base, layer_range: [0, 2]}, {model: ft_a, layer_range: [0, 2]}]
      - sources: [{model: base, layer_range: [0, 2]}, {model: ft_a, layer_range: [0, 2]}]
    base_model: base
    merge_method: slerp
    parameters: {t: [0.2, 0.8]}
    """, tiny_family)
    ts = [_task(plan, f"model.layers.{i}.mlp.up_proj.weight").params.t for i in range(4)]
    assert ts == [0.2, 0.8, 0.2, 0.8]
    assert plan.config_updates["num_hidden_layers"] == 4


def test_passthrough_slices_renumber_and_take_ends(tiny_family):
    plan = _plan(SLICES_YAML, tiny_family)
    src = {t.name: (t.inputs[0].model, t.inputs[0].name) for t in plan.tasks}
    assert src["model.layers.0.mlp.up_proj.weight"] == ("ft_a", "model.layers.0.mlp.up_proj.weight")
    assert src["model.layers.1.mlp.up_proj.weight"] == ("ft_a", "model.layers.1.mlp.up_proj.weight")
    assert src["model.layers.2.mlp.up_proj.weight"] == ("ft_b", "model.layers.1.mlp.up_proj.weight")
    assert src["model.embed_tokens.weight"][0] == "ft_a"  # embeddings: first slice
    assert src["model.norm.weight"][0] == "ft_b" and src["lm_head.weight"][0] == "ft_b"  # last
    assert plan.config_updates == {"num_hidden_layers": 3}
    assert len(plan.tasks) == 3 * 9 + 3


def test_models_syntax_adds_base_for_methods_without_base(tiny_family):
    with pytest.raises(UserError, match="missing parameter 'weight' for model 'base'"):
        _plan("""
        models: [{model: ft_a, parameters: {weight: 1}}]
        base_model: base
        merge_method: linear
        """, tiny_family)


def test_layer_range_out_of_bounds(tiny_family):
    with pytest.raises(UserError, match=r"layer_range \[1, 3\] for model 'ft_a' is out of bounds: "
                                        "it has 2 layers"):
        _plan("slices: [{sources: [{model: ft_a, layer_range: [1, 3]}]}]\n"
              "merge_method: passthrough", tiny_family)


def test_hub_id_downloads_when_online(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(tmp_path)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_path("org/model@v2", tmp_path / "nowhere") == tmp_path
    assert calls[0][:2] == ("org/model", "v2")
    assert "*.safetensors" in calls[0][2] and not any("bin" in p for p in calls[0][2])


def test_model_plus_adapter_references_parse_and_round_trip():
    r = Recipe.from_yaml("models: [{model: ' base + ad ', parameters: {weight: 1}}]\nmerge_method: linear")
    assert r.models[0].model == "base+ad" and r.referenced_models() == ["base+ad"]
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_hub_id_offline_comes_from_the_hugging_face_cache(monkeypatch, tmp_path):
    """A model in the HF cache (the hub's own layout: refs/main -> snapshots/<commit>) resolves offline."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--org--cached-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model_path("org/cached-tiny", tmp_path) == snapshot
    with pytest.raises(UserError, match=r"nor in the Hugging Face cache"):
        resolve_model_path("org/cached-tiny@v9", tmp_path)
