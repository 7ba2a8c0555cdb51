"""The allocator table: ``allocation.method`` → where its function, its options' schema and its early check live.

One explicit table, read by :func:`msp.allocation.build.build_allocation` and by the config schemas
(:func:`msp.config.register_configs`); entries are ``"module:attribute"`` strings imported when used, so importing
msp registers nothing and loads no allocator. A new allocator is one line here (and a ``conf/allocation`` file).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AllocatorEntry:
    function: str  # (AllocationContext, options: dict) -> msp.allocation.build.Allocated
    schema: str  # the dataclass of its allocation.* options (defaults and types)
    check: str | None = None  # (options: dict, target: float, pattern: Pattern) -> None: its own model-free option check


ALLOCATORS: dict[str, AllocatorEntry] = {
    "uniform": AllocatorEntry("msp.allocation.build:uniform_allocator", "msp.config:UniformAllocation"),
    "file": AllocatorEntry("msp.allocation.build:file_allocator", "msp.config:FileAllocation"),
    "owl": AllocatorEntry("msp.allocation.allocators:owl_allocator", "msp.config:OwlAllocation"),
    "rank": AllocatorEntry("msp.allocation.allocators:rank_allocator", "msp.config:RankAllocation"),
    "fisher": AllocatorEntry("msp.allocation.allocators:fisher_allocator", "msp.config:FisherAllocation"),
    "hessian": AllocatorEntry("msp.allocation.allocators:hessian_allocator", "msp.config:HessianAllocation"),
    "alpha": AllocatorEntry("msp.allocation.baselines:alpha_allocator", "msp.config:AlphaAllocation", "msp.allocation.baselines:check_alpha"),
    "dlp": AllocatorEntry("msp.allocation.baselines:dlp_allocator", "msp.config:DlpAllocation", "msp.allocation.baselines:check_dlp"),
    "atp": AllocatorEntry("msp.allocation.baselines:atp_allocator", "msp.config:AtpAllocation", "msp.allocation.baselines:check_atp"),
    # the evolutionary search (msp.search) is an allocator like the others: allocation=msp, options allocation.*
    "msp": AllocatorEntry("msp.search.allocator:msp_allocator", "msp.search.settings:SearchConfig", "msp.search.allocator:check_options"),
}


def load(path: str) -> Any:
    """The object a ``"module:attribute"`` entry names (the module imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = ["AllocatorEntry", "ALLOCATORS", "load"]
