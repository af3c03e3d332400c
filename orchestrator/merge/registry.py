"""The one registry of merge methods: add a method by writing its module and listing it here.

Keys, parameter names and defaults are mergekit's (0.1.5), so a mergekit recipe runs unchanged.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from functools import partial

from orchestrator.errors import UserError
from orchestrator.merge import task_arithmetic as gta
from orchestrator.merge.base import MergeMethod, NoParams
from orchestrator.merge.fusion import arcee_fusion
from orchestrator.merge.isotropic import IsoCParams, IsoCtsParams, iso_c, iso_cts
from orchestrator.merge.linear import LinearParams, WeightParams, linear
from orchestrator.merge.model_stock import ModelStockParams, model_stock
from orchestrator.merge.nearswap import NearswapParams, nearswap
from orchestrator.merge.passthrough import ScaleParams, passthrough
from orchestrator.merge.ram import RamParams, RamPlusParams, ram, ramplus_tl
from orchestrator.merge.sce import SceParams, sce
from orchestrator.merge.slerp import NuslerpParams, SlerpParams, nuslerp, slerp
from orchestrator.merge.spherical import KarcherParams, MultislerpParams, karcher, multislerp
from orchestrator.merge.tsv import TsvParams, tsv


def _gta(name: str, params: type, model_params: type, sparsification: str | None, consensus: bool,
         description: str, reference_url: str) -> MergeMethod:
    """A generalized-task-arithmetic method: one function, fixed sparsification and consensus."""
    return MergeMethod(
        name=name,
        fn=partial(gta.generalized_task_arithmetic, sparsification=sparsification, consensus=consensus),
        fused=partial(gta.merge_models, sparsification=sparsification, consensus=consensus),
        keywords=frozenset({"out", "workspace"}), updates="always",
        params=params, model_params=model_params, base="required", inputs="deltas",
        random=sparsification in ("random", "della_magprune"), description=description,
        reference_url=reference_url,
        normalize_key="normalize" if "normalize" in {f.name for f in fields(params)} else None,
    )


def _deltas(name: str, fn, params: type, description: str, reference_url: str, *,
            max_models: int | None = None) -> MergeMethod:
    """A method over task vectors without per-model parameters (base required, deterministic)."""
    return MergeMethod(name, fn, params, NoParams, base="required", inputs="deltas",
                       updates="always", max_models=max_models, description=description,
                       reference_url=reference_url)


_DARE, _TIES = "https://arxiv.org/abs/2311.03099", "https://arxiv.org/abs/2306.01708"
_BREADCRUMBS, _DELLA = "https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2406.11617"
_RAM, _ISO = "https://arxiv.org/abs/2601.13572", "https://arxiv.org/abs/2502.04959"

_METHODS = (
    MergeMethod("linear", linear, LinearParams, WeightParams, base="none",
                keywords=frozenset({"out"}), updates="when_normalized", normalize_key="normalize",
                description="Weighted average of the models (model soups).",
                reference_url="https://arxiv.org/abs/2203.05482"),
    MergeMethod("slerp", slerp, SlerpParams, NoParams, base="required", min_models=1, max_models=1,
                keywords=frozenset({"out"}),
                description="Spherical interpolation from the base (t=0) to one other model (t=1).",
                reference_url="https://en.wikipedia.org/wiki/Slerp"),
    MergeMethod("nuslerp", nuslerp, NuslerpParams, WeightParams, base="optional", min_models=2,
                max_models=2,
                description="Slerp of two models (or of their task vectors, with a base) by weight."),
    MergeMethod("multislerp", multislerp, MultislerpParams, WeightParams, base="optional",
                normalize_key="normalize_weights", any_dtype=True,
                description="Weighted mean of many models on the hypersphere.",
                reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    MergeMethod("karcher", karcher, KarcherParams, NoParams, base="optional", any_dtype=True,
                description="Equal-weight Karcher mean on the hypersphere (a base counts as a model).",
                reference_url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean"),
    _gta("task_arithmetic", gta.TaskArithmeticParams, gta.DeltaParams, None, False,
         "Weighted sum of task vectors added to the base.", "https://arxiv.org/abs/2212.04089"),
    _gta("ties", gta.TiesParams, gta.DeltaParams, "magnitude", True,
         "Top-magnitude trim, sign election, disjoint mean of task vectors.", _TIES),
    _gta("dare_linear", gta.DareLinearParams, gta.DeltaParams, "random", False,
         "Random drop and rescale of task vectors, then their weighted sum.", _DARE),
    _gta("dare_ties", gta.DareTiesParams, gta.DeltaParams, "random", True,
         "Random drop and rescale of task vectors, then TIES sign election.", _DARE),
    _gta("breadcrumbs", gta.BreadcrumbsParams, gta.BreadcrumbsModelParams, "magnitude_outliers",
         False, "Drop the largest outliers and the smallest entries, then sum.", _BREADCRUMBS),
    _gta("breadcrumbs_ties", gta.BreadcrumbsTiesParams, gta.BreadcrumbsModelParams,
         "magnitude_outliers", True,
         "Drop the largest outliers and the smallest entries, then TIES sign election.", _BREADCRUMBS),
    _gta("della", gta.DellaParams, gta.DellaModelParams, "della_magprune", True,
         "Magnitude-ranked random drop and rescale, then TIES sign election.", _DELLA),
    _gta("della_linear", gta.DareLinearParams, gta.DellaModelParams, "della_magprune", False,
         "Magnitude-ranked random drop and rescale, then the weighted sum.", _DELLA),
    MergeMethod("model_stock", model_stock, ModelStockParams, NoParams, base="required",
                min_models=2, any_dtype=True,
                description="Move from the base towards the models' mean by their angle.",
                reference_url="https://arxiv.org/abs/2403.19522"),
    MergeMethod("passthrough", passthrough, NoParams, ScaleParams, base="none", max_models=1,
                description="Copy one model's tensor, optionally scaled (slice stacking)."),
    # mergekit 0.1.5's other methods
    _deltas("sce", sce, SceParams,
            "Variance top-k select, energy-weighted merge of sign-agreeing task vectors.",
            "https://arxiv.org/abs/2408.07990"),
    _deltas("nearswap", nearswap, NearswapParams,
            "Take the other model's value where it is within t of the base's.",
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", max_models=1),
    MergeMethod("arcee_fusion", arcee_fusion, NoParams, NoParams, base="required", max_models=1,
                description="Keep the changes whose |delta| x KL importance is an outlier.",
                reference_url="https://arcee.ai"),
    _deltas("ram", ram, RamParams,
            "Sum the changes only one model makes, average those several make.", _RAM),
    _deltas("ramplus_tl", ramplus_tl, RamPlusParams,
            "RAM with each model's unique changes boosted by its shared/unique ratio.", _RAM),
    # data-free methods beyond mergekit
    _deltas("tsv", tsv, TsvParams,
            "Decorrelated top singular vectors of each task matrix (TSV-Merge).",
            "https://arxiv.org/abs/2412.00081"),
    _deltas("iso_c", iso_c, IsoCParams,
            "Sum of task matrices with a flat spectrum (isotropic merging).", _ISO),
    _deltas("iso_cts", iso_cts, IsoCtsParams,
            "Common plus task-specific subspaces with a flat spectrum (Iso-CTS).", _ISO),
)

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in _METHODS}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``.

    Raises:
        UserError: no such method; the message lists close matches and all valid names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise UserError(f"unknown merge method {name!r}{hint}; valid: {', '.join(REGISTRY)}") from None
