"""Sensitivities: Fisher trace against its closed form, Hutchinson against exact Hessian traces, OWL against an
independent full-forward computation, and the caching / bookkeeping of :func:`msp.sensitivity.compute_sensitivity`."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from msp.cache import DiskCache
from msp.models import build_tiny_model, prunable_layers
from msp.pruners.wanda import wanda_scores
from msp.sensitivity import compute_sensitivity
from msp.sensitivity.fisher import fisher_trace
from textbook import linear_inputs
from msp.sensitivity.hessian import hessian_trace, hutchinson_trace
from msp.sensitivity.owl import outlier_ratio, owl_outlier_ratios

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


class _Block(nn.Module):
    def __init__(self, d: int, v: int):
        super().__init__()
        self.out = nn.Linear(d, v, bias=True)


class ToyLM(nn.Module):
    """logits_t = W·E[x_t] + b: one prunable Linear (``blocks.0.out``), so every derivative has a closed form."""

    def __init__(self, v: int = 7, d: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(v, d)
        self.blocks = nn.ModuleList([_Block(d, v)])

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.blocks[0].out(self.embed(input_ids)))


def _per_position(model: ToyLM, seq: torch.Tensor):
    """float64 hidden states h_t, softmax p_t and targets y_t = x_{t+1} for t < T-1."""
    h = model.embed.weight.detach().double()[seq[:-1]]  # (T-1, d)
    W = model.blocks[0].out.weight.detach().double()
    b = model.blocks[0].out.bias.detach().double()
    p = torch.softmax(h @ W.T + b, dim=-1)  # (T-1, V)
    return h, p, seq[1:]


def fisher_closed_form(model: ToyLM, windows: torch.Tensor) -> float:
    """(1/N) Σ_n ‖∂ℓ_n/∂W‖²_F with ∂ℓ_n/∂W = (1/(T−1)) Σ_t (p_t − e_{y_t}) h_tᵀ (softmax cross-entropy)."""
    total = 0.0
    for seq in windows:
        h, p, y = _per_position(model, seq)
        resid = p - torch.nn.functional.one_hot(y, p.shape[1]).double()
        grad = resid.T @ h / h.shape[0]  # (V, d)
        total += float((grad**2).sum())
    return total / windows.shape[0]


def hessian_closed_form(model: ToyLM, seq: torch.Tensor) -> torch.Tensor:
    """H_n w.r.t. vec(W) (row-major): (1/(T−1)) Σ_t (diag p_t − p_t p_tᵀ) ⊗ h_t h_tᵀ."""
    h, p, _ = _per_position(model, seq)
    H = 0
    for t in range(h.shape[0]):
        H = H + torch.kron(torch.diag(p[t]) - torch.outer(p[t], p[t]), torch.outer(h[t], h[t]))
    return H / h.shape[0]


def test_fisher_trace_equals_closed_form_and_squares_per_sequence():
    model = ToyLM()
    windows = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 6, 1, 0, 2, 2], [3, 5, 3, 5, 3, 5]])
    expected = fisher_closed_form(model, windows)
    got = fisher_trace(model, windows, CPU, normalize=False)
    assert set(got) == {"blocks.0.out"}
    assert got["blocks.0.out"] == pytest.approx(expected, rel=1e-5)
    # normalize divides by |u| = V·d
    got_norm = fisher_trace(model, windows, CPU, normalize=True)
    assert got_norm["blocks.0.out"] == pytest.approx(expected / 21, rel=1e-5)
    # squaring the *mean* gradient instead would give a clearly different number on these sequences
    mean_grad = sum(
        ((p - torch.nn.functional.one_hot(y, 7).double()).T @ h / h.shape[0])
        for h, p, y in (_per_position(model, s) for s in windows)
    ) / 3
    assert abs(float((mean_grad**2).sum()) - expected) > 0.05 * expected
    # nsamples=1 uses only the first window
    assert fisher_trace(model, windows, CPU, nsamples=1, normalize=False)["blocks.0.out"] == pytest.approx(
        fisher_closed_form(model, windows[:1]), rel=1e-5
    )


def test_fisher_restores_requires_grad_and_grads():
    model = ToyLM()
    model.embed.weight.requires_grad_(False)
    sentinel = torch.full_like(model.blocks[0].out.bias, 3.0)
    model.blocks[0].out.bias.grad = sentinel
    fisher_trace(model, torch.tensor([[0, 1, 2, 3]]), CPU)
    assert model.embed.weight.requires_grad is False
    assert model.blocks[0].out.weight.requires_grad is True
    assert model.blocks[0].out.weight.grad is None
    assert model.blocks[0].out.bias.grad is sentinel


def test_fisher_rejects_too_many_samples():
    with pytest.raises(ValueError, match="data.nsamples"):
        fisher_trace(ToyLM(), torch.tensor([[0, 1, 2, 3]]), CPU, nsamples=5)


def _hutchinson_sd(A: torch.Tensor, unit: slice) -> float:
    """Std of one probe's z_uᵀ(Az)_u: Var = 2 Σ_{i≠j∈u} A_ij² + Σ_{i∈u, j∉u} A_ij² (A symmetric, z Rademacher)."""
    block = A[unit, unit]
    off = float((block**2).sum() - (torch.diagonal(block) ** 2).sum())
    rows = A[unit]
    cross = float((rows**2).sum() - (block**2).sum())
    return math.sqrt(2 * off + cross)


def test_hutchinson_converges_to_exact_trace_of_quadratic():
    """L(θ) = ½ θᵀAθ, θ = (θ_1 ∈ R³, θ_2 ∈ R⁴): H = A, so tr(H_uu) = tr(A_uu) exactly.

    The estimate over P probes has standard deviation sd/√P (see ``_hutchinson_sd``); we allow 4 of them,
    i.e. a false-failure chance below 1e-4 for a random seed (and the seed is fixed, so the test is stable).
    """
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    A = (B + B.T) / 2 + 3 * torch.eye(7, dtype=torch.float64)
    theta = [torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)]

    def loss():
        x = torch.cat(theta)
        return 0.5 * x @ A @ x

    probes = 4000
    sums = hutchinson_trace(loss, theta, probes=probes, generator=torch.Generator().manual_seed(0))
    for s, unit in zip(sums, (slice(0, 3), slice(3, 7))):
        exact = float(torch.trace(A[unit, unit]))
        tol = 4 * _hutchinson_sd(A, unit) / math.sqrt(probes)
        assert abs(float(s) / probes - exact) < tol, (float(s) / probes, exact, tol)
        assert tol < 0.05 * abs(exact)  # the tolerance is tight enough to mean something


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # zᵀ D z = Σ D_ii z_i² = tr(D) for every Rademacher z: one probe is exact
    d = torch.tensor([1.0, -2.0, 5.0, 0.5], dtype=torch.float64)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (s,) = hutchinson_trace(lambda: 0.5 * (d * theta**2).sum(), [theta], probes=1, generator=torch.Generator().manual_seed(1))
    assert float(s) == pytest.approx(float(d.sum()), abs=1e-12)


def test_hessian_trace_matches_exact_trace_of_toy_lm():
    """Through the real path (double backprop of the next-token loss): tr(H) = (1/N) Σ_n tr(H_n), closed form."""
    model = ToyLM(seed=1)
    windows = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [6, 5, 1, 1, 2, 0, 3]])
    Hs = [hessian_closed_form(model, s) for s in windows]
    exact = sum(float(torch.trace(H)) for H in Hs) / len(Hs)
    probes = 1500
    # Var of the mean over N sequences × P probes: (2 / (N² P)) Σ_n Σ_{i≠j} (H_n)_ij²
    var = 2 * sum(float((H**2).sum() - (torch.diagonal(H) ** 2).sum()) for H in Hs) / (len(Hs) ** 2 * probes)
    got = hessian_trace(model, windows, CPU, probes=probes, normalize=False, seed=0)["blocks.0.out"]
    assert abs(got - exact) < 4 * math.sqrt(var), (got, exact, math.sqrt(var))
    assert 4 * math.sqrt(var) < 0.1 * exact
    assert model.blocks[0].out.weight.grad is None


def test_hessian_trace_on_tiny_llama_is_seeded_and_leaves_model_unchanged():
    loaded = build_tiny_model("tiny-llama")
    model = loaded.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    a = hessian_trace(model, windows, CPU, probes=1, seed=5)
    b = hessian_trace(model, windows, CPU, probes=1, seed=5)
    assert a == b and set(a) == set(prunable_layers(model))
    assert all(math.isfinite(v) for v in a.values())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_outlier_ratio_golden():
    # joint mean of [1]*9 + [100] and [1]*10 = 119/20 = 5.95; M=5 → threshold 29.75: one entry of twenty above
    a = torch.ones(10)
    a[3] = 100.0
    assert outlier_ratio([a, torch.ones(10)], 5.0) == pytest.approx(1 / 20)
    assert outlier_ratio([a], 5.0) == pytest.approx(1 / 10)  # mean 10.9 → threshold 54.5
    assert outlier_ratio([a], 10.0) == pytest.approx(0.0)  # threshold 109 > 100


def test_owl_ratios_match_a_full_forward_reference():
    """The streamed per-block computation equals hooks on one ordinary forward of the dense model."""
    model = build_tiny_model("tiny-llama").model
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    got = owl_outlier_ratios(model, windows, CPU, M=3.0, batch_size=2)
    layers = prunable_layers(model)
    norms = {n: (x**2).sum(0) for n, x in linear_inputs(model, windows).items()}
    for b in (0, 1):
        scores = [wanda_scores(lin.weight, norms[n]) for n, lin in layers.items() if n.startswith(f"model.layers.{b}.")]
        assert got[b] == pytest.approx(outlier_ratio(scores, 3.0), abs=1e-9)
    assert 0 < got[0] < 1


def _compute(model, windows, cache, method, options):
    fields = {"model": "tiny-llama", "data": "random", "nsamples": windows.shape[0], "seqlen": windows.shape[1], "seed": 0}
    return compute_sensitivity(model, prunable_layers(model), windows, method, options, device=CPU, seed=0, batch_size=2,
                               cache=cache, cache_fields=fields)


def test_compute_sensitivity_caches_and_records(tmp_path):
    model = build_tiny_model("tiny-llama").model
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = DiskCache(tmp_path / "cache")
    report = _compute(model, windows, cache, "fisher", {"normalize": False})
    first = report.values
    assert cache.misses == 1 and cache.hits == 0
    assert report.method == "fisher" and report.seconds >= 0 and report.to_json()["layers"] == first
    # the normalised variant reuses the cached raw traces
    normed = _compute(model, windows, cache, "fisher", {"normalize": True}).values
    assert cache.hits == 1 and cache.misses == 1
    for n, lin in prunable_layers(model).items():
        assert normed[n] == pytest.approx(first[n] / lin.weight.numel())
    # fewer windows is another entry
    _compute(model, windows, cache, "fisher", {"nsamples": 1})
    assert cache.misses == 2
    # owl: one value per block, shared by its layers
    owl = _compute(model, windows, cache, "owl", {"M": 5}).values
    assert len({v for n, v in owl.items() if ".layers.0." in n}) == 1
    with pytest.raises(ValueError, match="valid: fisher, hessian, owl"):
        _compute(model, windows, cache, "taylor", {})


def test_a_cache_entry_missing_layers_is_one_clear_error(tmp_path):
    """A stale entry (here: written for a subset of the layers) names the fix instead of failing with a KeyError."""
    from msp.sensitivity import SensitivityError

    model = build_tiny_model("tiny-llama").model
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    cache = DiskCache(tmp_path / "cache")
    report = _compute(model, windows, cache, "fisher", {})
    for path in (tmp_path / "cache").glob("*.pt"):
        torch.save({n: v for n, v in list(report.values.items())[:3]}, path)
    with pytest.raises(SensitivityError, match="lacks 11 layer.*use_cache=false"):
        _compute(model, windows, cache, "fisher", {})

