"""Search over layers: per-layer-group and per-filter parameters (the genome of a search space).

Naming, recipes, one-line errors, and a differential test: for the same values, our genome's
recipe builds, through ``mergekit-yaml``, the model mergekit-evolve's own genome builds, and our
``merge`` builds it too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.errors import UserError
from orchestrator.study.candidates import Candidates, build_recipe
from orchestrator.study.genome import PerBlock, block_ranges
from orchestrator.study.spaces import load_space, parse_space, space_as_dict
from orchestrator.config import SPACES_DIR

MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
CAND = Candidates({"a": "/m/a", "b": "/m/b"}, base="/m/base")


def ties_space(**weight):
    return parse_space({"method": "ties-layers", "per_model": {
        "weight": {"low": 0.1, "high": 1.0, **weight}, "density": {"low": 0.2, "high": 1.0}},
        "fixed": {"normalize": True}}, "space.yaml")


class Recorder:
    """A trial that answers low + 0.01 * (its call number) and records the names asked."""

    def __init__(self):
        self.names = []

    def suggest_float(self, name, low, high, step=None, log=False):
        self.names.append(name)
        return round(low + 0.01 * len(self.names), 4)


def test_names_are_readable_and_ordered_group_then_filter():
    space = ties_space(layer_groups=2, filters=["self_attn", "mlp"]).bind(4)
    trial = Recorder()
    space.suggest(trial, ["a", "b"])
    assert trial.names[:7] == ["ties-layers.a.weight.g0.self_attn", "ties-layers.a.weight.g0.mlp",
                               "ties-layers.a.weight.g0.rest", "ties-layers.a.weight.g1.self_attn",
                               "ties-layers.a.weight.g1.mlp", "ties-layers.a.weight.g1.rest", "ties-layers.a.density"]
    assert list(space.param_grid(["a", "b"], 2)) == trial.names  # the grid sampler sees the same names


def test_discrete_groups_become_one_slice_per_block_with_filter_rules():
    space = ties_space(layer_groups=2, filters=["self_attn", "mlp"]).bind(3)
    global_values, per_model = space.suggest(Recorder(), ["a", "b"])
    assert isinstance(per_model["a"]["weight"], PerBlock)
    recipe = build_recipe("ties-layers", global_values, per_model, CAND)
    assert recipe["merge_method"] == "ties" and "models" not in recipe
    assert recipe["parameters"] == {"normalize": True} and recipe["base_model"] == "/m/base"
    first, second = recipe["slices"]
    assert [s["layer_range"] for s in first["sources"]] == [[0, 1]] * 3  # a, b, then the base
    assert [s["layer_range"] for s in second["sources"]] == [[1, 3]] * 3
    assert first["sources"][0]["parameters"] == {
        "weight": [{"filter": "self_attn", "value": 0.11}, {"filter": "mlp", "value": 0.12}, {"value": 0.13}],
        "density": 0.27}
    assert second["sources"][0]["parameters"]["weight"][2] == {"value": 0.16}
    assert "parameters" not in first["sources"][2]


def test_smooth_groups_are_gradients_in_models_syntax():
    space = parse_space({"method": "task_arithmetic", "per_model": {
        "weight": {"low": 0.0, "high": 1.0, "layer_groups": 3, "smooth": True, "filters": ["mlp"]}},
        "global": {"lambda": {"low": 0.5, "high": 1.5, "layer_groups": 2, "smooth": True}}}, "s.yaml")
    global_values, per_model = space.suggest(Recorder(), ["a"])  # no bind needed: no blocks
    recipe = build_recipe("task_arithmetic", global_values, per_model, Candidates({"a": "/m/a"}, base="/m/base"))
    assert recipe["parameters"] == {"lambda": [0.51, 0.52]}
    assert recipe["models"] == [{"model": "/m/a", "parameters": {"weight": [
        {"filter": "mlp", "value": [0.03, 0.05, 0.07]}, {"value": [0.04, 0.06, 0.08]}]}}]


def test_filters_alone_and_global_blocks():
    space = parse_space({"method": "slerp", "global": {"t": {"low": 0.0, "high": 1.0, "layer_groups": 2,
                                                             "filters": ["self_attn"]}}}, "s.yaml").bind(2)
    global_values, per_model = space.suggest(Recorder(), ["a", "b"])
    recipe = build_recipe("slerp", global_values, per_model, CAND)
    assert recipe["base_model"] == "/m/a" and [len(s["sources"]) for s in recipe["slices"]] == [2, 2]
    assert recipe["slices"][1]["parameters"] == {"t": [{"filter": "self_attn", "value": 0.03}, {"value": 0.04}]}


def test_block_ranges_are_contiguous_and_near_equal():
    assert block_ranges(7, 3) == ((0, 2), (2, 4), (4, 7))
    assert block_ranges(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    with pytest.raises(UserError, match="layer_groups 5 > 4"):
        block_ranges(4, 5)


@pytest.mark.parametrize("per_model,needle", [
    ({"weight": {"low": -0.5, "high": 1.0}}, "allow_negative: true"),
    ({"weight": {"low": 0.0, "high": 1.0, "smooth": True}}, "set layer_groups >= 2"),
    ({"weight": {"low": 0.0, "high": 1.0, "layer_groups": 0}}, "layer_groups must be an integer >= 1"),
    ({"weight": {"low": 0.0, "high": 1.0, "filters": ["mlp", "mlp"]}}, "filters must be distinct"),
    ({"weight": {"low": 0.0, "high": 1.0, "filters": ["rest"]}}, "not 'rest'"),
    ({"weight": {"low": 0.0, "high": 1.0, "filters": "mlp"}}, "filters must be a list"),
    ({"weight": {"low": 0.0, "high": 1.0, "gradient": 3, "layer_groups": 3}}, "use one or the other"),
    ({"weight": {"low": 0.0, "high": 1.0, "layer_groups": 2}, "density": {"low": 0.1, "high": 1, "layer_groups": 3}},
     "discrete layer_groups must be the same"),
    ({"weight": {"low": 0.0, "high": 1.0, "layer_groups": 2},
      "density": {"low": 0.1, "high": 1, "layer_groups": 2, "smooth": True}}, "make both smooth"),
    ({"weight": {"low": 0.0, "high": 1.0, "allow_negative": "yes"}}, "allow_negative must be true or false"),
])
def test_bad_genomes_fail_in_one_line(per_model, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        parse_space({"method": "ties", "per_model": per_model}, "space.yaml")
    assert "\n" not in str(err.value) and "space.yaml" in str(err.value)


def test_negative_weights_when_asked_and_in_the_logged_space():
    space = parse_space({"method": "task_arithmetic", "per_model": {"weight": {
        "low": -1.0, "high": 1.0, "allow_negative": True, "layer_groups": 2, "filters": ["mlp"]}}}, "s.yaml").bind(4)
    logged = space_as_dict(space)
    assert logged["per_model"]["weight"] == {"low": -1.0, "high": 1.0, "allow_negative": True,
                                             "layer_groups": 2, "filters": ["mlp"]}
    assert logged["n_layers"] == 4


def test_a_filter_matching_no_tensor_fails_before_the_study(tmp_path):
    from orchestrator.study.binding import bind_spaces
    from tests.test_dataflow import demo_candidates

    space = ties_space(layer_groups=3, filters=["self_atn"])
    with pytest.raises(UserError, match=r"per_model.weight.filters: no tensor name .* contains 'self_atn'"):
        bind_spaces({"ties-layers": space}, demo_candidates(), tmp_path, 0)


def test_layer_groups_beyond_the_depth_fail_at_bind():
    with pytest.raises(UserError, match=r"per_model.weight.*layer_groups 4 > 3"):
        ties_space(layer_groups=4).bind(3, "search space of 'ties-layers'")


def test_shipped_layer_spaces_load():
    for name in ("task_arithmetic-layers", "task_arithmetic-smooth", "ties-layers"):
        space = load_space(SPACES_DIR / f"{name}.yaml", name)
        assert space.method == name and space.merge_method == name.partition("-")[0]


def test_adapter_sweep_refuses_layer_groups(tmp_path):
    from orchestrator.sweep.setup import check_adapter_sweep

    cand = Candidates({"a": "/m/base+/m/ad_a"}, base="/m/base")
    with pytest.raises(UserError, match="adapter sweep"):
        check_adapter_sweep({"ties-layers": ties_space(layer_groups=2)}, cand)
    check_adapter_sweep({"ties": parse_space({"method": "ties", "per_model": {"weight": {"low": 0, "high": 1}}},
                                             "s")}, cand)


def test_a_layered_trial_merges_in_memory_as_on_disk(tmp_path):
    """The resident merge of a sliced genome recipe writes the tensors ``merge`` writes."""
    from orchestrator.engine import merge_to_disk
    from orchestrator.engine.resident import InMemoryMerger
    from tests.tiny import load_base, make_tiny_family

    family = make_tiny_family(tmp_path / "fam", layers=4)
    cand = Candidates({"a": str(family["ft_a"]), "b": str(family["ft_b"])}, base=str(family["base"]))
    space = ties_space(layer_groups=2, filters=["self_attn", "mlp"]).bind(4)
    recipe = build_recipe("ties-layers", *space.suggest(Recorder(), ["a", "b"]), cand)
    model = load_base(family["base"])
    InMemoryMerger(recipe, model).merge_into(recipe)
    disk = load_file(merge_to_disk(recipe, tmp_path / "out").out_dir / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in disk.items())


# -- differential: our genome vs mergekit-evolve's, through mergekit-yaml --------------------------
def _genotype_values(space_method, models, params, groups, filters, seed):
    """Random genotype (layer group, model, filter set, param) and our Optuna names for it."""
    gen = torch.Generator().manual_seed(seed)
    sets = [*filters, "rest"] if filters else [""]
    genotype = 0.1 + 0.8 * torch.rand(groups, len(models), len(sets), len(params), generator=gen)
    fixed = {}
    for g in range(groups):
        for m, model in enumerate(models):
            for f, name in enumerate(sets):
                for p, param in enumerate(params):
                    key = f"{space_method}.{model}.{param}" + (f".g{g}" if groups > 1 else "") + (f".{name}" if name else "")
                    fixed[key] = float(genotype[g, m, f, p])
    return genotype, fixed


GENOMES = {  # case -> (merge method, our space, evolve options, params)
    "ties_discrete_filters": ("ties", {"per_model": {
        "weight": {"low": 0.0, "high": 1.0, "layer_groups": 2, "filters": ["self_attn", "mlp"]},
        "density": {"low": 0.05, "high": 1.0, "layer_groups": 2, "filters": ["self_attn", "mlp"]}},
        "fixed": {"normalize": True}}, {"layer_granularity": 2, "filters": ["self_attn", "mlp"]}, ["weight", "density"]),
    "task_arithmetic_smooth_filters": ("task_arithmetic", {"per_model": {
        "weight": {"low": 0.0, "high": 1.0, "layer_groups": 2, "smooth": True, "filters": ["self_attn"]}},
        "fixed": {"normalize": False}}, {"layer_granularity": 2, "filters": ["self_attn"], "smooth": True}, ["weight"]),
    "ties_per_layer": ("ties", {"per_model": {
        "weight": {"low": 0.0, "high": 1.0, "layer_groups": 4}, "density": {"low": 0.05, "high": 1.0, "layer_groups": 4}},
        "fixed": {"normalize": True}}, {"layer_granularity": 1}, ["weight", "density"]),
}


def _run_mergekit(config: dict, root: Path) -> tuple[Path, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(MERGEKIT), str(root / "recipe.yml"), str(root / "out"), "--quiet", "--device", "cpu",
                           "--random-seed", "0", "--allow-crimes", "--no-lazy-unpickle", "-j", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    return root / "out", proc.stderr[-3000:] if proc.returncode else ""


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _evolve_config(case: str, family: dict) -> dict:
    from mergekit.common import ModelReference
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    method, _, options, params = GENOMES[case]
    definition = ModelGenomeDefinition(models=[ModelReference.parse(str(family[n])) for n in ("ft_a", "ft_b")],
                                       merge_method=method, base_model=ModelReference.parse(str(family["base"])),
                                       **options)
    genome = ModelGenome(definition)
    genotype, _ = _genotype_values(method, ["a", "b"], params, genome.num_layers // options["layer_granularity"],
                                   options.get("filters"), seed=len(case))
    config = genome.genotype_merge_config(genotype).model_dump(mode="json", exclude_none=True)
    return {**config, "dtype": "float32"}  # evolve hardcodes bfloat16; both sides compute in float32


def _our_recipe(case: str, family: dict) -> dict:
    method, data, options, params = GENOMES[case]
    space = parse_space({"method": method, **data}, case).bind(4)
    groups = 4 // options["layer_granularity"]
    _, fixed = _genotype_values(method, ["a", "b"], params, groups, options.get("filters"), seed=len(case))
    cand = Candidates({"a": str(family["ft_a"]), "b": str(family["ft_b"])}, base=str(family["base"]))
    return build_recipe(method, *space.suggest(optuna.trial.FixedTrial(fixed), ["a", "b"]), cand)


@pytest.fixture(scope="module")
def genome_outputs(tmp_path_factory):
    """For each case: mergekit-yaml on evolve's config and on ours (two subprocesses at a time)."""
    if not MERGEKIT.exists():
        pytest.skip("mergekit-yaml is not installed")
    from tests.tiny import make_tiny_family

    root = tmp_path_factory.mktemp("genome")
    family = make_tiny_family(root / "family", layers=4, hidden=32)
    jobs = {(case, side): (_evolve_config if side == "evolve" else _our_recipe)(case, family)
            for case in GENOMES for side in ("evolve", "ours")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_run_mergekit, cfg, root / f"{key[0]}-{key[1]}") for key, cfg in jobs.items()}
        return family, jobs, {key: fut.result() for key, fut in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GENOMES))
def test_genome_recipe_equals_mergekit_evolve_genome(case, genome_outputs, tmp_path):
    from orchestrator.engine import merge_to_disk

    family, jobs, outputs = genome_outputs
    (evolve_out, err1), (ours_out, err2) = outputs[(case, "evolve")], outputs[(case, "ours")]
    assert not err1 and not err2, err1 or err2
    slices = "slices" in jobs[(case, "ours")]
    assert slices == ("smooth" not in GENOMES[case][2])  # discrete: slices, as evolve writes them
    evolve, mk_ours = _tensors(evolve_out), _tensors(ours_out)
    assert evolve.keys() == mk_ours.keys()
    for name in evolve:  # mergekit computes the same model from both configs
        assert torch.equal(evolve[name], mk_ours[name]), name
    ours = _tensors(merge_to_disk(jobs[(case, "ours")], tmp_path / "ours", seed=0).out_dir)
    base = _tensors(family["base"])
    assert ours.keys() == mk_ours.keys()
    for name in ours:  # and our merge builds it too
        scale = float((mk_ours[name] - base[name]).norm()) or 1.0
        assert float((ours[name] - mk_ours[name]).abs().max()) < 1e-5 * scale, name


def test_every_shipped_parameter_name_is_a_valid_mlflow_key(tmp_path):
    """MLflow keys allow alphanumerics, ``_ - . : /`` and spaces only (``@`` fails the trial's log)."""
    from tests.test_dataflow import bound

    for path in sorted(SPACES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        space = bound(data, tmp_path) if path.stem.startswith("dataflow") else load_space(path)
        if not path.stem.startswith("dataflow") and any(not lay.trivial for lay in space.layouts().values()):
            space = space.bind(3)
        for name in [path.stem, *space.param_grid(["knowledge", "commonsense"], 2)]:
            assert re.fullmatch(r"[\w\-. :/]+", name), name
