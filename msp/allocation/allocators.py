"""Sensitivity-driven allocators: ``owl``, ``rank``, ``fisher``, ``hessian``.

Each works at ``granularity: layer`` (one sparsity per Linear layer) or ``block`` (one per decoder block,
shared by its Linear layers), keeps every unit within ``[min, max]``, and ends on the budget exactly: the raw
per-unit sparsities are re-centred by :func:`msp.allocation.budget.fit_to_budget` (one additive shift with
clipping, so the order "more sensitive → less pruned" is kept). Under mixed N:M (``pattern=N:M`` with a
literal N) every unit is then rounded to a level k/M and the achieved mean is reported in ``meta``.

Raw maps (σ_u: the unit's sensitivity, t: the target):

* ``owl`` (Yin et al. 2023): D_b = block outlier ratio, s_b = t + λ − 2λ·(D_b − min D)/(max D − min D), so
  s_b ∈ [t − λ, t + λ] and the block with most outliers is pruned least.
* ``rank`` (arXiv 2310.09499, Algorithm 1): sort units by σ ascending (rank r_u = 0 … U−1),
  s_u = t + α − 2α·r_u/(U − 1): the least sensitive unit gets t + α, the most sensitive t − α.
* ``fisher`` / ``hessian``: z-score of the log-sensitivity,
  s_u = t + β·(mean_v log σ_v − log σ_u) / std_v(log σ_v), a monotone decreasing map of σ_u; values of σ
  below ``1e-12 · max σ`` (e.g. a negative Hutchinson estimate) are floored there, i.e. treated as the least
  sensitive.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from msp.allocation.base import Allocation, AllocationError
from msp.allocation.budget import fit_to_budget, round_to_levels, weighted_mean
from msp.allocation.build import Allocated, AllocationContext, bounds_from, typed_options
from msp.models import find_blocks, layer_block_index

log = logging.getLogger(__name__)

def fixed_pattern_allocation(ctx: AllocationContext, method: str) -> Allocation | None:
    """Under a fixed N:M pattern (e.g. 2:4) every layer is pruned N:M, so there is nothing to allocate."""
    fixed = ctx.pattern.fixed_sparsity()
    if fixed is None:
        return None
    log.warning(
        "allocation=%s with pattern=%s: a fixed N:M pattern prunes every layer to %.3f, so the allocation is uniform; "
        "use pattern=N:%d to let %s choose N per layer", method, ctx.pattern, fixed, ctx.pattern.m, method,
    )
    return Allocation({n: fixed for n in ctx.layers}, fixed, method, {"note": f"pattern {ctx.pattern} fixes every layer"})


def units_of(ctx: AllocationContext, granularity: str) -> tuple[dict[str, int], dict[str, str]]:
    """(unit → parameter count, layer → unit). Block units are named by their module path (``model.layers.3``)."""
    if granularity == "layer":
        return dict(ctx.params), {n: n for n in ctx.layers}
    prefix, _ = find_blocks(ctx.model)
    layer_unit = {n: f"{prefix}.{layer_block_index(n, prefix)}" for n in ctx.layers}
    unit_params: dict[str, int] = {}
    for n, p in ctx.params.items():
        unit_params[layer_unit[n]] = unit_params.get(layer_unit[n], 0) + p
    return unit_params, layer_unit


def unit_sensitivity(
    sens: Mapping[str, float], layer_unit: Mapping[str, str], params: Mapping[str, int], normalized: bool
) -> dict[str, float]:
    """Aggregate per-layer sensitivities to units: Σ for raw traces, parameter-weighted mean for per-weight ones."""
    sums: dict[str, float] = {}
    mass: dict[str, float] = {}
    for n, value in sens.items():
        u = layer_unit[n]
        w = float(params[n]) if normalized else 1.0
        sums[u] = sums.get(u, 0.0) + w * float(value)
        mass[u] = mass.get(u, 0.0) + w
    return {u: sums[u] / mass[u] if normalized else sums[u] for u in sums}


def finish(
    ctx: AllocationContext,
    method: str,
    raw: Mapping[str, float],
    unit_params: Mapping[str, int],
    layer_unit: Mapping[str, str],
    bounds: tuple[float, float],
    meta: dict,
) -> Allocation:
    """Raw unit sparsities → on budget (shift + clip) → mixed-N:M levels if asked → per-layer :class:`Allocation`."""
    fitted = fit_to_budget(raw, unit_params, ctx.target, bounds)
    if ctx.pattern.kind == "mixed_nm":
        fitted, achieved = round_to_levels(fitted, unit_params, ctx.target, ctx.pattern.m, bounds)
        meta["achieved_mean"] = achieved
        log.info("%s on N:%d levels: mean sparsity %.6f for target %.6f", method, ctx.pattern.m, achieved, ctx.target)
    sparsities = {n: float(fitted[layer_unit[n]]) for n in ctx.layers}
    meta.setdefault("achieved_mean", weighted_mean(sparsities, ctx.params))
    meta["units"] = {u: float(v) for u, v in fitted.items()}
    return Allocation(sparsities, float(ctx.target), method, meta)


def _log_sigma(values: Mapping[str, float]) -> dict[str, float]:
    top = max(values.values())
    if not top > 0 or not math.isfinite(top):
        raise AllocationError(f"sensitivities are all non-positive or not finite (max {top}); check the calibration data or use allocation=uniform")
    floor = 1e-12 * top
    return {u: math.log(max(float(v), floor)) for u, v in values.items()}


def zscore_map(sens: Mapping[str, float], target: float, beta: float) -> dict[str, float]:
    """s_u = t + β·(mean log σ − log σ_u)/std(log σ); all t when every σ is equal."""
    logs = _log_sigma(sens)
    mean = sum(logs.values()) / len(logs)
    std = math.sqrt(sum((v - mean) ** 2 for v in logs.values()) / len(logs))
    if std < 1e-12:
        return {u: target for u in logs}
    return {u: target + beta * (mean - v) / std for u, v in logs.items()}


def rank_map(sens: Mapping[str, float], target: float, alpha: float) -> dict[str, float]:
    """Linear in the rank: least sensitive → t + α, most sensitive → t − α (ties keep unit order)."""
    order = sorted(sens, key=lambda u: sens[u])  # stable: equal values keep their order
    count = len(order)
    if count == 1:
        return {order[0]: target}
    return {u: target + alpha - 2 * alpha * r / (count - 1) for r, u in enumerate(order)}


def owl_map(ratios: Mapping[str, float], target: float, lam: float) -> dict[str, float]:
    """s = t + λ − 2λ·(D − min D)/(max D − min D): more outliers, less pruned; all t when every D is equal."""
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi - lo < 1e-15:
        return {u: target for u in ratios}
    return {u: target + lam - 2 * lam * (d - lo) / (hi - lo) for u, d in ratios.items()}


def _sensitivity_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("nsamples", "normalize", "probes", "seed", "M") if k in options and options[k] is not None}


def _sensitivity_allocator(ctx: AllocationContext, options: dict, method: str, signal: str) -> Allocated:
    from msp.sensitivity import compute_sensitivity

    fixed = fixed_pattern_allocation(ctx, method)
    if fixed is not None:
        return Allocated(fixed)
    typed = typed_options(options)  # the schema's defaults (msp.config) for what options leaves out
    granularity = str(typed.granularity)
    bounds = bounds_from(options, ctx.target)
    unit_params, layer_unit = units_of(ctx, granularity)
    sens_options = _sensitivity_options(options)
    report = compute_sensitivity(ctx.model, ctx.layers, ctx.calibration_ids, signal, sens_options, device=ctx.device, plan=ctx.plan,
                                 seed=ctx.seed, batch_size=ctx.batch_size, cache=ctx.cache, cache_fields=ctx.cache_fields)
    sens = report.values
    normalized = signal == "owl" or bool(sens_options.get("normalize", True))
    unit_sens = unit_sensitivity(sens, layer_unit, ctx.params, normalized)
    meta: dict[str, Any] = {"granularity": granularity, "signal": signal, "bounds": list(bounds), "sensitivity_options": sens_options}
    # the raw map: owl's lambda, rank's alpha, the z-score's beta
    key, raw_map = {"owl": ("lambda", owl_map), "rank": ("alpha", rank_map)}.get(method, ("beta", zscore_map))
    width = float(typed[key])
    raw = raw_map(unit_sens, ctx.target, width)
    meta[key] = width
    meta["unit_sensitivity"] = unit_sens
    return Allocated(finish(ctx, method, raw, unit_params, layer_unit, bounds, meta), sensitivity=report)


def owl_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """OWL: block sparsities in target ± λ from the blocks' outlier ratios (``lambda``, ``M``)."""
    return _sensitivity_allocator(ctx, options, "owl", "owl")


def rank_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """arXiv 2310.09499 Algorithm 1: ranks by Hessian (or Fisher, ``signal``) trace mapped to target ± α."""
    return _sensitivity_allocator(ctx, options, "rank", str(typed_options(options).signal))


def fisher_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """MSP: Fisher-trace z-score map (``beta``) re-centred on the budget."""
    return _sensitivity_allocator(ctx, options, "fisher", "fisher")


def hessian_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """Hutchinson Hessian-trace z-score map (``beta``) re-centred on the budget."""
    return _sensitivity_allocator(ctx, options, "hessian", "hessian")


__all__ = ["owl_allocator", "rank_allocator", "fisher_allocator", "hessian_allocator", "zscore_map", "rank_map", "owl_map",
           "units_of", "finish", "fixed_pattern_allocation"]
