"""AlphaPruning's spectral signal: the Hill/KS power-law fit on matrices with a known spectrum, and the map
α → sparsity (heavier tail → pruned less) landing on the parameter-weighted budget via fit_to_budget."""
from __future__ import annotations

import math

import pytest
import torch

from msp.allocation.base import AllocationError
from msp.allocation.budget import fit_to_budget, weighted_mean
from msp.allocation.spectral import (
    MIN_EIGENVALUES,
    SpectrumError,
    alpha_ratios,
    alpha_raw_sparsities,
    eigenvalues,
    fit_power_law,
    hill_alpha,
    ks_distance,
    layer_alphas,
    matrix_alpha,
    unit_alphas,
)


def power_law_matrix(alpha: float, rows: int, cols: int, seed: int) -> torch.Tensor:
    """W = U diag(√λ) Vᵀ with U, V orthonormal and λ i.i.d. Pareto of density exponent α (p(λ) ∝ λ^−α, λ ≥ 1):
    λ = u^(−1/(α−1)) for u ~ U(0, 1], so the eigenvalues of WᵀW are exactly the λ."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    lam = torch.rand(k, generator=g, dtype=torch.float64).clamp_min(1e-12) ** (-1.0 / (alpha - 1.0))
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return ((u * lam.sqrt()) @ v.T).to(torch.float32)


def test_eigenvalues_are_squared_singular_values_ascending():
    w = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert eigenvalues(w).tolist() == pytest.approx([4.0, 9.0])
    with pytest.raises(SpectrumError, match="2-D"):
        eigenvalues(torch.ones(3))


def test_hill_estimator_and_ks_by_hand():
    # tail {1, e, e²} from λ_min = 1: Σ log = 0 + 1 + 2 = 3, α = 1 + 3/3 = 2
    tail = torch.tensor([1.0, math.e, math.e**2], dtype=torch.float64)
    assert hill_alpha(tail, 1.0) == pytest.approx(2.0)
    # F(x) = 1 − 1/x at α = 2: F = 0, 1 − 1/e, 1 − 1/e²; steps of the empirical CDF at 0, 1/3, 2/3, 1
    f = [0.0, 1 - 1 / math.e, 1 - math.exp(-2)]
    expected = max(max(f[j] - j / 3, (j + 1) / 3 - f[j]) for j in range(3))
    assert ks_distance(tail, 1.0, 2.0) == pytest.approx(expected)
    assert hill_alpha(torch.ones(4, dtype=torch.float64), 1.0) == math.inf


# Tolerance: the Hill estimate over k i.i.d. Pareto samples has standard error (α − 1)/√k; with k ≈ 512
# (a 768 × 512 matrix) every single fit must lie within 3 standard errors, and the mean over 4 seeds within 5 %.
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
@pytest.mark.parametrize("rule", ["peak", "all"])
def test_hill_fit_recovers_known_exponent(alpha, rule, one_thread):
    fits = [matrix_alpha(power_law_matrix(alpha, 768, 512, seed), xmin_rule=rule) for seed in range(4)]
    for f in fits:
        assert abs(f.alpha - alpha) <= 3 * (alpha - 1) / math.sqrt(f.n_tail), (f, alpha)
        assert f.n_eigs == 512 and f.n_tail >= 8 and f.ks < 0.1
    assert sum(f.alpha for f in fits) / len(fits) == pytest.approx(alpha, rel=0.05)


def test_peak_rule_searches_a_window_near_the_density_peak():
    eigs = eigenvalues(power_law_matrix(3.0, 768, 512, seed=0))
    peak, every = fit_power_law(eigs, xmin_rule="peak"), fit_power_law(eigs, xmin_rule="all")
    median = fit_power_law(eigs, xmin_rule="median")
    assert peak.rule == "peak" and 1 < peak.candidates < every.candidates == 512 - 8 + 1
    # a Pareto density peaks at its lower end (λ = 1): the chosen λ_min lies in [0.95, 1.5] × that peak
    assert float(eigs[0]) <= peak.xmin <= 1.5 * 1.1 * float(eigs[0])
    assert every.ks <= peak.ks + 1e-12  # the full search can only find a closer fit
    assert median.candidates == 1 and median.n_tail == 256


def test_heavier_tail_gets_lower_sparsity_on_budget(one_thread):
    heavy, light = power_law_matrix(2.5, 384, 256, seed=1), power_law_matrix(4.5, 384, 256, seed=2)
    alphas = layer_alphas({"heavy": heavy, "light": light, "mid": power_law_matrix(3.5, 384, 256, seed=3)}).alphas
    assert alphas["heavy"] < alphas["mid"] < alphas["light"]
    params = {"heavy": 1000, "light": 3000, "mid": 2000}
    raw = alpha_raw_sparsities(alphas, params, target=0.7, epsilon=0.2)
    assert weighted_mean(raw, params) == pytest.approx(0.7, abs=1e-12)
    final = fit_to_budget(raw, params, 0.7, (0.0, 0.99))
    assert final["heavy"] < final["mid"] < final["light"]
    assert weighted_mean(final, params) == pytest.approx(0.7, abs=1e-12)
    # no bound binds: fit_to_budget leaves AlphaPruning's normalised values as they are
    assert final == pytest.approx(raw, abs=1e-12)
    # the extreme units sit at (1 ∓ ε) times one common scale
    assert raw["light"] / raw["heavy"] == pytest.approx(1.2 / 0.8)


def test_alpha_ratios_by_hand():
    r = alpha_ratios({"a": 2.0, "b": 3.0, "c": 4.0}, epsilon=0.2)
    assert r == pytest.approx({"a": 0.8, "b": 1.0, "c": 1.2})
    assert alpha_ratios({"a": 3.0, "b": 3.0}) == {"a": 1.0, "b": 1.0}
    # s_u = r_u · t · Σn/Σ n r: params 1, 1, 2 → Σ n r = 0.8 + 1 + 2.4 = 4.2, scale = 0.5 · 4 / 4.2
    raw = alpha_raw_sparsities({"a": 2.0, "b": 3.0, "c": 4.0}, {"a": 1, "b": 1, "c": 2}, 0.5, 0.2)
    assert raw == pytest.approx({"a": 0.8 * 2 / 4.2, "b": 2 / 4.2, "c": 1.2 * 2 / 4.2})
    with pytest.raises(AllocationError, match="allocation.epsilon"):
        alpha_ratios({"a": 2.0}, epsilon=1.5)


def test_extreme_target_is_clipped_back_onto_budget():
    alphas = {f"u{i}": 2.0 + 0.5 * i for i in range(5)}
    params = {u: 100 for u in alphas}
    raw = alpha_raw_sparsities(alphas, params, target=0.9, epsilon=0.3)
    assert max(raw.values()) > 0.99  # (1 + ε)·0.9 leaves [0, 1)
    final = fit_to_budget(raw, params, 0.9, (0.0, 0.99))
    assert max(final.values()) <= 0.99 and weighted_mean(final, params) == pytest.approx(0.9, abs=1e-12)
    assert sorted(final, key=final.get) == list(alphas)  # order kept: smaller α, lower sparsity


def test_block_granularity_is_the_mean_alpha_of_its_matrices():
    got = unit_alphas({"b0.q": 2.0, "b0.k": 4.0, "b1.q": 5.0}, {"b0.q": "b0", "b0.k": "b0", "b1.q": "b1"})
    assert got == {"b0": 3.0, "b1": 5.0}


def test_too_small_matrix_refused_or_falls_back_to_mean(one_thread):
    small = torch.randn(64, MIN_EIGENVALUES - 1)
    with pytest.raises(SpectrumError, match=r"fewer than the 16"):
        matrix_alpha(small)
    weights = {"big1": power_law_matrix(3.0, 96, 64, 0), "tiny": small, "big2": power_law_matrix(4.0, 96, 64, 1)}
    with pytest.raises(SpectrumError, match=r"layer tiny .*allocation.fallback=mean"):
        layer_alphas(weights)
    out = layer_alphas(weights, fallback="mean")
    assert set(out.alphas) == set(weights) and set(out.fallbacks) == {"tiny"}
    assert out.alphas["tiny"] == pytest.approx((out.alphas["big1"] + out.alphas["big2"]) / 2)
    # rank-deficient: a 64 × 64 matrix of rank 4 has only 4 non-zero eigenvalues
    low_rank = torch.randn(64, 4) @ torch.randn(4, 64)
    with pytest.raises(SpectrumError, match="only 4 non-zero"):
        matrix_alpha(low_rank)


def test_bad_options_name_the_key():
    eigs = torch.arange(1.0, 40.0)
    with pytest.raises(AllocationError, match="xmin_rule"):
        fit_power_law(eigs, xmin_rule="mode")
    with pytest.raises(AllocationError, match="allocation.fallback"):
        layer_alphas({"a": torch.eye(20)}, fallback="skip")
    with pytest.raises(SpectrumError, match="flat tail"):
        fit_power_law(torch.ones(32))


def test_tiny_llama_layers_have_a_spectrum(tiny_llama, one_thread):
    from msp.models import prunable_layers

    layers = prunable_layers(tiny_llama.model)
    out = layer_alphas({n: l.weight for n, l in layers.items()})
    assert not out.fallbacks and all(math.isfinite(a) and a > 1 for a in out.alphas.values())
