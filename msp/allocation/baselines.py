"""The 2024–2025 layer-wise baselines as allocators: ``alpha`` (AlphaPruning), ``dlp`` (DLP), ``atp`` (ATP).

The math lives in :mod:`msp.allocation.spectral` (Hill α of each weight spectrum), :mod:`msp.allocation.layerwise`
(DLP's map, ATP's ramp and β grid) and :mod:`msp.sensitivity.dlp` (DLP's block Wanda scores, one dense pass,
cached like the other sensitivities). Here each signal becomes raw per-unit sparsities that
:func:`msp.allocation.allocators.finish` puts on the budget (shift + clip within ``[min, max]``), rounds to N:M
levels under a mixed ``pattern=N:M`` and records per unit in ``allocation.json``; a fixed N:M pattern leaves
nothing to allocate (:func:`msp.allocation.allocators.fixed_pattern_allocation`).

ATP's β is chosen with the search's own fitness (:class:`msp.search.fitness.ModelFitness`, KL to the dense model)
on the held-out calibration tail, never on evaluation text: every grid point's allocation is known before any
scoring, so one variant pass (:func:`msp.search.fitness.precompute_variants`) records every level a layer takes,
and a :class:`msp.search.fitness.CandidateModel` swaps them in per β — the same candidates the search scores.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from msp import data as data_mod
from msp.allocation.allocators import finish, fixed_pattern_allocation, unit_sensitivity, units_of
from msp.allocation.base import Allocation, AllocationError
from msp.allocation.build import Allocated, AllocationContext, bounds_from, typed_options
from msp.allocation.layerwise import DLP_REDUCTIONS, atp_ramp, beta_grid, check_atp_grid, default_beta_grid, dlp_sparsities, search_beta
from msp.allocation.spectral import FALLBACKS, XMIN_RULES, alpha_raw_sparsities, layer_alphas, unit_alphas
from msp.masks import Pattern

log = logging.getLogger(__name__)

#: allocators whose unit is the decoder block (no allocation.granularity=layer)
BLOCK_ONLY = ("dlp", "atp")
FITNESS_METRICS = ("kl", "ppl")  # msp.search.settings.METRICS (not imported: it loads the search)


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if str(value) not in valid:
        raise AllocationError(f"allocation.{key}={value!r} is unknown; valid: {', '.join(valid)}")


def _half_open(key: str, value: float, high: float, paper: str) -> None:
    """``allocation.<key>`` must lie in [0, high) (NaN fails)."""
    if math.isnan(value) or not 0.0 <= value < high:
        raise AllocationError(f"allocation.{key}={value} must be in [0, {high:g}) ({paper}), e.g. allocation.{key}={paper.split()[-1].split('-')[0]}")


def _block_only(method: str, granularity: str) -> None:
    if granularity != "block":
        raise AllocationError(f"allocation={method} allocates per decoder block (the paper's unit); drop allocation.granularity={granularity} or use allocation=alpha / fisher for layers")


# ---------------------------------------------------------------------------------------------------- early checks


def check_alpha(options: dict, target: float, pattern: Pattern) -> None:
    """Model-free checks of ``allocation=alpha``: ε in [0, 1), known rules, 2 <= min_tail <= min_eigenvalues."""
    t = typed_options(options)
    _half_open("epsilon", t.epsilon, 1.0, "the paper uses 0.2-0.3")
    _choice("xmin_rule", t.xmin_rule, XMIN_RULES)
    _choice("fallback", t.fallback, FALLBACKS)
    if t.min_tail < 2 or t.min_eigenvalues < t.min_tail or t.bins < 1:
        raise AllocationError(f"need 2 <= allocation.min_tail ({t.min_tail}) <= allocation.min_eigenvalues ({t.min_eigenvalues}) and allocation.bins >= 1")


def check_dlp(options: dict, target: float, pattern: Pattern) -> None:
    """Model-free checks of ``allocation=dlp``: α in [0, 0.5), a known reduction, block granularity."""
    t = typed_options(options)
    _half_open("alpha", t.alpha, 0.5, "DLP uses 0.15")
    _choice("reduction", t.reduction, DLP_REDUCTIONS)
    _block_only("dlp", str(t.granularity))


def check_atp(options: dict, target: float, pattern: Pattern) -> None:
    """Model-free checks of ``allocation=atp``: β >= 0, a [start, stop, step] grid, the fitness options. The grid
    against the bounds needs the number of blocks: :func:`atp_allocator` checks it before any model pass."""
    t = typed_options(options)
    _block_only("atp", str(t.granularity))
    _choice("fitness", t.fitness, FITNESS_METRICS)
    if t.beta is not None and (math.isnan(t.beta) or t.beta < 0):
        raise AllocationError(f"allocation.beta={t.beta} must be >= 0 (sparsity rising with depth), or null to search beta_grid")
    _grid_of(t.beta_grid)
    for key, least in (("fitness_tokens", 2), ("fitness_seqlen", 2), ("fitness_batch_size", 1), ("variant_nsamples", 1)):
        if t[key] is not None and t[key] < least:
            raise AllocationError(f"allocation.{key}={t[key]} must be >= {least}")


def atp_betas(options: dict, target: float, n_blocks: int) -> list[float]:
    """The β values ``allocation=atp`` will try on a model of ``n_blocks`` blocks (``[beta]`` when given, else the
    grid), each checked against allocation.min/max: one line naming the largest β that fits."""
    t = typed_options(options)
    bounds = bounds_from(options, target)
    if t.beta is not None:
        betas = [float(t.beta)]
    else:
        grid = _grid_of(t.beta_grid)
        betas = default_beta_grid(n_blocks, target, bounds) if grid is None else grid
    check_atp_grid(n_blocks, target, betas, bounds)
    return betas


def _grid_of(given: Any) -> list[float] | None:
    """The β values of ``allocation.beta_grid=[start, stop, step]`` (None: the default grid)."""
    if given is None:
        return None
    values = list(given)
    if len(values) != 3:
        raise AllocationError(f"allocation.beta_grid={values} must be [start, stop, step], e.g. allocation.beta_grid=[0.0,0.03,0.002]")
    return beta_grid(*values)


# ---------------------------------------------------------------------------------------------------- alpha


def _start(ctx: AllocationContext, options: dict, method: str) -> tuple[Allocated | None, tuple | None]:
    """(the uniform Allocated of a fixed N:M pattern, None), or (None, (typed options, bounds, unit → parameters,
    layer → unit)) at the options' granularity (dlp and atp: always block, checked early)."""
    fixed = fixed_pattern_allocation(ctx, method)
    if fixed is not None:
        return Allocated(fixed), None
    t = typed_options(options)
    unit_params, layer_unit = units_of(ctx, str(t.granularity))
    return None, (t, bounds_from(options, ctx.target), unit_params, layer_unit)


def alpha_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """AlphaPruning: Hill α per weight matrix (mean per block), mapped to target·[1 − ε, 1 + ε] and onto the budget."""
    done, setup = _start(ctx, options, "alpha")
    if done is not None:
        return done
    t, bounds, unit_params, layer_unit = setup
    granularity = str(t.granularity)
    spectra = layer_alphas({n: lin.weight.data for n, lin in ctx.layers.items()}, fallback=str(t.fallback), xmin_rule=str(t.xmin_rule),
                           bins=int(t.bins), min_eigenvalues=int(t.min_eigenvalues), min_tail=int(t.min_tail))
    alphas = unit_alphas(spectra.alphas, layer_unit)
    raw = alpha_raw_sparsities(alphas, unit_params, ctx.target, float(t.epsilon))
    meta: dict[str, Any] = {
        "granularity": granularity, "epsilon": float(t.epsilon), "bounds": list(bounds), "xmin_rule": str(t.xmin_rule),
        "unit_alpha": alphas,
        "layer_fits": {n: {"alpha": f.alpha, "xmin": f.xmin, "ks": f.ks, "n_tail": f.n_tail, "n_eigs": f.n_eigs, "rule": f.rule}
                       for n, f in spectra.fits.items()},
        "fallbacks": dict(spectra.fallbacks),
    }
    return Allocated(finish(ctx, "alpha", raw, unit_params, layer_unit, bounds, meta))


# ---------------------------------------------------------------------------------------------------- dlp


def dlp_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """DLP: block Wanda scores (one dense pass, cached) → importance → sparsities in a 2α band → onto the budget."""
    from msp.sensitivity import compute_sensitivity

    done, setup = _start(ctx, options, "dlp")
    if done is not None:
        return done
    t, bounds, unit_params, layer_unit = setup
    sens_options = {"reduction": str(t.reduction), **({"nsamples": int(t.nsamples)} if t.nsamples is not None else {})}
    report = compute_sensitivity(ctx.model, ctx.layers, ctx.calibration_ids, "dlp", sens_options, device=ctx.device, plan=ctx.plan,
                                 seed=ctx.seed, batch_size=ctx.batch_size, cache=ctx.cache, cache_fields=ctx.cache_fields)
    scores = unit_sensitivity(report.values, layer_unit, ctx.params, normalized=True)  # every layer holds its block's score
    raw = dlp_sparsities(scores, ctx.target, float(t.alpha))
    meta = {"granularity": "block", "alpha": float(t.alpha), "reduction": str(t.reduction), "bounds": list(bounds), "unit_score": scores}
    return Allocated(finish(ctx, "dlp", raw, unit_params, layer_unit, bounds, meta), sensitivity=report)


# ---------------------------------------------------------------------------------------------------- atp


def atp_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """ATP: the linear ramp of :func:`msp.allocation.layerwise.atp_ramp`, β given or chosen on the grid by the
    search's fitness on the held-out calibration tail."""
    done, setup = _start(ctx, options, "atp")
    if done is not None:
        return done
    t, bounds, unit_params, layer_unit = setup
    units = sorted(unit_params, key=lambda u: int(u.rsplit(".", 1)[1]))  # depth order
    n = len(units)
    base = {"granularity": "block", "bounds": list(bounds)}

    def allocation_of(beta: float, ramp: list[float]) -> Allocation:
        return finish(ctx, "atp", dict(zip(units, ramp)), unit_params, layer_unit, bounds, {**base, "beta": beta})

    grid = atp_betas(options, ctx.target, n)  # checked against the bounds (again: run.load_stage did it after loading)
    if t.beta is not None:
        return Allocated(allocation_of(float(t.beta), atp_ramp(n, ctx.target, float(t.beta))))
    candidates = {b: allocation_of(b, atp_ramp(n, ctx.target, b)) for b in grid}
    with heldout_scorer(ctx, list(candidates.values()), t) as score:
        chosen = search_beta(n, ctx.target, lambda b, ramp: score(candidates[b]), grid, bounds)
    alloc = candidates[chosen.beta]
    alloc.meta.update(beta_scores={f"{b:g}": s for b, s in chosen.scores.items()}, fitness=str(t.fitness),
                      fitness_tokens=int(t.fitness_tokens), searched=True)
    log.info("allocation=atp: β=%g chosen (%s %.6g) among %d grid points", chosen.beta, t.fitness, chosen.scores[chosen.beta], len(grid))
    return Allocated(alloc)


@contextmanager
def heldout_scorer(ctx: AllocationContext, allocations: list[Allocation], options: Any) -> Iterator[Callable[[Allocation], float]]:
    """``score(allocation)``: the search's fitness (``options.fitness``: KL to dense, or perplexity) of ``ctx.pruner``
    at that allocation, on ``options.fitness_tokens`` held-out calibration tokens. One variant pass records every
    level that one of ``allocations`` gives a layer; the dense weights are back in the model on exit."""
    from msp.search.fitness import CandidateModel, ModelFitness, precompute_variants

    if ctx.pruner is None:
        raise AllocationError("scoring allocations needs the run's pruner (AllocationContext.pruner)")
    seqlen = int(options.fitness_seqlen)
    count = max(1, math.ceil(int(options.fitness_tokens) / seqlen))
    have = 0 if ctx.heldout_tokens is None else int(ctx.heldout_tokens.numel())
    if have < count * seqlen:
        raise AllocationError(
            f"scoring needs {count * seqlen} held-out calibration tokens ({count} windows of allocation.fitness_seqlen={seqlen}) but only "
            f"{have} are held out; raise data.heldout_fraction or lower allocation.fitness_tokens / allocation.fitness_seqlen"
        )
    windows = data_mod.sequential_windows(ctx.heldout_tokens, seqlen, count, bos=ctx.bos_token_id)
    names = list(ctx.layers)
    levels = {n: sorted({float(a[n]) for a in allocations}) for n in names}
    calibration = ctx.calibration_ids
    if options.variant_nsamples is not None and calibration is not None:
        calibration = calibration[: int(options.variant_nsamples)]
    variants = precompute_variants(ctx.model, ctx.layers, ctx.pruner, ctx.pattern, calibration, ctx.device, levels=levels,
                                   max_levels=max(len(v) for v in levels.values()), batch_size=ctx.batch_size)
    candidate = CandidateModel(ctx.layers, variants, [[n] for n in names], lambda u, k: levels[names[u]][k])
    try:
        fitness = ModelFitness(ctx.model, candidate, windows, [count], ctx.device, str(options.fitness), int(options.fitness_batch_size),
                               plan=ctx.plan)
        yield lambda alloc: fitness([levels[n].index(float(alloc[n])) for n in names], 0)
    finally:
        candidate.restore()
        variants.close()


__all__ = ["BLOCK_ONLY", "alpha_allocator", "dlp_allocator", "atp_allocator", "check_alpha", "check_dlp", "check_atp", "heldout_scorer"]
