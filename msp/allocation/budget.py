"""Budget arithmetic shared by every allocator (and the evolutionary search).

An allocation assigns a sparsity ``s_u`` to each unit ``u`` (a Linear layer or a decoder block) with ``n_u``
weights. The budget is the parameter-weighted mean

    s̄ = Σ_u n_u s_u / Σ_u n_u  =  target.

* :func:`fit_to_budget` re-centres any raw allocation onto the budget with one additive shift ``c`` and
  clipping to the bounds: ``s_u = clip(raw_u + c, lo, hi)``. The weighted mean is continuous and
  non-decreasing in ``c``, so bisection brackets ``c``; the exact ``c`` is then solved in closed form on the
  set of units that are not clipped, so the mean equals the target to float precision.
* :func:`round_to_levels` puts every unit on the grid ``k/M`` of mixed N:M (fixed M, per-layer N = M − k)
  and fixes the weighted mean up greedily, as close to the target as the grid allows.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from msp.allocation.base import AllocationError

log = logging.getLogger(__name__)


def check_target(target: float, what: str = "sparsity") -> float:
    """The target sparsity as a float in [0, 1), or an :class:`AllocationError` naming the fix: msp's one
    sparsity check (``sparsity=``, the allocators' targets, an allocation file's target)."""
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise AllocationError(f"{what}={target!r} is not a number; give a float in [0, 1), e.g. {what}=0.7") from None
    if math.isnan(t) or not 0.0 <= t < 1.0:
        raise AllocationError(f"{what}={target} is outside [0, 1); give the fraction of weights to remove, e.g. {what}=0.7")
    return t


def check_bounds(lo: float, hi: float, target: float) -> tuple[float, float]:
    """Bounds ``0 <= lo <= target <= hi < 1``; otherwise no allocation within them can meet the budget."""
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise AllocationError(f"allocation.min={lo!r} / allocation.max={hi!r} must be numbers in [0, 1)") from None
    if math.isnan(lo) or math.isnan(hi) or lo < 0.0 or hi >= 1.0 or lo > hi:
        raise AllocationError(f"allocation bounds [min={lo}, max={hi}] are invalid; need 0 <= allocation.min <= allocation.max < 1")
    if hi < target - 1e-12:
        raise AllocationError(
            f"allocation.max={hi} is below the target sparsity {target}: no allocation within the bounds meets the budget; "
            f"raise allocation.max to at least {target} or lower sparsity"
        )
    if lo > target + 1e-12:
        raise AllocationError(
            f"allocation.min={lo} is above the target sparsity {target}: no allocation within the bounds meets the budget; "
            f"lower allocation.min to at most {target} or raise sparsity"
        )
    return lo, hi


def weighted_mean(values: Mapping[str, float], params: Mapping[str, int]) -> float:
    total = sum(params[u] for u in values)
    return sum(values[u] * params[u] for u in values) / total


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def fit_to_budget(
    raw: Mapping[str, float], params: Mapping[str, int], target: float, bounds: tuple[float, float] = (0.0, 0.99)
) -> dict[str, float]:
    """``s_u = clip(raw_u + c, lo, hi)`` with the shift ``c`` chosen so that Σ n_u s_u / Σ n_u = target.

    raw: unit → raw sparsity (any real numbers); params: unit → weight count n_u. The order of the raw values
    is preserved (a monotone map), and every value lies in ``bounds``. Raises :class:`AllocationError` when
    the bounds cannot contain the target.
    """
    target = check_target(target)
    lo, hi = check_bounds(bounds[0], bounds[1], target)
    units = list(raw)
    if not units:
        raise AllocationError("nothing to allocate: the model has no prunable Linear layers")
    bad = [u for u in units if not math.isfinite(float(raw[u]))]
    if bad:
        raise AllocationError(f"raw allocation is not finite for {len(bad)} unit(s) (e.g. {bad[0]}={raw[bad[0]]}); check the sensitivities")
    total = float(sum(params[u] for u in units))

    def mean_at(c: float) -> float:
        return sum(params[u] * _clip(raw[u] + c, lo, hi) for u in units) / total

    # every unit at lo when c <= lo - max(raw), every unit at hi when c >= hi - min(raw)
    a = lo - max(raw.values()) - 1.0
    b = hi - min(raw.values()) + 1.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
        if b - a < 1e-15:
            break
    c = 0.5 * (a + b)
    # exact solve on the units that are not clipped at c: Σ_free n_u (raw_u + c) = target·N − Σ_clipped n_u·bound_u
    free = [u for u in units if lo < raw[u] + c < hi]
    if free:
        free_set = set(free)
        clipped = sum(params[u] * _clip(raw[u] + c, lo, hi) for u in units if u not in free_set)
        n_free = sum(params[u] for u in free)
        c_exact = (target * total - clipped - sum(params[u] * raw[u] for u in free)) / n_free
        if all(lo <= raw[u] + c_exact <= hi for u in free):
            c = c_exact
    return {u: _clip(raw[u] + c, lo, hi) for u in units}


def levels(m: int, bounds: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """Mixed N:M sparsity levels ``k/M`` (k = 0 … M−1, i.e. N = M … 1 kept) inside ``bounds``."""
    lo, hi = bounds
    return [k / m for k in range(m) if lo - 1e-12 <= k / m <= hi + 1e-12]


def check_grid(target: float, m: int, bounds: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """The usable levels of N:M with this M, or an error when the target lies outside them."""
    grid = levels(m, bounds)
    if not grid:
        raise AllocationError(
            f"pattern=N:{m} has no level k/{m} inside allocation bounds [{bounds[0]}, {bounds[1]}]; widen allocation.min/max"
        )
    if not grid[0] - 1e-12 <= target <= grid[-1] + 1e-12:
        raise AllocationError(
            f"pattern=N:{m} is too coarse for sparsity={target}: its levels within the bounds span [{grid[0]:.4f}, {grid[-1]:.4f}]; "
            f"use a larger M (e.g. pattern=N:{2 * m}), widen allocation.min/max, or choose sparsity within that range"
        )
    return grid


def round_to_levels(
    values: Mapping[str, float], params: Mapping[str, int], target: float, m: int, bounds: tuple[float, float] = (0.0, 1.0)
) -> tuple[dict[str, float], float]:
    """Put every unit on a level ``k/M`` with the weighted mean as close to ``target`` as a greedy fix-up gets.

    1. Round each unit to its nearest level (within bounds).
    2. While some single one-level move of one unit (towards the target mean) strictly reduces
       |mean − target|, make the move that adds the least rounding distortion |value − level|
       (ties: the one leaving the smallest budget error, then unit order).

    Returns (unit → level, achieved weighted mean). Each iteration strictly lowers the budget error, so the
    loop ends; the result is not guaranteed to be the global optimum of this small knapsack, only close to it.
    """
    target = check_target(target)
    grid = check_grid(target, m, bounds)
    units = list(values)
    total = float(sum(params[u] for u in units))
    index = {u: min(range(len(grid)), key=lambda i, u=u: (abs(grid[i] - values[u]), i)) for u in units}
    mass = sum(params[u] * grid[index[u]] for u in units)  # Σ n_u s_u
    order = {u: i for i, u in enumerate(units)}
    for _ in range(len(units) * len(grid) + 1):
        err = mass / total - target
        if abs(err) < 1e-15:
            break
        step = -1 if err > 0 else 1
        best = None
        for u in units:
            j = index[u] + step
            if not 0 <= j < len(grid):
                continue
            new_err = (mass + params[u] * (grid[j] - grid[index[u]])) / total - target
            if abs(new_err) >= abs(err) - 1e-15:
                continue
            distortion = abs(values[u] - grid[j]) - abs(values[u] - grid[index[u]])
            key = (round(distortion, 12), abs(new_err), order[u])
            if best is None or key < best[0]:
                best = (key, u, j)
        if best is None:
            break
        _, u, j = best
        mass += params[u] * (grid[j] - grid[index[u]])
        index[u] = j
    out = {u: grid[index[u]] for u in units}
    return out, weighted_mean(out, params)


__all__ = ["check_target", "check_bounds", "fit_to_budget", "levels", "check_grid", "round_to_levels", "weighted_mean"]
