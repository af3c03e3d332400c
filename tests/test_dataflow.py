"""Data-flow search: spaces and constraints, the path evaluated in place (layers shared, not
copied) against its exported passthrough recipe merged by us and by ``mergekit-yaml``, PS+DFS,
and a sweep end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from orchestrator.config import SPACES_DIR, load_config
from orchestrator.errors import UserError
from orchestrator.study.binding import bind_spaces
from orchestrator.study.candidates import Candidates, build_recipe, resolve_candidates
from orchestrator.study.dataflow import DataflowChoice, Step, path_recipe, repair
from orchestrator.study.spaces import load_space, parse_space, space_as_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_zoo"
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
SCALE = {"low": 0.5, "high": 1.5}


def demo_candidates() -> Candidates:
    return resolve_candidates(Candidates({"knowledge": str(DEMO / "knowledge"),
                                          "commonsense": str(DEMO / "commonsense")}, base=str(DEMO / "base")))


def flow(tmp_path=None, ps=None, **section):
    data = {"method": "dataflow" if ps is None else "dataflow-ps", "dataflow": section}
    if ps is not None:
        data["ps"] = ps
    return data


def bound(data, tmp_path, cand=None):
    space = parse_space(data, "space.yaml")
    return bind_spaces({space.method: space}, cand or demo_candidates(), tmp_path / "ps", 0)[space.method]


# -- spaces and constraints: one line, before the study ------------------------------------------
@pytest.mark.parametrize("data,needle", [
    (flow(repeat=2), "unknown dataflow key(s) ['repeat']"),
    (flow(min_depth=4, max_depth=2), "min_depth 4 > max_depth 2"),
    (flow(scale={"low": -1, "high": 1}), "0 <= low <= high"),
    (flow(max_params="lots"), "max_params must be a positive integer or a ratio"),
    (flow(fix_first=3), "must be true, false or a source name"),
    (flow(repeats=0), "repeats must be an integer >= 1"),
    (flow(sources=["knowledge", "knowledge"]), "distinct candidate names"),
    (flow(sources=["knowledge"], ps={"method": "task_arithmetic", "per_model": {"weight": {"low": 0, "high": 1}}}),
     "go together"),
    ({"method": "dataflow", "per_model": {}}, "unknown section(s) ['per_model']"),
])
def test_bad_dataflow_spaces_fail_at_load(data, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        parse_space(data, "space.yaml")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("section,needle", [
    ({"sources": ["knowledge", "nobody"]}, "dataflow.sources ['nobody'] are not candidates"),
    ({"fix_first": "nobody"}, "fix_first 'nobody' is not a source"),
    ({"max_params": 100_000}, "no path fits"),
    ({"min_depth": 7}, "no path fits: it needs at least 7 layers"),
    ({"fix_first": "commonsense", "fix_last": "knowledge"}, "comes after fix_last"),
    ({"max_depth": 1, "fix_first": True, "fix_last": True}, "needs at least 2 layers"),
    ({"scale": SCALE, "scale_filters": ["out_proj"]}, "no tensor name of the candidates contains 'out_proj'"),
])
def test_infeasible_constraints_fail_before_the_study(section, needle, tmp_path):
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        bound(flow(**section), tmp_path)
    assert "\n" not in str(err.value)


def test_max_params_is_a_depth_bound(tmp_path):
    space = bound(flow(repeats=3, max_params="2.0x"), tmp_path)  # demo layers ~148k, embeddings ~47k
    assert space.bound.max_depth == 6 and len(space.slots()) == 18
    assert space_as_dict(space)["max_depth_effective"] == 6


def test_candidates_named_ps_or_adapters_are_refused(tmp_path):
    cand = demo_candidates()
    named = Candidates({"ps": cand.models["knowledge"], "b": cand.models["commonsense"]}, base=cand.base)
    with pytest.raises(UserError, match="named 'ps'"):
        bound(flow(), tmp_path, named)
    adapters = Candidates({"a": f"{cand.base}+{DEMO / 'lora_knowledge'}"}, base=cand.base)
    with pytest.raises(UserError, match="LoRA adapters"):
        bound(flow(), tmp_path, adapters)


def test_a_bad_space_stops_the_cli_in_one_line(tmp_path):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "dataflow.yaml").write_text(yaml.safe_dump(flow(min_depth=9)))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "experiment=demo_dataflow",
                           "method.methods=[dataflow]", f"method.spaces_dir={spaces}",
                           f"runs_dir={tmp_path / 'runs'}", "tracking=none"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "no path fits" in proc.stderr
    assert "resident model loaded" not in proc.stdout


# -- paths, names, repair, recipes -----------------------------------------------------------
def test_slots_names_and_fixed_ends(tmp_path):
    space = bound(flow(repeats=2, fix_first=True, fix_last="knowledge", scale=SCALE, max_depth=6), tmp_path)
    names = sorted(space.param_grid(["knowledge", "commonsense"], 2))
    assert "dataflow.r0.knowledge.L0" not in names and "dataflow.r0.knowledge.L0.scale" in names
    assert "dataflow.r1.knowledge.L2" not in names  # fix_last: knowledge's last slot, the slots after it gone
    assert not any(n.startswith("dataflow.r1.commonsense") for n in names)
    on = {n: 1 for n in names if not n.endswith(".scale")}
    params = {**on, **{n: 1.0 for n in names if n.endswith(".scale")}, "dataflow.r0.commonsense.L1.scale": 0.7}
    (values, per_model) = space.suggest(optuna.trial.FixedTrial(params), ["knowledge", "commonsense"])
    steps = values["path"].steps
    assert per_model == {} and len(steps) == 6  # max_depth: 6 layers of 9 (repaired)
    assert steps[0] == Step("knowledge", 0, 1.0) and steps[-1] == Step("knowledge", 2, 1.0)
    assert steps[4] == Step("commonsense", 1, 0.7)  # the optional slots were dropped from the end


def test_repair_is_deterministic_and_keeps_fixed_slots():
    assert repair([True] * 6, {0, 5}, 1, 3) == [0, 1, 5]
    assert repair([True, False, False, False], {0}, 3, 4) == [0, 1, 2]
    assert repair([False, False, True], set(), 2, 3, allowed={2, 1}) == [1, 2]


def test_path_recipe_groups_runs_and_scales_single_layers():
    choice = DataflowChoice((Step("k", 0), Step("k", 1, 1.0), Step("c", 1, 0.8), Step("c", 2), Step("c", 2)),
                            scale_filters=("o_proj", "down_proj"))
    recipe = path_recipe(choice, {"k": "/m/k", "c": "/m/c"}, "float32")
    assert recipe == {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": "/m/k", "layer_range": [0, 2]}]},
        {"sources": [{"model": "/m/c", "layer_range": [1, 2], "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.8}, {"filter": "down_proj", "value": 0.8}, {"value": 1.0}]}}]},
        {"sources": [{"model": "/m/c", "layer_range": [2, 3]}]},
        {"sources": [{"model": "/m/c", "layer_range": [2, 3]}]}]}


def test_shipped_dataflow_spaces_load(tmp_path):
    for name in ("dataflow", "dataflow-ps"):
        space = load_space(SPACES_DIR / f"{name}.yaml", name)
        assert space.method == name
        bound(yaml.safe_load((SPACES_DIR / f"{name}.yaml").read_text()), tmp_path)


# -- in place == exported --------------------------------------------------------------------
@pytest.fixture(scope="module")
def resident():
    from orchestrator.evaluation.suite import check_tasks_available
    from orchestrator.study.resident import Resident
    from orchestrator.sweep.setup import eval_spec

    torch.set_num_threads(1)
    spec = eval_spec(load_config(["experiment=demo", "eval.rungs=[30]"]))
    return Resident(demo_candidates(), spec, check_tasks_available(spec), 0)


def per_item(evaluator, split="confirm"):
    """{(leaf, doc): record} of a split (metrics and lm-eval's responses: log-likelihoods)."""
    evaluator.evaluate(split)
    return {(leaf, doc): rec for leaf, docs in evaluator.item_results(split).items() for doc, rec in docs.items()}


def path_of(cand: Candidates) -> dict:
    k, c = cand.models["knowledge"], cand.models["commonsense"]
    choice = DataflowChoice((Step("knowledge", 0), Step("knowledge", 1), Step("commonsense", 1, 0.7),
                             Step("knowledge", 1), Step("commonsense", 2)), scale_filters=("o_proj", "down_proj"))
    return path_recipe(choice, {"knowledge": k, "commonsense": c}, "float32")


def test_path_in_place_scores_item_by_item_what_its_export_scores(resident, tmp_path):
    from orchestrator.engine import merge_to_disk
    from orchestrator.evaluation import ResidentEvaluator

    recipe = path_of(resident_candidates := demo_candidates())
    resident.merge(recipe, 0)
    assert resident.evaluator is not resident.main and resident.evaluator.model.config.num_hidden_layers == 5
    in_place = per_item(resident.evaluator)
    out = merge_to_disk(recipe, tmp_path / "ours").out_dir
    fresh = ResidentEvaluator(out, resident.main.spec, suite=resident.main.suite)
    assert per_item(fresh) == in_place  # every item, log-likelihoods included, bit for bit
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    resident.merge({"merge_method": "linear", "models": [{"model": resident_candidates.models["knowledge"],
                                                          "parameters": {"weight": 1.0}}]}, 0)
    assert resident.evaluator is resident.main and resident.main.model.config.num_hidden_layers == 3


@pytest.mark.slow
def test_mergekit_builds_the_same_path_model(resident, tmp_path):
    from safetensors.torch import load_file

    from orchestrator.engine import merge_to_disk
    from orchestrator.evaluation import ResidentEvaluator

    if not MERGEKIT.exists():
        pytest.skip("mergekit-yaml is not installed")
    recipe = path_of(demo_candidates())
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(MERGEKIT), str(tmp_path / "recipe.yml"), str(tmp_path / "mk"), "--quiet",
                           "--device", "cpu", "--allow-crimes", "-j", "1"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = load_file(merge_to_disk(recipe, tmp_path / "ours").out_dir / "model.safetensors")
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    resident.merge(recipe, 0)
    fresh = ResidentEvaluator(tmp_path / "mk", resident.main.spec, suite=resident.main.suite)
    assert per_item(fresh) == per_item(resident.evaluator)


def test_ps_plus_dfs_in_place_equals_its_materialized_export(resident, tmp_path):
    from orchestrator.engine import merge_to_disk
    from orchestrator.evaluation import ResidentEvaluator

    space = bound(yaml.safe_load((SPACES_DIR / "dataflow-ps.yaml").read_text()), tmp_path)
    names = space.param_grid(["knowledge", "commonsense"], 2)
    on = {"dataflow-ps.r0.ps.L1", "dataflow-ps.r0.commonsense.L1"}  # path: ps0 ps1 commonsense1 ps2
    params = {n: int(n in on) for n in names if re.search(r"\.r\d\.", n) and not n.endswith(".scale")}
    params.update({n: 1.0 for n in names if n.endswith(".scale")})
    params.update({"dataflow-ps.ps.knowledge.weight": 0.9, "dataflow-ps.ps.commonsense.weight": 0.8})
    values, per_model = space.suggest(optuna.trial.FixedTrial(params), ["knowledge", "commonsense"])
    recipe = build_recipe("dataflow-ps", values, per_model, demo_candidates())
    assert [sl["sources"][0]["layer_range"] for sl in recipe["slices"]] == [[0, 2], [1, 2], [2, 3]]
    ps_ref = recipe["slices"][0]["sources"][0]["model"]
    assert ps_ref.startswith(str(tmp_path / "ps" / "task_arithmetic-")) and Path(f"{ps_ref}.yml").is_file()
    resident.merge(recipe, 0)
    in_place = per_item(resident.evaluator)
    assert resident.flow.materialize(recipe, 0) == [ps_ref]
    out = merge_to_disk(recipe, tmp_path / "out").out_dir
    fresh = ResidentEvaluator(out, resident.main.spec, suite=resident.main.suite)
    assert per_item(fresh) == in_place



def test_generation_with_the_kv_cache_matches_the_export(resident, tmp_path):
    """Each position's attention has its own ``layer_idx``: cached generation is the export's."""
    from orchestrator.engine import merge_to_disk
    from orchestrator.evaluation.models import load_model

    recipe = path_of(demo_candidates())
    prompts = ["the capital of", "a dog can"]
    ours = resident.answers(recipe, 0, prompts, max_new_tokens=8)
    model, tokenizer = load_model(merge_to_disk(recipe, tmp_path / "out").out_dir)
    with torch.no_grad():
        for prompt, answer in zip(prompts, ours):
            ids = tokenizer(prompt, return_tensors="pt")
            tokens = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer

# -- shared, not copied ------------------------------------------------------------------------
def test_layers_are_referenced_not_copied(resident):
    from orchestrator.engine.dataflow import Scaled, storages

    cand = demo_candidates()
    resident.merge(path_of(cand), 0)
    model, bank = resident.evaluator.model, resident.flow.bank
    layers = model.model.layers
    knowledge = bank.model(cand.models["knowledge"])
    assert layers[1].mlp.up_proj.weight is knowledge.model.layers[1].mlp.up_proj.weight  # the same Parameter
    assert layers[3].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # a layer used twice, held once
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]  # the KV cache's index per position
    assert knowledge.model.layers[1].self_attn.layer_idx == 1  # the source's own module is untouched
    assert isinstance(layers[2].self_attn.o_proj, Scaled) and layers[2].self_attn.o_proj.scales == {"weight": 0.7}
    cached = resident.merger.cached_storages()
    assert storages(model) <= cached  # every tensor the path model holds is the merger's cached input
    unique = {p.untyped_storage().data_ptr(): p.numel() for p in model.parameters()}
    per_layer = sum(p.numel() for p in knowledge.model.layers[0].parameters())
    other = sum(p.numel() for p in knowledge.parameters()) - 3 * per_layer  # embeddings (tied) and norm
    assert len(layers) == 5 and sum(unique.values()) == other + 4 * per_layer  # 5 positions, 4 distinct layers
    before = set(cached)
    resident.merge(path_of(cand), 0)  # a second trial: no new storage anywhere
    assert resident.merger.cached_storages() == before


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_dataflow_sweep_saves_a_passthrough_merge_that_scores_what_it_confirmed(micro_zoo, tmp_path):
    from orchestrator.evaluation import ResidentEvaluator
    from orchestrator.sweep.run import run_sweep
    from orchestrator.sweep.setup import eval_spec

    runs = tmp_path / "runs"
    overrides = ["experiment=debug", f"runs_dir={runs}", "candidates.zoo=null", f"candidates.base={micro_zoo / 'base'}",
                 f"candidates.models.knowledge={micro_zoo / 'knowledge'}",
                 f"candidates.models.commonsense={micro_zoo / 'commonsense'}", "method.methods=[dataflow-ps]",
                 "study.n_trials=4", "study.name=flow", "tracking=none", "study.baselines=false"]
    outcome = run_sweep(load_config(overrides), overrides)
    assert outcome.best.method == "dataflow-ps" and outcome.best.recipe["merge_method"] == "passthrough"
    saved = yaml.safe_load((outcome.best_dir / "mergekit_config.yml").read_text())
    assert saved["merge_method"] == "passthrough" and any(
        (Path(s["sources"][0]["model"]) / "config.json").is_file() for s in saved["slices"])
    scores = json.loads((outcome.best_dir / "scores.json").read_text())
    fresh = ResidentEvaluator(outcome.best_dir, eval_spec(load_config(overrides)))
    assert fresh.evaluate("confirm").score == pytest.approx(scores["confirm"]["seed_score"], abs=1e-9)


def test_depth_up_scaling_recipe_runs_with_our_merge(tmp_path):
    """``recipes/dus_demo.yml`` (SOLAR-style self-stacking with overlap) merges from the repo root."""
    from safetensors.torch import load_file

    out = tmp_path / "dus"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "merge", "recipes/dus_demo.yml", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    merged, source = load_file(out / "model.safetensors"), load_file(DEMO / "knowledge" / "model.safetensors")
    for out_layer, src_layer in enumerate([0, 1, 1, 2]):  # [0, 2) then [1, 3)
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(merged[name.format(out_layer)], source[name.format(src_layer)])
