"""Allocator registry: ``allocation.method`` → a function (context, options) → :class:`Allocation`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from msp.allocation.base import Allocation, AllocationError, uniform_allocation
from msp.masks import Pattern


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
    extras: dict = field(default_factory=dict)  # what allocators report back (sensitivities, search history)

    @property
    def params(self) -> dict[str, int]:
        return {n: l.weight.numel() for n, l in self.layers.items()}

    @property
    def rows(self) -> dict[str, int]:
        return {n: l.weight.shape[0] for n, l in self.layers.items()}


Allocator = Callable[[AllocationContext, dict], Allocation]
ALLOCATORS: dict[str, Allocator] = {}


def register(name: str) -> Callable[[Allocator], Allocator]:
    def deco(fn: Allocator) -> Allocator:
        ALLOCATORS[name] = fn
        return fn

    return deco


@register("uniform")
def _uniform(ctx: AllocationContext, options: dict) -> Allocation:
    fixed = ctx.pattern.fixed_sparsity()
    return uniform_allocation(ctx.params, fixed if fixed is not None else ctx.target)


@register("file")
def _from_file(ctx: AllocationContext, options: dict) -> Allocation:
    path = options.get("path")
    if not path:
        raise AllocationError("allocation=file needs allocation.path=<run dir>/allocation.json")
    alloc = Allocation.load(Path(str(path)))
    alloc.validate(ctx.params, tolerance=1.0)  # names must match; the target is whatever that run used
    alloc.method = f"file:{alloc.method}"
    return alloc


def build_allocation(ctx: AllocationContext, options: dict) -> Allocation:
    method = options.get("method", "uniform")
    _load_plugins()
    if method not in ALLOCATORS:
        raise AllocationError(f"unknown allocation method {method!r}; valid: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[method](ctx, options)


def _load_plugins() -> None:
    """Import the modules that register the other allocators (kept lazy so `import msp` stays lean)."""
    import importlib

    for module in ("msp.allocation.allocators", "msp.search.allocator"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
