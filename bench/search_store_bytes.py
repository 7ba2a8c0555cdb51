"""Bytes per prunable weight of the SparseGPT variant store (issue 12 §3): dense float16 copies per level (before)
against packed levels, kept values + a bitmask (after, :func:`msp.search.fitness.pack_weight`).

* tiny-llama, measured: the store that ``allocation=msp pruner=sparsegpt`` builds at the default settings
  (block units, ``max_levels=6``, 70% ± 0.2), from a real SparseGPT variant pass;
* LLaMA-2-7B on paper (224 Linear layers: per block q, k, v, o 4096×4096, gate, up 11008×4096, down 4096×11008;
  6.48 B prunable weights): the grid ``allocation=msp`` would build, for every ``max_levels`` 2…17, at block and
  layer granularity, and what ``allocation.store_budget_gb`` picks for a few budgets.

    python bench/search_store_bytes.py

Writes ``bench/results/search_store_bytes.md``. The dense copy of every layer the store also keeps (float32 on the
CPU, 4 bytes per weight) is the same before and after and is not counted.
"""
from __future__ import annotations

from pathlib import Path

import torch

from msp.masks import Pattern
from msp.models import build_tiny_model, find_blocks, layer_block_index, prunable_layers
from msp.pruners import SparseGPTPruner
from msp.allocation.base import AllocationError
from msp.search.allocator import MAX_STORE_LEVELS, store_grid
from msp.search.fitness import precompute_variants, store_estimate
from msp.search.grid import fit_store_levels
from msp.search.settings import parse_options

RESULTS = Path(__file__).resolve().parent / "results"
UNSTRUCTURED = Pattern.parse("unstructured")
LLAMA2_7B_BLOCK = [4096 * 4096] * 4 + [11008 * 4096] * 3  # q k v o, gate up down


def grid_bytes(units: list[list[int]], max_levels: int) -> tuple[int, float, int, int]:
    """(most levels per layer, step, dense float16 bytes, packed bytes) of the default store grid."""
    unit_params = [sum(u) for u in units]
    grid, step = fit_store_levels(unit_params, 0.7, UNSTRUCTURED, (0.5, 0.9), 0.025, max_levels, quiet=True)
    sizes = [n for u in units for n in u]
    levels = [grid.levels(i) for i, u in enumerate(units) for _ in u]
    dense = sum(2 * n * len(lv) for n, lv in zip(sizes, levels))
    return grid.most_levels(), step, dense, store_estimate(sizes, levels, 2)


def tiny_llama_measured() -> tuple[str, int]:
    lm = build_tiny_model("tiny-llama")
    layers = prunable_layers(lm.model)
    prefix, _ = find_blocks(lm.model)
    blocks: dict[int, list[str]] = {}
    for name in layers:
        blocks.setdefault(layer_block_index(name, prefix), []).append(name)
    units = list(blocks.values())
    grid, _ = fit_store_levels([sum(layers[n].weight.numel() for n in u) for u in units], 0.7, UNSTRUCTURED, (0.5, 0.9), 0.025, 6)
    levels = {n: grid.levels(i) for i, u in enumerate(units) for n in u}
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    store = precompute_variants(lm.model, layers, SparseGPTPruner(), UNSTRUCTURED, calib, torch.device("cpu"), levels=levels)
    weights = sum(layers[n].weight.numel() for n in layers)
    dense = sum(2 * layers[n].weight.numel() * len(lv) for n, lv in levels.items())
    packed = store.store_bytes()
    estimate = store_estimate([layers[n].weight.numel() for n in layers], list(levels.values()), 2)
    store.close()
    line = (f"tiny-llama ({len(layers)} layers, {weights:,} prunable weights, {len(units)} block units), default store grid "
            f"{', '.join(f'{s:.3f}' for s in grid.levels(0))}: dense float16 levels {dense / weights:.3f} bytes/weight, packed "
            f"**{packed / weights:.3f}** bytes/weight measured ({estimate / weights:.3f} by `store_estimate`), "
            f"{dense / packed:.2f}× smaller.")
    return line, packed


def llama2_7b_table() -> list[str]:
    per_block = LLAMA2_7B_BLOCK
    weights = 32 * sum(per_block)
    rows = ["| granularity | max_levels | levels per layer | step | dense float16 (GB) | bytes/weight | packed (GB) | bytes/weight |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for granularity, units in (("block", [per_block] * 32), ("layer", [[n] for n in per_block * 32])):
        for m in (6, 9, 13, 17):
            most, step, dense, packed = grid_bytes(units, m)
            rows.append(f"| {granularity} | {m} | {most} | {step:.4f} | {dense / 1e9:.1f} | {dense / weights:.2f} | "
                        f"{packed / 1e9:.1f} | {packed / weights:.2f} |")
    return rows


def budget_table() -> list[str]:
    """What ``allocation.store_budget_gb`` picks for LLaMA-2-7B (block units, the defaults otherwise)."""
    rows = ["| store_budget_gb | max_levels picked | levels per layer | step | packed (GB) |", "|---:|---:|---:|---:|---:|"]
    units = [LLAMA2_7B_BLOCK] * 32
    for budget in (16, 32, 64, 128):
        settings = parse_options({"store_budget_gb": budget}, 0.7, UNSTRUCTURED)
        try:
            grid, step, picked = store_grid(settings, ([sum(u) for u in units], 0.7, UNSTRUCTURED, settings.bounds, settings.step), units)
        except AllocationError:
            rows.append(f"| {budget} | too small | | | |")
            continue
        packed = store_estimate([n for u in units for n in u], [grid.levels(i) for i, u in enumerate(units) for _ in u], 2)
        rows.append(f"| {budget} | {picked.max_levels} | {grid.most_levels()} | {step:.4f} | {packed / 1e9:.1f} |")
    return rows


def main() -> None:
    tiny, _ = tiny_llama_measured()
    lines = ["# SparseGPT variant store: bytes per prunable weight (issue 12 §3)", "",
             "Before: a dense float16 copy per (layer, level): 2 bytes per weight per level. After: the kept values (float16) plus "
             "a bitmask (1/8 byte per weight), or int32 indices above 31/32 sparsity: (1−s)·2 + 1/8 bytes per weight per level. "
             "The dense weights the store also holds (float32, 4 bytes per weight) are the same before and after and not counted.", "",
             tiny, "",
             "## LLaMA-2-7B on paper", "",
             f"224 Linear layers (32 blocks × q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008), {32 * sum(LLAMA2_7B_BLOCK) / 1e9:.2f} B "
             "prunable weights; target 70%, bounds [0.5, 0.9], allocation.step=0.025 raised until max_levels fits. GB = 1e9 bytes.", "",
             *llama2_7b_table(), "",
             "The 6-level grid 0.5, 0.58, …, 0.9 (70% ± 0.2 in 6 levels) costs 12 bytes/weight as dense float16 copies and "
             f"{store_estimate([4096], [[0.5, 0.58, 0.66, 0.74, 0.82, 0.9]], 2) / 4096:.2f} packed.", "",
             f"`allocation.store_budget_gb` picks the largest max_levels ≤ {MAX_STORE_LEVELS} whose packed store fits "
             "(LLaMA-2-7B, block units):", "", *budget_table()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_store_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
