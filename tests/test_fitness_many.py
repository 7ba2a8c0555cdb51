"""``ModelFitness.many`` (a stage's candidates scored together, block by block, from cached prefixes) gives the
per-genome forward's values, runs fewer blocks, and counts what it moves (issue 12 §1, §2, §6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msp.masks import Pattern
from msp.models import build_tiny_model, find_blocks, layer_block_index, prunable_layers
from msp.pruners import SparseGPTPruner, WandaPruner
from msp.search.evolution import Evolution, EvolutionConfig, SearchSpace, mutate
from msp.search.fitness import CandidateModel, ModelFitness, precompute_variants, resolve_mode
from msp.streaming import plan_streaming

CPU = torch.device("cpu")
LEVELS = [0.3, 0.5, 0.7, 0.9]


def _setup(pruner, granularity: str, streamed: bool, metric: str = "kl", *, blockwise: bool = True, memory_gb: float = 2.0):
    model = build_tiny_model("tiny-llama", seed=3).model.eval()
    layers = prunable_layers(model)
    prefix, _ = find_blocks(model)
    if granularity == "layer":
        units = [[n] for n in layers]
    else:
        blocks: dict[int, list[str]] = {}
        for n in layers:
            blocks.setdefault(layer_block_index(n, prefix), []).append(n)
        units = list(blocks.values())
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    mode = resolve_mode("auto", pruner)
    levels = {n: LEVELS for n in layers} if mode == "store" else None
    variants = precompute_variants(model, layers, pruner, Pattern.parse("unstructured"), calib, CPU, mode=mode, levels=levels,
                                   max_levels=len(LEVELS))
    plan = plan_streaming(model, CPU, "true", nsamples=2) if streamed else None  # streamed: passes of 2 windows
    candidate = CandidateModel(layers, variants, units, lambda u, l: LEVELS[l])
    fitness = ModelFitness(model, candidate, windows, [1, 3], CPU, metric, batch_size=2, plan=plan, blockwise=blockwise,
                           memory_gb=memory_gb)
    return fitness, candidate, len(units)


def _genomes(units: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """A parent and children that each change a few units of it (as the search's mutations do), plus a random one."""
    rng = np.random.default_rng(seed)
    parent = rng.integers(0, len(LEVELS), units)
    out = [parent]
    for _ in range(count - 2):
        g = parent.copy()
        for u in rng.choice(units, size=int(rng.integers(1, 3)), replace=False):
            g[u] = (g[u] + int(rng.integers(1, len(LEVELS)))) % len(LEVELS)
        out.append(g)
    out.append(rng.integers(0, len(LEVELS), units))
    return out


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("pruner", [WandaPruner(), SparseGPTPruner()], ids=["wanda-ranking", "sparsegpt-store"])
def test_many_equals_the_per_genome_forward(pruner, granularity, streamed):
    fitness, candidate, units = _setup(pruner, granularity, streamed)
    genomes = _genomes(units, 5)
    try:
        for stage in (0, 1, 0, 1):  # stage 1 reuses stage 0's window; the repeats come from the caches
            together = fitness.many(genomes, stage)
            alone = [fitness(g, stage) for g in genomes]
            assert together == pytest.approx(alone, rel=1e-5, abs=0)
            assert len(set(alone)) > 1  # the candidates really differ
        fitness.many(genomes[::-1], 1)  # leaves each unit at some level, set block by block (level steps for rankings)
        for u, level in enumerate(candidate.current):
            for name in candidate.unit_layers[u]:
                want = candidate.variants.weight(name, LEVELS[int(level)])
                assert torch.equal(candidate.layers[name].weight.data, want)
    finally:
        candidate.restore()


@pytest.mark.parametrize("metric", ["kl", "ppl"])
def test_many_for_the_perplexity_and_under_a_tiny_memory_budget(metric):
    """Groups of one candidate and a sparse boundary cache (stride > 1) change nothing but the cost."""
    fitness, candidate, units = _setup(WandaPruner(), "layer", False, metric, memory_gb=2e-5)
    genomes = _genomes(units, 4, seed=1)
    try:
        for stage in (1, 0, 1):
            together = fitness.many(genomes, stage)
            assert together == pytest.approx([fitness(g, stage) for g in genomes], rel=1e-5, abs=0)
        assert fitness.stride > 1 and fitness.cost.passes > 3
    finally:
        candidate.restore()


def test_children_start_at_their_first_changed_block_and_the_cost_is_counted():
    fitness, candidate, units = _setup(WandaPruner(), "block", True)
    blocks = fitness.n_blocks
    try:
        parent = np.zeros(units, np.int64)
        fitness.many([parent], 1)
        assert fitness.cost.block_windows == 3 * blocks  # nothing cached yet: every block for every window
        child = parent.copy()
        child[-1] = 2  # only the last block changes
        fitness.many([child], 1)
        assert fitness.cost.block_windows == 3 * blocks + 3  # the last block only, for each of the 3 windows
        cost = fitness.cost.to_json()
        assert cost["evaluations"] == 2 and cost["tokens"] == 2 * 3 * 24
        assert cost["block_windows_full"] == 2 * 3 * blocks
        # streamed: every block of the first pass and the last block of the second went to the device once
        assert cost["bytes_to_device"]["weights"] == sum(fitness._block_bytes) + fitness._block_bytes[-1]
        assert cost["bytes_to_device"]["variants"] > 0 and cost["bytes_to_device"]["reference"] > 0
        fitness(child, 1)  # the per-genome forward: all blocks again
        assert fitness.cost.block_windows == 3 * blocks + 3 + 3 * blocks
    finally:
        candidate.restore()


def test_the_search_with_many_gives_the_per_genome_history():
    """The evolution through ``many`` (its seam, Evolution.score_all) makes the same choices as one forward each."""
    results = {}
    for blockwise in (True, False):
        fitness, candidate, units = _setup(WandaPruner(), "layer", False, blockwise=blockwise)
        space = SearchSpace(lower=(0,) * units, upper=(3,) * units, weight=(1,) * units, budget=units * 3 // 2)
        start = [np.array([(1 + i % 2) for i in range(units)], np.int64)]
        start[0][0] += units * 3 // 2 - int(start[0].sum())
        assert space.feasible(start[0])
        evo = Evolution(space, EvolutionConfig(generations=3, population=3, offspring=4, survivors=(2,), seed=5))
        start += [mutate(start[0], space, np.random.default_rng(k), 2) for k in range(2)]
        try:
            result = evo.run(fitness, start)
        finally:
            candidate.restore()
        results[blockwise] = (result.best.tolist(), result.history, fitness.cost)
    (best_a, hist_a, cost_a), (best_b, hist_b, cost_b) = results[True], results[False]
    assert best_a == best_b
    assert [h["best"] for h in hist_a] == pytest.approx([h["best"] for h in hist_b], rel=1e-5, abs=0)
    assert cost_a.evaluations == cost_b.evaluations and cost_a.tokens == cost_b.tokens
    assert cost_a.block_windows < cost_b.block_windows == cost_b.block_windows_full


def test_results_json_reports_the_search_cost(tmp_path):
    """results.json["search"]["fitness_cost"]: tokens scored, decoder blocks run, bytes moved to the device."""
    import json

    from conftest import run_tiny_msp

    run = run_tiny_msp(tmp_path / "run", "allocation=msp", "sparsity=0.6", "allocation.generations=2", "streaming=true", "eval=none")
    search = json.loads((run / "results.json").read_text())["search"]
    cost = search["fitness_cost"]
    assert cost["blockwise"] is True and cost["evaluations"] == search["evaluations"] > 0
    low, high = min(search["stage_tokens"]), max(search["stage_tokens"])
    assert cost["evaluations"] * low < cost["tokens"] <= cost["evaluations"] * high
    assert 0 < cost["block_windows"] < cost["block_windows_full"]  # children reuse their parents' prefixes
    assert cost["bytes_to_device"]["weights"] > 0  # streamed: the blocks visited the device
    assert cost["bytes_to_device_total"] == sum(cost["bytes_to_device"].values())


def test_search_speed_benchmark_reports_consistent_figures(tmp_path):
    """bench/search_speed.py end to end on tiny-llama: both paths find the same genome; the per-genome path runs
    every block, the blockwise one fewer and moves fewer bytes (timings are not asserted)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "search_speed.py"
    spec = importlib.util.spec_from_file_location("search_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", "tiny-llama", "--generations", "2", "--out", str(tmp_path), "--threads", "0"])
    r = json.loads((tmp_path / "search_speed_tiny-llama_cpu.json").read_text())
    assert sorted(r["runs"]) == ["resident/after", "resident/before", "streamed/after", "streamed/before"]
    for placement in ("resident", "streamed"):
        before, after = r["runs"][f"{placement}/before"], r["runs"][f"{placement}/after"]
        assert before["best_genome"] == after["best_genome"] and before["evaluations"] == after["evaluations"]
        assert before["blocks_fraction"] == 1.0 > after["blocks_fraction"] > 0
        assert after["bytes_to_device_per_candidate"] < before["bytes_to_device_per_candidate"]
    assert r["runs"]["streamed/after"]["bytes_to_device_per_candidate_by_kind"]["weights"] > 0
    assert r["variant_bytes_per_weight"]["dense"] == 4.0  # float32 tiny-llama
    assert "| resident | before" in (tmp_path / "search_speed_tiny-llama_cpu.md").read_text()
