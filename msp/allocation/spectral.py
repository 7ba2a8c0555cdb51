"""AlphaPruning's data-free signal (Lu et al., NeurIPS 2024): the heavy-tail exponent of each weight matrix's
empirical spectral density (ESD), and its map to per-unit sparsities. Pure functions on tensors and numbers.

ESD. For a weight matrix W (out × in) the eigenvalues of the correlation matrix WᵀW are the squared singular
values λ = σ² (``torch.linalg.svdvals`` in float32, min(out, in) values). Eigenvalues ``λ ≤ 1e-10 · λ_max``
are numerical zeros of a rank-deficient matrix and are dropped (float32 SVD noise sits near 1e-7 in σ,
i.e. 1e-14 relative in λ).

Power-law fit (HT-SR "PL_Alpha_Hill"). The tail λ ≥ λ_min is modelled as p(λ) ∝ λ^(−α). For a candidate
λ_min = λ_(i) (the i-th smallest eigenvalue, tail of k = N − i eigenvalues) the Hill / maximum-likelihood
estimate is

    α̂(λ_min) = 1 + k / Σ_{j ≥ i} log(λ_j / λ_min)

and the Kolmogorov–Smirnov distance of that fit to the empirical tail is

    D(λ_min) = max_j max( F(λ_j) − j/k, (j+1)/k − F(λ_j) ),   F(x) = 1 − (x/λ_min)^(1−α̂),

over the sorted tail λ_j, j = 0 … k−1 (both sides of each step of the empirical CDF). λ_min is the candidate
with the smallest D (the first one on ties). Candidate rules (``xmin_rule``):

* ``"peak"`` (default; AlphaPruning's ``xmin_peak``): histogram log10 λ into ``bins`` (100) equal bins over
  [min, max]; the peak p is the left edge of the fullest bin (the first one on ties), i.e. the mode of the
  spectral density on a log scale; candidates are the eigenvalues in [0.95 p, 1.5 p]. The bin width is at most
  10 decades / 100 bins = factor 1.26 < 1.5, so the fullest bin always lies inside the window.
* ``"all"``: every eigenvalue (Clauset–Shalizi–Newman's xmin search).
* ``"median"``: only the median eigenvalue λ_(⌊N/2⌋) (WeightWatcher's ``xmin_mid``; no search).

Every candidate must leave at least ``min_tail`` (8) eigenvalues in the tail; a "peak" window with no such
candidate falls back to "all". A matrix with fewer than ``min_eigenvalues`` (16) non-zero eigenvalues,
i.e. min(out, in) < 16 or rank < 16, has no usable spectrum: :func:`fit_power_law` raises
:class:`SpectrumError`; :func:`layer_alphas` either re-raises it (``fallback="error"``) or gives that layer the
mean α of the others and records why (``fallback="mean"``).

Map to sparsities (AlphaPruning, Eq. 4 and the released code's normalisation). With α over the units
(layers, or blocks: the mean α of a block's matrices),

    r_u = s₁ + (α_u − α_min) / (α_max − α_min) · (s₂ − s₁),   s₁ = 1 − ε, s₂ = 1 + ε,
    s_u = r_u · t · Σ_v n_v / Σ_v n_v r_v                      (so Σ n_u s_u / Σ n_u = t exactly),

so a heavier-tailed unit (smaller α, "better trained") is pruned *less*: α_min ↦ (1 − ε)·t·c, α_max ↦ (1 + ε)·t·c.
All α equal gives r_u = 1 (uniform). The result goes through :func:`msp.allocation.budget.fit_to_budget`,
which leaves it unchanged when no bound binds and otherwise shifts and clips it back onto the budget.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from msp.allocation.base import AllocationError

log = logging.getLogger(__name__)

XMIN_RULES = ("peak", "all", "median")
FALLBACKS = ("error", "mean")
#: fewer non-zero eigenvalues than this: no spectrum to fit (min(out, in) of the matrix, or its rank)
MIN_EIGENVALUES = 16
#: every λ_min candidate leaves at least this many eigenvalues in the tail
MIN_TAIL = 8
#: eigenvalues at or below this fraction of λ_max are numerical zeros
ZERO_EIGENVALUE = 1e-10
#: AlphaPruning's default ε (its Wanda / LLaMA-2 runs use 0.3)
DEFAULT_EPSILON = 0.2


class SpectrumError(AllocationError):
    """A weight matrix whose spectrum cannot be fitted (too small, rank-deficient, degenerate)."""


@dataclass(frozen=True)
class PowerLawFit:
    """The chosen fit of one ESD: exponent α, λ_min, KS distance D, tail size k, non-zero eigenvalues N and
    how many λ_min candidates were tried (``rule`` says which rule produced them)."""

    alpha: float
    xmin: float
    ks: float
    n_tail: int
    n_eigs: int
    candidates: int
    rule: str


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW in ascending order (float32, on W's device): squared singular values of W.

    weight: (out, in) → (min(out, in),). A 1-D or >2-D tensor is refused (reshape conv kernels first).
    """
    if weight.dim() != 2:
        raise SpectrumError(f"need a 2-D weight matrix for its spectrum, got shape {tuple(weight.shape)}")
    sv = torch.linalg.svdvals(weight.detach().to(torch.float32))
    return torch.sort(sv * sv).values


def hill_alpha(tail: torch.Tensor, xmin: float) -> float:
    """α̂ = 1 + k / Σ log(λ_j / λ_min) over the k tail eigenvalues (inf when they all equal λ_min)."""
    s = float(torch.log(tail.to(torch.float64) / xmin).sum())
    return math.inf if s <= 0 else 1.0 + tail.numel() / s


def ks_distance(tail: torch.Tensor, xmin: float, alpha: float) -> float:
    """KS distance between the sorted tail's empirical CDF and F(x) = 1 − (x/λ_min)^(1−α)."""
    x = tail.to(torch.float64)
    k = x.numel()
    fitted = 1.0 - (x / xmin) ** (1.0 - alpha)
    j = torch.arange(k, dtype=torch.float64)
    return float(torch.maximum(fitted - j / k, (j + 1) / k - fitted).max())


def _candidates(lam: torch.Tensor, rule: str, bins: int, min_tail: int) -> tuple[list[int], str]:
    """Indices i of the λ_min candidates in the ascending ``lam`` (tail N − i ≥ min_tail) and the rule used."""
    n = lam.numel()
    last = n - min_tail  # largest index that leaves min_tail eigenvalues
    if rule == "median":
        return [min(n // 2, last)], rule
    if rule == "peak":
        logs = torch.log10(lam.to(torch.float64))
        lo, hi = float(logs[0]), float(logs[-1])
        if hi > lo:
            counts = torch.histc(logs, bins=bins, min=lo, max=hi)
            peak = 10.0 ** (lo + int(torch.argmax(counts)) * (hi - lo) / bins)
            window = [i for i in range(last + 1) if 0.95 * peak <= float(lam[i]) <= 1.5 * peak]
            if window:
                return window, rule
        log.debug("no λ_min candidate in the peak window; searching every eigenvalue")
    return list(range(last + 1)), "all"


def fit_power_law(
    eigs: torch.Tensor,
    *,
    xmin_rule: str = "peak",
    bins: int = 100,
    min_eigenvalues: int = MIN_EIGENVALUES,
    min_tail: int = MIN_TAIL,
) -> PowerLawFit:
    """The KS-optimal power-law fit of a spectrum (see the module docstring for every rule). eigs: (N,) ≥ 0."""
    if xmin_rule not in XMIN_RULES:
        raise AllocationError(f"allocation.xmin_rule={xmin_rule!r} is unknown; valid: {', '.join(XMIN_RULES)}")
    if min_tail < 2 or min_eigenvalues < min_tail:
        raise AllocationError(f"need 2 <= min_tail ({min_tail}) <= min_eigenvalues ({min_eigenvalues})")
    lam = torch.sort(eigs.detach().reshape(-1).to(torch.float64).cpu()).values
    if lam.numel() == 0 or not bool(torch.isfinite(lam).all()):
        raise SpectrumError("the spectrum is empty or not finite (NaN/inf weights?)")
    lam = lam[lam > ZERO_EIGENVALUE * float(lam[-1])]
    n = lam.numel()
    if n < min_eigenvalues:
        raise SpectrumError(
            f"only {n} non-zero eigenvalue(s), fewer than the {min_eigenvalues} a power-law fit needs "
            f"(matrix smaller than {min_eigenvalues} in one dimension, or of lower rank)"
        )
    cands, used = _candidates(lam, xmin_rule, bins, min_tail)
    best: tuple[float, float, int] | None = None  # (D, α, i)
    for i in cands:
        xmin = float(lam[i])
        tail = lam[i:]
        alpha = hill_alpha(tail, xmin)
        if not math.isfinite(alpha):
            continue
        d = ks_distance(tail, xmin, alpha)
        if best is None or d < best[0]:
            best = (d, alpha, i)
    if best is None:
        raise SpectrumError(f"every λ_min candidate has a flat tail (all {n} eigenvalues equal?); no power law to fit")
    d, alpha, i = best
    return PowerLawFit(alpha=alpha, xmin=float(lam[i]), ks=d, n_tail=n - i, n_eigs=n, candidates=len(cands), rule=used)


def matrix_alpha(weight: torch.Tensor, **fit_options) -> PowerLawFit:
    """:func:`fit_power_law` of the ESD of one weight matrix (out, in)."""
    return fit_power_law(eigenvalues(weight), **fit_options)


@dataclass
class SpectralAlphas:
    """α per layer (every layer of the input, fallbacks included), the fits, and the reason per fallback."""

    alphas: dict[str, float]
    fits: dict[str, PowerLawFit] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)


def layer_alphas(weights: Mapping[str, torch.Tensor], *, fallback: str = "error", **fit_options) -> SpectralAlphas:
    """α of every weight matrix. ``fallback="mean"``: a matrix without a usable spectrum gets the mean α of the
    fitted ones (the middle of the ratio range) and a logged reason; ``"error"``: one :class:`SpectrumError`
    naming the layer and the fix."""
    if fallback not in FALLBACKS:
        raise AllocationError(f"allocation.fallback={fallback!r} is unknown; valid: {', '.join(FALLBACKS)}")
    out = SpectralAlphas({})
    failed: dict[str, str] = {}
    for name, w in weights.items():
        try:
            out.fits[name] = matrix_alpha(w, **fit_options)
        except SpectrumError as exc:
            if fallback == "error":
                raise SpectrumError(
                    f"allocation=alpha: layer {name} (shape {tuple(w.shape)}) has no usable spectrum: {exc}; "
                    f"set allocation.fallback=mean to give such layers the mean α, or choose another allocation"
                ) from None
            failed[name] = str(exc)
    if not out.fits:
        raise SpectrumError(f"allocation=alpha: none of the {len(failed)} matrices has a usable spectrum (e.g. {next(iter(failed.items()), ('', ''))[1]})")
    mean = sum(f.alpha for f in out.fits.values()) / len(out.fits)
    for name in weights:
        if name in failed:
            log.warning("allocation=alpha: %s has no usable spectrum (%s); using the mean α %.3f", name, failed[name], mean)
            out.alphas[name] = mean
            out.fallbacks[name] = failed[name]
        else:
            out.alphas[name] = out.fits[name].alpha
    return out


def unit_alphas(alphas: Mapping[str, float], layer_unit: Mapping[str, str]) -> dict[str, float]:
    """Mean α per unit (e.g. per decoder block: AlphaPruning's block granularity), in first-seen order."""
    sums: dict[str, list[float]] = {}
    for name, a in alphas.items():
        sums.setdefault(layer_unit[name], []).append(float(a))
    return {u: sum(v) / len(v) for u, v in sums.items()}


def alpha_ratios(alphas: Mapping[str, float], epsilon: float = DEFAULT_EPSILON) -> dict[str, float]:
    """r_u = (1 − ε) + (α_u − α_min)/(α_max − α_min) · 2ε, increasing in α; all 1 when every α is equal."""
    if not alphas:
        raise AllocationError("nothing to allocate: no α values")
    eps = float(epsilon)
    if not 0.0 <= eps < 1.0 or math.isnan(eps):
        raise AllocationError(f"allocation.epsilon={epsilon} must be in [0, 1) (the paper uses 0.2-0.3), e.g. allocation.epsilon=0.2")
    bad = [u for u, a in alphas.items() if not math.isfinite(float(a))]
    if bad:
        raise AllocationError(f"α is not finite for {len(bad)} unit(s) (e.g. {bad[0]}={alphas[bad[0]]})")
    lo, hi = min(alphas.values()), max(alphas.values())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return {u: 1.0 for u in alphas}
    s1, s2 = 1.0 - eps, 1.0 + eps
    return {u: s1 + (float(a) - lo) / (hi - lo) * (s2 - s1) for u, a in alphas.items()}


def alpha_raw_sparsities(
    alphas: Mapping[str, float], params: Mapping[str, int], target: float, epsilon: float = DEFAULT_EPSILON
) -> dict[str, float]:
    """AlphaPruning's per-unit sparsities s_u = r_u · t · Σ n / Σ n r (parameter-weighted mean exactly t).

    Values may leave [0, 1) at extreme targets; :func:`msp.allocation.budget.fit_to_budget` clips them and
    re-centres the rest onto the budget."""
    ratios = alpha_ratios(alphas, epsilon)
    total = float(sum(params[u] for u in ratios))
    weighted = sum(params[u] * r for u, r in ratios.items())
    scale = float(target) * total / weighted
    return {u: r * scale for u, r in ratios.items()}


__all__ = [
    "DEFAULT_EPSILON", "FALLBACKS", "MIN_EIGENVALUES", "MIN_TAIL", "XMIN_RULES", "PowerLawFit", "SpectralAlphas",
    "SpectrumError", "alpha_ratios", "alpha_raw_sparsities", "eigenvalues", "fit_power_law", "hill_alpha",
    "ks_distance", "layer_alphas", "matrix_alpha", "unit_alphas",
]
