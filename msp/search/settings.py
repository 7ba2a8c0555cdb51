"""The options of ``allocation=msp``: one schema holding every default, and one function that checks the values.

:class:`SearchConfig` is the structured-config schema of ``allocation=msp`` (Hydra checks the types and unknown
keys at compose time); the YAML file only picks values. :func:`validate` checks the values once, without a model
(ranges, bounds against the target, stages, choices, a grid that can move) and returns the :class:`Settings` the
search runs with. Library callers may pass a partial dict: :func:`parse_options` fills the rest from the schema's
defaults (``SearchConfig(**options)``), so a test can write ``{"method": "msp", "granularity": "layer"}``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from msp.allocation.base import AllocationError
from msp.allocation.registry import ALLOCATORS
from msp.masks import Pattern
from msp.search.evolution import EvolutionConfig
from msp.search.grid import nm_level_range

log = logging.getLogger(__name__)

STATE_FILE = "search_state.json"  # the search checkpoint, in the run dir

GRANULARITIES = ("block", "layer")
#: the cheap allocators ``allocation.init=best`` scores (the search's own fitness) before starting from the best one;
#: rank and hessian (Hutchinson passes) and atp (a β grid of fitness calls) are left out as not cheap
BEST_INITS = ("uniform", "owl", "alpha", "dlp", "fisher")
#: every allocator of the registry but the search itself (``file``: a previous run's allocation.json, given as
#: ``allocation.init_options.path``), and ``best``
INITS = tuple(sorted([name for name in ALLOCATORS if name != "msp"] + ["best"]))
EXTRAS = ("uniform", "owl")
METRICS = ("kl", "ppl")
MODES = ("auto", "ranking", "store")  # allocation.candidates
STORES = ("memory", "disk")
STORE_DTYPES = ("float16", "bfloat16", "float32")
#: allocation.final: what the run delivers at the winning allocation. ``prune``: the pruner run again on the whole
#: calibration set through the sequential pipeline (later blocks calibrated on pruned inputs); ``candidate``: the
#: very model the search scored, its layers taken from the variants (EvoPress's stitched model)
FINALS = ("prune", "candidate")
#: allocation.verify: rerank_guard (default: rerank, then the guard) | guard (the search's best against its start, as
#: delivered) | rerank (the last population and the start re-scored as the search scored them)
VERIFY_MODES = ("rerank_guard", "guard", "rerank")
#: allocation.store_inputs: what feeds each block during the variant pass. ``dense``: the dense model's outputs (every
#: block calibrated as if the blocks before it were dense); ``start``: the outputs of the blocks before it pruned at
#: the search's start allocation (the init allocator's, snapped; init=best: the target), so the variants of later
#: blocks are calibrated on inputs like those of the model the run delivers (final=prune is sequential);
#: ``target``: every block before it at the level nearest the target
STORE_INPUTS = ("dense", "start", "target")

#: field → valid values, checked by :func:`validate`
CHOICES: dict[str, tuple[str, ...]] = {
    "granularity": GRANULARITIES, "init": INITS, "fitness": METRICS, "candidates": MODES, "store": STORES,
    "store_dtype": STORE_DTYPES, "final": FINALS, "verify": VERIFY_MODES, "store_inputs": STORE_INPUTS,
}
#: integer field → its smallest valid value (the search's own budget fields are checked by EvolutionConfig)
MINIMUM = {"fitness_seqlen": 2, "fitness_batch_size": 1, "max_levels": 2, "init_swaps": 1, "variant_nsamples": 1}


@dataclass
class StageConfig:
    """One fidelity stage: the candidates left are scored on ``tokens`` held-out tokens, and the best
    ``survivors`` of them (every stage but the last) go on to the next stage."""

    tokens: int
    survivors: Optional[int] = None


def _default_stages() -> List[StageConfig]:
    return [StageConfig(tokens=256, survivors=2), StageConfig(tokens=512)]


@dataclass
class SearchConfig:
    """``allocation=msp``: every option with its default (the comments of conf/allocation/msp.yaml explain them)."""

    method: str = "msp"
    granularity: str = "block"  # block | layer: the unit that gets one sparsity
    init: str = "fisher"  # the allocation the population starts from (INITS; best: the best of BEST_INITS on the fitness; file: init_options.path)
    init_options: Dict[str, Any] = field(default_factory=dict)  # options of the init allocator, e.g. {beta: 0.05}
    extra: List[str] = field(default_factory=lambda: ["uniform"])  # more starting individuals (EXTRAS)
    min: Optional[float] = None  # lowest unit sparsity (None: sparsity - spread, at least 0)
    max: Optional[float] = None  # highest unit sparsity (None: sparsity + spread, at most 0.99)
    spread: float = 0.2
    step: float = 0.025  # sparsity change of one level step of the median unit
    population: int = 4  # μ
    offspring: int = 8  # λ
    generations: int = 40
    stages: List[StageConfig] = field(default_factory=_default_stages)
    crossover: float = 0.25
    max_swaps: int = 3
    init_swaps: int = 2
    fitness: str = "kl"  # kl | ppl
    fitness_seqlen: int = 256
    fitness_batch_size: int = 4
    fitness_blockwise: bool = True  # a stage's candidates scored together block by block, from cached prefixes (false: one forward each)
    fitness_memory_gb: float = 2.0  # bound of the blockwise fitness's hidden states (live and cached), GB
    candidates: str = "auto"  # auto | ranking | store
    store: str = "memory"  # memory | disk
    store_dtype: str = "float16"
    max_levels: int = 17  # the ranking pruners' step 0.025 over ±0.2 (6 levels, steps of 0.08, lost SparseGPT 75%)
    store_budget_gb: Optional[float] = None  # store mode: None = max_levels; else the largest max_levels <= 17 whose store fits
    variant_nsamples: Optional[int] = 8  # calibration windows of the variant pass (None: all)
    store_inputs: str = "dense"  # STORE_INPUTS: the variant pass's inputs, dense or through the blocks pruned at the start
    final: str = "prune"  # prune: re-prune at the winning allocation | candidate: deliver the model the search scored (FINALS)
    verify_tokens: Optional[int] = 4096  # held-out tokens of the final check of the search's pick (allocation.verify); None: off
    verify: str = "rerank_guard"  # VERIFY_MODES: the finalists re-ranked on verify_tokens, then the best against the start, pruned as delivered
    seed: Optional[int] = None  # None: the run's seed
    resume: bool = False
    resume_from: Optional[str] = None  # a run dir or a search_state.json
    dist_timeout_s: float = 300.0  # several ranks (torchrun, SLURM tasks): seconds a rank waits for the others

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "SearchConfig":
        """The config of a (partial) options mapping; the defaults fill the rest. An unknown key or stage key
        is one :class:`AllocationError` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise AllocationError(f"allocation=msp has no option {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        values = dict(options)
        if isinstance(values.get("stages"), (list, tuple)):
            values["stages"] = [_stage(i, st) for i, st in enumerate(values["stages"])]
        return cls(**values)


def _stage(index: int, stage: Any) -> Any:
    if not isinstance(stage, Mapping):
        return stage  # a StageConfig already, or a wrong type that validate() names
    if "tokens" not in stage or set(stage) - {"tokens", "survivors"}:
        raise AllocationError(
            f"allocation.stages[{index}]={dict(stage)!r} needs 'tokens' (and 'survivors' for all but the last stage), nothing else"
        )
    return StageConfig(**stage)


@dataclass
class Settings:
    """The validated options of one search (model-free): what :func:`msp.search.allocator.build_search` uses."""

    target: float
    granularity: str
    init: str
    init_options: dict
    extra: list[str]
    metric: str
    step: float
    bounds: tuple[float, float]
    tokens: list[int]  # per stage
    survivors: list[int]  # after each stage but the last
    fitness_seqlen: int
    fitness_batch_size: int
    fitness_blockwise: bool
    fitness_memory_gb: float
    max_levels: int
    store_budget_gb: float | None
    init_swaps: int
    candidates: str
    store: str
    store_dtype: str
    variant_nsamples: int | None
    config: EvolutionConfig
    resume: bool
    resume_from: str | None
    dist_timeout_s: float = 300.0
    final: str = "prune"  # FINALS
    verify_tokens: int | None = None  # the finalists' re-scoring on more held-out tokens (None: off)
    verify: str = "rerank_guard"  # VERIFY_MODES
    store_inputs: str = "dense"  # STORE_INPUTS

    def checkpoint_source(self, run_dir: Path | None) -> Path | None:
        """Where a resumed search reads its state: ``allocation.resume_from`` (a run dir or a file), else the run dir."""
        if self.resume_from:
            p = Path(self.resume_from).expanduser()
            return p / STATE_FILE if p.is_dir() or not p.suffix else p
        return run_dir / STATE_FILE if run_dir is not None else None


def parse_options(options: Mapping[str, Any] | SearchConfig, target: float, pattern: Pattern, seed: int = 0) -> Settings:
    """:func:`validate` of a (partial) options mapping, or of a :class:`SearchConfig`."""
    config = options if isinstance(options, SearchConfig) else SearchConfig.from_options(options)
    return validate(config, target, pattern, seed)


def validate(config: SearchConfig, target: float, pattern: Pattern, seed: int = 0) -> Settings:
    """Check every value of ``config`` against the target and the pattern (no model needed); each problem is one
    :class:`AllocationError` naming the override that fixes it. ``seed``: the run's, used when ``config.seed`` is None."""
    c = _typed(config)
    target = float(target)
    for key, valid in CHOICES.items():
        if getattr(c, key) not in valid:
            raise AllocationError(f"allocation.{key}={getattr(c, key)!r} is unknown; valid: {', '.join(valid)}")
    bad = [e for e in c.extra if e not in EXTRAS]
    if bad:
        raise AllocationError(f"allocation.extra has unknown individual(s) {bad}; valid: {', '.join(EXTRAS)}")
    for key, least in MINIMUM.items():
        value = getattr(c, key)
        if value is not None and value < least:
            raise AllocationError(f"allocation.{key}={value} must be >= {least}, e.g. allocation.{key}={_example(key)}")
    if c.store_budget_gb is not None and not c.store_budget_gb > 0:
        raise AllocationError(f"allocation.store_budget_gb={c.store_budget_gb:g} must be > 0 (GB of packed variants), e.g. allocation.store_budget_gb=8, or null")
    if not c.dist_timeout_s > 0:
        raise AllocationError(f"allocation.dist_timeout_s={c.dist_timeout_s:g} must be > 0 (seconds a rank waits for the others), e.g. allocation.dist_timeout_s=300")
    if not c.fitness_memory_gb > 0:
        raise AllocationError(f"allocation.fitness_memory_gb={c.fitness_memory_gb:g} must be > 0 (GB of hidden states), e.g. allocation.fitness_memory_gb=2")
    if not 0 < c.step < 1:
        raise AllocationError(f"allocation.step={c.step} must be in (0, 1), e.g. allocation.step=0.025")
    bounds = _bounds(c, target)
    _check_grid_moves(c, target, bounds, pattern)
    tokens, survivors = _stages(c.stages)
    verify_tokens = None if c.verify_tokens is None else _integer("verify_tokens", c.verify_tokens)
    if verify_tokens is not None and verify_tokens < tokens[-1]:  # e.g. the default 4096 under a longer last stage: nothing to add
        log.warning("allocation.verify_tokens=%d is fewer than the last stage's %d tokens, on which the finalists were already scored: "
                    "no verification (use allocation.verify_tokens>%d to verify on more tokens)", verify_tokens, tokens[-1], tokens[-1])
        verify_tokens = None
    evolution = EvolutionConfig(
        generations=c.generations, population=c.population, offspring=c.offspring, survivors=tuple(survivors),
        crossover=c.crossover, max_swaps=c.max_swaps, seed=c.seed if c.seed is not None else int(seed),
    )
    return Settings(
        target=target, granularity=c.granularity, init=c.init, init_options=dict(c.init_options), extra=list(c.extra),
        metric=c.fitness, step=c.step, bounds=bounds, tokens=tokens, survivors=survivors, fitness_seqlen=c.fitness_seqlen,
        fitness_batch_size=c.fitness_batch_size, fitness_blockwise=c.fitness_blockwise, fitness_memory_gb=c.fitness_memory_gb,
        max_levels=c.max_levels, store_budget_gb=c.store_budget_gb, init_swaps=c.init_swaps, candidates=c.candidates,
        store=c.store, store_dtype=c.store_dtype, variant_nsamples=c.variant_nsamples, config=evolution, resume=c.resume,
        resume_from=c.resume_from, dist_timeout_s=c.dist_timeout_s, final=c.final, verify_tokens=verify_tokens, verify=c.verify,
        store_inputs=c.store_inputs,
    )


def _example(key: str) -> str:
    """The default of ``key`` as a command-line value (``allocation.key=<this>``)."""
    value = getattr(SearchConfig(), key)
    if key == "stages":
        return "[{tokens:256,survivors:2},{tokens:512}]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "{}" if value == {} else str(value)


def _typed(config: SearchConfig) -> SearchConfig:
    """A copy with every field of its declared type (Hydra checks them at compose time; a library caller's dict
    is checked here): integral floats become ints, ints become floats, path-likes become strings."""
    hints = get_type_hints(SearchConfig)
    values = {f.name: _coerce(f.name, getattr(config, f.name), hints[f.name]) for f in fields(SearchConfig)}
    return SearchConfig(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (Optional[...] of int, float, bool, str, list, dict), or an AllocationError."""
    if get_origin(hint) is Union:  # Optional[X]: the only union the schema uses
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    kind = get_origin(hint) or hint
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number and not math.isnan(value):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, os.PathLike)):
        return str(value)
    if kind is list and isinstance(value, (list, tuple)):
        return list(value)
    if kind is dict and isinstance(value, Mapping):
        return dict(value)
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "a mapping"}[kind]
    raise AllocationError(f"allocation.{key}={value!r} is not {name}, e.g. allocation.{key}={_example(key)}")


def _bounds(c: SearchConfig, target: float) -> tuple[float, float]:
    """(min, max) unit sparsity: given, or target ± spread within [0, 0.99]; they must contain the target."""
    if c.spread < 0:
        raise AllocationError(f"allocation.spread={c.spread} must be >= 0, e.g. allocation.spread=0.2")
    lo = max(0.0, target - c.spread) if c.min is None else c.min
    hi = min(0.99, target + c.spread) if c.max is None else c.max
    if not (0.0 <= lo <= hi < 1.0):
        raise AllocationError(f"allocation bounds [min={lo}, max={hi}] are invalid; need 0 <= allocation.min <= allocation.max < 1")
    if hi < target or lo > target:
        raise AllocationError(
            f"allocation bounds [min={lo}, max={hi}] do not contain sparsity={target}: no allocation within them meets the budget; "
            f"set allocation.min <= {target} <= allocation.max"
        )
    return lo, hi


def _check_grid_moves(c: SearchConfig, target: float, bounds: tuple[float, float], pattern: Pattern) -> None:
    """The checks of the level grid that need no model: some unit can move one level."""
    if pattern.kind == "unstructured" and c.granularity == "block" and c.step > max(bounds[1] - target, target - bounds[0]) + 1e-12:
        # blocks of one model have equal sizes, so every block's level step is `step`
        raise AllocationError(
            f"allocation.step={c.step} is too coarse for sparsity={target} within [{bounds[0]:g}, {bounds[1]:g}]: no block can move one level; "
            f"use a smaller allocation.step, e.g. {c.step / 4:g}, or widen allocation.min/max"
        )
    if pattern.kind == "mixed_nm":
        nm_level_range(bounds, pattern.m)


def _stages(stages: list) -> tuple[list[int], list[int]]:
    """(tokens per stage, survivors after each stage but the last)."""
    if not stages:
        raise AllocationError("allocation.stages must be a list like [{tokens: 256, survivors: 2}, {tokens: 1024}]")
    tokens, survivors = [], []
    for i, st in enumerate(stages):
        if not isinstance(st, StageConfig):
            raise AllocationError(f"allocation.stages[{i}]={st!r} needs 'tokens' (and 'survivors' for all but the last stage)")
        t = _integer(f"stages[{i}].tokens", st.tokens)
        if t < 2:
            raise AllocationError(f"allocation.stages[{i}].tokens={t} must be >= 2")
        tokens.append(t)
        if i < len(stages) - 1:
            if st.survivors is None:
                raise AllocationError(f"allocation.stages[{i}] needs 'survivors': how many offspring go on to stage {i + 1}")
            survivors.append(_integer(f"stages[{i}].survivors", st.survivors))
    return tokens, survivors


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise AllocationError(f"allocation.{key}={value!r} is not an integer")
    return int(value)


__all__ = ["SearchConfig", "StageConfig", "Settings", "parse_options", "validate", "STATE_FILE", "GRANULARITIES", "INITS", "BEST_INITS",
           "EXTRAS", "METRICS", "MODES", "STORES", "STORE_DTYPES", "FINALS", "VERIFY_MODES"]
