"""``allocation=msp``: the sensitivity-initialised evolutionary search over per-unit sparsities.

:func:`msp_allocator` reads as the search's steps:

1. **Settings** (:mod:`msp.search.settings`): the options, validated once and model-free (before the model is
   loaded too, by :func:`check_options`).
2. **Search** (:func:`build_search`, no model pass): the units (decoder blocks or Linear layers: ``granularity``),
   the level grid and its budget (:mod:`msp.search.grid`), the held-out fitness windows, the start population
   (:class:`StartPopulation`: the ``init`` allocation — Fisher by default, through the allocator registry — snapped
   to the grid, the ``extra`` individuals, perturbed copies) and the :class:`~msp.search.evolution.Evolution` with its
   checkpoint fingerprint. :func:`check_checkpoint` refuses a foreign checkpoint here, before any heavy work.
3. **Candidates** (:func:`candidate_source`, :mod:`msp.search.fitness`): variants from one dense calibration pass,
   the model that swaps them in, and the fitness on held-out calibration tokens (KL to the dense model or
   perplexity; multi-fidelity ``stages``).
4. **Evolution** (:meth:`~msp.search.evolution.Evolution.run` with that fitness), checkpointed to
   ``<run dir>/search_state.json`` every generation; ``allocation.resume=true`` continues it (from
   ``allocation.resume_from`` or the run dir).
5. **Report** (:class:`SearchReport`: ``results.json["search"]``).

The dense weights are restored afterwards; the model is then pruned with the winning allocation by the normal
sequential pipeline (:func:`msp.prune.prune_`), so the reported perplexity is that of a real pruned model. With
``allocation.final=candidate`` the run delivers instead the very model the search scored (the winning genome's
variant weights, :func:`candidate_weights`), as EvoPress stitches its final model from its database.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msp import data as data_mod
from msp.allocation.base import Allocation, AllocationError
from msp.allocation.baselines import BLOCK_ONLY
from msp.allocation.build import Allocated, AllocationContext, allocator_entry, build_allocation, load_allocation_file
from msp.allocation.registry import load
from msp.device import available_memory_bytes
from msp.distributed import ranks as run_ranks
from msp.distributed import same_search, search_group, split_fitness
from msp.masks import Pattern
from msp.models import find_blocks, layer_block_index
from msp.numerics import check_all_finite, weights_hint
from msp.prune import prune_
from msp.search.evolution import Evolution, SearchResult, mutate, snap
from msp.search.fitness import CandidateModel, LayerVariants, ModelFitness, precompute_variants, resolve_mode, store_estimate
from msp.search.grid import Grid, build_grid, fit_store_levels
from msp.search.settings import BEST_INITS, STATE_FILE, Settings, parse_options

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- entry points


def check_options(options: dict, target: float, pattern: Pattern) -> None:
    """Early (before the model is loaded) checks of ``allocation=msp``: options, bounds, grid, and that an
    explicit ``allocation.resume_from`` holds a readable checkpoint."""
    if pattern.kind == "nm":
        return  # falls back to the uniform allocation (with a warning)
    settings = parse_options(options, target, pattern)
    if settings.init == "file":
        _check_init_file(settings)
    if settings.resume_from and settings.resume:
        path = settings.checkpoint_source(None)
        if path is None or not path.exists():
            raise AllocationError(
                f"allocation.resume_from={settings.resume_from}: no {STATE_FILE} there; give the run dir of the search to continue (or its {STATE_FILE})"
            )


def _check_init_file(settings: Settings) -> None:
    """allocation.init=file: a readable allocation.json at allocation.init_options.path, for this run's target."""
    path = settings.init_options.get("path")
    if not path or str(path) == "???":
        raise AllocationError(
            "allocation.init=file needs the allocation to start from: add +allocation.init_options.path=<run dir>/allocation.json"
        )
    alloc = load_allocation_file({"path": path})
    if abs(float(alloc.target) - settings.target) > 1e-9:
        raise AllocationError(
            f"allocation.init_options.path={path} holds an allocation for target {alloc.target:g}, not this run's sparsity={settings.target:g}: "
            f"start from an allocation.json of a run at sparsity={settings.target:g}, or set sparsity={alloc.target:g}"
        )


def msp_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """Sensitivity-initialised evolutionary search; see the module docstring."""
    if ctx.pattern.kind == "nm":
        return _fixed_pattern(ctx)
    started = time.perf_counter()
    settings = parse_options(options, ctx.target, ctx.pattern, ctx.seed)
    search = build_search(ctx, settings)
    timeout = settings.dist_timeout_s
    with search_group(ctx.device, timeout) as ranks:  # several ranks (torchrun, SLURM): the candidates split across them
        search.source = same_search(search.evolution.fingerprint, search.source, ranks, timeout, settings.resume)
        check_checkpoint(search)
        with candidate_source(ctx, search) as source:
            fitness = split_fitness(source.fitness, ranks, timeout, ctx.device)
            last = settings.config.stages - 1
            search.start.score = lambda genome: search.evolution.score(fitness, genome, last)
            t0, c0 = time.perf_counter(), time.process_time()
            result = search.evolution.run(fitness, search.start, resume=settings.resume, resume_from=search.source)
            # the start population (e.g. the Fisher pass) is timed on its own, inside the run
            seconds = (time.perf_counter() - t0 - search.start.wall, time.process_time() - c0 - search.start.cpu)
            chosen, verified = result.best, None
            if settings.verify_tokens is not None:
                chosen, verified = verify_finalists(ctx, search, source, result)
            weights = candidate_weights(source.candidate, ctx.layers, chosen) if settings.final == "candidate" else None
    report = SearchReport.of(search, source, result, seconds, started, ranks=ranks.world, delivered=chosen, verify=verified)
    log.info("search done: fitness %s %.5f (initial %s allocation) -> %.5f (best) in %d generations, %d evaluations, %.1f s "
             "(precompute %.1f s, init %.1f s, search %.1f s)", settings.metric, result.initial_fitness, settings.init,
             result.best_fitness, result.generations, result.evaluations, report.wall_seconds["total"], source.wall,
             search.start.wall, seconds[0])
    meta = {"granularity": settings.granularity, "init": settings.init, "init_chosen": search.start.chosen, "fitness": settings.metric,
            "best_fitness": result.best_fitness, "initial_fitness": result.initial_fitness, "final": settings.final}
    if ctx.pattern.kind == "mixed_nm":
        meta["achieved_mean"] = search.grid.achieved
    allocation = genome_allocation(search, chosen, meta)
    return Allocated(allocation, sensitivity=search.start.sensitivity.get(search.start.chosen), search=report.to_json(), weights=weights)


@torch.no_grad()
def verify_finalists(ctx: AllocationContext, search: "Search", source: "CandidateSource", result: SearchResult) -> tuple[np.ndarray, dict]:
    """``allocation.verify_tokens``: a last check of the search's pick on the first ``verify_tokens`` held-out tokens
    (more than the last stage's: the best of many noisy few-hundred-token scores is biased low).

    ``allocation.verify``: ``rerank`` re-scores the last population and the start as the search scored them and
    picks the best; ``guard`` scores the search's pick and its start as the run delivers them (with ``final=prune``:
    the pruner at their allocations on all calibration windows; the search's variant models can rank them the other
    way, e.g. SparseGPT at 75%) and delivers the better, so the search never delivers a model worse than its start's
    on these tokens; ``rerank_guard`` (the default) re-ranks, then guards. Returns (the chosen genome, what
    ``results.json["search"]["verify"]`` records)."""
    st = search.settings
    asked = math.ceil(st.verify_tokens / st.fitness_seqlen)
    windows = data_mod.sequential_windows(ctx.heldout_tokens, st.fitness_seqlen, asked, bos=ctx.bos_token_id)
    n = int(windows.shape[0])  # never fewer than the last stage's windows: the search itself scored on them
    if n < asked:
        log.warning("search: allocation.verify_tokens=%d asks for %d windows of %d held-out tokens; the held-out text has %d, so "
                    "the check uses %d tokens (raise data.heldout_fraction or use longer calibration text for more)",
                    st.verify_tokens, asked, st.fitness_seqlen, n, n * st.fitness_seqlen)
    finalists: list[tuple[str, np.ndarray, float]] = [("start", np.asarray(result.initial, np.int64), result.initial_fitness)]
    for i, (genome, value) in enumerate(zip(result.population, result.fitness)):
        if not any(np.array_equal(genome, g) for _, g, _ in finalists) and (st.verify != "guard" or i == 0):
            finalists.append((f"population[{i}]", np.asarray(genome, np.int64), float(value)))
    t0 = time.perf_counter()
    source.candidate.restore()  # the dense reference of the verification windows is taken from the dense weights
    verifier = ModelFitness(ctx.model, source.candidate, windows, [n], ctx.device, st.metric, st.fitness_batch_size, plan=ctx.plan,
                            blockwise=False)
    as_pruned = st.final == "prune" and ctx.pruner is not None
    scored: dict[int, float] = {}  # the models the search scored (its variants' weights)
    if st.verify != "guard" or not as_pruned:
        scored = {i: verifier(genome, 0) for i, (_, genome, _) in enumerate(finalists)}
    pick = min(scored, key=lambda i: (scored[i], i)) if st.verify != "guard" else len(finalists) - 1  # guard: the search's best
    pruned: dict[int, float] = {}
    if st.verify in ("guard", "rerank_guard"):
        contenders = list(dict.fromkeys([0, pick]))
        if as_pruned:
            for i in contenders:
                source.candidate.restore()
                prune_(ctx.model, ctx.pruner, genome_allocation(search, finalists[i][1]), ctx.calibration_ids, ctx.device, ctx.pattern,
                       ctx.batch_size, store_device=getattr(ctx.plan, "store", None), true_sequential=ctx.true_sequential)
                pruned[i] = verifier.of_model(0)
        guard = pruned or {i: scored[i] for i in contenders}
        pick = min(guard, key=lambda i: (guard[i], i))
    source.candidate.restore()
    del verifier
    describe = _describer(search.grid)
    log.info("search: verification (%s) on %d held-out tokens: %s%s; delivering %s", st.verify, n * st.fitness_seqlen,
             ", ".join(f"{finalists[i][0]} {v:.5f}" for i, v in scored.items()) or "-",
             "; pruned as delivered: " + ", ".join(f"{finalists[i][0]} {v:.5f}" for i, v in pruned.items()) if pruned else "",
             finalists[pick][0])
    report = {"mode": st.verify, "tokens": int(n * st.fitness_seqlen), "chosen": finalists[pick][0], "seconds": time.perf_counter() - t0,
              "finalists": [{"name": name, "search_fitness": f, "verify_fitness": scored.get(i), "pruned_fitness": pruned.get(i),
                             "genome": describe(g)} for i, (name, g, f) in enumerate(finalists)]}
    return finalists[pick][1], report


def genome_allocation(search: "Search", genome: np.ndarray, meta: dict | None = None) -> Allocation:
    """The per-layer allocation of a genome: every layer of a unit at the unit's sparsity."""
    levels = search.grid.sparsities(genome)
    sparsities = {name: float(levels[u]) for u, names in enumerate(search.units) for name in names}
    return Allocation(sparsities, search.settings.target, "msp", dict(meta or {}))


@torch.no_grad()
def candidate_weights(candidate: CandidateModel, layers: dict[str, torch.nn.Linear], genome: np.ndarray) -> dict[str, torch.Tensor]:
    """``allocation.final=candidate``: the weights of the model the search scored for ``genome`` (its layers taken
    from the variants), copied to the CPU before the dense weights go back in. Costs one copy of the prunable
    weights in host memory until the prune stage puts them in place."""
    candidate.apply(genome)
    return {name: lin.weight.detach().to("cpu", copy=True) for name, lin in layers.items()}


def _fixed_pattern(ctx: AllocationContext) -> Allocated:
    fixed = ctx.pattern.fixed_sparsity()
    log.warning(
        "allocation=msp with pattern=%s: a fixed N:M pattern prunes every layer to %.3f, so there is nothing to search; "
        "using the uniform allocation (use pattern=N:%d to search N per layer)", ctx.pattern, fixed, ctx.pattern.m,
    )
    alloc = Allocation({n: float(fixed) for n in ctx.layers}, float(fixed), "msp", {"note": f"pattern {ctx.pattern} fixes every layer; nothing searched"})
    return Allocated(alloc, search={"skipped": f"pattern {ctx.pattern} fixes every layer's sparsity"})


# ---------------------------------------------------------------------------------------------------- the search


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
class Search:
    """One search, ready to run: everything but the candidates (built without a model pass)."""

    settings: Settings
    mode: str  # how candidates are built: ranking | store
    unit_names: list[str]
    units: list[list[str]]  # the layers of each unit
    grid: Grid
    step: float  # the level step of the grid (store mode may raise allocation.step)
    windows: torch.Tensor  # held-out fitness windows (max stage windows × fitness_seqlen)
    windows_per_stage: list[int]
    start: "StartPopulation"
    evolution: Evolution
    source: Path | None  # the checkpoint a resumed search reads


def build_search(ctx: AllocationContext, settings: Settings) -> Search:
    """Units, grid, fitness windows, start population and the evolution with its fingerprint. Every check that
    needs the model but no model pass fails here (too few units, too few held-out tokens, a too long window)."""
    mode = resolve_mode(settings.candidates, ctx.pruner)
    unit_names, units = search_units(ctx, settings.granularity)
    if len(units) < 2:
        raise AllocationError(f"allocation=msp needs at least two units to trade sparsity between; the model has {len(units)} {settings.granularity}(s)")
    params = ctx.params
    unit_params = [sum(params[n] for n in names) for names in units]
    grid_args = (unit_params, settings.target, ctx.pattern, settings.bounds, settings.step)
    if mode == "store":
        grid, step, settings = store_grid(settings, grid_args, [[params[n] for n in names] for names in units])
    else:
        grid, step = build_grid(*grid_args), settings.step
    if ctx.pattern.kind == "mixed_nm" and abs(grid.achieved - settings.target) > 1e-9:
        log.info("search: pattern=%s reaches mean sparsity %.5f, the nearest to sparsity=%s on the k/%d grid", ctx.pattern,
                 grid.achieved, settings.target, ctx.pattern.m)
    windows, windows_per_stage = fitness_windows(ctx, settings)
    evolution = Evolution(grid.space, settings.config, checkpoint=ctx.run_dir / STATE_FILE if ctx.run_dir is not None else None,
                          fingerprint_extra=fingerprint_fields(ctx, settings, mode), describe=_describer(grid),
                          on_generation=_tracker_callback(ctx), writer=run_ranks().writer)
    start = StartPopulation(ctx, settings, grid, units)
    return Search(settings, mode, unit_names, units, grid, step, windows, windows_per_stage, start, evolution,
                  settings.checkpoint_source(ctx.run_dir))


#: the finest store grid ``allocation.store_budget_gb`` picks: 17 levels over ±0.2 is the 0.025 step
MAX_STORE_LEVELS = 17


def check_store_fits_memory(need: int, available: int | None = None) -> None:
    """Refuse, before the variant pass, a memory store (``allocation.max_levels`` levels per layer) larger than the
    memory that is free: one line naming the ways to shrink it."""
    available = available_memory_bytes() if available is None else available
    if available is not None and need > 0.9 * available:
        raise AllocationError(
            f"the search's variant store needs {need / 1e9:.3g} GB of memory but {available / 1e9:.3g} GB are free; "
            f"set allocation.store_budget_gb=<GB> (fewer levels), allocation.store=disk, or a lower allocation.max_levels"
        )


def store_grid(settings: Settings, grid_args: tuple, layer_params: list[list[int]]) -> tuple[Grid, float, Settings]:
    """Store mode's grid: at most ``allocation.max_levels`` levels per unit, or with ``allocation.store_budget_gb``
    the most levels (≤ :data:`MAX_STORE_LEVELS`) whose packed store (:func:`store_estimate`) fits the budget; the
    settings come back with the ``max_levels`` used. ``layer_params``: the weight counts of each unit's layers."""
    element = torch.finfo(getattr(torch, settings.store_dtype)).bits // 8
    sizes = [n for unit in layer_params for n in unit]
    if settings.store_budget_gb is None:
        grid, step = fit_store_levels(*grid_args, settings.max_levels)
        if settings.store == "memory":
            check_store_fits_memory(store_estimate(sizes, [grid.levels(u) for u, unit in enumerate(layer_params) for _ in unit], element))
        return grid, step, settings
    budget = settings.store_budget_gb * 1e9
    need = math.inf
    for levels in range(MAX_STORE_LEVELS, 1, -1):
        try:
            grid, step = fit_store_levels(*grid_args, levels, quiet=True)
        except AllocationError:
            break  # so few levels that no unit can move: fewer cannot either
        need = store_estimate(sizes, [grid.levels(u) for u, unit in enumerate(layer_params) for _ in unit], element)
        if need <= budget:
            levels = max(levels, grid.most_levels())  # a mixed N:M grid has its k/M levels whatever the bound
            log.info("search: allocation.store_budget_gb=%g holds %d levels per layer (step %.4f, %.2f GB)", settings.store_budget_gb,
                     grid.most_levels(), step, need / 1e9)
            return grid, step, replace(settings, max_levels=levels)
    raise AllocationError(
        f"allocation.store_budget_gb={settings.store_budget_gb:g} is too small: the coarsest grid that can move already needs {need / 1e9:.3g} GB "
        f"of packed variants; raise it, narrow allocation.min/max, or use allocation.granularity=block"
    )


def fitness_windows(ctx: AllocationContext, settings: Settings) -> tuple[torch.Tensor, list[int]]:
    """The held-out calibration windows the fitness stages read, and how many each stage reads."""
    seqlen = settings.fitness_seqlen
    windows_per_stage = [max(1, math.ceil(t / seqlen)) for t in settings.tokens]
    need = max(windows_per_stage) * seqlen
    heldout = ctx.heldout_tokens
    have = 0 if heldout is None else int(heldout.numel())
    if have < need:
        raise AllocationError(
            f"the search fitness needs {need} held-out calibration tokens ({max(windows_per_stage)} windows of allocation.fitness_seqlen={seqlen}) "
            f"but only {have} are held out; raise data.heldout_fraction or lower allocation.stages[-1].tokens"
        )
    max_pos = getattr(getattr(ctx.model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seqlen > max_pos:
        raise AllocationError(f"allocation.fitness_seqlen={seqlen} is longer than the model's context ({max_pos}); use allocation.fitness_seqlen<={max_pos}")
    return data_mod.sequential_windows(heldout, seqlen, max(windows_per_stage), bos=ctx.bos_token_id), windows_per_stage


def fingerprint_fields(ctx: AllocationContext, settings: Settings, mode: str) -> dict:
    """What a checkpoint must share with this search to be resumed (beyond the grid and the evolution config)."""
    st, params = settings, ctx.params
    return {
        "context": {k: str(v) for k, v in sorted(ctx.cache_fields.items())},
        "pruner": repr(ctx.pruner), "pattern": str(ctx.pattern), "target": st.target, "granularity": st.granularity,
        "layers": [len(params), sum(params.values())], "init": st.init, "init_options": st.init_options,
        "extra": st.extra, "init_swaps": st.init_swaps, "fitness": st.metric, "fitness_seqlen": st.fitness_seqlen,
        "stage_tokens": st.tokens, "candidates": mode, "store_dtype": st.store_dtype if mode == "store" else None,
        "variant_nsamples": st.variant_nsamples,
        **({"store_inputs": st.store_inputs} if st.store_inputs != "dense" else {}),  # dense: as earlier checkpoints
    }


def check_checkpoint(search: Search) -> None:
    """With ``allocation.resume=true``, a checkpoint of another configuration fails here: its fingerprint needs only
    the grid and the settings, so no variant pass or fitness is spent on a search that cannot continue."""
    if search.settings.resume:
        search.evolution.load_checkpoint(search.source)


class StartPopulation:
    """The initial genomes: the ``init`` allocation snapped to the grid, the ``extra`` individuals, perturbed copies.

    Called by the evolution only when it does not resume, on the dense weights (the init allocators, e.g. the
    Fisher pass, run then). Keeps the genome of each named start (``named``), the sensitivity report each start
    was derived from (``sensitivity``) and the wall and CPU seconds it took."""

    def __init__(self, ctx: AllocationContext, settings: Settings, grid: Grid, units: list[list[str]]):
        self.ctx, self.settings, self.grid, self.units = ctx, settings, grid, units
        self.named: dict[str, np.ndarray] = {}
        self.sensitivity: dict[str, Any] = {}  # allocator → the SensitivityReport its start was derived from
        self.scores: dict[str, float] = {}  # init=best: every candidate's fitness (final stage)
        self.chosen = settings.init  # the allocator the population starts from (init=best: the best of BEST_INITS)
        self.score: Callable[[np.ndarray], float] | None = None  # the search's fitness (final stage); set before the run
        self.wall = self.cpu = 0.0
        self._snapped: dict[str, np.ndarray] = {}

    def __call__(self) -> list[np.ndarray]:
        w0, p0 = time.perf_counter(), time.process_time()
        st = self.settings
        first = self._best() if st.init == "best" else self.genome(st.init, st.init_options)
        self.named[self.chosen] = first
        genomes = [first]
        for e in st.extra:
            if e == "uniform" or e != self.chosen:  # uniform always (as before); owl unless the search starts from it
                self.named[e] = self.genome(e, {})
                genomes.append(self.named[e])
        rng = np.random.default_rng(st.config.seed + 1)
        for _ in range(st.config.population - len(genomes)):
            genomes.append(mutate(first, self.grid.space, rng, st.init_swaps))
        log.info("search: initial population of %d (%s snapped to the grid, %s, perturbed copies)", len(genomes), self.chosen,
                 ", ".join(st.extra) or "no extras")
        self.wall, self.cpu = time.perf_counter() - w0, time.process_time() - p0
        return genomes

    def _best(self) -> np.ndarray:
        """init=best: every allocator of BEST_INITS snapped to the grid and scored by the search's own fitness (the
        scores are memoised by the evolution, so the initial population does not score them again); the best wins,
        the first of BEST_INITS on ties."""
        if self.score is None:
            raise AllocationError("allocation.init=best needs the search's fitness before the start population is built")
        for method in BEST_INITS:
            self.scores[method] = float(self.score(self.genome(method, {})))
            log.info("search: init=best: %s scores %.6g", method, self.scores[method])
        self.chosen = min(self.scores, key=lambda m: (self.scores[m], BEST_INITS.index(m)))
        log.info("search: init=best starts from %s (%.6g)", self.chosen, self.scores[self.chosen])
        return self._snapped[self.chosen]

    def genome(self, method: str, extra_options: dict) -> np.ndarray:
        """The genome of allocator ``method`` (uniform: the target everywhere), computed once."""
        if method not in self._snapped:
            if method == "uniform":
                self._snapped[method] = snap(self.grid.real_levels([self.settings.target] * len(self.units)), self.grid.space)
            else:
                self._snapped[method] = self._snap(method, extra_options)
        return self._snapped[method]

    def _snap(self, method: str, extra_options: dict) -> np.ndarray:
        """Run allocator ``method`` (one of settings.INITS, all in the registry) and put its per-unit sparsities on the grid.
        The search's granularity and bounds are passed to allocators that take them (dlp and atp are per block)."""
        lo, hi = self.settings.bounds
        keys = {f.name for f in dataclass_fields(load(allocator_entry(method).schema))}
        passed = {"granularity": self.settings.granularity, "min": lo, "max": hi}
        if method in BLOCK_ONLY:
            passed.pop("granularity")
        opts = {"method": method, **{k: v for k, v in passed.items() if k in keys}, **extra_options}
        outcome = build_allocation(self.ctx, opts)
        if outcome.sensitivity is not None:
            self.sensitivity[method] = outcome.sensitivity
        params = self.ctx.params
        unit_values = [sum(outcome.allocation[n] * params[n] for n in names) / sum(params[n] for n in names) for names in self.units]
        return snap(self.grid.real_levels(unit_values), self.grid.space)


# ---------------------------------------------------------------------------------------------------- candidates


@dataclass
class CandidateSource:
    """The search's candidates on the real model: the variants, the model that swaps them in, the fitness."""

    variants: LayerVariants
    candidate: CandidateModel
    fitness: ModelFitness
    variant_windows: int  # calibration windows of the variant pass
    wall: float  # seconds of the variant pass and the dense reference
    cpu: float


@contextmanager
def candidate_source(ctx: AllocationContext, search: Search) -> Iterator[CandidateSource]:
    """Variants from one dense calibration pass, the :class:`CandidateModel` and the fitness (with its dense
    reference); on exit the dense weights are back in the model and the variants are released."""
    st = search.settings
    t0, c0 = time.perf_counter(), time.process_time()
    calibration = ctx.calibration_ids
    if st.variant_nsamples is not None and calibration is not None:
        calibration = calibration[: st.variant_nsamples]
    levels = None
    if search.mode == "store":
        levels = {name: search.grid.levels(u) for u, names in enumerate(search.units) for name in names}
    variants = precompute_variants(
        ctx.model, ctx.layers, ctx.pruner, ctx.pattern, calibration, ctx.device, mode=search.mode, levels=levels,
        store=st.store, store_dir=ctx.run_dir, store_dtype=st.store_dtype, max_levels=st.max_levels, batch_size=ctx.batch_size,
        inputs_at=variant_inputs_at(search),
    )
    candidate = CandidateModel(ctx.layers, variants, search.units, search.grid.sparsity)
    try:
        fitness = _model_fitness(ctx, search, candidate)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        log.info("search: precompute (%s variants, dense reference) took %.1f s", search.mode, wall)
        yield CandidateSource(variants, candidate, fitness, int(calibration.shape[0]) if calibration is not None else 0, wall, cpu)
    finally:
        candidate.restore()
        variants.close()


def variant_inputs_at(search: Search) -> dict[str, float] | None:
    """``allocation.store_inputs``: the sparsity of every layer whose pruned outputs feed the variant pass's next block
    (None: ``dense``). ``start``: the search's start allocation (the init allocator on the dense model, snapped to the
    grid: the start population reuses it); with ``init=best`` the start is chosen by the fitness, which needs the
    variants, so the target level stands in for it."""
    st = search.settings
    if st.store_inputs == "dense":
        return None
    if st.store_inputs == "start" and st.init != "best":
        genome, what = search.start.genome(st.init, st.init_options), f"the {st.init} start"
    else:
        genome, what = search.start.genome("uniform", {}), "the target level"
        if st.store_inputs == "start":
            log.info("search: allocation.store_inputs=start with init=best: the variant pass's inputs go through the blocks "
                     "at the target level (the start is chosen with the variants)")
    log.info("search: the variant pass calibrates every block on the outputs of the blocks before it at %s", what)
    sparsities = search.grid.sparsities(genome)
    return {name: float(sparsities[u]) for u, names in enumerate(search.units) for name in names}


def _model_fitness(ctx: AllocationContext, search: Search, candidate: CandidateModel) -> ModelFitness:
    """The fitness on the held-out windows (the forward streamed block by block when the run's plan streams)."""
    st = search.settings
    fitness = ModelFitness(ctx.model, candidate, search.windows, search.windows_per_stage, ctx.device, st.metric, st.fitness_batch_size,
                           plan=ctx.plan, blockwise=st.fitness_blockwise, memory_gb=st.fitness_memory_gb)
    # a NaN dense reference would make every candidate's KL NaN: stop here, before the search, with the stage named
    check_all_finite([(None, "the dense reference Σ p log p", t) for t in getattr(fitness, "dense_plogp", ())],
                     stage="search: dense reference", hint=weights_hint(ctx.model))
    return fitness


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class SearchReport:
    """What the search did (``results.json["search"]``)."""

    generations: int
    evaluations: int
    fitness: str  # the metric
    history: list[dict]  # per generation: best, mean, evaluations (, seconds)
    initial_fitness: float  # of the init allocation
    best_fitness: float
    start_fitness: dict[str, Any]  # named start (init, extras) → its final-stage fitness
    init: str
    init_chosen: str  # the allocator the search started from (init=best: the best-scoring one; else init)
    init_scores: dict[str, float]  # init=best: every candidate's final-stage fitness; {} otherwise
    granularity: str
    units: dict[str, float]  # unit → sparsity of the best genome
    initial_units: dict[str, float]
    grid: dict  # step, min, max, weights_per_step, levels (per unit)
    candidates: str  # ranking | store
    stage_tokens: list[int]
    resumed_from: int | None  # the generation a resumed search continued from
    layer_swaps: int
    # precompute: variant pass + dense reference; init: the starting allocations (e.g. the Fisher pass);
    # search: scoring the initial population and every generation
    wall_seconds: dict[str, float]
    # process CPU time (all threads): robust to other jobs sharing the cores; ≈ threads × wall when alone
    cpu_seconds: dict[str, float]
    variant_windows: int
    checkpoint: str | None
    # what the fitness spent (msp.search.fitness.FitnessCost): tokens scored, decoder blocks run (block × window
    # forwards, and what one full forward per evaluation runs), bytes moved to the device by kind, passes
    fitness_cost: dict
    ranks: int = 1  # processes that scored the candidates together (msp.distributed)
    final: str = "prune"  # what the run delivers: prune (re-pruned at the allocation) | candidate (the scored model)
    # allocation.verify_tokens: {tokens, chosen, seconds, finalists: [{name, search_fitness, verify_fitness, genome}]}; None: off
    verify: dict | None = None

    @classmethod
    def of(cls, search: Search, source: CandidateSource, result: SearchResult, seconds: tuple[float, float],
           started: float, ranks: int = 1, delivered: np.ndarray | None = None, verify: dict | None = None) -> "SearchReport":
        """``seconds``: (wall, CPU) of the evolution without the start population; ``started``: the allocator's start;
        ``ranks``: the processes the search ran on; ``delivered``: the genome the run delivers (``units``; default the
        best); ``verify``: the finalists' verification (:func:`verify_finalists`)."""
        delivered = result.best if delivered is None else delivered
        st, grid, start = search.settings, search.grid, search.start
        last = st.config.stages - 1
        return cls(
            generations=result.generations, evaluations=result.evaluations, fitness=st.metric, history=result.history,
            initial_fitness=result.initial_fitness, best_fitness=result.best_fitness,
            start_fitness={k: search.evolution.cached(g, last) for k, g in start.named.items()}, init=st.init,
            init_chosen=start.chosen, init_scores=dict(start.scores),
            granularity=st.granularity, units=dict(zip(search.unit_names, grid.sparsities(delivered))),
            initial_units=dict(zip(search.unit_names, grid.sparsities(result.initial))),
            grid={"step": search.step, "min": st.bounds[0], "max": st.bounds[1], "weights_per_step": grid.step_weights,
                  "levels": [len(grid.levels(u)) for u in range(len(search.units))]},
            candidates=search.mode, stage_tokens=[w * st.fitness_seqlen for w in search.windows_per_stage],
            resumed_from=result.resumed_from, layer_swaps=source.candidate.swaps,
            wall_seconds={"precompute": source.wall, "init": start.wall, "search": seconds[0], "total": time.perf_counter() - started},
            cpu_seconds={"precompute": source.cpu, "init": start.cpu, "search": seconds[1]},
            variant_windows=source.variant_windows,
            checkpoint=str(search.evolution.checkpoint) if search.evolution.checkpoint else None, ranks=ranks, final=st.final, verify=verify,
            fitness_cost={**source.fitness.cost.to_json(), "blockwise": source.fitness.blockwise, "stride": source.fitness.stride},
        )

    def to_json(self) -> dict:
        return asdict(self)


def _describer(grid: Grid):
    def describe(genome: np.ndarray) -> str:
        s = grid.sparsities(genome)
        if len(s) <= 48:
            return " ".join(f"{x:.3f}" for x in s)
        return f"{len(s)} units in [{min(s):.3f}, {max(s):.3f}], first: " + " ".join(f"{x:.3f}" for x in s[:12]) + " ..."

    return describe


def _tracker_callback(ctx: AllocationContext):
    def on_generation(gen: int, best: float, mean: float, genome: np.ndarray) -> None:
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({"search/best_fitness": best, "search/mean_fitness": mean}, step=gen)

    return on_generation


__all__ = ["msp_allocator", "check_options", "build_search", "check_checkpoint", "candidate_source", "Search", "StartPopulation",
           "CandidateSource", "SearchReport", "candidate_weights", "search_units", "store_grid", "MAX_STORE_LEVELS", "fitness_windows", "fingerprint_fields", "STATE_FILE"]
