"""The level grid of the search: unit u at integer level l has sparsity ``offset[u] + l · delta[u]``.

Unstructured: one level step removes the same number of weights c = round(step · n_ref) in every unit (n_ref: the
median unit size), i.e. s_u(l) = target + l · c / n_u for integer levels l within [min, max]; the budget
Σ_u n_u s_u = target · Σ_u n_u is Σ_u l_u = 0, kept by construction by level switches. Mixed N:M
(``pattern=N:M``): levels are k/M, one step of unit u removes n_u / M weights, and the budget is the level sum
weighted by n_u / (M·g) (g: the gcd of the unit steps), as close to the target as the grid allows.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from msp.allocation.base import AllocationError
from msp.masks import Pattern
from msp.search.evolution import SearchSpace

log = logging.getLogger(__name__)


@dataclass
class Grid:
    """Sparsity of unit u at level l: ``offset[u] + l · delta[u]``; the search space over the levels."""

    space: SearchSpace
    offset: list[float]
    delta: list[float]
    achieved: float  # parameter-weighted mean sparsity of every genome on the budget
    step_weights: int  # weights removed by one level step (unstructured; per-unit steps for N:M)

    def sparsity(self, unit: int, level: int) -> float:
        return self.offset[unit] + level * self.delta[unit]

    def levels(self, unit: int) -> list[float]:
        return [self.sparsity(unit, l) for l in range(self.space.lower[unit], self.space.upper[unit] + 1)]

    def real_levels(self, unit_sparsity: list[float]) -> np.ndarray:
        return np.array([(s - o) / d for s, o, d in zip(unit_sparsity, self.offset, self.delta)], float)

    def sparsities(self, genome: np.ndarray) -> list[float]:
        return [self.sparsity(u, int(l)) for u, l in enumerate(genome)]

    def most_levels(self) -> int:
        return max(b - a + 1 for a, b in zip(self.space.lower, self.space.upper))


def nm_level_range(bounds: tuple[float, float], m: int) -> tuple[int, int]:
    """(kmin, kmax): the levels k/M within ``bounds`` (k < M); an :class:`AllocationError` unless there are two or more."""
    kmin, kmax = math.ceil(bounds[0] * m - 1e-9), min(math.floor(bounds[1] * m + 1e-9), m - 1)
    if kmin >= kmax:
        raise AllocationError(
            f"pattern=N:{m} is too coarse for a search within allocation bounds [{bounds[0]:g}, {bounds[1]:g}]: "
            f"{'no level' if kmin > kmax else 'a single level'} k/{m} fits; widen allocation.min/max (or allocation.spread) or use a larger M"
        )
    return kmin, kmax


def build_grid(unit_params: list[int], target: float, pattern: Pattern, bounds: tuple[float, float], step: float) -> Grid:
    """The level grid and budget (see the module docstring). Raises :class:`AllocationError` naming the fix
    when the bounds cannot hold the target or the grid is too coarse to move any unit."""
    if pattern.kind == "mixed_nm":
        return _nm_grid(unit_params, target, pattern.m, bounds)
    lo, hi = bounds
    n = len(unit_params)
    ref = float(np.median(np.asarray(unit_params, np.int64)))
    c = max(1, int(round(step * ref)))
    delta = [c / float(p) for p in unit_params]
    lower = tuple(int(math.ceil((lo - target) / d - 1e-9)) for d in delta)
    upper = tuple(int(math.floor((hi - target) / d + 1e-9)) for d in delta)
    if all(a == b for a, b in zip(lower, upper)):
        raise AllocationError(
            f"allocation.step={step} is too coarse for sparsity={target} within [{lo}, {hi}]: no unit can move one level "
            f"(a step changes a unit's sparsity by {min(delta):.4f} or more); use a smaller allocation.step, e.g. {step / 4:g}, "
            f"or widen allocation.min/max"
        )
    space = SearchSpace(lower, upper, tuple([1] * n), 0)
    return Grid(space, [float(target)] * n, delta, float(target), c)


def _nm_grid(unit_params: list[int], target: float, m: int, bounds: tuple[float, float]) -> Grid:
    """Levels k/M; the budget Σ_u (n_u / (M g)) k_u as near to target · Σ n_u / g as the levels reach."""
    kmin, kmax = nm_level_range(bounds, m)
    total = int(np.asarray(unit_params, np.int64).sum())
    quanta = [int(p) // m for p in unit_params]  # weights removed per level step of each unit
    g = reduce(math.gcd, quanta)
    weight = tuple(q // g for q in quanta)
    budget = int(round(target * total / g))  # Σ_u (n_u / (M g)) k_u = Σ_u n_u (k_u / M) / g = target · Σ n_u / g
    budget = min(max(budget, kmin * sum(weight)), kmax * sum(weight))
    achieved = budget * g / total  # Σ n_u k_u / M / Σ n_u with Σ (n_u / (M g)) k_u = budget
    n = len(unit_params)
    space = SearchSpace(tuple([kmin] * n), tuple([kmax] * n), weight, budget)
    return Grid(space, [0.0] * n, [1.0 / m] * n, achieved, g * m)


def fit_store_levels(unit_params: list[int], target: float, pattern: Pattern, bounds: tuple[float, float], step: float,
                     max_levels: int, quiet: bool = False) -> tuple[Grid, float]:
    """Store mode: raise the step until no unit has more than ``max_levels`` levels (bounded variant store);
    returns the grid and the step it was built with (``quiet``: no log line, for callers trying several)."""
    grid = build_grid(unit_params, target, pattern, bounds, step)
    if grid.most_levels() <= max_levels or pattern.kind == "mixed_nm":
        return grid, step
    lo, hi = bounds
    ratio = max(unit_params) / float(np.median(unit_params))  # the largest unit has the finest sparsity step
    new_step = (hi - lo) / max(1, max_levels - 1) * ratio
    for _ in range(64):  # ×1.1 per try: 64 tries raise the step by 445×, far past any grid of one level per unit
        grid = build_grid(unit_params, target, pattern, bounds, new_step)
        if grid.most_levels() <= max_levels:
            break
        new_step *= 1.1
    if not quiet:
        log.info("search: allocation.max_levels=%d bounds the variant store, so the level step is raised from %.4f to %.4f", max_levels, step, new_step)
    return grid, new_step


__all__ = ["Grid", "build_grid", "fit_store_levels", "nm_level_range"]
