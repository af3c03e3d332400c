"""Oracle tests: small tensors whose merged values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.merge import REGISTRY

T = torch.tensor
R2 = math.sqrt(0.5)


def merge(name: str, xs, base=None, models=(), seed: int = 0, **glob) -> torch.Tensor:
    """Run a registered method with recipe-style keys (``lambda`` may be passed as ``lambda_``)."""
    method = REGISTRY[name]
    glob = {k.rstrip("_"): v for k, v in glob.items()}
    generator = torch.Generator().manual_seed(seed) if method.random else None
    return method.fn([T(x, dtype=torch.float32) for x in xs],
                     None if base is None else T(base, dtype=torch.float32),
                     [method.make_model_params(m) for m in models], method.make_params(glob), generator)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


# linear ------------------------------------------------------------------------------------------

def test_linear_normalized_and_not():
    xs = [[1, 2, 3, 4], [3, 2, 1, 0]]
    models = [{"weight": 1.0}, {"weight": 3.0}]
    # 1*[1,2,3,4] + 3*[3,2,1,0] = [10, 8, 6, 4]; normalized by 1 + 3 = 4.
    close(merge("linear", xs, models=models), [2.5, 2.0, 1.5, 1.0])
    close(merge("linear", xs, models=models, normalize=False), [10, 8, 6, 4])


def test_linear_weights_summing_to_zero_are_refused_when_normalizing():
    models = [{"weight": 1.0}, {"weight": -1.0}]
    with pytest.raises(ValueError, match="weights sum to zero"):
        merge("linear", [[1, 2], [3, 4]], models=models)
    close(merge("linear", [[1, 2], [3, 4]], models=models, normalize=False), [-2, -2])


# slerp / nuslerp ---------------------------------------------------------------------------------

def test_slerp_orthogonal_halfway():
    # θ = π/2: coefficients sin(π/4)/sin(π/2) = √½ each, applied to the raw tensors.
    close(merge("slerp", [[0, 1, 0, 0]], base=[1, 0, 0, 0], t=0.5), [R2, R2, 0, 0])
    close(merge("slerp", [[0, 2, 0, 0]], base=[2, 0, 0, 0], t=0.5), [2 * R2, 2 * R2, 0, 0])
    # Unequal norms: the raw tensors keep their lengths in the mix (no renormalisation).
    close(merge("slerp", [[0, 4]], base=[2, 0], t=0.5), [2 * R2, 4 * R2])


def test_slerp_endpoints_and_collinear_fallback():
    base, other = [1.0, 2, 3, 4], [0.5, -1, 2, 0]
    close(merge("slerp", [other], base=base, t=0.0), base)
    close(merge("slerp", [other], base=base, t=1.0), other)
    # Parallel (cos = 1) and antiparallel (cos = -1): lerp (1 - t) base + t other.
    close(merge("slerp", [[2, 4, 6, 8]], base=base, t=0.25), [1.25, 2.5, 3.75, 5.0])
    close(merge("slerp", [[-1, -2, -3, -4]], base=base, t=0.25), [0.5, 1.0, 1.5, 2.0])


def test_slerp_threshold_is_mergekits():
    base = T([1.0, 0.0])
    for angle, lerps in [(0.03, True), (0.04, False)]:  # cos 0.99955 > 0.9995 > cos 0.9992
        other = T([math.cos(angle), math.sin(angle)])
        out = merge("slerp", [other.tolist()], base=base.tolist(), t=0.5)
        lerp = 0.5 * (base + other)
        assert torch.allclose(out, lerp, rtol=0, atol=1e-7) == lerps


def test_nuslerp_t_from_weights():
    # t = 3 / (1 + 3) = 0.75 between orthogonal unit vectors: [sin(π/8), sin(3π/8)].
    models = [{"weight": 1.0}, {"weight": 3.0}]
    expected = [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]
    close(merge("nuslerp", [[1, 0], [0, 1]], models=models), expected)
    # With a base, the task vectors are slerped and the base added back.
    close(merge("nuslerp", [[2, 1], [1, 2]], base=[1, 1], models=models),
          [1 + expected[0], 1 + expected[1]])
    # Weights that cancel give t = 0.5.
    close(merge("nuslerp", [[1, 0], [0, 1]], models=[{"weight": 1.0}, {"weight": -1.0}]), [R2, R2])


def test_nuslerp_row_and_column_wise():
    # Rows [1,0]/[0,1] (orthogonal) and [1,0]/[1,0] (collinear -> lerp), t = 0.5.
    a, b = [[1, 0], [1, 0]], [[0, 1], [1, 0]]
    models = [{"weight": 1.0}, {"weight": 1.0}]
    close(merge("nuslerp", [a, b], models=models, nuslerp_flatten=False), [[R2, R2], [1, 0]])
    # row_wise takes the angle along dim 0 (per column). Column 0: [1,1] and [0,1] are 45° apart,
    # both coefficients c = sin(π/8)/sin(π/4), so c [1, 2]. Column 1: [0,0] has no direction
    # (cos 0, as if orthogonal): √½ [0,0] + √½ [1,0].
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    expected = [[c, R2], [2 * c, 0.0]]
    close(merge("nuslerp", [a, b], models=models, nuslerp_flatten=False, nuslerp_row_wise=True),
          expected)


# multislerp / karcher ----------------------------------------------------------------------------

def test_multislerp_orthogonal_vectors():
    # Unit directions e1, e2 with equal weights: mean direction (e1 + e2)/√2, times the
    # weighted mean norm (2 + 4) / 2 = 3.
    out = merge("multislerp", [[2, 0], [0, 4]], models=[{"weight": 1.0}, {"weight": 1.0}])
    close(out, [3 * R2, 3 * R2])
    # With a base, on task vectors.
    out = merge("multislerp", [[3, 1], [1, 5]], base=[1, 1], models=[{"weight": 1.0}, {"weight": 1.0}])
    close(out, [1 + 3 * R2, 1 + 3 * R2])


def test_multislerp_antipodal():
    models = [{"weight": 1.0}, {"weight": 1.0}]
    # Two antipodal inputs fall back to the weighted sum (as mergekit): 0.5 a - 0.5 a = 0.
    close(merge("multislerp", [[1, 2], [-1, -2]], models=models), [0, 0])
    with pytest.raises(ValueError, match="antipodal"):
        merge("multislerp", [[1, 0], [-1, 0], [0, 0]], models=models + [{"weight": 0.0}])


def test_karcher_symmetric_means():
    # Geodesic midpoint of e1 and e2 is (e1 + e2)/√2; mean norm (1 + 3) / 2 = 2.
    close(merge("karcher", [[1, 0], [0, 3]]), [2 * R2, 2 * R2])
    # Three orthogonal directions: (1, 1, 1)/√3 times mean norm 1; a base counts as a model.
    r3 = 1 / math.sqrt(3)
    close(merge("karcher", [[1, 0, 0], [0, 1, 0]], base=[0, 0, 1]), [r3, r3, r3])


# task arithmetic and TIES ------------------------------------------------------------------------

def test_task_arithmetic():
    deltas = [[1, -2, 0, 4], [2, 2, -1, 0]]
    models = [{"weight": 1.0}, {"weight": 0.5}]
    # 1*d1 + 0.5*d2 = [2, -1, -0.5, 4]; lambda 2 -> [4, -2, -1, 8]; normalize divides by 1.5.
    close(merge("task_arithmetic", deltas, base=[0] * 4, models=models, lambda_=2.0), [4, -2, -1, 8])
    close(merge("task_arithmetic", deltas, base=[0] * 4, models=models, normalize=True),
          [2 / 1.5, -1 / 1.5, -0.5 / 1.5, 4 / 1.5])


# Worked TIES sign election, density 1 (no trimming), weights (1, 1, 2):
#   entry:        0     1     2     3     4     5     6
#   d1          3    -1     2    -4   0.5    0     1
#   d2         -1    -2     1     3  -0.5    0     1
#   d3          2     1    -4     1   0.5    0  -1.5      (weighted: 4 2 -8 2 1 0 -3)
# weighted_sum (mergekit) elects on 1*d1 + 1*d2 + 2*d3 = 6 -1 -5 1 1 0 -1 -> + - - + + + -
#   agreeing weighted sum   7    -3    -8     5   1.5    0    -3
#   agreeing weights        3     2     2     3     3    1*    2     (*0 -> 1)
# sum (paper/PEFT) elects on d1 + d2 + d3 = 4 -2 -1 0 0.5 0 0.5 -> + - - + + + +
#   agreeing weighted sum   7    -3    -8     5   1.5    0     2
#   agreeing count          2     2     1     2     2    1*    2
TIES_DELTAS = [[3, -1, 2, -4, 0.5, 0, 1], [-1, -2, 1, 3, -0.5, 0, 1], [2, 1, -4, 1, 0.5, 0, -1.5]]
TIES_MODELS = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0}]


def test_ties_weighted_sign_election():
    out = merge("ties", TIES_DELTAS, base=[0] * 7, models=TIES_MODELS)
    close(out, [7 / 3, -1.5, -4, 5 / 3, 0.5, 0, -1.5])
    out = merge("ties", TIES_DELTAS, base=[0] * 7, models=TIES_MODELS, normalize=False)
    close(out, [7, -3, -8, 5, 1.5, 0, -3])


def test_ties_paper_sign_election():
    out = merge("ties", TIES_DELTAS, base=[0] * 7, models=TIES_MODELS, sign_method="sum")
    close(out, [3.5, -1.5, -8, 2.5, 0.75, 0, 1])


def test_ties_variants_agree_with_unit_weights():
    models = [{"weight": 1.0}] * 3
    weighted = merge("ties", TIES_DELTAS, base=[0] * 7, models=models)
    close(merge("ties", TIES_DELTAS, base=[0] * 7, models=models, sign_method="sum"), weighted.tolist())


def test_ties_negative_weight_votes_with_its_weighted_sign():
    # d = [1, 1] with weights (1, -1): weighted deltas 1 and -1 sum to 0 -> + elected; only
    # model 1 agrees, divisor 1.
    out = merge("ties", [[1, 1], [1, 1]], base=[0, 0], models=[{"weight": 1.0}, {"weight": -1.0}])
    close(out, [1, 1])


def test_ties_trims_to_top_k_magnitudes():
    # k = int(0.5 * 7) = 3: keep |d| = 4, 3, 2.
    delta = [3, -1, 2, -4, 0.5, 0, 1]
    out = merge("ties", [delta], base=[0] * 7, models=[{"weight": 1.0, "density": 0.5}])
    close(out, [3, 0, 2, -4, 0, 0, 0])


def test_magnitude_ties_at_the_threshold_keep_exactly_k():
    # k = 2 of |d| = 1, 1, 1, 2: the largest, then the last of the tied ones (ties rank by position).
    out = merge("ties", [[1, -1, 1, 2]], base=[0] * 4, models=[{"weight": 1.0, "density": 0.5}])
    close(out, [0, 0, 1, 2])


# DARE --------------------------------------------------------------------------------------------

def _dare_mask(shape, density: float, seed: int) -> torch.Tensor:
    """The keep mask DARE draws: uniform(0, 1) < density from a generator seeded with ``seed``."""
    return (torch.empty(shape).uniform_(generator=torch.Generator().manual_seed(seed)) < density).float()


@pytest.mark.parametrize("rescale_mode", ["l1", "density"])
def test_dare_linear_fixed_mask_and_rescale(rescale_mode):
    delta = T([1.0, -2, 3, -4, 5, -6, 7, -8])
    mask = _dare_mask(delta.shape, 0.5, seed=11)
    assert 0 < mask.sum() < 8  # the seed drops some and keeps some
    kept = delta * mask
    # l1 (mergekit): scale by sum|delta| / sum|kept|; density (paper/PEFT): by 1 / 0.5.
    scale = delta.abs().sum() / kept.abs().sum() if rescale_mode == "l1" else 2.0
    out = merge("dare_linear", [delta.tolist()], base=[0] * 8, models=[{"weight": 1.0, "density": 0.5}],
                seed=11, rescale_mode=rescale_mode)
    close(out, (kept * scale).tolist())
    out = merge("dare_linear", [delta.tolist()], base=[0] * 8, models=[{"weight": 1.0, "density": 0.5}],
                seed=11, rescale=False)
    close(out, kept.tolist())


def test_dare_keeps_about_density():
    out = merge("dare_linear", [[1.0] * 100_000], base=[0.0] * 100_000,
                models=[{"weight": 1.0, "density": 0.3}], rescale=False)
    assert abs(float(out.mean()) - 0.3) < 0.01


def test_dare_ties_draws_one_mask_per_model_in_order():
    delta = [1.0, -2, 3, -4, 5, -6, 7, -8]
    g = torch.Generator().manual_seed(5)
    m1 = (torch.empty(8).uniform_(generator=g) < 0.6).float()
    m2 = (torch.empty(8).uniform_(generator=g) < 0.6).float()
    out = merge("dare_ties", [delta, delta], base=[0] * 8, seed=5, rescale=False,
                models=[{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.6}])
    close(out, (T(delta) * (m1 + m2)).tolist())  # same signs: every kept entry agrees; no normalize


# Model Breadcrumbs -------------------------------------------------------------------------------

BREADCRUMB = [0.1, -5, 0.3, 2, -0.2, 1, 0.05, -3, 0.4, 0.6]
# ascending |d|: 0.05 0.1 0.2 0.3 0.4 0.6 1 2 3 5  (positions 6 0 4 2 8 9 5 3 7 1)


def test_breadcrumbs_drops_outliers_and_small_entries():
    # n = 10, density 0.5 -> keep 5; gamma 0.1 -> drop 1 outlier; n_bot = 10 - 5 - 1 = 4:
    # ascending ranks 4..8 -> 0.4 0.6 1 2 3.
    out = merge("breadcrumbs", [BREADCRUMB], base=[0] * 10,
                models=[{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    close(out, [0, 0, 0, 2, 0, 1, 0, -3, 0.4, 0.6])


def test_breadcrumbs_gamma_zero_is_magnitude_trimming():
    # mergekit <= 0.1.4 sliced indices[n_bot:-0] and dropped everything at gamma=0; 0.1.5 (and we)
    # keep the top int(density * n), as TIES does.
    out = merge("breadcrumbs", [BREADCRUMB], base=[0] * 10,
                models=[{"weight": 1.0, "density": 0.5, "gamma": 0.0}])
    close(out, [0, -5, 0, 2, 0, 1, 0, -3, 0, 0.6])
    ties = merge("ties", [BREADCRUMB], base=[0] * 10, models=[{"weight": 1.0, "density": 0.5}])
    close(out, ties.tolist())


def test_breadcrumbs_reduces_outlier_removal_to_keep_density():
    # density 0.9 keeps 9; gamma 0.5 wants 5 outliers gone but only 1 can go: n_bot = 0, ranks 0..8.
    out = merge("breadcrumbs", [BREADCRUMB], base=[0] * 10,
                models=[{"weight": 1.0, "density": 0.9, "gamma": 0.5}])
    close(out, [0.1, 0, 0.3, 2, -0.2, 1, 0.05, -3, 0.4, 0.6])


# DELLA -------------------------------------------------------------------------------------------

def test_della_keep_probability_grows_with_rank():
    # Row of 5: ranks 0..4 -> p = 0.3 + rank * 0.4 / 4 = 0.3 0.4 0.5 0.6 0.7 (density 0.5, eps 0.2).
    row = [5.0, 1, 3, 2, 4]  # ranks 4 0 2 1 3
    n = 20_000
    out = merge("della_linear", [row * n], base=[0] * (5 * n), rescale=False,
                models=[{"weight": 1.0, "density": 0.5, "epsilon": 0.2}])
    kept = (out.view(n, 5) != 0).float().mean(dim=0)  # one long row: ranks across all entries
    assert kept[1] < kept[3] < kept[2] < kept[4] < kept[0]
    # Per-row ranking: a (n, 5) matrix ranks inside each row.
    out = merge("della_linear", [[row] * n], base=[[0] * 5] * n, rescale=False,
                models=[{"weight": 1.0, "density": 0.5, "epsilon": 0.2}])
    kept = (out != 0).float().mean(dim=0)
    torch.testing.assert_close(kept, T([0.7, 0.3, 0.5, 0.4, 0.6]), atol=0.015, rtol=0)


def test_della_single_entry_rows_keep_with_density():
    # A row of one entry has no rank spread: p = density (mergekit divides 0 by 0 and raises).
    out = merge("della_linear", [[[1.0]] * 20_000], base=[[0.0]] * 20_000, rescale=False,
                models=[{"weight": 1.0, "density": 0.4, "epsilon": 0.2}])
    assert abs(float((out != 0).float().mean()) - 0.4) < 0.02


def test_della_density_rescale_divides_by_each_keep_probability():
    row = [[5.0, 1, 3, 2, 4]]
    out = merge("della_linear", [row], base=[[0] * 5], rescale_mode="density", seed=1,
                models=[{"weight": 1.0, "density": 0.5, "epsilon": 0.2}])
    p = T([[0.7, 0.3, 0.5, 0.4, 0.6]])
    kept = out != 0
    close(out[kept], (T(row) / p)[kept].tolist())


# Model Stock and passthrough ---------------------------------------------------------------------

def test_model_stock_angle_ratio():
    # Offsets (1, 0) and (0.5, √3/2) are 60° apart: cos = 0.5, n = 2 -> t = 2*0.5/(1 + 0.5) = 2/3.
    # average = base + (0.75, √3/4); result = base + t (average - base) = (1.5, 1 + √3/6).
    s3 = math.sqrt(3)
    out = merge("model_stock", [[2, 1], [1.5, 1 + s3 / 2]], base=[1, 1])
    close(out, [1.5, 1 + s3 / 6])


def test_model_stock_three_models_and_filter_wise():
    # Three mutually orthogonal offsets: mean cos 0 -> t = 0 -> the base.
    close(merge("model_stock", [[1, 0, 0], [0, 1, 0], [0, 0, 1]], base=[0, 0, 0]), [0, 0, 0])
    # filter_wise: row 0 has parallel offsets (cos 1 -> t = 1 -> average), row 1 orthogonal (base).
    xs = [[[1, 0], [1, 0]], [[2, 0], [0, 1]]]
    close(merge("model_stock", xs, base=[[0, 0], [0, 0]], filter_wise=True), [[1.5, 0], [0, 0]])


def test_passthrough_scale():
    close(merge("passthrough", [[1, -2, 3]], models=[{"scale": 0.5}]), [0.5, -1, 1.5])
    close(merge("passthrough", [[1, -2, 3]], models=[{}]), [1, -2, 3])


# SCE ---------------------------------------------------------------------------------------------
# d1 = [2, -1, 0, 1], d2 = [2, 3, -2, -1]
#   energies mean(d^2): 6/4 = 1.5 and 18/4 = 4.5 -> weights 0.25, 0.75
#   elected sign of d1 + d2 = [4, 2, -2, 0] -> + + - + (zero elects +)
#   agreeing: d1 [y n n y], d2 [y y y n]
#   merged: [(0.25*2 + 0.75*2)/1, 0.75*3/0.75, 0.75*-2/0.75, 0.25*1/0.25] = [2, 3, -2, 1]
SCE_DELTAS = [[2, -1, 0, 1], [2, 3, -2, -1]]


def test_sce_energy_weights_and_sign_erasure():
    close(merge("sce", SCE_DELTAS, base=[0] * 4, models=[{}, {}]), [2, 3, -2, 1])


def test_sce_selects_the_top_variance_entries():
    # Variances across the two models: [0, 4, 1, 1]; 3 are non-zero, k = int(3 * 0.5) = 1 keeps
    # entry 1 only: d1 = [0, -1, 0, 0], d2 = [0, 3, 0, 0]; the sum elects +, only d2 agrees.
    out = merge("sce", SCE_DELTAS, base=[0] * 4, models=[{}, {}], select_topk=0.5)
    close(out, [0, 3, 0, 0])
    # select_topk 0 keeps nothing: the base.
    close(merge("sce", SCE_DELTAS, base=[0] * 4, models=[{}, {}], select_topk=0.0), [0] * 4)


def test_sce_tiny_task_vectors_get_uniform_weights():
    # Energies 1e-8 and 5e-8 sum below mergekit's 1e-6: weights 0.5, 0.5 (not 1/6, 5/6).
    # Signs: sum [4e-4, 0] elects + +; d1 agrees at entry 0 only.
    out = merge("sce", [[1e-4, -1e-4], [3e-4, 1e-4]], base=[0, 0], models=[{}, {}])
    torch.testing.assert_close(out, T([2e-4, 1e-4]), rtol=1e-6, atol=1e-12)


# NearSwap ----------------------------------------------------------------------------------------

def test_nearswap_takes_near_values_and_moves_t_towards_far_ones():
    # t = 0.1: w = clamp(0.1 / |delta|, 0, 1) = [1, 0.5, 1, 1 (|delta| clamped to 1e-6)].
    delta = [0.05, -0.2, 0.1, 0.0]
    close(merge("nearswap", [delta], base=[0] * 4, models=[{}], t=0.1), [0.05, -0.1, 0.1, 0.0])
    close(merge("nearswap", [delta], base=[0] * 4, models=[{}], t=0.0), [0.0] * 4)


# RAM / RAM+ --------------------------------------------------------------------------------------
# epsilon 0.5: active |d| > 0.5
#   d1 = [1, 0.2, 2, 0,   -1]   active T F T F T
#   d2 = [3, 0, 0.4, 0,    2]   active T F F F T
#   d3 = [0, 0,   0, 0.1,  1]   active F F F F T
#   count                  2 0 1 0 3
# RAM: shared entries averaged over the active ones, unique ones kept, inactive values dropped:
#   [(1 + 3)/2, 0, 2, 0, (-1 + 2 + 1)/3]
RAM_DELTAS = [[1, 0.2, 2, 0, -1], [3, 0, 0.4, 0, 2], [0, 0, 0, 0.1, 1]]


def test_ram_sums_unique_and_averages_shared_changes():
    close(merge("ram", RAM_DELTAS, base=[0] * 5, models=[{}] * 3, epsilon=0.5),
          [2, 0, 2, 0, 2 / 3])


@pytest.mark.parametrize(("alpha", "boosted"), [(1.0, 3.0), (3.0, 4.0), (0.0, 2.0)])
def test_ramplus_boosts_unique_changes_by_the_shared_ratio(alpha, boosted):
    # d1 has 2 shared active entries (0, 4) and 1 unique (2): rho = 2; lambda = 1 + r clamp(rho,
    # 0, alpha) with r = 0.5: alpha 1 -> 1.5, alpha 3 -> 2, alpha 0 -> 1 (plain RAM). d2 and d3
    # have no unique entries.
    out = merge("ramplus_tl", RAM_DELTAS, base=[0] * 5, models=[{}] * 3, epsilon=0.5, r=0.5,
                alpha=alpha)
    close(out, [2, 0, boosted, 0, 2 / 3])


def test_ramplus_with_zero_epsilon_and_no_unique_entries_is_finite():
    # Identical task vectors: every entry is shared, no model has a unique one (mergekit: 0/0).
    out = merge("ramplus_tl", [[1, -2], [1, -2]], base=[0, 0], models=[{}, {}], epsilon=0.0)
    close(out, [1, -2])


# Arcee Fusion ------------------------------------------------------------------------------------

def test_arcee_fusion_keeps_importance_outliers():
    # A vector has one KL value K > 0, so importance = K |delta|; sorted |delta| = .1 .2 .3 .4 5,
    # N - 1 = 4: q1 = [1] = .2, median = [2] = .3, q3 = [3] = .4 -> threshold K (.3 + 1.5 * .2).
    delta = [0.1, -0.2, 0.3, -0.4, 5.0]
    base = [1.0, 0.0, -1.0, 0.5, 0.0]
    out = merge("arcee_fusion", [[b + d for b, d in zip(base, delta)]], base=base, models=[{}])
    close(out, [1.0, 0.0, -1.0, 0.5, 5.0])


def test_arcee_fusion_weighs_changes_by_their_row_kl():
    # Row 1 moves by a constant 5: the same softmax, KL ~0, so importance ~0 and it is dropped
    # although its changes are the largest. Row 0 has KL K > 0: importances K [.1 .2 .5 2] and
    # ~0 four times; N - 1 = 7: q1 = [1] ~ 0, median = [3] ~ 0, q3 = [5] = .2 K -> threshold .3 K.
    base = [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
    delta = [[0.1, -0.2, 0.5, 2.0], [5.0, 5.0, 5.0, 5.0]]
    x = [[b + d for b, d in zip(rb, rd)] for rb, rd in zip(base, delta)]
    out = merge("arcee_fusion", [x], base=base, models=[{}])
    close(out, [[0.0, 1.0, 0.5, 3.0], [1.0, 0.0, 1.0, 0.0]])


def test_arcee_fusion_quantiles_are_the_floor_index_order_statistics():
    # Against a direct implementation of the formula (numpy sort and floor indices).
    import numpy as np

    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 33, generator=g)
    x = base + 0.05 * torch.randn(6, 33, generator=g)
    p, q = (np.exp(v) / np.exp(v).sum(-1, keepdims=True) + 1e-8 for v in (x.double().numpy(),
                                                                        base.double().numpy()))
    importance = np.abs((x - base).double().numpy()) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s, last = np.sort(importance.ravel()), importance.size - 1
    threshold = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
    want = base + (x - base) * torch.from_numpy(importance >= threshold)
    out = merge("arcee_fusion", [x.tolist()], base=base.tolist(), models=[{}])
    torch.testing.assert_close(out, want.float(), rtol=0, atol=1e-6)
