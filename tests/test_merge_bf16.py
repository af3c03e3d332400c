"""Task vectors like real bf16 fine-tunes: mostly exact zeros, the rest a few hundred magnitudes.

Real bf16 checkpoints (``orchestrator.zoo.real_pair``: 63-74% of the deltas exactly zero, 690
distinct magnitudes in a 885k-entry tensor) made magnitude selection, sign election and the
sphere/variance merges slow, and one SVD fail; the synthetic float32 cases never showed it.
Here every fast path is checked against a plain reference written the obvious way (full stable
sort, stacked tensors), on that pattern and at sizes that cross the slice and sample limits:

* ranks and thresholds: exact, ties at a cut broken by flat position (a stable sort's order);
* TIES / breadcrumbs (whole and fused), sce, arcee_fusion, ram, ramplus_tl, karcher,
  multislerp, model_stock: equal to the reference (bits where the docstrings promise them);
* determinism: the same bits on a second run;
* iso_cts: an SVD that fails to converge in float32 is redone in float64.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.merge import REGISTRY, chunks, selection, spectral
from orchestrator.merge.selection import Window, order_statistics, rank_window, select_ranks, window_from

N_BIG = 300_000  # > selection.SAMPLE and several CPU slices


def bf16_pair(n: int, seed: int = 0, zeros: float = 0.7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and two fine-tunes of it as float32: ``base`` (n,), deltas [(n,), (n,)].

    About ``zeros`` of each delta is exactly 0 (the update rounds away in bf16), the rest are
    one or a few bf16 steps, so magnitudes repeat thousands of times.
    """
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    deltas = []
    for _ in range(2):
        step = torch.randn(n, generator=g) * 4e-4
        step[torch.rand(n, generator=g) < zeros - 0.1] = 0  # plus those rounding to 0 in bf16
        deltas.append((base.float() + step).bfloat16().float() - base.float())
    return base.float(), deltas


def stable_window_mask(delta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Reference: 0/1 mask of ascending ranks ``[start, stop)`` of ``|delta|``, ties by position."""
    order = torch.argsort(delta.abs().reshape(-1), stable=True)
    mask = torch.zeros(delta.numel())
    mask[order[max(start, 0):stop]] = 1.0
    return mask.view(delta.shape)


def test_the_synthetic_deltas_look_like_the_real_pair():
    _, (d, _) = bf16_pair(N_BIG)
    zero = float((d == 0).float().mean())
    assert 0.6 < zero < 0.8
    assert torch.unique(d.abs()).numel() < 2_000  # thousands of ties per magnitude


# ranks and thresholds ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["sample", "radix", "small"])
def test_select_ranks_is_exact_on_tied_data(path):
    _, (d, e) = bf16_pair(N_BIG if path != "small" else 5_000, seed=1)
    values = torch.cat([d, -e])  # negative values too: the keys order every float32
    n = values.numel()
    ranks = [0, 1, n // 3, n // 2, n - n // 100, n - 1]
    sample = selection.sample_of(values) if path == "sample" else None
    found = select_ranks(lambda a, b: values[a:b], n, 65_536, ranks, sample)
    ordered = torch.sort(values).values
    for rank, r in zip(ranks, found):
        assert r.value == float(ordered[rank])
        assert (r.below, r.equal) == (int((values < r.value).sum()), int((values == r.value).sum()))
    assert torch.equal(torch.stack(order_statistics(values, ranks)), ordered[ranks])


def test_a_bracket_that_misses_falls_back_to_exact_selection():
    _, (d, _) = bf16_pair(N_BIG, seed=2)
    values = d.abs()
    wrong_sample = torch.zeros(selection.SAMPLE).numpy()  # all zeros: brackets miss the top
    n = values.numel()
    (r,) = select_ranks(lambda a, b: values[a:b], n, 65_536, [n - 10], wrong_sample)
    assert r.value == float(torch.sort(values).values[n - 10])


@pytest.mark.parametrize("window", [(0.5, 1.0), (0.9, 1.0), (0.49, 0.99), (0.2, 0.75), (0.99, 1.0)])
def test_rank_window_and_window_from_equal_a_stable_sort(window):
    _, (d, _) = bf16_pair(N_BIG, seed=3)
    n = d.numel()
    start, stop = int(window[0] * n), int(window[1] * n)
    expected = stable_window_mask(d, start, stop)
    work = d.abs()
    rank_window(work, d, start, stop)
    assert torch.equal(work, expected)
    lo, hi, drop_lo, drop_hi = window_from(lambda a, b: d[a:b].abs(), n, 65_536, start, stop,
                                           selection.sample_of(d.abs()))
    # The same selection as thresholds and tie cuts (sparsify's Window), applied per slice.
    kept = _apply_window(d, lo, hi, drop_lo, drop_hi)
    assert torch.equal(kept, d * expected)


def _apply_window(d: torch.Tensor, lo, hi, drop_lo: int, drop_hi: int) -> torch.Tensor:
    a = d.abs()
    lo_cut = int(torch.nonzero(a == lo)[drop_lo - 1]) if lo and drop_lo else -1
    hi_cut = int(torch.nonzero(a == hi)[-drop_hi]) if hi is not None and drop_hi else 1 << 62
    window = Window(lo=None if lo == 0 else lo, hi=hi, lo_cut=lo_cut, hi_cut=hi_cut,
                    empty=hi == 0)
    out, tmp = torch.empty(d.numel()), torch.empty(d.numel())
    for start, stop in chunks.spans(d.numel(), 65_536):
        window.apply(d[start:stop], out[start:stop], start, tmp)
    return out


def test_ties_at_the_top_k_cut_keep_the_later_positions():
    # 10 entries tie at the cut: the top-k keeps the 6 that come last, every run.
    delta = torch.tensor([0.5] * 10 + [0.0] * 5 + [1.0, 2.0, 3.0, 0.1, 0.1])
    n, k = delta.numel(), 9  # 3 larger than the tie, then 6 of the 10 tied entries
    for _ in range(2):
        work = delta.abs()
        rank_window(work, delta, n - k, n)
        assert work.tolist() == [0.0] * 4 + [1.0] * 6 + [0.0] * 5 + [1.0] * 3 + [0.0] * 2



def _rows_cases() -> dict[str, torch.Tensor]:
    _, (d, e) = bf16_pair(1536 * 96, seed=3)
    bf16 = d.view(1536, 96).abs()
    few, many = bf16.clone(), bf16.clone()
    for t, every in ((few, 20), (many, 7)):  # values that are not bf16 numbers, in 1 row of `every`
        t[::every, 5] = 1e-3 + torch.arange(t[::every].shape[0]) * 1e-9
        t[::every, 9] = t[::every, 5]  # tied with one
    return {
        "bf16 deltas": bf16,
        "a few rows with non-bf16 values (those rows by torch)": few,
        "many rows with non-bf16 values (dense keys)": many,
        "float32 values, 100k distinct (torch path)": torch.rand(400, 250, generator=torch.Generator().manual_seed(1)),
        "all zero and all equal rows": torch.cat([torch.zeros(3, 40), torch.full((3, 40), 0.25)]),
        "one column": e.view(-1, 1)[:500].abs(),
        "one row": e[:3000].abs().view(1, -1),
        "negative values (torch path)": d.view(1536, 96),
        "float64 (torch path)": bf16.double(),
        "three dimensions (torch path)": bf16.reshape(96, 16, 96),
        "a strided view, many non-bf16 rows": many.t().contiguous().t(),
    }


@pytest.mark.parametrize("case", list(_rows_cases()))
def test_row_order_equals_a_stable_argsort(case):
    # DELLA's per-row ranks: numpy's 16-bit radix sort on bf16 rows, torch's sort elsewhere.
    mags = _rows_cases()[case]
    assert torch.equal(selection.row_order(mags), mags.argsort(dim=1, stable=True))


def test_della_on_bf16_deltas_equals_the_stable_sort_reference():
    from types import SimpleNamespace

    from orchestrator.merge.sparsify import sparsify
    _, (d, _) = bf16_pair(2048 * 64, seed=5)
    delta = d.view(2048, 64)
    model = SimpleNamespace(density=0.4, epsilon=0.15)
    got = sparsify(delta, model, "della_magprune", rescale="density",
                   generator=torch.Generator().manual_seed(9))
    ranks = torch.empty(delta.shape).scatter_(
        1, delta.abs().argsort(dim=1, stable=True), torch.arange(64.0).expand(2048, 64))
    probs = ranks * (2 * 0.15 / 63) + (0.4 - 0.15)  # the rank's keep probability
    keep = torch.empty(delta.shape).uniform_(generator=torch.Generator().manual_seed(9)) < probs
    assert torch.equal(got, delta * keep / probs)

# generalized task arithmetic: ties, breadcrumbs ----------------------------------------------------

def ties_reference(deltas, weights, masks, normalize=True) -> torch.Tensor:
    """mergekit's TIES on masked deltas, written on stacked tensors."""
    trimmed = torch.stack([d * m for d, m in zip(deltas, masks)])  # (n, d)
    w = torch.tensor(weights).view(-1, 1)
    weighted = trimmed * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(weighted) == elected
    mixed = (weighted * agree).sum(0)
    if not normalize:
        return mixed
    divisor = (w * agree).sum(0)
    return mixed / torch.where(divisor == 0, 1.0, divisor)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs"])
def test_magnitude_methods_equal_the_reference(method):
    base, deltas = bf16_pair(N_BIG, seed=4)
    spec = REGISTRY[method]
    per_model = {"weight": 0.5, "density": 0.4, **({"gamma": 0.02} if "bread" in method else {})}
    models = [spec.make_model_params(per_model) for _ in deltas]
    params = spec.make_params({})
    n = base.numel()
    if "bread" in method:
        start = n - int(0.4 * n) - int(0.02 * n)
        masks = [stable_window_mask(d, start, start + int(0.4 * n)) for d in deltas]
    else:
        masks = [stable_window_mask(d, n - int(0.4 * n), n) for d in deltas]
    if method == "breadcrumbs":
        expected = sum(0.5 * d * m for d, m in zip(deltas, masks))
    else:
        expected = ties_reference(deltas, [0.5, 0.5], masks, normalize=params.normalize)
    merged = spec.fn(deltas, base, models, params, None)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(spec.fn(deltas, base, models, params, None), merged)  # deterministic
    fused = spec.fused([base + d for d in deltas], base, models, params, None)
    assert torch.equal(fused, merged + base)  # the streaming path, same bits


def test_ties_from_bf16_tensors_equals_ties_on_float32_deltas():
    base, deltas = bf16_pair(N_BIG, seed=5)
    spec = REGISTRY["ties"]
    models = [spec.make_model_params({"weight": w, "density": 0.3}) for w in (0.7, 0.3)]
    params = spec.make_params({})
    xs = [(base + d).bfloat16() for d in deltas]
    fused = spec.fused(xs, base.bfloat16(), models, params, None)
    whole = spec.fn([x.float() - base for x in xs], base, models, params, None) + base
    assert torch.equal(fused, whole)


# the other methods against references on stacked tensors ------------------------------------------

def _run(method: str, xs, base, **glob) -> torch.Tensor:
    spec = REGISTRY[method]
    return spec.fn(xs, base, [spec.make_model_params({"weight": 0.5} if "weight" in spec.model_keys()
                                                    else {}) for _ in xs],
                   spec.make_params(glob), None)


def test_sce_equals_the_reference():
    base, deltas = bf16_pair(N_BIG, seed=6)
    deltas = [deltas[0] * 30, deltas[1] * 10]  # energies above mergekit's uniform cut-off
    tvs = torch.stack(deltas)
    var = ((deltas[0] - deltas[1]) / 2).square()  # two models' variance, correctly rounded
    k = int(torch.count_nonzero(var) * 0.5)
    mask = stable_window_mask(var, var.numel() - k, var.numel())
    tvs = tvs * mask
    w = tvs.square().mean(dim=1)
    w = (w / w.sum() if w.sum() >= 1e-6 else torch.full_like(w, 0.5)).view(-1, 1)  # mergekit
    erased = (torch.sign(tvs) == torch.where(tvs.sum(0) >= 0, 1.0, -1.0)) * w
    expected = (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(_run("sce", deltas, base, select_topk=0.5), expected,
                               rtol=1e-5, atol=1e-9)


def test_arcee_fusion_equals_the_reference():
    base, (d, _) = bf16_pair(576 * 600, seed=7)
    b, x = base.view(600, 576), (base + d).view(600, 576)
    p, q = F.softmax(x, -1) + 1e-8, F.softmax(b, -1) + 1e-8
    importance = (x - b).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = torch.sort(importance.reshape(-1)).values
    last = s.numel() - 1
    threshold = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
    expected = b + (x - b) * (importance >= threshold)
    assert torch.equal(_run("arcee_fusion", [x], b), expected)


def ram_reference(deltas, plus: bool, r=0.1, alpha=0.2, eps=1e-5) -> torch.Tensor:
    tvs = torch.stack(deltas)
    active = tvs.abs() > eps
    kept, count = tvs * active, active.sum(0)
    if not plus:
        return kept.sum(0) / count.clamp(min=1)
    unique, shared = count == 1, count > 1
    shared_i = (active & shared).sum(1).double()
    unique_i = (active & unique).sum(1).double()
    rho = torch.where(unique_i > 0, shared_i / unique_i.clamp(min=eps), 0.0)
    boost = (1 + r * rho.clamp(0, alpha)).float().view(-1, 1)
    return (kept * unique * boost).sum(0) + (kept * shared).sum(0) / count.clamp(min=1)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_equals_the_reference_bit_for_bit(method):
    base, deltas = bf16_pair(N_BIG, seed=8, zeros=0.5)
    deltas.append(deltas[0] * (torch.arange(N_BIG) % 3 == 0))  # a third model sharing entries
    assert torch.equal(_run(method, deltas, base), ram_reference(deltas, method == "ramplus_tl"))


def karcher_reference(tensors, max_iter=10, tol=1e-5) -> torch.Tensor:
    """The stacked float64 fixed-point iteration (what the Gram version must reproduce)."""
    x = torch.stack([t.double().reshape(-1) for t in tensors])
    norms = x.norm(dim=1)
    units = x / norms.unsqueeze(1)
    alphas = torch.full((len(tensors),), 1 / len(tensors), dtype=torch.float64)
    mean = alphas @ units
    mean = mean / mean.norm()
    for _ in range(max_iter):
        cos = (units @ mean).clamp(-1, 1)
        theta = torch.arccos(cos)
        coef = torch.where(theta >= tol, alphas * theta / torch.sin(theta), 0.0)
        tangent = coef @ units - (coef @ cos) * mean
        tn = tangent.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (mean * norms.mean()).float().view(tensors[0].shape)


def test_karcher_equals_the_reference():
    base, deltas = bf16_pair(N_BIG, seed=9)
    xs = [base + 5 * d for d in deltas] + [base - 3 * deltas[0]]
    torch.testing.assert_close(_run("karcher", xs[:2], xs[2]), karcher_reference(xs),
                               rtol=1e-5, atol=1e-8)


def test_multislerp_equals_the_reference():
    base, deltas = bf16_pair(N_BIG, seed=10)
    deltas.append(deltas[1] - deltas[0])
    x = torch.stack([d.double() for d in deltas])
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    norms = x.norm(dim=1)
    mean = w @ (x / (norms.unsqueeze(1) + 1e-8))
    expected = (mean / mean.norm() * (w @ norms)).float() + base  # the tangent is ~0
    torch.testing.assert_close(_run("multislerp", [base + d for d in deltas], base), expected,
                               rtol=1e-5, atol=1e-8)


def test_model_stock_equals_the_reference():
    base, deltas = bf16_pair(N_BIG, seed=11)
    deltas.append(deltas[0] + deltas[1])
    xs = [base + d for d in deltas]
    cos = torch.stack([(deltas[i] @ deltas[j]) / (deltas[i].norm() * deltas[j].norm())
                       for i, j in combinations(range(3), 2)]).mean()
    t = 3 * cos / (1 + 2 * cos)
    expected = t * (sum(xs) / 3) + (1 - t) * base
    torch.testing.assert_close(_run("model_stock", xs, base), expected, rtol=1e-5, atol=1e-8)


# spectral -------------------------------------------------------------------------------------------

def test_an_svd_that_fails_in_float32_is_redone_in_float64(monkeypatch):
    base, deltas = bf16_pair(96 * 64, seed=12)
    deltas = [d.view(96, 64) for d in deltas]
    expected = _run("iso_cts", deltas, base.view(96, 64))
    svd = torch.linalg.svd

    def failing(matrix, *args, **kwargs):  # LAPACK's float32 gesdd not converging
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(spectral.torch.linalg, "svd", failing)
    torch.testing.assert_close(_run("iso_cts", deltas, base.view(96, 64)), expected,
                               rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _real_pair() -> Path | None:
    from orchestrator.zoo.real_pair import DEFAULT_DIR, ENV_DIR

    import os
    folder = Path(os.environ.get(ENV_DIR) or DEFAULT_DIR).expanduser()
    return folder if (folder / "ft_b" / "model.safetensors").exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_real_pair() is None, reason="the real pair is not built (python -m "
                    "orchestrator.zoo.real_pair)")
def test_iso_cts_merges_the_real_tensor_whose_svd_did_not_converge():
    from safetensors import safe_open

    name, folder = "model.layers.12.self_attn.o_proj.weight", _real_pair()
    tensors = {}
    for model in ("base", "ft_a", "ft_b"):
        with safe_open(str(folder / model / "model.safetensors"), "pt") as f:
            tensors[model] = f.get_tensor(name).float()
    deltas = [tensors["ft_a"] - tensors["base"], tensors["ft_b"] - tensors["base"]]
    merged = _run("iso_cts", deltas, tensors["base"])  # raised LinAlgError before
    assert torch.isfinite(merged).all() and merged.abs().max() > 0


@pytest.mark.parametrize("method, extra", [("model_stock", {}),
                                           ("model_stock", {"filter_wise": True}),
                                           ("karcher", {}), ("multislerp", {})])
def test_any_dtype_methods_read_bf16_as_stored_with_the_same_bits(tmp_path, method, extra,
                                                                  monkeypatch):
    """Methods flagged ``any_dtype`` get the stored bf16 tensors in the streaming engine (no
    whole float32 copies: ``StreamReader._read`` is never called) and give the bits that
    float32 copies give (the CachedReader path the resident merge uses)."""
    from orchestrator.engine import CachedReader, StreamReader, compute_tensor, open_models
    from orchestrator.engine.plan import build_plan
    from orchestrator.engine.recipe import Recipe
    from tests.tiny import make_tiny_family

    assert REGISTRY[method].any_dtype
    family = make_tiny_family(tmp_path, dtype=torch.bfloat16)
    recipe = Recipe.from_dict({
        "models": [{"model": str(family[k]),
                    **({"parameters": {"weight": w}} if method == "multislerp" else {})}
                   for k, w in [("ft_a", 0.6), ("ft_b", 0.4)]],
        "base_model": str(family["base"]), "merge_method": method, "parameters": extra})
    weights = open_models(recipe)
    plan = build_plan(recipe, weights)
    cached = {t.name: compute_tensor(t, plan.method, CachedReader(weights, torch.device("cpu")), 0)
              for t in plan.tasks}
    reads = []
    original = StreamReader._read
    monkeypatch.setattr(StreamReader, "_read", lambda self, ref: reads.append(ref) or original(self, ref))
    reader = StreamReader(weights, torch.device("cpu"))
    streamed = {t.name: compute_tensor(t, plan.method, reader, 0) for t in plan.tasks}
    assert reads == []
    assert all(torch.equal(streamed[k], cached[k]) for k in cached)
    assert all(v.dtype == torch.float32 for v in streamed.values() if v.is_floating_point())
