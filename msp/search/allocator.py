"""``allocation=msp``: the sensitivity-initialised evolutionary search over per-unit sparsities.

1. **Grid** (:func:`build_grid`). Units are decoder blocks or Linear layers (``granularity``). Unstructured:
   one level step removes the same number of weights c = round(step · n_ref) in every unit (n_ref: the median
   unit size), i.e. unit u's sparsity is s_u(l) = target + l · c / n_u for integer levels l within
   [min, max]; the budget Σ_u n_u s_u = target · Σ_u n_u is Σ_u l_u = 0, kept by construction by level
   switches. Mixed N:M (``pattern=N:M``): levels are k/M, one step of unit u removes n_u / M weights, and the
   budget is the level sum weighted by n_u / (M·g) (g: the gcd of the unit steps), as close to the target as
   the grid allows.
2. **Population**: the ``init`` allocation (Fisher by default, through the allocator registry) snapped to the
   grid, optional ``extra`` individuals (uniform, OWL), and perturbed copies (``init_swaps`` level switches).
3. **Fitness** on held-out calibration tokens (:mod:`msp.search.fitness`): variants from one dense
   calibration pass; KL to the dense model or perplexity; multi-fidelity ``stages``.
4. **Search** (:mod:`msp.search.evolution`), checkpointed to ``<run dir>/search_state.json`` every generation;
   ``allocation.resume=true`` continues it (from ``allocation.resume_from`` or the run dir).

The dense weights are restored afterwards; the model is then pruned with the winning allocation by the normal
sequential pipeline (:func:`msp.prune.prune_`), so the reported perplexity is that of a real pruned model.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from msp import data as data_mod
from msp.allocation.base import Allocation, AllocationError
from msp.allocation.build import OPTION_CHECKS, Allocated, AllocationContext, build_allocation, register
from msp.masks import Pattern
from msp.models import find_blocks, layer_block_index
from msp.search.evolution import Evolution, EvolutionConfig, SearchError, SearchSpace, mutate, snap
from msp.search.fitness import METRICS, CandidateModel, ModelFitness, precompute_variants, resolve_mode

log = logging.getLogger(__name__)

STATE_FILE = "search_state.json"
GRANULARITIES = ("block", "layer")
INITS = ("fisher", "hessian", "owl", "rank", "uniform")
EXTRAS = ("uniform", "owl")

DEFAULTS: dict[str, Any] = {
    "granularity": "block", "init": "fisher", "init_options": {}, "extra": ["uniform"], "min": None, "max": None,
    "spread": 0.2, "step": 0.025, "population": 4, "offspring": 8, "generations": 40,
    "stages": [{"tokens": 256, "survivors": 2}, {"tokens": 512}], "crossover": 0.25, "max_swaps": 3, "init_swaps": 2,
    "fitness": "kl", "fitness_seqlen": 256, "fitness_batch_size": 4, "candidates": "auto", "store": "memory",
    "store_dtype": "float16", "max_levels": 6, "variant_nsamples": None, "seed": None, "resume": False, "resume_from": None,
}


def _opt(options: dict, key: str) -> Any:
    value = options.get(key)
    return DEFAULTS[key] if value is None else value


def _int(options: dict, key: str, minimum: int) -> int:
    value = _opt(options, key)
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise AllocationError(f"allocation.{key}={value!r} is not an integer, e.g. allocation.{key}={DEFAULTS[key]}") from None
    if v < minimum:
        raise AllocationError(f"allocation.{key}={v} must be >= {minimum}, e.g. allocation.{key}={DEFAULTS[key]}")
    return v


def _float(options: dict, key: str) -> float:
    value = _opt(options, key)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AllocationError(f"allocation.{key}={value!r} is not a number, e.g. allocation.{key}={DEFAULTS[key]}") from None
    if math.isnan(v):
        raise AllocationError(f"allocation.{key} is NaN; e.g. allocation.{key}={DEFAULTS[key]}")
    return v


def _choice(options: dict, key: str, valid: tuple[str, ...]) -> str:
    value = str(_opt(options, key))
    if value not in valid:
        raise AllocationError(f"allocation.{key}={value!r} is unknown; valid: {', '.join(valid)}")
    return value


# ---------------------------------------------------------------------------------------------------- units & grid


def search_units(ctx: AllocationContext, granularity: str) -> tuple[list[str], list[list[str]]]:
    """(unit names, layers of each unit): decoder blocks (``model.layers.3``) or single Linear layers."""
    if granularity == "layer":
        names = list(ctx.layers)
        return names, [[n] for n in names]
    prefix, _ = find_blocks(ctx.model)
    groups: dict[str, list[str]] = {}
    for name in ctx.layers:
        groups.setdefault(f"{prefix}.{layer_block_index(name, prefix)}", []).append(name)
    return list(groups), list(groups.values())


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


def build_grid(unit_params: list[int], target: float, pattern: Pattern, bounds: tuple[float, float], step: float) -> Grid:
    """The level grid and budget (see the module docstring). Raises :class:`AllocationError` naming the fix
    when the bounds cannot hold the target or the grid is too coarse to move any unit."""
    lo, hi = bounds
    n = np.asarray(unit_params, np.int64)
    total = int(n.sum())
    if pattern.kind == "mixed_nm":
        m = pattern.m
        kmin, kmax = math.ceil(lo * m - 1e-9), min(math.floor(hi * m + 1e-9), m - 1)
        if kmin > kmax:
            raise AllocationError(f"pattern=N:{m} has no level k/{m} within allocation bounds [{lo}, {hi}]; widen allocation.min/max")
        quanta = [int(p) // m for p in unit_params]  # weights removed per level step of each unit
        g = reduce(math.gcd, quanta)
        weight = tuple(q // g for q in quanta)
        budget = int(round(target * total / g))  # Σ_u (n_u / (M g)) k_u = Σ_u n_u (k_u / M) / g = target · Σ n_u / g
        budget = min(max(budget, kmin * sum(weight)), kmax * sum(weight))
        achieved = budget * g / total  # Σ n_u k_u / M / Σ n_u with Σ (n_u / (M g)) k_u = budget
        if kmin == kmax:
            raise AllocationError(
                f"pattern=N:{m} with allocation bounds [{lo}, {hi}] leaves one level (k={kmin}); nothing to search: widen allocation.min/max"
            )
        space = SearchSpace(tuple([kmin] * len(n)), tuple([kmax] * len(n)), weight, budget)
        return Grid(space, [0.0] * len(n), [1.0 / m] * len(n), achieved, g * m)
    ref = float(np.median(n))
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
    space = SearchSpace(lower, upper, tuple([1] * len(n)), 0)
    return Grid(space, [float(target)] * len(n), delta, float(target), c)


def fit_store_levels(grid_args: tuple, step: float, max_levels: int) -> tuple[Grid, float]:
    """Store mode: raise the step until no unit has more than ``max_levels`` levels (bounded variant store)."""
    unit_params, target, pattern, bounds = grid_args
    grid = build_grid(unit_params, target, pattern, bounds, step)
    most = max(b - a + 1 for a, b in zip(grid.space.lower, grid.space.upper))
    if most <= max_levels or pattern.kind == "mixed_nm":
        return grid, step
    lo, hi = bounds
    ratio = max(unit_params) / float(np.median(unit_params))  # the largest unit has the finest sparsity step
    new_step = (hi - lo) / max(1, max_levels - 1) * ratio
    for _ in range(64):
        grid = build_grid(unit_params, target, pattern, bounds, new_step)
        if max(b - a + 1 for a, b in zip(grid.space.lower, grid.space.upper)) <= max_levels:
            break
        new_step *= 1.1
    log.info("search: allocation.max_levels=%d bounds the variant store, so the level step is raised from %.4f to %.4f", max_levels, step, new_step)
    return grid, new_step


# ---------------------------------------------------------------------------------------------------- allocator


def _bounds(options: dict, target: float) -> tuple[float, float]:
    spread = _float(options, "spread")
    if spread < 0:
        raise AllocationError(f"allocation.spread={spread} must be >= 0, e.g. allocation.spread=0.2")
    lo = options.get("min")
    hi = options.get("max")
    lo = max(0.0, target - spread) if lo is None else float(lo)
    hi = min(0.99, target + spread) if hi is None else float(hi)
    if not (0.0 <= lo <= hi < 1.0):
        raise AllocationError(f"allocation bounds [min={lo}, max={hi}] are invalid; need 0 <= allocation.min <= allocation.max < 1")
    if hi < target or lo > target:
        raise AllocationError(
            f"allocation bounds [min={lo}, max={hi}] do not contain sparsity={target}: no allocation within them meets the budget; "
            f"set allocation.min <= {target} <= allocation.max"
        )
    return lo, hi


def _stages(options: dict) -> tuple[list[int], list[int]]:
    """(tokens per stage, survivors after each stage but the last)."""
    raw = _opt(options, "stages")
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise AllocationError("allocation.stages must be a list like [{tokens: 256, survivors: 2}, {tokens: 1024}]")
    tokens, survivors = [], []
    for i, st in enumerate(raw):
        if not isinstance(st, dict) or "tokens" not in st:
            raise AllocationError(f"allocation.stages[{i}]={st!r} needs 'tokens' (and 'survivors' for all but the last stage)")
        try:
            t = int(st["tokens"])
        except (TypeError, ValueError):
            raise AllocationError(f"allocation.stages[{i}].tokens={st['tokens']!r} is not an integer") from None
        if t < 2:
            raise AllocationError(f"allocation.stages[{i}].tokens={t} must be >= 2")
        tokens.append(t)
        if i < len(raw) - 1:
            if st.get("survivors") is None:
                raise AllocationError(f"allocation.stages[{i}] needs 'survivors': how many offspring go on to stage {i + 1}")
            survivors.append(int(st["survivors"]))
    return tokens, survivors


def _fixed_pattern(ctx: AllocationContext) -> Allocated:
    fixed = ctx.pattern.fixed_sparsity()
    log.warning(
        "allocation=msp with pattern=%s: a fixed N:M pattern prunes every layer to %.3f, so there is nothing to search; "
        "using the uniform allocation (use pattern=N:%d to search N per layer)", ctx.pattern, fixed, ctx.pattern.m,
    )
    alloc = Allocation({n: float(fixed) for n in ctx.layers}, float(fixed), "msp", {"note": f"pattern {ctx.pattern} fixes every layer; nothing searched"})
    return Allocated(alloc, search={"skipped": f"pattern {ctx.pattern} fixes every layer's sparsity"})


def _unit_values(alloc: Allocation, units: list[list[str]], params: dict[str, int]) -> list[float]:
    return [sum(alloc[n] * params[n] for n in names) / sum(params[n] for n in names) for names in units]


def _checkpoint_source(options: dict, run_dir: Path | None) -> Path | None:
    src = options.get("resume_from")
    if src:
        p = Path(str(src)).expanduser()
        return p / STATE_FILE if p.is_dir() or not p.suffix else p
    return run_dir / STATE_FILE if run_dir is not None else None


@dataclass
class Settings:
    """The validated ``allocation.*`` options of a search (model-free)."""

    granularity: str
    init: str
    init_options: dict
    extra: list[str]
    metric: str
    step: float
    bounds: tuple[float, float]
    tokens: list[int]
    survivors: list[int]
    fitness_seqlen: int
    fitness_batch_size: int
    max_levels: int
    init_swaps: int
    candidates: str
    store: str
    store_dtype: str
    variant_nsamples: int | None
    config: EvolutionConfig
    resume: bool


def parse_options(options: dict, target: float, pattern: Pattern, seed: int = 0) -> Settings:
    """Check every search option without a model (called early by :func:`check_options` and again by the
    allocator); each problem is one :class:`AllocationError` naming the override that fixes it."""
    from msp.search.fitness import MODES, STORES, _STORE_DTYPES

    target = float(target)
    granularity = _choice(options, "granularity", GRANULARITIES)
    init = _choice(options, "init", INITS)
    init_options = _opt(options, "init_options") or {}
    if not isinstance(init_options, dict):
        raise AllocationError(f"allocation.init_options={init_options!r} must be a mapping, e.g. allocation.init_options={{beta: 0.05}}")
    extra = _opt(options, "extra") or []
    extra = [str(e) for e in ([extra] if isinstance(extra, str) else extra)]
    bad = [e for e in extra if e not in EXTRAS]
    if bad:
        raise AllocationError(f"allocation.extra has unknown individual(s) {bad}; valid: {', '.join(EXTRAS)}")
    metric = _choice(options, "fitness", METRICS)
    candidates = _choice(options, "candidates", MODES)
    store = _choice(options, "store", STORES)
    store_dtype = _choice(options, "store_dtype", tuple(_STORE_DTYPES))
    step = _float(options, "step")
    if not 0 < step < 1:
        raise AllocationError(f"allocation.step={step} must be in (0, 1), e.g. allocation.step=0.025")
    bounds = _bounds(options, target)
    if pattern.kind == "unstructured" and granularity == "block" and step > max(bounds[1] - target, target - bounds[0]) + 1e-12:
        # blocks of one model have equal sizes, so every block's level step is `step`
        raise AllocationError(
            f"allocation.step={step} is too coarse for sparsity={target} within [{bounds[0]:g}, {bounds[1]:g}]: no block can move one level; "
            f"use a smaller allocation.step, e.g. {step / 4:g}, or widen allocation.min/max"
        )
    if pattern.kind == "mixed_nm":
        m = pattern.m
        kmin, kmax = math.ceil(bounds[0] * m - 1e-9), min(math.floor(bounds[1] * m + 1e-9), m - 1)
        if kmin >= kmax:
            raise AllocationError(
                f"pattern=N:{m} is too coarse for a search within allocation bounds [{bounds[0]:g}, {bounds[1]:g}]: "
                f"{'no level' if kmin > kmax else 'a single level'} k/{m} fits; widen allocation.min/max (or allocation.spread) or use a larger M"
            )
    tokens, survivors = _stages(options)
    variant_nsamples = options.get("variant_nsamples")
    try:
        config = EvolutionConfig(
            generations=_int(options, "generations", 0), population=_int(options, "population", 1),
            offspring=_int(options, "offspring", 1), survivors=tuple(survivors), crossover=_float(options, "crossover"),
            max_swaps=_int(options, "max_swaps", 1), seed=int(options["seed"]) if options.get("seed") is not None else int(seed),
        )
    except SearchError as exc:
        raise AllocationError(str(exc)) from None
    return Settings(
        granularity=granularity, init=init, init_options=dict(init_options), extra=extra, metric=metric, step=step, bounds=bounds,
        tokens=tokens, survivors=survivors, fitness_seqlen=_int(options, "fitness_seqlen", 2),
        fitness_batch_size=_int(options, "fitness_batch_size", 1), max_levels=_int(options, "max_levels", 2),
        init_swaps=_int(options, "init_swaps", 1), candidates=candidates, store=store, store_dtype=store_dtype,
        variant_nsamples=None if variant_nsamples is None else _int(options, "variant_nsamples", 1), config=config,
        resume=bool(options.get("resume", False)),
    )


def check_options(options: dict, target: float, pattern: Pattern) -> None:
    """Early (before the model is loaded) checks of ``allocation=msp``: options, bounds, grid, and that an
    explicit ``allocation.resume_from`` holds a readable checkpoint."""
    if pattern.kind == "nm":
        return  # falls back to the uniform allocation (with a warning)
    parse_options(options, target, pattern)
    src = options.get("resume_from")
    if src and options.get("resume"):
        path = _checkpoint_source(options, None)
        if path is None or not path.exists():
            raise AllocationError(
                f"allocation.resume_from={src}: no {STATE_FILE} there; give the run dir of the search to continue (or its {STATE_FILE})"
            )


OPTION_CHECKS["msp"] = check_options


@register("msp")
def msp_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """Sensitivity-initialised evolutionary search; see the module docstring."""
    if ctx.pattern.kind == "nm":
        return _fixed_pattern(ctx)
    started = time.perf_counter()
    target = float(ctx.target)
    st = parse_options(options, target, ctx.pattern, ctx.seed)
    granularity, init, extra, metric, step, bounds = st.granularity, st.init, st.extra, st.metric, st.step, st.bounds
    tokens, fitness_seqlen, max_levels, config, init_swaps = st.tokens, st.fitness_seqlen, st.max_levels, st.config, st.init_swaps
    seed = config.seed
    try:
        mode = resolve_mode(st.candidates, ctx.pruner)
    except SearchError as exc:
        raise AllocationError(str(exc)) from None

    unit_names, units = search_units(ctx, granularity)
    if len(units) < 2:
        raise AllocationError(f"allocation=msp needs at least two units to trade sparsity between; the model has {len(units)} {granularity}(s)")
    params = ctx.params
    unit_params = [sum(params[n] for n in names) for names in units]
    grid_args = (unit_params, target, ctx.pattern, bounds)
    if mode == "store":
        grid, step = fit_store_levels(grid_args, step, max_levels)
    else:
        grid = build_grid(*grid_args, step)
    if ctx.pattern.kind == "mixed_nm" and abs(grid.achieved - target) > 1e-9:
        log.info("search: pattern=%s reaches mean sparsity %.5f, the nearest to sparsity=%s on the k/%d grid", ctx.pattern, grid.achieved, target, ctx.pattern.m)

    # held-out fitness windows: checked before any heavy work
    windows_per_stage = [max(1, math.ceil(t / fitness_seqlen)) for t in tokens]
    need = max(windows_per_stage) * fitness_seqlen
    heldout = ctx.heldout_tokens
    have = 0 if heldout is None else int(heldout.numel())
    if have < need:
        raise AllocationError(
            f"the search fitness needs {need} held-out calibration tokens ({max(windows_per_stage)} windows of allocation.fitness_seqlen={fitness_seqlen}) "
            f"but only {have} are held out; raise data.heldout_fraction or lower allocation.stages[-1].tokens"
        )
    max_pos = getattr(getattr(ctx.model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and fitness_seqlen > max_pos:
        raise AllocationError(f"allocation.fitness_seqlen={fitness_seqlen} is longer than the model's context ({max_pos}); use allocation.fitness_seqlen<={max_pos}")
    windows = data_mod.sequential_windows(heldout, fitness_seqlen, max(windows_per_stage))

    checkpoint = ctx.run_dir / STATE_FILE if ctx.run_dir is not None else None
    resume = st.resume
    source = _checkpoint_source(options, ctx.run_dir)
    fields = {
        "context": {k: str(v) for k, v in sorted(ctx.cache_fields.items())},
        "pruner": repr(ctx.pruner), "pattern": str(ctx.pattern), "target": target, "granularity": granularity,
        "layers": [len(params), sum(params.values())], "init": init, "init_options": st.init_options,
        "extra": extra, "init_swaps": init_swaps, "fitness": metric, "fitness_seqlen": fitness_seqlen, "stage_tokens": tokens,
        "candidates": mode, "store_dtype": st.store_dtype if mode == "store" else None, "variant_nsamples": st.variant_nsamples,
    }
    describe = _describer(grid, unit_names)

    def on_generation(gen: int, best: float, mean: float, genome: np.ndarray) -> None:
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({"search/best_fitness": best, "search/mean_fitness": mean}, step=gen)

    # the fitness is attached after the precompute; the search is built first so that a foreign checkpoint
    # (its fingerprint needs only the grid and the settings) fails before any heavy work
    evolution = Evolution(grid.space, lambda g, s: math.nan, config, checkpoint=checkpoint, fingerprint_extra=fields,
                          describe=describe, on_generation=on_generation)
    if resume:
        try:
            evolution.load_checkpoint(source)  # a foreign checkpoint fails here, before the variant pass
        except SearchError as exc:
            raise AllocationError(str(exc)) from None

    # ---- precompute: variants from one dense calibration pass, dense reference log-probs
    t0, c0 = time.perf_counter(), time.process_time()
    calibration = ctx.calibration_ids
    if st.variant_nsamples is not None and calibration is not None:
        calibration = calibration[: st.variant_nsamples]
    layer_levels = None
    if mode == "store":
        layer_levels = {name: grid.levels(u) for u, names in enumerate(units) for name in names}
    store_dir = ctx.run_dir if ctx.run_dir is not None else None
    try:
        variants = precompute_variants(
            ctx.model, ctx.layers, ctx.pruner, ctx.pattern, calibration, ctx.device, mode=mode, levels=layer_levels,
            store=st.store, store_dir=store_dir, store_dtype=st.store_dtype,
            max_levels=max_levels, batch_size=ctx.batch_size,
        )
    except SearchError as exc:
        raise AllocationError(str(exc)) from None
    candidate = CandidateModel(ctx.layers, variants, units, grid.sparsity)
    try:
        fitness = ModelFitness(ctx.model, candidate, windows, windows_per_stage, ctx.device, metric, st.fitness_batch_size,
                               plan=ctx.plan)
        precompute_seconds, precompute_cpu = time.perf_counter() - t0, time.process_time() - c0
        log.info("search: precompute (%s variants, dense reference) took %.1f s", mode, precompute_seconds)
        evolution.fitness = fitness

        named: dict[str, np.ndarray] = {}
        start_sensitivity: dict[str, Any] = {}  # allocator → the SensitivityReport its start was derived from
        init_time = {"wall": 0.0, "cpu": 0.0}

        def initial_population() -> list[np.ndarray]:
            w0, p0 = time.perf_counter(), time.process_time()
            uniform = snap(grid.real_levels([target] * len(units)), grid.space)
            if init == "uniform":
                first = uniform
            else:
                first = _snap_allocation(ctx, init, st.init_options, granularity, bounds, grid, units, params, start_sensitivity)
            named[init] = first
            genomes = [first]
            for e in extra:
                if e == "uniform":
                    named["uniform"] = uniform
                    genomes.append(uniform)
                elif e == "owl" and init != "owl":
                    named["owl"] = _snap_allocation(ctx, "owl", {}, granularity, bounds, grid, units, params, start_sensitivity)
                    genomes.append(named["owl"])
            rng = np.random.default_rng(seed + 1)
            for _ in range(config.population - len(genomes)):
                genomes.append(mutate(first, grid.space, rng, init_swaps))
            log.info("search: initial population of %d (%s snapped to the grid, %s, perturbed copies)", len(genomes), init, ", ".join(extra) or "no extras")
            init_time["wall"], init_time["cpu"] = time.perf_counter() - w0, time.process_time() - p0
            return genomes

        t1, c1 = time.perf_counter(), time.process_time()
        try:
            result = evolution.run(initial_population, resume=resume, resume_from=source)
        except SearchError as exc:
            raise AllocationError(str(exc)) from None
        search_seconds = time.perf_counter() - t1 - init_time["wall"]
        search_cpu = time.process_time() - c1 - init_time["cpu"]
    finally:
        candidate.restore()
        variants.close()

    best = grid.sparsities(result.best)
    sparsities = {name: float(best[u]) for u, names in enumerate(units) for name in names}
    named_fitness = {k: evolution.cached(g, config.stages - 1) for k, g in named.items()}
    report = {
        "generations": result.generations,
        "evaluations": result.evaluations,
        "fitness": metric,
        "history": result.history,
        "initial_fitness": result.initial_fitness,
        "best_fitness": result.best_fitness,
        "start_fitness": named_fitness,
        "init": init,
        "granularity": granularity,
        "units": dict(zip(unit_names, best)),
        "initial_units": dict(zip(unit_names, grid.sparsities(result.initial))),
        "grid": {"step": step, "min": bounds[0], "max": bounds[1], "weights_per_step": grid.step_weights,
                 "levels": [len(grid.levels(u)) for u in range(len(units))]},
        "candidates": mode,
        "stage_tokens": [w * fitness_seqlen for w in windows_per_stage],
        "resumed_from": result.resumed_from,
        "layer_swaps": candidate.swaps,
        # precompute: variant pass + dense reference; init: the starting allocations (e.g. the Fisher pass);
        # search: scoring the initial population and every generation
        "wall_seconds": {"precompute": precompute_seconds, "init": init_time["wall"], "search": search_seconds,
                         "total": time.perf_counter() - started},
        # process CPU time (all threads): robust to other jobs sharing the cores; ≈ threads × wall when alone
        "cpu_seconds": {"precompute": precompute_cpu, "init": init_time["cpu"], "search": search_cpu},
        "variant_windows": int(calibration.shape[0]) if calibration is not None else 0,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    log.info("search done: fitness %s %.5f (initial %s allocation) -> %.5f (best) in %d generations, %d evaluations, %.1f s "
             "(precompute %.1f s, init %.1f s, search %.1f s)", metric, result.initial_fitness, init, result.best_fitness, result.generations,
             result.evaluations, report["wall_seconds"]["total"], precompute_seconds, init_time["wall"], search_seconds)
    meta = {"granularity": granularity, "init": init, "fitness": metric, "best_fitness": result.best_fitness,
            "initial_fitness": result.initial_fitness}
    if ctx.pattern.kind == "mixed_nm":
        meta["achieved_mean"] = grid.achieved
    return Allocated(Allocation(sparsities, target, "msp", meta), sensitivity=start_sensitivity.get(init), search=report)


def _snap_allocation(
    ctx: AllocationContext, method: str, extra_options: dict, granularity: str, bounds: tuple[float, float], grid: Grid,
    units: list[list[str]], params: dict[str, int], sensitivities: dict[str, Any],
) -> np.ndarray:
    """Run allocator ``method`` through the registry and put its per-unit sparsities on the grid
    (its sensitivity report, if any, goes to ``sensitivities[method]``)."""
    opts = {"method": method, "granularity": granularity, "min": bounds[0], "max": bounds[1], **extra_options}
    try:
        outcome = build_allocation(ctx, opts)
    except AllocationError as exc:
        if "unknown allocation method" in str(exc):
            raise AllocationError(
                f"allocation.init={method} is not available in this msp ({exc}); use allocation.init=uniform"
            ) from None
        raise
    if outcome.sensitivity is not None:
        sensitivities[method] = outcome.sensitivity
    return snap(grid.real_levels(_unit_values(outcome.allocation, units, params)), grid.space)


def _describer(grid: Grid, unit_names: list[str]):
    def describe(genome: np.ndarray) -> str:
        s = grid.sparsities(genome)
        if len(s) <= 48:
            return " ".join(f"{x:.3f}" for x in s)
        return f"{len(s)} units in [{min(s):.3f}, {max(s):.3f}], first: " + " ".join(f"{x:.3f}" for x in s[:12]) + " ..."

    return describe


__all__ = ["msp_allocator", "check_options", "parse_options", "Settings", "build_grid", "Grid", "search_units", "STATE_FILE", "DEFAULTS"]
