"""Two per-block allocation rules from 2025 papers, as pure functions on numbers: DLP and ATP.

**DLP** (Chen et al., "DLP: Dynamic Layerwise Pruning in Large Language Models", ICML 2025). Each unit u
(a decoder block) has a Wanda score A_u: a statistic over every weight of the block's Linear layers of
|W_ij| · ‖X_j‖₂ (inputs propagated through the *dense* blocks). The paper reads A_u as the block's
*unimportance* and uses the median; the issue's default is the mean (``reduction``). Then

    I_u = 1 − A_u / Σ_v A_v                                   (relative importance)
    Ĩ_u = (I_u − min I) / (max I − min I) · 2α                 (min-max scaled to [0, 2α], α = 0.15)
    keep_u = Ĩ_u − mean(Ĩ) + (1 − t)                           (mean kept fraction = 1 − t)
    s_u = 1 − keep_u = t + mean(Ĩ) − Ĩ_u.

So s_u ∈ [t − 2α + mean(Ĩ), t + mean(Ĩ)], a band of width 2α around the budget (t ± α when the scaled
importances are symmetric about their mean); the block with the largest A_u (least important) gets the highest
sparsity. All A_u equal → every s_u = t. The unweighted mean of s_u is t; with unequal unit sizes
:func:`msp.allocation.budget.fit_to_budget` shifts it onto the parameter-weighted budget.

**ATP** (Huang et al., "Determining Layer-wise Sparsity for Large Language Models Through a Theoretical
Perspective", ICML 2025). Sparsity rises linearly with depth, an arithmetic progression of common difference β
centred on the target, for blocks i = 0 … L−1:

    s_i = t − β (L − 1)/2 + β i,      mean_i s_i = t.

β is chosen on a grid by a scoring callback, lower is better — msp scores with the search's own fitness (KL to
the dense model on the held-out calibration tail). The default grid is 0 … 0.03 in steps of 0.002, cut at the
largest β whose ramp stays within the bounds, β_max = 2·min(t − lo, hi − t)/(L − 1) (logged): on 30 blocks
(SmolLM2) at t = 0.7, β = 0.03 would span [0.265, 1.135], so the default stops at 0.02. A grid the user gives
is checked whole against the bounds before any scoring and refused in one line naming the largest β that fits.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from msp.allocation.base import AllocationError
from msp.allocation.budget import check_target

log = logging.getLogger(__name__)

#: DLP's α (the half-width of the sparsity band); the paper's default
DLP_ALPHA = 0.15
DLP_REDUCTIONS = ("mean", "median")
#: ATP's default β grid: 0, 0.002, …, 0.03
ATP_GRID = (0.0, 0.03, 0.002)


# ------------------------------------------------------------------------------------------------ DLP


def dlp_block_score(metrics: Iterable[torch.Tensor], reduction: str = "mean") -> float:
    """A_u: the mean or median of the Wanda metric |W|·‖X‖₂ over every weight of a block's Linear layers
    (the metrics are concatenated, so a larger layer weighs in proportion to its size). metrics: tensors of
    any shape, one per Linear."""
    if reduction not in DLP_REDUCTIONS:
        raise AllocationError(f"allocation.reduction={reduction!r} is unknown; valid: {', '.join(DLP_REDUCTIONS)}")
    flat = [m.detach().reshape(-1).to(torch.float32) for m in metrics]
    if not flat or sum(f.numel() for f in flat) == 0:
        raise AllocationError("a block has no Linear weights to score")
    if reduction == "mean":
        total = sum(float(f.to(torch.float64).sum()) for f in flat)
        return total / sum(f.numel() for f in flat)
    return float(torch.cat([f.cpu() for f in flat]).median())


def dlp_importance(scores: Mapping[str, float]) -> dict[str, float]:
    """I_u = 1 − A_u / Σ A (scores: unit → A_u ≥ 0, not all zero)."""
    if not scores:
        raise AllocationError("nothing to allocate: no block scores")
    bad = {u: a for u, a in scores.items() if not math.isfinite(float(a)) or float(a) < 0}
    if bad:
        u, a = next(iter(bad.items()))
        raise AllocationError(f"DLP needs finite non-negative Wanda scores; {len(bad)} unit(s) are not (e.g. {u}={a})")
    total = sum(float(a) for a in scores.values())
    if total <= 0:
        raise AllocationError("every DLP score is 0 (all-zero weights or inputs?); use another allocation")
    return {u: 1.0 - float(a) / total for u, a in scores.items()}


def dlp_sparsities(scores: Mapping[str, float], target: float, alpha: float = DLP_ALPHA) -> dict[str, float]:
    """DLP's raw per-unit sparsities s_u = t + mean(Ĩ) − Ĩ_u (see the module docstring); unweighted mean t."""
    t = check_target(target)
    a = float(alpha)
    if math.isnan(a) or not 0.0 <= a < 0.5:
        raise AllocationError(f"allocation.alpha={alpha} must be in [0, 0.5) (DLP uses 0.15), e.g. allocation.alpha=0.15")
    imp = dlp_importance(scores)
    lo, hi = min(imp.values()), max(imp.values())
    if hi - lo <= 1e-15:
        return {u: t for u in imp}
    scaled = {u: (i - lo) / (hi - lo) * 2.0 * a for u, i in imp.items()}
    mean = sum(scaled.values()) / len(scaled)
    return {u: 1.0 - (v - mean + (1.0 - t)) for u, v in scaled.items()}


# ------------------------------------------------------------------------------------------------ ATP


def atp_ramp(n_blocks: int, target: float, beta: float) -> list[float]:
    """s_i = t − β(L−1)/2 + β·i for i = 0 … L−1 (no bounds check; see :func:`check_atp_grid`)."""
    if int(n_blocks) != n_blocks or n_blocks < 1:
        raise AllocationError(f"ATP needs at least one block, got {n_blocks}")
    t, b, n = float(target), float(beta), int(n_blocks)
    return [t - b * (n - 1) / 2.0 + b * i for i in range(n)]


def beta_grid(start: float = ATP_GRID[0], stop: float = ATP_GRID[1], step: float = ATP_GRID[2]) -> list[float]:
    """start, start + step, …, up to stop inclusive (values rounded to 12 decimals, so 0.002·k prints as such)."""
    start, stop, step = float(start), float(stop), float(step)
    if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0 or stop < start or start < 0:
        raise AllocationError(
            f"ATP grid start={start}, stop={stop}, step={step} is invalid; need 0 <= start <= stop and step > 0, "
            f"e.g. allocation.beta_grid=[0.0, 0.03, 0.002]"
        )
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + k * step, 12) for k in range(count)]


def atp_max_beta(n_blocks: int, target: float, bounds: tuple[float, float] = (0.0, 0.99)) -> float:
    """The largest β whose ramp stays within [lo, hi]: 2·min(t − lo, hi − t)/(L − 1) (inf for one block)."""
    lo, hi = bounds
    if n_blocks <= 1:
        return math.inf
    return 2.0 * min(float(target) - lo, hi - float(target)) / (n_blocks - 1)


def check_atp_grid(
    n_blocks: int, target: float, betas: Sequence[float], bounds: tuple[float, float] = (0.0, 0.99)
) -> None:
    """Every β of the grid must keep s_0 ≥ lo and s_{L−1} ≤ hi (``bounds`` = allocation.min/max, inside
    [0, 1)); otherwise one :class:`AllocationError` that names the largest β that fits."""
    t = check_target(target)
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0.0 <= lo <= t <= hi < 1.0:
        raise AllocationError(f"ATP bounds [min={lo}, max={hi}] must satisfy 0 <= min <= target ({t}) <= max < 1")
    if not betas:
        raise AllocationError("the ATP β grid is empty; give e.g. allocation.beta_grid=[0.0, 0.03, 0.002]")
    negative = [b for b in betas if not math.isfinite(float(b)) or float(b) < 0]
    if negative:
        raise AllocationError(f"ATP β must be finite and >= 0 (sparsity rising with depth), got {negative[0]}")
    worst = max(float(b) for b in betas)
    ramp = atp_ramp(n_blocks, t, worst)
    if ramp[0] < lo - 1e-12 or ramp[-1] > hi + 1e-12:
        fit = atp_max_beta(n_blocks, t, (lo, hi))
        raise AllocationError(
            f"allocation=atp: β={worst:g} over {n_blocks} blocks spans sparsities [{ramp[0]:.4f}, {ramp[-1]:.4f}], outside "
            f"the bounds [{lo}, {hi}] at sparsity={t}; the largest β that fits is {fit:.6f}: lower the grid's stop "
            f"(allocation.beta_grid=[0.0, {math.floor(fit * 1e4) / 1e4:g}, 0.002]) or allocation.beta, or widen allocation.min/max"
        )


def default_beta_grid(n_blocks: int, target: float, bounds: tuple[float, float] = (0.0, 0.99)) -> list[float]:
    """:func:`beta_grid`'s default points up to the largest β that keeps the ramp within ``bounds``."""
    check_atp_grid(n_blocks, target, [0.0], bounds)
    full = beta_grid()
    limit = atp_max_beta(n_blocks, target, bounds)
    grid = [b for b in full if b <= limit + 1e-12]
    if len(grid) < len(full):
        log.info(
            "allocation=atp: %d blocks at sparsity %.3f allow β <= %.5f; searching %d of the %d default grid points",
            n_blocks, target, limit, len(grid), len(full),
        )
    return grid


@dataclass(frozen=True)
class BetaSearch:
    """The chosen β, its ramp, and the score of every grid point (β → score, in grid order)."""

    beta: float
    sparsities: list[float]
    scores: dict[float, float]


def search_beta(
    n_blocks: int,
    target: float,
    score: Callable[[float, list[float]], float],
    grid: Sequence[float] | None = None,
    bounds: tuple[float, float] = (0.0, 0.99),
) -> BetaSearch:
    """Score every β of ``grid`` with ``score(β, ramp)`` (lower is better) and keep the minimiser; ties go to the
    smaller β (the first in grid order). ``grid=None``: :func:`default_beta_grid`; a given grid is checked whole
    against ``bounds`` before the first call. A non-finite score counts as +inf (logged); all non-finite → error."""
    betas = [float(b) for b in (default_beta_grid(n_blocks, target, bounds) if grid is None else grid)]
    check_atp_grid(n_blocks, target, betas, bounds)
    scores: dict[float, float] = {}
    best: tuple[float, float] | None = None  # (score, β)
    for b in betas:
        value = float(score(b, atp_ramp(n_blocks, target, b)))
        if not math.isfinite(value):
            log.warning("allocation=atp: β=%g scored %s; treating it as the worst", b, value)
            value = math.inf
        scores[b] = value
        log.info("allocation=atp: β=%g → score %.6g", b, value)
        if best is None or value < best[0]:
            best = (value, b)
    if best is None or not math.isfinite(best[0]):
        raise AllocationError("allocation=atp: every β on the grid scored NaN/inf; check the fitness data (held-out tokens)")
    return BetaSearch(best[1], atp_ramp(n_blocks, target, best[1]), scores)


__all__ = [
    "ATP_GRID", "DLP_ALPHA", "DLP_REDUCTIONS", "BetaSearch", "atp_max_beta", "atp_ramp", "beta_grid", "check_atp_grid",
    "default_beta_grid", "dlp_block_score", "dlp_importance", "dlp_sparsities", "search_beta",
]
