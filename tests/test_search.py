"""The evolutionary search (allocation=msp): operators keep the budget, the search finds known optima,
resume is exact, thresholded rankings equal the pruners' masks, and on tiny-llama the search lowers the fitness."""
from __future__ import annotations

import logging

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msp.allocation.base import AllocationError
from msp.allocation.build import AllocationContext, build_allocation
from msp.masks import Pattern, mask_from_scores
from msp.models import build_tiny_model, prunable_layers
from msp.pipeline import sequential_pass
from msp.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from msp.search.allocator import STATE_FILE, build_search, check_store_fits_memory, search_units, store_grid
from msp.search.settings import parse_options
from msp.search.evolution import (
    Evolution,
    EvolutionConfig,
    SearchError,
    SearchSpace,
    SearchState,
    crossover,
    history_path,
    mutate,
    repair,
    snap,
)
from msp.search.grid import build_grid, fit_store_levels
from msp.search.fitness import (
    CandidateModel,
    ModelFitness,
    RankingVariants,
    StoredVariants,
    mask_from_ranking,
    pack_weight,
    packed_nbytes,
    precompute_variants,
    store_estimate,
    ranking_of,
)

# ------------------------------------------------------------------------------------------ pure search


def _feasible_genome(space: SearchSpace, rng: np.random.Generator) -> np.ndarray:
    lower, upper, _ = space.arrays()
    return repair(rng.integers(lower, upper + 1), space, rng)


@st.composite
def spaces(draw, mixed: bool):
    """Equal weights (unstructured grids) or the weights of mixed N:8 over LLaMA blocks (q,k,v,o,gate,up,down)."""
    if mixed:
        blocks = draw(st.integers(1, 4))
        weight = [3, 1, 1, 3, 8, 8, 8] * blocks
        lower, upper = [draw(st.integers(1, 4))] * len(weight), [7] * len(weight)
    else:
        n = draw(st.integers(2, 12))
        lower = [draw(st.integers(-6, 0)) for _ in range(n)]
        upper = [lo + draw(st.integers(0, 8)) for lo in lower]
        weight = [1] * n
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    point = rng.integers(np.asarray(lower), np.asarray(upper) + 1)
    budget = int(np.dot(point, weight))  # the cost of some in-bounds genome: always reachable
    return SearchSpace(tuple(lower), tuple(upper), tuple(weight), budget), seed


@settings(max_examples=150, deadline=None)
@given(spaces(mixed=False), st.integers(1, 6))
def test_mutation_keeps_the_budget_exactly(space_seed, swaps):
    space, seed = space_seed
    rng = np.random.default_rng(seed)
    genome = _feasible_genome(space, rng)
    for _ in range(10):
        genome = mutate(genome, space, rng, swaps)
        assert space.feasible(genome)


@settings(max_examples=150, deadline=None)
@given(st.one_of(spaces(mixed=False), spaces(mixed=True)))
def test_crossover_then_repair_keeps_the_budget_exactly(space_seed):
    space, seed = space_seed
    rng = np.random.default_rng(seed)
    a, b = _feasible_genome(space, rng), _feasible_genome(space, rng)
    for _ in range(10):
        child = repair(crossover(a, b, rng), space, rng)
        assert space.feasible(child)
        child = mutate(child, space, rng, 2)
        assert space.feasible(child)
        a, b = b, child


def test_snap_is_the_nearest_feasible_genome():
    space = SearchSpace((-3,) * 4, (3,) * 4, (1,) * 4, 0)
    # rounding gives (1, 1, -1, 0): one too many; the unit rounded up the most (0.6 → 1) goes back down
    assert snap(np.array([0.6, 0.9, -1.2, -0.3]), space).tolist() == [0, 1, -1, 0]
    assert snap(np.array([5.0, 0.0, 0.0, -5.0]), space).tolist() == [3, 0, 0, -3]  # clipped, still on budget


def _separable(seed: int = 0, n: int = 12):
    """f(g) = Σ_u c_u (g_u − t_u)² with Σ t_u = 0: its unique optimum on the budget is t (f = 0)."""
    rng = np.random.default_rng(seed)
    half = rng.integers(-5, 6, n // 2)
    t = rng.permutation(np.concatenate([half, -half]))
    c = rng.uniform(0.5, 2.0, n)
    space = SearchSpace((-6,) * n, (6,) * n, (1,) * n, 0)
    return space, t, c


def test_search_finds_the_optimum_of_a_separable_fitness():
    space, t, c = _separable()

    def fitness(g, stage):
        exact = float(np.sum(c * (g - t) ** 2))
        return exact if stage == 1 else exact + 0.5 * math.sin(7.0 * g[0] + g[1])  # a noisy cheap stage

    start = np.zeros(len(t), np.int64)
    result = Evolution(space, EvolutionConfig(generations=150, survivors=(3,), seed=0)).run(fitness, [start])
    assert result.initial_fitness == pytest.approx(float(np.sum(c * t**2)))
    assert result.best.tolist() == t.tolist()
    assert result.best_fitness == 0.0
    bests = [h["best"] for h in result.history]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))  # elitist: the best never gets worse


class _Killed(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_result(tmp_path):
    space, t, c = _separable(seed=3)
    cfg = EvolutionConfig(generations=25, population=3, offspring=5, survivors=(2,), crossover=0.5, seed=7)
    fitness = lambda g, s: float(np.sum(c * np.abs(g - t) ** 1.5)) + 0.1 * s  # noqa: E731
    start = [np.zeros(len(t), np.int64)]
    full = Evolution(space, cfg, checkpoint=tmp_path / "full.json").run(fitness, start)

    calls = {"n": 0}

    def dying(g, s):
        calls["n"] += 1
        if calls["n"] > 40:
            raise _Killed
        return fitness(g, s)

    path = tmp_path / "killed.json"
    with pytest.raises(_Killed):
        Evolution(space, cfg, checkpoint=path).run(dying, start)
    stopped_at = SearchState.load(path).generation
    assert 0 < stopped_at < cfg.generations
    resumed = Evolution(space, cfg, checkpoint=path).run(fitness, lambda: pytest.fail("resume must not rebuild the population"), resume=True)
    assert resumed.resumed_from == stopped_at
    assert resumed.best.tolist() == full.best.tolist()
    assert [g.tolist() for g in resumed.population] == [g.tolist() for g in full.population]
    assert [(h["best"], h["mean"]) for h in resumed.history] == [(h["best"], h["mean"]) for h in full.history]


def test_resume_after_a_kill_between_the_history_append_and_the_state_write(tmp_path):
    """The history line of generation k+1 (and a line cut short after it) reached the disk, the state of k+1 did
    not: the resume drops those lines and continues to the uninterrupted result, history and all."""
    space, t, c = _separable(seed=3)
    cfg = EvolutionConfig(generations=12, population=3, offspring=5, survivors=(2,), crossover=0.5, seed=7)
    fitness = lambda g, s: float(np.sum(c * np.abs(g - t) ** 1.5)) + 0.1 * s  # noqa: E731
    start = [np.zeros(len(t), np.int64)]
    full = Evolution(space, cfg, checkpoint=tmp_path / "full.json").run(fitness, start)
    assert [json.loads(line) for line in history_path(tmp_path / "full.json").read_text().splitlines()] == full.history
    assert "history" not in json.loads((tmp_path / "full.json").read_text())  # the state stays O(population)

    ahead = tmp_path / "ahead" / "search_state.json"  # one generation further than the state we keep
    Evolution(space, replace(cfg, generations=6), checkpoint=ahead).run(fitness, start)
    path = tmp_path / "torn" / "search_state.json"
    Evolution(space, replace(cfg, generations=5), checkpoint=path).run(fitness, start)
    torn = history_path(ahead).read_text() + '{"generation": 7, "be'
    history_path(path).write_text(torn)
    assert SearchState.load(path).generation == 5 and len(history_path(path).read_text().splitlines()) == 6  # truncated

    history_path(path).write_text(torn)
    resumed = Evolution(space, cfg, checkpoint=path).run(fitness, lambda: pytest.fail("no rebuild"), resume=True)
    assert resumed.resumed_from == 5
    assert [g.tolist() for g in resumed.population] == [g.tolist() for g in full.population]
    assert [(h["generation"], h["best"], h["mean"]) for h in resumed.history] == [(h["generation"], h["best"], h["mean"]) for h in full.history]
    on_disk = [json.loads(line) for line in history_path(path).read_text().splitlines()]
    assert [h["generation"] for h in on_disk] == list(range(cfg.generations + 1))

    history_path(path).write_text("".join(torn.splitlines(keepends=True)[:3]))  # lines lost: refused, not guessed
    with pytest.raises(SearchError, match=r"search_history.jsonl holds 3 generation\(s\), the state is at generation 12"):
        SearchState.load(path)


def test_a_version_1_checkpoint_with_the_history_inside_still_resumes(tmp_path):
    space, t, c = _separable(seed=3)
    cfg = EvolutionConfig(generations=8, population=3, offspring=5, seed=7)
    fitness = lambda g, s: float(np.sum(c * np.abs(g - t) ** 1.5))  # noqa: E731
    start = [np.zeros(len(t), np.int64)]
    full = Evolution(space, cfg, checkpoint=tmp_path / "full.json").run(fitness, start)
    path = tmp_path / "old" / "search_state.json"
    Evolution(space, replace(cfg, generations=3), checkpoint=path).run(fitness, start)
    old = {**json.loads(path.read_text()), "version": 1, "history": SearchState.load(path).history}
    path.write_text(json.dumps(old))
    history_path(path).unlink()
    resumed = Evolution(space, cfg, checkpoint=path).run(fitness, start, resume=True)
    assert resumed.resumed_from == 3 and resumed.best.tolist() == full.best.tolist()
    assert [(h["best"], h["mean"]) for h in resumed.history] == [(h["best"], h["mean"]) for h in full.history]
    assert len(history_path(path).read_text().splitlines()) == cfg.generations + 1


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    space, t, c = _separable()
    fitness = lambda g, s: float(np.sum(c * (g - t) ** 2))  # noqa: E731
    path = tmp_path / "state.json"
    Evolution(space, EvolutionConfig(generations=2, offspring=4), checkpoint=path).run(fitness, [np.zeros(len(t), np.int64)])
    other = Evolution(space, EvolutionConfig(generations=2, offspring=6), checkpoint=path)
    with pytest.raises(SearchError, match=r"differs in: config\.offspring.*allocation\.resume=true"):
        other.run(fitness, [np.zeros(len(t), np.int64)], resume=True)


def test_bad_search_settings_are_clear():
    with pytest.raises(SearchError, match="allocation.offspring=0"):
        EvolutionConfig(offspring=0)
    with pytest.raises(SearchError, match=r"stages\[0\]\.survivors=9"):
        EvolutionConfig(offspring=8, survivors=(9,))
    with pytest.raises(SearchError, match="outside what the levels can reach"):
        SearchSpace((0, 0), (1, 1), (1, 1), 3)


# ------------------------------------------------------------------------------------------ grid


def test_unstructured_grid_steps_remove_equal_weight_counts_and_keep_the_budget():
    lm = build_tiny_model("tiny-llama")
    params = {n: l.weight.numel() for n, l in prunable_layers(lm.model).items()}
    unit_params = list(params.values())  # layer granularity: 64·64, 32·64, ..., 128·64 weights
    grid = build_grid(unit_params, 0.7, Pattern.parse("unstructured"), (0.5, 0.9), 0.05)
    removed = [grid.delta[u] * unit_params[u] for u in range(len(unit_params))]
    assert all(r == pytest.approx(grid.step_weights) for r in removed)
    rng = np.random.default_rng(0)
    g = _feasible_genome(grid.space, rng)
    for _ in range(20):
        g = mutate(g, grid.space, rng, 3)
        s = grid.sparsities(g)
        assert all(0.5 - 1e-12 <= x <= 0.9 + 1e-12 for x in s)
        assert np.dot(s, unit_params) / sum(unit_params) == pytest.approx(0.7, abs=1e-12)


def test_mixed_nm_grid_levels_are_k_over_m_and_meet_the_target():
    unit_params = [4096, 2048, 2048, 4096, 8192, 8192, 8192] * 2
    grid = build_grid(unit_params, 0.75, Pattern.parse("N:8"), (0.5, 0.9), 0.025)
    assert grid.achieved == 0.75
    g = snap(grid.real_levels([0.75] * len(unit_params)), grid.space)
    assert grid.sparsities(g) == [0.75] * len(unit_params)
    assert set(grid.levels(0)) == {0.5, 0.625, 0.75, 0.875}


def test_grid_too_coarse_names_the_fix():
    with pytest.raises(AllocationError, match="allocation.step=0.9 is too coarse"):
        build_grid([1000, 1000], 0.5, Pattern.parse("unstructured"), (0.4, 0.6), 0.9)


# ------------------------------------------------------------------------------------------ candidates


@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner()], ids=["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["unstructured", "N:8", "2:4"])
def test_thresholded_ranking_equals_prune_weight(pruner, pattern):
    gen = torch.Generator().manual_seed(0)
    # weights on a coarse grid (many exact ties, as in weights dequantised from 4-bit)
    weight = torch.round(torch.randn(24, 64, generator=gen) * 4) / 4
    from msp.pruners.stats import LayerStats

    stats = LayerStats(64, need_hessian=False)
    stats.add_batch(torch.randn(50, 64, generator=gen))
    p = Pattern.parse(pattern)
    rank = ranking_of(pruner.scores(weight, stats), p)
    variants = RankingVariants({"w": weight}, {"w": rank}, p)
    levels = [0.5] if p.kind == "nm" else ([k / 8 for k in range(8)] if p.kind == "mixed_nm" else [0.0, 0.1, 0.37, 0.5, 0.7, 0.93])
    for s in levels:
        expected = pruner.prune_weight(weight, stats, s, p)
        assert torch.equal(variants.weight("w", s), expected), s
        assert torch.equal(mask_from_ranking(rank, s, p), mask_from_scores(pruner.scores(weight, stats), s, p))


def test_sparsegpt_store_holds_prune_weight_per_level(tmp_path):
    lm = build_tiny_model("tiny-llama")
    layers = prunable_layers(lm.model)
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    pruner = SparseGPTPruner()
    levels = {n: [0.3, 0.6] for n in layers}
    store = precompute_variants(lm.model, layers, pruner, Pattern.parse("unstructured"), calib, torch.device("cpu"),
                                levels=levels, store="disk", store_dir=tmp_path, store_dtype="float32")
    assert isinstance(store, StoredVariants) and len(store.files) == 2 * len(layers)
    # the same statistics through the ordinary pipeline hook, without pruning
    expected = {}

    def on_block(i, prefix, block, linears, stats):
        for local, lin in linears.items():
            expected[f"{prefix}.{i}.{local}"] = pruner.prune_weight(lin.weight.data, stats[local], 0.6, Pattern.parse("unstructured"))
        return False

    sequential_pass(lm.model, calib, torch.device("cpu"), on_block, need_hessian=True, batch_size=4)
    for name in layers:
        assert torch.equal(store.weight(name, 0.6), expected[name]), name
        assert torch.equal(store.dense[name], layers[name].weight.data)
    store.close()
    assert not any(tmp_path.iterdir())
    with pytest.raises(SearchError, match="allocation.max_levels=1"):
        precompute_variants(lm.model, layers, pruner, Pattern.parse("unstructured"), calib, torch.device("cpu"),
                            levels=levels, max_levels=1)


def test_store_inputs_calibrate_each_block_on_the_blocks_before_it_pruned(tmp_path):
    """inputs_at (allocation.store_inputs=start|target): every block's variants are those of the ordinary pipeline
    whose earlier blocks were pruned at those sparsities (here 0.6), not of the dense model's inputs; the first block
    sees the same inputs either way; the dense weights are back in the model afterwards."""
    lm = build_tiny_model("tiny-llama")
    layers = prunable_layers(lm.model)
    dense = {n: l.weight.detach().clone() for n, l in layers.items()}
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    pruner, p = SparseGPTPruner(), Pattern.parse("unstructured")
    levels = {n: [0.3, 0.6] for n in layers}
    kw = dict(levels=levels, store_dtype="float32")
    plain = precompute_variants(lm.model, layers, pruner, p, calib, torch.device("cpu"), **kw)
    chained = precompute_variants(lm.model, layers, pruner, p, calib, torch.device("cpu"), inputs_at={n: 0.6 for n in layers}, **kw)
    for n, lin in layers.items():
        assert torch.equal(lin.weight, dense[n]), n
    expected = {}

    def on_block(i, prefix, block, linears, stats):
        for local, lin in linears.items():
            name = f"{prefix}.{i}.{local}"
            expected[name] = {s: pruner.prune_weight(lin.weight.data, stats[local], s, p) for s in (0.3, 0.6)}
        for local, lin in linears.items():
            lin.weight.data.copy_(expected[f"{prefix}.{i}.{local}"][0.6])
        return True

    sequential_pass(lm.model, calib, torch.device("cpu"), on_block, need_hessian=True, batch_size=4)
    first = [n for n in layers if ".0." in n]
    later = [n for n in layers if n not in first]
    assert first and later
    for name in layers:
        for s in (0.3, 0.6):
            assert torch.equal(chained.weight(name, s), expected[name][s]), (name, s)
    assert all(torch.equal(chained.weight(n, 0.6), plain.weight(n, 0.6)) for n in first)
    assert not all(torch.equal(chained.weight(n, 0.6), plain.weight(n, 0.6)) for n in later)
    plain.close(), chained.close()


@pytest.mark.parametrize("inputs", ["start", "target"])
def test_a_search_with_store_inputs_runs_on_budget_and_records_them_in_its_fingerprint(tmp_path, inputs):
    ctx = _ctx(tmp_path, pruner=SparseGPTPruner())
    outcome = build_allocation(ctx, {**SMALL, "generations": 1, "store_inputs": inputs, "verify_tokens": None})
    assert outcome.allocation.weighted_mean(ctx.params) == pytest.approx(0.7, abs=1e-12)
    assert outcome.search["best_fitness"] <= outcome.search["initial_fitness"]
    search = build_search(ctx, parse_options({**SMALL, "store_inputs": inputs}, 0.7, ctx.pattern, 0))
    assert search.evolution.fingerprint != build_search(ctx, parse_options(SMALL, 0.7, ctx.pattern, 0)).evolution.fingerprint
    with pytest.raises(AllocationError, match="allocation.store_inputs='pruned' is unknown; valid: dense, start, target"):
        parse_options({**SMALL, "store_inputs": "pruned"}, 0.7, ctx.pattern, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_packed_levels_rebuild_the_weight_bit_for_bit_and_cost_kept_values_plus_a_bitmask(tmp_path, dtype):
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight[weight.abs() < 0.8] = 0.0  # ~58% pruned
    weight[0, :3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)  # −0.0 is kept (its bits are not +0.0's)
    sparse = torch.zeros(8, 64, dtype=dtype)
    sparse[2, 5], sparse[7, 63] = -1.5, 2.0  # 2 of 512 kept: indices are smaller than the bitmask
    memory, disk = StoredVariants({"w": weight.float()}), StoredVariants({"w": weight.float()}, tmp_path)
    for store in (memory, disk):
        store.put("w", 0.5, weight)
        store.put("w", 0.99, sparse)
        for s, w in ((0.5, weight), (0.99, sparse)):
            rebuilt = store.weight("w", s)
            assert rebuilt.dtype == torch.float32
            assert torch.equal(rebuilt.to(dtype).view(torch.uint8), w.view(torch.uint8)), (store.folder, s)  # bit for bit
    kept = int((weight.view(torch.uint8).reshape(512, -1) != 0).any(1).sum())
    size = torch.finfo(dtype).bits // 8
    assert memory.store_bytes() == disk.store_bytes() == kept * size + 512 // 8 + 2 * size + 2 * 4
    assert memory.store_bytes() == packed_nbytes(512, kept, size) + packed_nbytes(512, 2, size)
    assert "index" in pack_weight(sparse) and "mask" in pack_weight(weight)


def test_default_store_grid_costs_a_third_of_dense_float16_copies():
    """6 levels 0.5, 0.58, …, 0.9 (70% ± 0.2) of one 4096-weight layer: Σ (1−s)·2 + 6/8 bytes per weight, not 6·2."""
    levels = [0.5, 0.58, 0.66, 0.74, 0.82, 0.9]
    per_weight = store_estimate([4096], [levels], 2) / 4096
    assert per_weight == pytest.approx(2 * (6 - sum(levels)) + 6 / 8, abs=1e-3)  # 4.35 bytes (dense copies: 12)


def test_default_store_keeps_the_ranking_step_and_refuses_a_store_larger_than_free_memory():
    unit_params = [4096] * 8
    args = (unit_params, 0.7, Pattern.parse("unstructured"), (0.5, 0.9), 0.025)
    default = parse_options({"method": "msp", "granularity": "layer"}, 0.7, Pattern.parse("unstructured"))
    grid, step, _ = store_grid(default, args, [[n] for n in unit_params])
    assert default.max_levels == 17 and grid.most_levels() == 17 and step == pytest.approx(0.025)
    need = store_estimate(unit_params, [grid.levels(u) for u in range(8)], 2)
    check_store_fits_memory(need, available=2 * need)
    with pytest.raises(AllocationError, match="allocation.store_budget_gb=<GB> .*allocation.store=disk"):
        check_store_fits_memory(need, available=need)


def test_store_budget_picks_the_most_levels_that_fit():
    unit_params = [4096] * 8
    args = (unit_params, 0.7, Pattern.parse("unstructured"), (0.5, 0.9), 0.025)
    base = parse_options({"method": "msp", "granularity": "layer", "max_levels": 6}, 0.7, Pattern.parse("unstructured"))
    layers = [[n] for n in unit_params]
    grid, _, same = store_grid(base, args, layers)
    assert same.max_levels == 6 and grid.most_levels() <= 6  # no budget: allocation.max_levels as before
    for levels in (17, 9):
        need = store_estimate(unit_params, [fit_store_levels(*args, levels)[0].levels(u) for u in range(8)], 2)
        grid, _, picked = store_grid(replace(base, store_budget_gb=need / 1e9), args, layers)
        assert picked.max_levels == levels and grid.most_levels() <= levels
        grid, _, picked = store_grid(replace(base, store_budget_gb=need / 1e9 * 0.999), args, layers)
        assert picked.max_levels < levels
    with pytest.raises(AllocationError, match="allocation.store_budget_gb=1e-06 is too small"):
        store_grid(replace(base, store_budget_gb=1e-6), args, layers)
    with pytest.raises(AllocationError, match="allocation.store_budget_gb=0 must be > 0"):
        parse_options({"store_budget_gb": 0}, 0.7, Pattern.parse("unstructured"))


def test_store_uses_a_pruners_all_levels_call_when_it_has_one():
    from msp.pruners.base import Pruner

    class Scaling(Pruner):  # not score-based → store mode; "prunes" by scaling, so each level is recognisable
        name, needs_calibration = "scaling", False
        calls: list = []

        def prune_weight(self, weight, stats, sparsity, pattern):
            raise AssertionError("prune_weight_levels should have been used")

        def prune_weight_levels(self, weight, stats, sparsities, pattern):
            self.calls.append(list(sparsities))
            return [weight * (1 - s) for s in sparsities]

    lm = build_tiny_model("tiny-llama")
    layers = prunable_layers(lm.model)
    store = precompute_variants(lm.model, layers, Scaling(), Pattern.parse("unstructured"), None, torch.device("cpu"),
                                levels={n: [0.25, 0.5] for n in layers}, store_dtype="float32")
    assert Scaling.calls == [[0.25, 0.5]] * len(layers)
    name = next(iter(layers))
    assert torch.equal(store.weight(name, 0.5), layers[name].weight.data * 0.5)


def test_candidate_swaps_only_changed_units_and_ppl_fitness_is_the_models_perplexity():
    from msp.eval.perplexity import perplexity

    lm = build_tiny_model("tiny-llama")
    layers = prunable_layers(lm.model)
    dense = {n: l.weight.detach().clone() for n, l in layers.items()}
    variants = precompute_variants(lm.model, layers, MagnitudePruner(), Pattern.parse("unstructured"), None, torch.device("cpu"))
    names = list(layers)
    candidate = CandidateModel(layers, variants, [[n] for n in names], lambda u, l: 0.1 * l)
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    fitness = ModelFitness(lm.model, candidate, windows, [1, 3], torch.device("cpu"), metric="ppl")
    genome = np.array([i % 8 for i in range(len(names))])
    value = fitness(genome, 1)
    assert value == pytest.approx(perplexity(lm.model, windows, torch.device("cpu"), batch_size=4), rel=1e-6)
    assert candidate.swaps == len(names)
    genome2 = genome.copy()
    genome2[[0, 5]] = [3, 2]
    fitness(genome2, 0)
    assert candidate.swaps == len(names) + 2  # only the two changed layers were rewritten
    for u, n in enumerate(names):
        assert torch.equal(layers[n].weight.data, MagnitudePruner().prune_weight(dense[n], None, 0.1 * genome2[u], Pattern.parse("unstructured")))
    candidate.restore()
    assert all(torch.equal(layers[n].weight.data, dense[n]) for n in names)


def test_kl_fitness_is_the_mean_token_kl_to_the_dense_model():
    """The cached-reference KL (Σ p log p − Σ p log q) equals KL computed from both log-softmaxes."""
    import torch.nn.functional as F

    lm = build_tiny_model("tiny-llama", seed=4)
    model = lm.model.eval()
    layers = prunable_layers(model)
    variants = precompute_variants(model, layers, MagnitudePruner(), Pattern.parse("unstructured"), None, torch.device("cpu"))
    names = list(layers)
    candidate = CandidateModel(layers, variants, [[n] for n in names], lambda u, l: 0.2 * l)
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense_logp = F.log_softmax(model(input_ids=windows).logits.float(), dim=-1)
    fitness = ModelFitness(model, candidate, windows, [2, 5], torch.device("cpu"), metric="kl", batch_size=2)
    genome = np.array([1 + i % 4 for i in range(len(names))])
    for stage, n in ((0, 2), (1, 5)):
        value = fitness(genome, stage)
        with torch.no_grad():
            logq = F.log_softmax(model(input_ids=windows[:n]).logits.float(), dim=-1)
        expected = float((dense_logp[:n].exp() * (dense_logp[:n] - logq)).sum(-1).mean())
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-7) and value > 0
    candidate.restore()


# ------------------------------------------------------------------------------------------ allocator on tiny-llama


def _ctx(tmp_path, pruner=None, target=0.7, pattern="unstructured", seed=0) -> AllocationContext:
    from msp import data as data_mod

    lm = build_tiny_model("tiny-llama", seed=0)
    gen = torch.Generator().manual_seed(seed)
    return AllocationContext(
        model=lm.model, layers=prunable_layers(lm.model), target=target, pattern=Pattern.parse(pattern),
        device=torch.device("cpu"), pruner=pruner or WandaPruner(),
        calibration_ids=torch.randint(0, 256, (4, 32), generator=gen), heldout_tokens=torch.randint(0, 256, (600,), generator=gen),
        seqlen=32, seed=seed, run_dir=tmp_path, batch_size=4,
    )


SMALL = {"method": "msp", "granularity": "layer", "init": "uniform", "extra": [], "population": 3, "offspring": 5,
         "stages": [{"tokens": 64, "survivors": 2}, {"tokens": 192}], "fitness_seqlen": 64, "step": 0.05}


def test_search_lowers_the_fitness_on_tiny_llama_and_restores_the_dense_weights(tmp_path):
    ctx = _ctx(tmp_path)
    dense = {n: l.weight.detach().clone() for n, l in ctx.layers.items()}
    outcome = build_allocation(ctx, {**SMALL, "generations": 6})
    alloc, report = outcome.allocation, outcome.search
    assert report["best_fitness"] < report["initial_fitness"]
    assert report["history"][-1]["best"] == report["best_fitness"]
    assert len(report["history"]) == 7 and report["generations"] == 6
    assert alloc.method == "msp" and set(alloc.sparsities) == set(ctx.layers)
    assert alloc.weighted_mean(ctx.params) == pytest.approx(0.7, abs=1e-12)
    assert len(set(alloc.sparsities.values())) > 1
    assert all(torch.equal(ctx.layers[n].weight, dense[n]) for n in dense)
    assert (tmp_path / STATE_FILE).exists()
    assert list(report) == [  # results.json["search"]: these keys, in this order
        "generations", "evaluations", "fitness", "history", "initial_fitness", "best_fitness", "start_fitness", "init",
        "init_chosen", "init_scores", "granularity", "units", "initial_units", "grid", "candidates", "stage_tokens", "resumed_from", "layer_swaps",
        "wall_seconds", "cpu_seconds", "variant_windows", "checkpoint", "fitness_cost", "ranks", "final", "verify",
    ]
    assert report["start_fitness"] == {"uniform": report["initial_fitness"]}


@pytest.mark.parametrize("pruner", [SparseGPTPruner(), WandaPruner()], ids=["sparsegpt-store", "wanda-ranking"])
def test_final_candidate_delivers_the_model_the_search_scored(tmp_path, pruner):
    """allocation.final=candidate hands back the winning genome's variant weights: put in place, the model's KL to
    the dense model on the last stage's held-out windows is the search's best fitness; the same search with
    final=prune gives the same allocation and no weights (the pipeline prunes again)."""
    import torch.nn.functional as F

    from msp.prune import apply_weights_
    from msp.search.allocator import fitness_windows

    options = {**SMALL, "generations": 3, "fitness_batch_size": 1, "verify_tokens": None}  # the search's own best, unverified
    ctx = _ctx(tmp_path / "candidate", pruner=pruner)
    dense = {n: l.weight.detach().clone() for n, l in ctx.layers.items()}
    outcome = build_allocation(ctx, {**options, "final": "candidate"})
    assert outcome.search["final"] == "candidate" and outcome.allocation.meta["final"] == "candidate"
    assert set(outcome.weights) == set(ctx.layers)
    assert all(torch.equal(ctx.layers[n].weight, dense[n]) for n in dense)  # dense until the prune stage
    windows, per_stage = fitness_windows(ctx, parse_options(options, 0.7, ctx.pattern))
    last = windows[: per_stage[-1]]
    with torch.no_grad():
        dense_logp = F.log_softmax(ctx.model(input_ids=last).logits.float(), dim=-1)
        reports = apply_weights_(ctx.model, outcome.weights, outcome.allocation)
        logq = F.log_softmax(ctx.model(input_ids=last).logits.float(), dim=-1)
    kl = float((dense_logp.exp() * (dense_logp - logq)).sum(-1).mean())
    assert kl == pytest.approx(outcome.search["best_fitness"], rel=1e-4)
    for r in reports:  # every layer at its allocated sparsity (Wanda's per-row counts round within a row)
        assert r.measured == pytest.approx(outcome.allocation[r.name], abs=1.0 / ctx.layers[r.name].in_features)
    again = build_allocation(_ctx(tmp_path / "prune", pruner=pruner), options)
    assert again.weights is None and again.search["final"] == "prune"
    assert again.allocation.sparsities == outcome.allocation.sparsities


def test_verify_rescoring_on_the_search_tokens_repeats_the_search_fitness(tmp_path):
    """allocation.verify_tokens equal to the last stage's tokens re-reads the same windows: every finalist's
    verification score is its search fitness, so the best is delivered, as without verification."""
    options = {**SMALL, "generations": 3}
    plain = build_allocation(_ctx(tmp_path / "plain", pruner=SparseGPTPruner()), {**options, "verify_tokens": None})
    outcome = build_allocation(_ctx(tmp_path / "same", pruner=SparseGPTPruner()), {**options, "verify_tokens": 192, "verify": "rerank"})
    verify = outcome.search["verify"]
    assert verify["tokens"] == 192 and verify["finalists"][0]["name"] == "start"
    for f in verify["finalists"]:
        assert f["verify_fitness"] == pytest.approx(f["search_fitness"], rel=1e-6)
    assert min(f["verify_fitness"] for f in verify["finalists"]) == pytest.approx(outcome.search["best_fitness"], rel=1e-6)
    assert outcome.allocation.sparsities == plain.allocation.sparsities
    assert plain.search["verify"] is None


def test_verify_delivers_the_finalist_best_on_more_tokens(tmp_path):
    """On more held-out tokens the finalists rank anew: the delivered allocation is the one of lowest verification
    fitness (the start among them), and the report's units are the delivered allocation's."""
    ctx = _ctx(tmp_path, pruner=SparseGPTPruner())
    outcome = build_allocation(ctx, {**SMALL, "generations": 3, "verify_tokens": 512, "verify": "rerank"})
    verify = outcome.search["verify"]
    assert verify["mode"] == "rerank" and all(f["pruned_fitness"] is None for f in verify["finalists"])
    names = [f["name"] for f in verify["finalists"]]
    assert names[0] == "start" and len(names) == len(set(names)) >= 2
    best = min(verify["finalists"], key=lambda f: f["verify_fitness"])
    assert verify["chosen"] == best["name"]
    assert " ".join(f"{outcome.allocation[n]:.3f}" for n in ctx.layers) == best["genome"]
    assert [outcome.search["units"][n] for n in ctx.layers] == [outcome.allocation[n] for n in ctx.layers]
    assert outcome.allocation.weighted_mean(ctx.params) == pytest.approx(0.7, abs=1e-12)


@pytest.mark.parametrize("mode", ["guard", "rerank_guard"])
@pytest.mark.parametrize("pruner", [WandaPruner(), SparseGPTPruner()], ids=["wanda", "sparsegpt"])
def test_the_guard_scores_the_pick_and_the_start_as_the_run_delivers_them(tmp_path, pruner, mode):
    """allocation.verify=guard (final=prune): the search's best (rerank_guard, the default: the re-ranked best) and
    its start are pruned by the run's pruner on all calibration windows and scored; the better is delivered, and the
    delivered allocation pruned by prune_ as the prune stage does has exactly that fitness; the dense weights are
    back afterwards."""
    import torch.nn.functional as F

    from msp import data as data_mod
    from msp.prune import prune_

    ctx = _ctx(tmp_path, pruner=pruner)
    dense = {n: l.weight.detach().clone() for n, l in ctx.layers.items()}
    outcome = build_allocation(ctx, {**SMALL, "generations": 2, "verify_tokens": 512, "verify": mode})
    verify = outcome.search["verify"]
    assert verify["mode"] == mode and verify["finalists"][0]["name"] == "start"
    for n, lin in ctx.layers.items():
        assert torch.equal(lin.weight, dense[n])
    windows = data_mod.sequential_windows(ctx.heldout_tokens, 64, 8, bos=ctx.bos_token_id)
    with torch.no_grad():
        p = F.log_softmax(ctx.model(windows).logits.float(), -1)
        prune_(ctx.model, pruner, outcome.allocation, ctx.calibration_ids, ctx.device, ctx.pattern, ctx.batch_size)
        q = F.log_softmax(ctx.model(windows).logits.float(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    chosen = next(f for f in verify["finalists"] if f["name"] == verify["chosen"])
    assert chosen["pruned_fitness"] == pytest.approx(kl, rel=1e-4)
    guarded = [f for f in verify["finalists"] if f["pruned_fitness"] is not None]
    assert chosen["pruned_fitness"] == min(f["pruned_fitness"] for f in guarded)
    if mode == "guard":  # the start and the search's own best, nothing re-ranked
        assert [f["name"] for f in verify["finalists"]] == ["start", "population[0]"] == [f["name"] for f in guarded]
        assert all(f["verify_fitness"] is None for f in verify["finalists"])
    else:  # the start and the finalist of lowest fitness on the verification tokens
        best = min(verify["finalists"], key=lambda f: f["verify_fitness"])
        assert {f["name"] for f in guarded} == {"start", best["name"]}


def test_the_guard_keeps_the_start_when_the_search_model_misleads(tmp_path, monkeypatch):
    """When the search's best, pruned as delivered, scores worse than the start pruned the same way, the start is
    delivered (made to happen by pruning every non-start finalist much harder than its allocation says)."""
    from msp.search import allocator

    real = allocator.prune_
    calls = []

    def prune_harder(model, pruner, allocation, *args, **kwargs):
        calls.append(allocation)
        if len(calls) == 2:  # the second contender, the search's best
            allocation = type(allocation)({n: 0.95 for n in allocation.sparsities}, 0.95, "msp", {})
        return real(model, pruner, allocation, *args, **kwargs)

    monkeypatch.setattr(allocator, "prune_", prune_harder)
    ctx = _ctx(tmp_path, pruner=WandaPruner())
    outcome = build_allocation(ctx, {**SMALL, "generations": 2, "verify_tokens": 512})
    verify = outcome.search["verify"]
    assert len(calls) == 2 and verify["chosen"] == "start"
    start = next(f for f in verify["finalists"] if f["name"] == "start")["genome"]
    assert " ".join(f"{outcome.allocation[n]:.3f}" for n in ctx.layers) == start


def test_verify_on_a_short_held_out_text_uses_what_it_has(tmp_path, caplog):
    """The default verify_tokens=4096 on a held-out text of fewer tokens verifies on all of it and says so (one line
    naming data.heldout_fraction), instead of failing after the search."""
    ctx = _ctx(tmp_path, pruner=SparseGPTPruner())
    have = ctx.heldout_tokens.numel() // 64
    with caplog.at_level(logging.WARNING, logger="msp.search.allocator"):
        outcome = build_allocation(ctx, {**SMALL, "generations": 2, "verify_tokens": 64 * (have + 10)})
    assert outcome.search["verify"]["tokens"] <= 64 * have
    assert outcome.search["verify"]["tokens"] >= 192  # at least the last stage's tokens
    assert any("data.heldout_fraction" in r.getMessage() for r in caplog.records)


def test_verify_is_on_by_default_with_4096_tokens_reranked_then_guarded():
    default = parse_options({}, 0.7, Pattern.parse("unstructured"))
    assert default.verify_tokens == 4096 and default.verify == "rerank_guard"
    assert parse_options({"verify_tokens": None}, 0.7, Pattern.parse("unstructured")).verify_tokens is None


def test_verify_tokens_below_the_last_stage_switch_verification_off(caplog):
    """Fewer tokens than the last stage's would re-score the finalists on part of what they were scored on: no
    verification, said in one line (the default 4096 under a longer last stage lands here)."""
    with caplog.at_level(logging.WARNING, logger="msp.search.settings"):
        assert parse_options({"verify_tokens": 256}, 0.7, Pattern.parse("unstructured")).verify_tokens is None
        assert parse_options({"stages": [{"tokens": 5000}]}, 0.7, Pattern.parse("unstructured")).verify_tokens is None
    assert any("verify_tokens=256 is fewer than the last stage's 512 tokens" in r.getMessage() for r in caplog.records)


def test_final_must_be_prune_or_candidate():
    with pytest.raises(AllocationError, match=r"allocation.final='store' is unknown; valid: prune, candidate"):
        parse_options({"final": "store"}, 0.7, Pattern.parse("unstructured"))


def test_allocator_resume_continues_to_the_same_allocation(tmp_path, monkeypatch):
    fresh = build_allocation(_ctx(tmp_path / "fresh"), {**SMALL, "generations": 4}).allocation
    # a run stopped after 2 generations has exactly this checkpoint (generations does not change the dynamics)
    build_allocation(_ctx(tmp_path / "killed"), {**SMALL, "generations": 2})
    ctx = _ctx(tmp_path / "killed")
    outcome = build_allocation(ctx, {**SMALL, "generations": 4, "resume": True})
    resumed = outcome.allocation
    assert outcome.search["resumed_from"] == 2
    assert resumed.sparsities == fresh.sparsities
    # from another run dir, and a checkpoint of another configuration fails before any heavy work
    other = _ctx(tmp_path / "elsewhere", target=0.6)
    monkeypatch.setattr("msp.search.allocator.precompute_variants", lambda *a, **k: pytest.fail("the variant pass ran"))
    with pytest.raises(AllocationError, match=r"differs in: .*target"):
        build_allocation(other, {**SMALL, "generations": 4, "resume": True, "resume_from": str(tmp_path / "killed")})


def test_mixed_nm_search_and_fixed_nm_fallback(tmp_path):
    ctx = _ctx(tmp_path, target=0.75, pattern="N:8")
    alloc = build_allocation(ctx, {**SMALL, "generations": 2}).allocation
    assert all(abs(s * 8 - round(s * 8)) < 1e-9 for s in alloc.sparsities.values())
    assert alloc.weighted_mean(ctx.params) == pytest.approx(0.75, abs=1e-12)
    ctx = _ctx(tmp_path, pattern="2:4")
    outcome = build_allocation(ctx, {**SMALL})
    assert set(outcome.allocation.sparsities.values()) == {0.5} and "skipped" in outcome.search


@pytest.mark.parametrize(
    "override, message",
    [
        ({"step": 0.9}, "allocation.step=0.9 is too coarse"),
        ({"min": 0.75}, "allocation.min=0.75"),
        ({"stages": [{"tokens": 5000}]}, "raise data.heldout_fraction"),
        ({"candidates": "ranking", "_pruner": SparseGPTPruner()}, "allocation.candidates=ranking needs a score-based pruner"),
        ({"fitness": "bleu"}, "allocation.fitness='bleu' is unknown; valid: kl, ppl"),
        ({"granularity": "head"}, "allocation.granularity='head' is unknown"),
    ],
)
def test_bad_search_input_fails_before_heavy_work(tmp_path, override, message):
    override = dict(override)
    ctx = _ctx(tmp_path, pruner=override.pop("_pruner", None))
    with pytest.raises(AllocationError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_allocation(ctx, {**SMALL, **override})
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize(
    "override, pattern, message",
    [
        ({"step": 0.5}, "unstructured", "allocation.step=0.5 is too coarse for sparsity=0.7 within [0.5, 0.9]"),
        ({"spread": 0.05}, "N:8", "pattern=N:8 is too coarse for a search within allocation bounds [0.65, 0.75]"),
        ({"stages": [{"tokens": 256}, {"tokens": 512}]}, "unstructured", "allocation.stages[0] needs 'survivors'"),
        ({"extra": ["random"]}, "unstructured", "allocation.extra has unknown individual(s) ['random']; valid: uniform, owl"),
        ({"resume": True, "resume_from": "/nonexistent/run"}, "unstructured", "allocation.resume_from=/nonexistent/run: no search_state.json"),
    ],
)
def test_search_options_are_checked_before_the_model_is_loaded(override, pattern, message):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from msp.allocation.build import check_allocation_options
    from msp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # the shipped allocation=msp, composed on its schema
        shipped = OmegaConf.to_container(compose(config_name="config", overrides=["allocation=msp", "cache_dir=/tmp/x"]).allocation, resolve=True)
    options = {**shipped, **override}
    check_allocation_options({k: v for k, v in options.items() if k not in override}, 0.7, Pattern.parse(pattern))  # the shipped defaults pass
    with pytest.raises(AllocationError) as err:
        check_allocation_options(options, 0.7, Pattern.parse(pattern))
    assert message in str(err.value)


def test_block_units_group_each_blocks_layers(tmp_path):
    ctx = _ctx(tmp_path)
    names, units = search_units(ctx, "block")
    assert names == ["model.layers.0", "model.layers.1"]
    assert [len(u) for u in units] == [7, 7] and sorted(sum(units, [])) == sorted(ctx.layers)


# ------------------------------------------------------------------------------------------ any start, init=best


@pytest.mark.parametrize("init, seed", [("uniform", 0), ("alpha", 1), ("dlp", 2)])
def test_elitism_never_returns_worse_than_its_start_on_its_own_fitness(tmp_path, init, seed):
    """The reported start and result are the fitness of those allocations, re-scored independently (a fresh variant
    pass and fitness on the same held-out windows), and the result is never worse than the start."""
    from types import SimpleNamespace

    from msp.allocation.base import Allocation
    from msp.allocation.baselines import heldout_scorer

    ctx = _ctx(tmp_path, seed=seed)
    report = build_allocation(ctx, {**SMALL, "init": init, "extra": [], "generations": 3, "crossover": 0.5, "seed": seed}).search
    assert report["best_fitness"] <= report["initial_fitness"]
    bests = [h["best"] for h in report["history"]]
    assert all(b <= a for a, b in zip(bests, bests[1:]))  # elitist: the generation's best never rises
    assert report["init_chosen"] == init and report["init_scores"] == {}
    final_stage = {"fitness": "kl", "fitness_tokens": 192, "fitness_seqlen": 64, "fitness_batch_size": 4, "variant_nsamples": 8}
    start = Allocation(report["initial_units"], 0.7, "start")  # granularity=layer: units are the layers
    best = Allocation(report["units"], 0.7, "best")
    with heldout_scorer(ctx, [start, best], SimpleNamespace(**final_stage)) as score:
        assert score(start) == pytest.approx(report["initial_fitness"], rel=1e-6)
        assert score(best) == pytest.approx(report["best_fitness"], rel=1e-6)


def test_init_best_scores_every_cheap_allocator_and_starts_from_the_best(tmp_path):
    from msp.search.settings import BEST_INITS

    ctx = _ctx(tmp_path)
    outcome = build_allocation(ctx, {**SMALL, "init": "best", "extra": ["uniform"], "generations": 2})
    report = outcome.search
    scores = report["init_scores"]
    assert list(scores) == list(BEST_INITS) == ["uniform", "owl", "alpha", "dlp", "fisher"]
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert report["init_chosen"] == min(scores, key=lambda m: (scores[m], BEST_INITS.index(m)))
    assert report["initial_fitness"] == scores[report["init_chosen"]]
    assert report["start_fitness"][report["init_chosen"]] == scores[report["init_chosen"]]
    assert report["best_fitness"] <= min(scores.values())
    assert outcome.allocation.meta["init"] == "best" and outcome.allocation.meta["init_chosen"] == report["init_chosen"]
    assert outcome.allocation.weighted_mean(ctx.params) == pytest.approx(0.7, abs=1e-12)


def test_init_file_starts_the_search_from_a_previous_allocation(tmp_path):
    """allocation.init=file: the start population's first genome is the saved allocation snapped to the grid."""
    from msp.allocation.base import Allocation

    ctx = _ctx(tmp_path)
    owl = build_allocation(ctx, {"method": "owl", "granularity": "layer"}).allocation
    path = tmp_path / "allocation.json"
    owl.save(path)
    report = build_allocation(ctx, {**SMALL, "init": "file", "init_options": {"path": str(path)}, "generations": 1}).search
    assert report["init_chosen"] == "file"
    start = report["initial_units"]
    assert max(abs(start[n] - owl[n]) for n in start) <= SMALL["step"] / 2 + 0.03  # snapped to the 0.05 grid, then on budget
    assert report["best_fitness"] <= report["initial_fitness"]
    assert Allocation(start, 0.7, "start").weighted_mean(ctx.params) == pytest.approx(0.7, abs=1e-9)


@pytest.mark.parametrize("options, message", [
    ({"init": "file"}, r"allocation.init=file needs the allocation to start from: add \+allocation.init_options.path="),
    ({"init": "file", "init_options": {"path": "/no/such/allocation.json"}}, r"/no/such/allocation.json"),
])
def test_init_file_without_a_readable_file_fails_early(options, message):
    from msp.search.allocator import check_options

    with pytest.raises(AllocationError, match=message):
        check_options({**SMALL, **options}, 0.7, Pattern.parse("unstructured"))


def test_init_file_for_another_target_names_both_targets(tmp_path):
    from msp.allocation.base import Allocation
    from msp.search.allocator import check_options

    ctx = _ctx(tmp_path, target=0.5)
    path = tmp_path / "allocation.json"
    build_allocation(ctx, {"method": "owl", "granularity": "layer"}).allocation.save(path)
    with pytest.raises(AllocationError, match=r"holds an allocation for target 0.5, not this run's sparsity=0.7"):
        check_options({**SMALL, "init": "file", "init_options": {"path": str(path)}}, 0.7, Pattern.parse("unstructured"))
