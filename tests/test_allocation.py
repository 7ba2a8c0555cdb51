"""Allocations: budget arithmetic (fit_to_budget, mixed N:M levels), validation messages, the raw maps, bad
input, and every allocator × pruner × pattern on tiny-llama through ``prune_``."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from msp.allocation import Allocation, AllocationError
from msp.allocation.allocators import owl_map, rank_map, zscore_map
from msp.allocation.budget import check_grid, fit_to_budget, round_to_levels, weighted_mean
from msp.allocation.build import AllocationContext, build_allocation, check_allocation_options
from msp.cache import DiskCache
from msp.masks import Pattern, sparsity_of
from msp.models import build_tiny_model, prunable_layers
from msp.prune import prune_
from msp.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- budget arithmetic


@pytest.mark.parametrize("seed", range(25))
def test_fit_to_budget_hits_target_exactly_within_bounds_and_keeps_order(seed):
    rng = random.Random(seed)
    units = [f"u{i}" for i in range(rng.randint(1, 30))]
    raw = {u: rng.uniform(-0.5, 1.5) for u in units}
    params = {u: rng.choice([64, 4096, 12288, 98304]) for u in units}
    target = rng.uniform(0.05, 0.9)
    lo = rng.uniform(0.0, target)
    hi = rng.uniform(target, 0.99)
    out = fit_to_budget(raw, params, target, (lo, hi))
    assert weighted_mean(out, params) == pytest.approx(target, abs=1e-12)
    assert all(lo - 1e-15 <= v <= hi + 1e-15 for v in out.values())
    for a in units:  # monotone: a higher raw value never gets a lower sparsity
        for b in units:
            if raw[a] > raw[b]:
                assert out[a] >= out[b] - 1e-15


def test_fit_to_budget_is_a_shift_when_nothing_clips():
    out = fit_to_budget({"a": 0.1, "b": 0.3}, {"a": 1, "b": 3}, 0.5)
    # mean of raw = (0.1 + 0.9)/4 = 0.25 → shift +0.25
    assert out == pytest.approx({"a": 0.35, "b": 0.55}, abs=1e-15)


def test_fit_to_budget_infeasible_bounds_name_the_fix():
    with pytest.raises(AllocationError, match=r"allocation.max=0.6 is below the target sparsity 0.7.*raise allocation.max"):
        fit_to_budget({"a": 0.7}, {"a": 1}, 0.7, (0.0, 0.6))
    with pytest.raises(AllocationError, match=r"allocation.min=0.8 is above the target"):
        fit_to_budget({"a": 0.7}, {"a": 1}, 0.7, (0.8, 0.9))
    with pytest.raises(AllocationError, match=r"outside \[0, 1\)"):
        fit_to_budget({"a": 0.7}, {"a": 1}, 1.0)
    with pytest.raises(AllocationError, match=r"outside \[0, 1\)"):
        fit_to_budget({"a": 0.7}, {"a": 1}, -0.1)


def test_fit_to_budget_at_a_bound_puts_everything_there():
    out = fit_to_budget({"a": 0.1, "b": 0.9}, {"a": 1, "b": 1}, 0.8, (0.2, 0.8))
    assert out == {"a": 0.8, "b": 0.8}


def test_round_to_levels_golden_uniform():
    # four equal layers, target 0.7 on N:8: levels 0.625 / 0.75. Two of each give 0.6875 (error 0.0125), better
    # than one/three (0.71875, error 0.01875) or all at one level (0.05 / 0.075)
    params = {f"l{i}": 100 for i in range(4)}
    out, achieved = round_to_levels({u: 0.7 for u in params}, params, 0.7, 8)
    assert sorted(out.values()) == [0.625, 0.625, 0.75, 0.75]
    assert achieved == pytest.approx(0.6875)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("m", [4, 8, 16])
def test_round_to_levels_multiples_of_one_over_m_and_close_to_target(seed, m):
    rng = random.Random(seed)
    units = [f"u{i}" for i in range(rng.randint(2, 40))]
    params = {u: rng.choice([4096, 12288, 98304]) for u in units}
    target = rng.uniform(0.1, (m - 1) / m - 0.01)
    values = fit_to_budget({u: target + rng.uniform(-0.15, 0.15) for u in units}, params, target, (0.0, 0.99))
    out, achieved = round_to_levels(values, params, target, m)
    assert all(abs(v * m - round(v * m)) < 1e-12 and 0 <= v < 1 for v in out.values())
    assert achieved == pytest.approx(weighted_mean(out, params))
    # the greedy fix-up stops only when no single one-level move improves: at most one level step of the
    # largest unit away from the target
    assert abs(achieved - target) <= max(params.values()) / sum(params.values()) / m + 1e-12
    # local optimality: no single move reduces the error
    grid = [k / m for k in range(m)]
    for u in units:
        i = grid.index(out[u])
        for j in (i - 1, i + 1):
            if 0 <= j < m:
                moved = achieved + params[u] * (grid[j] - grid[i]) / sum(params.values())
                assert abs(moved - target) >= abs(achieved - target) - 1e-12


def test_grid_too_coarse_names_the_fix():
    with pytest.raises(AllocationError, match=r"pattern=N:4 is too coarse for sparsity=0.8.*pattern=N:8"):
        check_grid(0.8, 4)
    with pytest.raises(AllocationError, match="no level"):
        check_grid(0.5, 8, (0.51, 0.6))


# ---------------------------------------------------------------- validation messages


def test_validation_names_missing_and_unknown_layers():
    params = {"a.q": 10, "a.k": 10, "a.v": 10}
    alloc = Allocation({"a.q": 0.5, "b.x": 0.5}, 0.5)
    with pytest.raises(AllocationError) as err:
        alloc.validate(params)
    msg = str(err.value)
    assert "2 layer(s) missing" in msg and "a.k" in msg and "a.v" in msg
    assert "1 unknown layer(s)" in msg and "b.x" in msg


def test_validation_names_the_budget_miss():
    params = {"a": 100, "b": 300}
    alloc = Allocation({"a": 0.5, "b": 0.6}, 0.5)  # mean 0.575
    with pytest.raises(AllocationError, match=r"is 0.575000, off the target 0.500000 by \+0.075000"):
        alloc.validate(params, tolerance=1e-3)


# ---------------------------------------------------------------- raw maps


def test_maps_more_sensitive_less_pruned():
    sens = {"a": 1e-4, "b": 1e-3, "c": 1e-2, "d": 1e-1}
    z = zscore_map(sens, 0.6, 0.05)
    assert z["a"] > z["b"] > z["c"] > z["d"]
    # equally spaced log σ: z-scores ±1.342, ±0.447 → 0.6 ± 0.0671, ± 0.0224
    assert z["a"] == pytest.approx(0.6 + 0.05 * 3 / (5**0.5), rel=1e-9)
    assert sum(z.values()) / 4 == pytest.approx(0.6)
    r = rank_map(sens, 0.6, 0.1)
    assert r == pytest.approx({"a": 0.7, "b": 0.6 + 0.1 / 3, "c": 0.6 - 0.1 / 3, "d": 0.5})
    o = owl_map({"x": 0.02, "y": 0.01, "w": 0.015}, 0.7, 0.08)
    assert o == pytest.approx({"x": 0.62, "y": 0.78, "w": 0.70})
    assert zscore_map({"a": 2.0, "b": 2.0}, 0.5, 0.1) == {"a": 0.5, "b": 0.5}
    with pytest.raises(AllocationError, match="non-positive"):
        zscore_map({"a": -1.0, "b": 0.0}, 0.5, 0.1)


# ---------------------------------------------------------------- bad input before heavy work


@pytest.mark.parametrize(
    "options, target, pattern, match",
    [
        ({"method": "fisher", "max": 0.5}, 0.7, "unstructured", "raise allocation.max to at least 0.7"),
        ({"method": "fisher", "min": 0.8}, 0.7, "unstructured", "lower allocation.min"),
        ({"method": "owl"}, 1.0, "unstructured", r"outside \[0, 1\)"),
        ({"method": "uniform"}, 0.95, "N:8", "too coarse"),
        ({"method": "rank", "signal": "taylor"}, 0.5, "unstructured", "valid: hessian, fisher"),
        ({"method": "fisher", "granularity": "row"}, 0.5, "unstructured", "valid: layer, block"),
        ({"method": "hessian", "probes": 0}, 0.5, "unstructured", "allocation.probes=0 must be positive int"),
        ({"method": "owl", "lambda": -1}, 0.5, "unstructured", "non-negative"),
        ({"method": "nope"}, 0.5, "unstructured", "valid: .*fisher.*uniform"),
        ({"method": "file"}, 0.5, "unstructured", "allocation.path="),
        ({"method": "file", "path": "???"}, 0.5, "unstructured", "allocation.path="),
    ],
)
def test_bad_allocation_options_fail_early(options, target, pattern, match):
    with pytest.raises(AllocationError, match=match):
        check_allocation_options(options, target, Pattern.parse(pattern))


def test_file_with_foreign_layer_names(tmp_path):
    model = build_tiny_model("tiny-llama").model
    Allocation({"transformer.h.0.attn.c_attn": 0.5}, 0.5).save(tmp_path / "allocation.json")
    ctx = _ctx(model, 0.5, "unstructured", None)
    with pytest.raises(AllocationError, match=r"14 layer\(s\) missing .*model.layers.0.self_attn.q_proj.*1 unknown layer\(s\) .*transformer.h.0.attn.c_attn"):
        build_allocation(ctx, {"method": "file", "path": str(tmp_path)})


# ---------------------------------------------------------------- every allocator × pruner × pattern on tiny-llama


_BASE = {}


def _base():
    if not _BASE:
        loaded = build_tiny_model("tiny-llama", seed=0)
        _BASE["model"] = loaded.model
        _BASE["windows"] = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    return _BASE["model"], _BASE["windows"]


def _ctx(model, target, pattern, cache, pruner=None) -> AllocationContext:
    _, windows = _base()
    return AllocationContext(
        model=model, layers=prunable_layers(model), target=target, pattern=Pattern.parse(pattern), device=CPU, pruner=pruner,
        calibration_ids=windows, seqlen=windows.shape[1], seed=0, cache=cache,
        cache_fields={"model": "tiny-llama", "data": "random", "nsamples": 3, "seqlen": 32, "seed": 0}, batch_size=3,
    )


ALLOCATORS = {
    "uniform": {"method": "uniform"},
    "owl": {"method": "owl", "lambda": 0.08, "M": 5},
    "rank": {"method": "rank", "alpha": 0.1, "probes": 1},
    "fisher": {"method": "fisher", "beta": 0.05},
    "fisher-block": {"method": "fisher", "beta": 0.05, "granularity": "block"},
    "hessian": {"method": "hessian", "beta": 0.05, "probes": 1},
    "file": None,  # a saved fisher allocation, re-applied
}
PATTERNS = {"unstructured": 0.7, "2:4": 0.5, "N:8": 0.7}


@pytest.fixture(scope="module")
def allocations(tmp_path_factory):
    """One allocation per (allocator, pattern), sensitivities computed once through a shared disk cache."""
    model, _ = _base()
    cache = DiskCache(tmp_path_factory.mktemp("cache"))
    out = {}
    for pattern, target in PATTERNS.items():
        fisher_file = tmp_path_factory.mktemp("run") / "allocation.json"
        build_allocation(_ctx(model, target, pattern, cache), ALLOCATORS["fisher"]).allocation.save(fisher_file)
        for name, options in ALLOCATORS.items():
            options = options or {"method": "file", "path": str(fisher_file)}
            out[name, pattern] = build_allocation(_ctx(model, target, pattern, cache), dict(options)).allocation
    return out


def test_allocations_meet_the_budget(allocations):
    model, _ = _base()
    params = {n: l.weight.numel() for n, l in prunable_layers(model).items()}
    for (name, pattern), alloc in allocations.items():
        p = Pattern.parse(pattern)
        mean = alloc.weighted_mean(params)
        if p.kind == "nm":
            assert set(alloc.sparsities.values()) == {0.5}, name
        elif p.kind == "mixed_nm":
            assert all(abs(v * 8 - round(v * 8)) < 1e-12 for v in alloc.sparsities.values()), name
            assert alloc.meta["achieved_mean"] == pytest.approx(mean)
            # the greedy fix-up leaves at most one level step of the largest layer: 8192/73728/8 ≈ 0.014
            assert abs(mean - 0.7) <= max(params.values()) / sum(params.values()) / 8 + 1e-12, name
        else:
            assert mean == pytest.approx(0.7, abs=1e-9), name
        if name in ("owl", "rank", "fisher", "hessian") and p.kind == "unstructured":
            assert len(set(round(v, 9) for v in alloc.sparsities.values())) > 1, f"{name} allocated uniformly"
    # OWL at block granularity: one value per block, within target ± λ
    owl = allocations["owl", "unstructured"]
    blocks = {n.split(".")[2]: v for n, v in owl.sparsities.items()}
    assert all(owl.sparsities[n] == blocks[n.split(".")[2]] for n in owl.sparsities)
    assert all(0.7 - 0.08 - 1e-9 <= v <= 0.7 + 0.08 + 1e-9 for v in blocks.values())
    # rank: values within target ± α before the budget shift, so the spread is at most 2α
    rank = allocations["rank", "unstructured"].sparsities.values()
    assert max(rank) - min(rank) == pytest.approx(0.2)
    # file re-applies exactly
    assert allocations["file", "unstructured"].sparsities == allocations["fisher", "unstructured"].sparsities


def test_uniform_mixed_nm_mixes_two_levels():
    alloc = build_allocation(_ctx(_base()[0], 0.7, "N:8", None), {"method": "uniform"}).allocation
    assert set(alloc.sparsities.values()) == {0.625, 0.75}  # not silently 0.75 everywhere
    assert abs(alloc.meta["achieved_mean"] - 0.7) < 0.7 - 0.625


@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), SparseGPTPruner(blocksize=32)], ids=lambda p: p.name)
def test_every_allocator_runs_with_every_pruner_and_pattern(allocations, pruner):
    base, windows = _base()
    for (name, pattern), alloc in allocations.items():
        model = copy.deepcopy(base)
        reports = prune_(model, pruner, alloc, windows, CPU, pattern, batch_size=3)
        assert len(reports) == 14
        for r in reports:
            lin = dict(model.named_modules())[r.name]
            measured = sparsity_of(lin.weight.data)
            if Pattern.parse(pattern).is_nm:
                # N:M masks are exact: the layer's level, every group of 8 (or 4) keeps N
                assert measured == pytest.approx(alloc[r.name], abs=1e-12), (name, pattern, r.name)
            else:
                # per-row top-k: off by at most half a weight per row
                assert abs(measured - alloc[r.name]) <= 0.5 / lin.in_features + 1e-12, (name, pattern, r.name)


def test_run_with_file_allocation_reports_the_files_target(tmp_path):
    """fisher run → allocation.json → allocation=file run with another sparsity= : the file wins."""
    from msp.pruners import WandaPruner as W
    from msp.run import RunSpec, run

    data = {"calibration": "book", "evaluation": ["wiki"], "nsamples": 2, "seqlen": 32, "heldout_fraction": 0.1, "eval_windows": 1}

    def spec(allocation, sparsity):
        return RunSpec(model="tiny-llama", model_revision=None, pruner=W(), pruner_config={}, sparsity=sparsity,
                       pattern=Pattern.parse("unstructured"), allocation=allocation, data=data, eval={"skip": True}, seed=0,
                       device="cpu", dtype="float32", batch_size=2, save_model=False, cache_dir=None, use_cache=False)

    first = run(spec({"method": "fisher", "beta": 0.05}, 0.6), tmp_path / "a")
    assert first["sensitivity_method"] == "fisher"
    assert all(isinstance(layer["sensitivity"], float) for layer in first["layers"])
    second = run(spec({"method": "file", "path": str(tmp_path / "a" / "allocation.json")}, 0.3), tmp_path / "b")
    assert second["target_sparsity"] == pytest.approx(0.6)
    assert second["allocation"] == "file:fisher"
    assert [l["target"] for l in second["layers"]] == [l["target"] for l in first["layers"]]
    saved = json.loads((tmp_path / "b" / "allocation.json").read_text())
    assert saved["target"] == pytest.approx(0.6)
