"""Build a run's allocation: ``allocation.method`` → its allocator (looked up in :mod:`msp.allocation.registry`),
its options checked before any model is loaded, its result checked against the model and the budget."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from msp.allocation.base import Allocation, AllocationError, uniform_allocation
from msp.allocation.budget import check_bounds, check_grid, check_target, round_to_levels
from msp.allocation.registry import ALLOCATORS, AllocatorEntry, load
from msp.masks import Pattern

log = logging.getLogger(__name__)


@dataclass
class AllocationContext:
    """Everything an allocator may use. Built once per run by :mod:`msp.run`."""

    model: nn.Module
    layers: dict[str, nn.Linear]
    target: float
    pattern: Pattern
    device: torch.device
    pruner: Any = None
    calibration_ids: torch.Tensor | None = None
    heldout_tokens: torch.Tensor | None = None
    seqlen: int = 512
    seed: int = 0
    cache: Any = None
    cache_fields: dict = field(default_factory=dict)  # model/data fields that key cached statistics
    run_dir: Path | None = None
    batch_size: int = 4
    tracker: Any = None
    plan: Any = None  # msp.streaming.StreamingPlan of the run (None: resident); streamed stages read it
    bos_token_id: int | None = None  # model.bos_per_window: the search's fitness windows start with it too
    true_sequential: bool = False  # the run's prune stage order (the search's pruned verification prunes the same way)


    @property
    def params(self) -> dict[str, int]:
        return {n: l.weight.numel() for n, l in self.layers.items()}

    @property
    def rows(self) -> dict[str, int]:
        return {n: l.weight.shape[0] for n, l in self.layers.items()}


@dataclass
class Allocated:
    """What an allocator hands back: the allocation, and what it measured on the way (for ``results.json``).

    ``sensitivity``: the :class:`msp.sensitivity.SensitivityReport` the allocation was derived from (the search:
    that of its start); ``search``: the search's report (``SearchReport.to_json()``), ``None`` for other methods;
    ``weights``: layer name → the pruned weight (on the CPU) the run delivers as it is instead of pruning again
    (the search's ``allocation.final=candidate``), ``None``: the pruner prunes at ``allocation``.
    """

    allocation: Allocation
    sensitivity: Any = None
    search: dict | None = None
    weights: dict | None = None


Allocator = Callable[[AllocationContext, dict], Allocated]


class UnknownAllocatorError(AllocationError):
    """``allocation.method`` names no allocator of :data:`msp.allocation.registry.ALLOCATORS`."""


def allocator_entry(method: str) -> AllocatorEntry:
    """The registry entry of ``method``, or an :class:`UnknownAllocatorError` listing the valid names."""
    entry = ALLOCATORS.get(str(method))
    if entry is None:
        raise UnknownAllocatorError(f"unknown allocation method {method!r}; valid: {', '.join(sorted(ALLOCATORS))} (e.g. allocation=fisher)")
    return entry


def typed_options(options: Mapping[str, Any]) -> DictConfig:
    """``options`` merged into the method's schema: the defaults filled in, an unknown key or a wrong type an
    :class:`AllocationError` naming ``allocation.<key>`` (library callers get the check the command line gets)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    entry = allocator_entry(options.get("method", "uniform"))
    try:
        schema = OmegaConf.structured(load(entry.schema))
        given = options if isinstance(options, DictConfig) else OmegaConf.create(dict(options))
        return OmegaConf.merge(schema, given)
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0]
        raise AllocationError(f"allocation.{exc.full_key}: {first}; see conf/allocation/{options.get('method', 'uniform')}.yaml for the valid keys") from None


def bounds_from(options: Mapping[str, Any], target: float) -> tuple[float, float]:
    """``(allocation.min, allocation.max)``, defaults 0 and max(0.99, target), checked against the target."""
    lo = options.get("min")
    hi = options.get("max")
    lo = 0.0 if lo is None else lo
    hi = max(0.99, float(target)) if hi is None else hi
    return check_bounds(lo, hi, float(target))


def uniform_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """Every layer at the target (a fixed N:M pattern: at 1 − N/M; mixed N:M: the two nearest levels mixed)."""
    fixed = ctx.pattern.fixed_sparsity()
    if ctx.pattern.kind == "mixed_nm":
        # N:M with per-layer N: the target is generally between two levels k/M, so mix the two nearest
        # levels across layers to get as close to the budget as the grid allows (not one level everywhere)
        bounds = bounds_from(options, ctx.target)
        levels_, achieved = round_to_levels({n: ctx.target for n in ctx.layers}, ctx.params, ctx.target, ctx.pattern.m, bounds)
        return Allocated(Allocation(levels_, float(ctx.target), "uniform", {"achieved_mean": achieved}))
    return Allocated(uniform_allocation(ctx.params, fixed if fixed is not None else ctx.target))


def file_allocator(ctx: AllocationContext, options: dict) -> Allocated:
    """Re-apply another run's ``allocation.json``: its per-layer sparsities and its target."""
    alloc = load_allocation_file(options)
    alloc.validate(ctx.params, tolerance=1.0)  # names must match; the budget is checked against the file's own target below
    alloc.method = f"file:{alloc.method}"
    fixed = ctx.pattern.fixed_sparsity()
    if fixed is not None:
        log.warning("allocation=file with pattern=%s: a fixed N:M pattern prunes every layer to %.3f; the file's per-layer values are ignored", ctx.pattern, fixed)
        return Allocated(Allocation({n: fixed for n in ctx.layers}, fixed, alloc.method, {"note": f"pattern {ctx.pattern} fixes every layer", "file": str(options.get("path"))}))
    if ctx.pattern.kind == "mixed_nm" and not _on_grid(alloc.sparsities, ctx.pattern.m):
        log.warning("allocation=file: %s holds values off the N:%d grid; rounding them to levels k/%d", options.get("path"), ctx.pattern.m, ctx.pattern.m)
        rounded, achieved = round_to_levels(alloc.sparsities, ctx.params, alloc.target, ctx.pattern.m)
        alloc = Allocation(rounded, alloc.target, alloc.method, {**alloc.meta, "achieved_mean": achieved})
    alloc.meta = {**alloc.meta, "file": str(options.get("path"))}
    return Allocated(alloc)


def load_allocation_file(options: Mapping[str, Any]) -> Allocation:
    path = options.get("path")
    if not path or str(path) == "???":
        raise AllocationError("allocation=file needs allocation.path=<run dir>/allocation.json (the file a previous run wrote)")
    return Allocation.load(Path(str(path)))


def check_file_fits(options: Mapping[str, Any], layers: Mapping[str, Any] | None) -> None:
    """allocation=file: the file names exactly the model's prunable layers (``layers``: the weightless skeleton's,
    so another model's file fails before any loading; None: not known yet, the allocator checks after loading)."""
    if layers is None:
        return
    load_allocation_file(options).validate({name: lin.weight.numel() for name, lin in layers.items()}, bounds=(0.0, 1.0), tolerance=1.0)


def check_file_target(options: Mapping[str, Any], sparsity: float) -> None:
    """allocation=file with a ``sparsity=`` the user typed: it must be the file's target (the file sets the run's target;
    a different number would be silently ignored)."""
    target = load_allocation_file(options).target
    if abs(target - float(sparsity)) > 1e-9:
        raise AllocationError(
            f"allocation.path={options.get('path')} holds an allocation for sparsity={target:g}, but sparsity={float(sparsity):g} was given; "
            f"drop sparsity= (the file sets the target) or build an allocation for sparsity={float(sparsity):g} first"
        )


def _on_grid(sparsities: dict[str, float], m: int) -> bool:
    return all(abs(s * m - round(s * m)) < 1e-6 for s in sparsities.values())


#: value rules the typed options of the built-in allocators share: option → (rule, example)
_RULES = {"lambda": ("non-negative", 0.08), "alpha": ("non-negative", 0.1), "beta": ("non-negative", 0.05), "M": ("positive", 5),
          "probes": ("positive int", 2), "nsamples": ("positive int", 8)}
_CHOICES = {"granularity": ("layer", "block"), "signal": ("hessian", "fisher")}


def _check_values(typed: DictConfig) -> None:
    for key, valid in _CHOICES.items():
        if typed.get(key) is not None and str(typed[key]) not in valid:
            raise AllocationError(f"allocation.{key}={typed[key]!r} is unknown; valid: {', '.join(valid)}")
    for key, (rule, example) in _RULES.items():
        value = typed.get(key)
        if value is not None and not (value >= 0 if rule == "non-negative" else value > 0):  # NaN fails both
            raise AllocationError(f"allocation.{key}={value} must be {rule}, e.g. allocation.{key}={example}")


def check_allocation_options(options: Mapping[str, Any], target: float, pattern: Pattern) -> None:
    """Cheap checks of ``allocation.*`` before any model is loaded: known method, keys and types of its schema,
    target in [0, 1), feasible bounds, a mixed N:M grid that can reach the target, a readable allocation file,
    and the allocator's own early check (the search's)."""
    method = str(options.get("method", "uniform"))
    typed = typed_options(options)
    if method == "file":
        alloc = load_allocation_file(options)
        check_target(alloc.target, f"target in {options.get('path')}")
        return
    _check_values(typed)
    if pattern.kind == "nm":
        return  # every layer is fixed at N/M; the allocator has nothing to decide
    target = check_target(target)
    bounds = bounds_from(options, target)
    if pattern.kind == "mixed_nm":
        check_grid(target, pattern.m, bounds)
    entry = allocator_entry(method)
    if entry.check is not None:
        load(entry.check)(dict(options), target, pattern)


def check_allocation_on_model(model: torch.nn.Module, options: Mapping[str, Any], target: float, pattern: Pattern) -> None:
    """The checks that need the model's shape but no pass over data (right after loading, before the dense
    evaluation): ATP's β grid against the bounds over this model's number of blocks."""
    if str(options.get("method", "uniform")) == "atp" and pattern.kind != "nm":
        from msp.allocation.baselines import atp_betas
        from msp.models import find_blocks

        atp_betas(dict(options), check_target(target), len(find_blocks(model)[1]))


def build_allocation(ctx: AllocationContext, options: dict) -> Allocated:
    """Run the allocator ``options['method']`` and validate its allocation against the model and the budget."""
    method = options.get("method", "uniform")
    check_allocation_options(options, ctx.target, ctx.pattern)
    outcome = load(allocator_entry(method).function)(ctx, options)
    _check_result(ctx, outcome.allocation, options, method)
    return outcome


def _check_result(ctx: AllocationContext, alloc: Allocation, options: dict, method: str) -> None:
    """Every layer present, within bounds, on the N:M grid when mixed, weighted mean on the (file's) target."""
    fixed = ctx.pattern.fixed_sparsity() is not None
    bounds = (0.0, 1.0) if method == "file" or fixed else bounds_from(options, alloc.target)
    tolerance = None
    reported = alloc.meta.get("achieved_mean")
    if method == "file" and isinstance(reported, (int, float)) and not set(ctx.params) - set(alloc.sparsities):
        if abs(reported - alloc.weighted_mean(ctx.params)) < 1e-6:  # a mixed N:M run's file: its grid mean is its budget
            tolerance = max(abs(reported - alloc.target), sum(ctx.rows.values()) / sum(ctx.params.values()))
    if ctx.pattern.kind == "mixed_nm":
        m = ctx.pattern.m
        off = [n for n, s in alloc.sparsities.items() if abs(s * m - round(s * m)) > 1e-6]
        if off:
            raise AllocationError(
                f"allocation={method} gave {len(off)} layer(s) sparsities off the pattern=N:{m} levels k/{m} "
                f"(e.g. {off[0]}={alloc.sparsities[off[0]]:.4f}); round them with msp.allocation.budget.round_to_levels"
            )
        achieved = alloc.weighted_mean(ctx.params) if not set(ctx.params) - set(alloc.sparsities) else alloc.target
        # the grid cannot hit every target: accept the achieved mean (reported in meta), at most one level off
        tolerance = max(abs(achieved - alloc.target), sum(ctx.rows.values()) / sum(ctx.params.values()))
        if tolerance > 1.0 / m + 1e-9:
            raise AllocationError(
                f"allocation={method} on pattern=N:{m} reaches mean sparsity {achieved:.4f}, more than one level off the target {alloc.target:.4f}"
            )
        alloc.meta.setdefault("achieved_mean", achieved)
    alloc.validate(ctx.params, bounds=bounds, tolerance=tolerance, rows=ctx.rows)
    log.info("allocation %s: %d layers, sparsity range [%.4f, %.4f], weighted mean %.6f (target %.6f)", alloc.method, len(alloc.sparsities),
             min(alloc.sparsities.values()), max(alloc.sparsities.values()), alloc.weighted_mean(ctx.params), alloc.target)
