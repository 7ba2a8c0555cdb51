"""allocation=alpha, dlp, atp wired as allocators: every pruner × unstructured / mixed N:8 on tiny-llama through
build_allocation (exact budget, the raw signal in allocation.json), the DLP cache, ATP's β choice on the held-out
fitness, their one-line errors, and a CLI run of each."""
from __future__ import annotations

import json
import math

import pytest
import torch

from msp.allocation import Allocation, AllocationError
from msp.allocation.build import AllocationContext, build_allocation, check_allocation_options
from msp.allocation.layerwise import atp_ramp
from msp.cache import DiskCache
from msp.masks import Pattern
from msp.models import build_tiny_model, prunable_layers
from msp.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from tests.test_cli import msp

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")

_MODEL = {}
ATP = {"method": "atp", "fitness_tokens": 128, "fitness_seqlen": 32}


def _ctx(target, pattern, pruner, cache=None) -> AllocationContext:
    if not _MODEL:
        _MODEL["model"] = build_tiny_model("tiny-llama", seed=0).model
    gen = torch.Generator().manual_seed(0)
    return AllocationContext(
        model=_MODEL["model"], layers=prunable_layers(_MODEL["model"]), target=target, pattern=Pattern.parse(pattern), device=CPU,
        pruner=pruner, calibration_ids=torch.randint(0, 256, (3, 32), generator=gen), heldout_tokens=torch.randint(0, 256, (400,), generator=gen),
        seqlen=32, cache=cache, cache_fields={"model": "tiny-llama", "data": "random", "nsamples": 3, "seqlen": 32, "seed": 0}, batch_size=3,
    )


def _blocks(alloc: Allocation) -> dict[int, float]:
    values = {int(n.split(".")[2]): v for n, v in alloc.sparsities.items()}
    assert all(alloc.sparsities[n] == values[int(n.split(".")[2])] for n in alloc.sparsities)  # one value per block
    return values


@pytest.mark.parametrize("pattern", ["unstructured", "N:8"])
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), SparseGPTPruner(blocksize=32)], ids=lambda p: p.name)
@pytest.mark.parametrize("method", ["alpha", "dlp", "atp"])
def test_every_baseline_with_every_pruner_meets_the_budget_and_records_its_signal(tmp_path, method, pruner, pattern):
    ctx = _ctx(0.7, pattern, pruner)
    outcome = build_allocation(ctx, ATP if method == "atp" else {"method": method})
    alloc = outcome.allocation
    mean = alloc.weighted_mean(ctx.params)
    if pattern == "N:8":
        assert all(abs(v * 8 - round(v * 8)) < 1e-12 for v in alloc.sparsities.values())
        assert alloc.meta["achieved_mean"] == pytest.approx(mean) and abs(mean - 0.7) <= 1 / 8
    else:
        assert mean == pytest.approx(0.7, abs=1e-12)
    blocks = _blocks(alloc)
    alloc.save(tmp_path / "allocation.json")
    meta = json.loads((tmp_path / "allocation.json").read_text())["meta"]
    assert meta["units"].keys() == {"model.layers.0", "model.layers.1"}
    if method == "alpha":
        assert set(meta["layer_fits"]) == set(ctx.layers) and meta["fallbacks"] == {} and meta["epsilon"] == 0.2
        a = meta["unit_alpha"]
        assert all(math.isfinite(f["alpha"]) and f["ks"] >= 0 for f in meta["layer_fits"].values())
        if pattern == "unstructured":  # two blocks: the heavier tail (smaller α) gets target·(1 − ε), the other (1 + ε)
            low, high = sorted(a, key=a.get)
            assert (meta["units"][low], meta["units"][high]) == pytest.approx((0.7 * 0.8, 0.7 * 1.2), abs=1e-12)
    elif method == "dlp":
        s = meta["unit_score"]
        assert set(s) == {"model.layers.0", "model.layers.1"} and outcome.sensitivity.method == "dlp"
        if pattern == "unstructured":  # two blocks: scaled importances {0, 2α}, so target ± α, the higher score pruned more
            low, high = sorted(s, key=s.get)
            assert (meta["units"][low], meta["units"][high]) == pytest.approx((0.7 - 0.15, 0.7 + 0.15), abs=1e-12)
    else:
        scores = meta["beta_scores"]
        assert list(scores) == [f"{0.002 * k:g}" for k in range(16)] and meta["searched"] is True
        assert scores[f"{meta['beta']:g}"] == min(scores.values())
        if pattern == "unstructured":
            assert [blocks[0], blocks[1]] == pytest.approx(atp_ramp(2, 0.7, meta["beta"]), abs=1e-12)


def test_dlp_scores_are_cached_and_atp_takes_a_given_beta(tmp_path):
    cache = DiskCache(tmp_path)
    first = build_allocation(_ctx(0.6, "unstructured", WandaPruner(), cache), {"method": "dlp"}).allocation
    misses = cache.misses
    again = build_allocation(_ctx(0.6, "unstructured", WandaPruner(), cache), {"method": "dlp"}).allocation
    assert cache.misses == misses == 1 and again.sparsities == first.sparsities
    alloc = build_allocation(_ctx(0.6, "unstructured", None), {"method": "atp", "beta": 0.1}).allocation  # no pruner: no scoring
    assert [_blocks(alloc)[0], _blocks(alloc)[1]] == pytest.approx([0.55, 0.65], abs=1e-12) and alloc.meta["beta"] == 0.1
    assert "beta_scores" not in alloc.meta


@pytest.mark.parametrize(
    "options, target, message",
    [
        ({"method": "alpha", "epsilon": 1.5}, 0.7, "allocation.epsilon=1.5 must be in [0, 1)"),
        ({"method": "alpha", "xmin_rule": "mode"}, 0.7, "allocation.xmin_rule='mode' is unknown; valid: peak, all, median"),
        ({"method": "alpha", "fallback": "skip"}, 0.7, "allocation.fallback='skip' is unknown; valid: error, mean"),
        ({"method": "alpha", "min_tail": 1}, 0.7, "need 2 <= allocation.min_tail (1)"),
        ({"method": "dlp", "alpha": 0.6}, 0.7, "allocation.alpha=0.6 must be in [0, 0.5)"),
        ({"method": "dlp", "reduction": "max"}, 0.7, "allocation.reduction='max' is unknown; valid: mean, median"),
        ({"method": "dlp", "granularity": "layer"}, 0.7, "allocation=dlp allocates per decoder block"),
        ({"method": "atp", "beta_grid": [0.0, 0.03]}, 0.7, "allocation.beta_grid=[0.0, 0.03] must be [start, stop, step]"),
        ({"method": "atp", "beta_grid": [0.03, 0.0, 0.002]}, 0.7, "need 0 <= start <= stop and step > 0"),
        ({"method": "atp", "beta": -0.01}, 0.7, "allocation.beta=-0.01 must be non-negative"),
        ({"method": "atp", "fitness": "acc"}, 0.7, "allocation.fitness='acc' is unknown; valid: kl, ppl"),
        ({"method": "atp", "epsilon": 0.2}, 0.7, "allocation.epsilon"),  # another allocator's key
    ],
)
def test_bad_baseline_options_fail_early_in_one_line(options, target, message):
    with pytest.raises(AllocationError) as err:
        check_allocation_options(options, target, Pattern.parse("unstructured"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_atp_grid_leaving_the_bounds_fails_before_any_scoring(monkeypatch):
    monkeypatch.setattr("msp.search.fitness.precompute_variants", lambda *a, **k: pytest.fail("the variant pass ran"))
    with pytest.raises(AllocationError, match=r"β=0.5 over 2 blocks spans sparsities \[0.4500, 0.9500\], outside the bounds \[0.0, 0.9\].*largest β that fits is 0.400000"):
        build_allocation(_ctx(0.7, "unstructured", WandaPruner()), {**ATP, "beta_grid": [0.0, 0.5, 0.1], "max": 0.9})
    with pytest.raises(AllocationError, match=r"needs 256 held-out calibration tokens .* only 0 are held out"):
        ctx = _ctx(0.7, "unstructured", WandaPruner())
        ctx.heldout_tokens = None
        build_allocation(ctx, {**ATP, "fitness_tokens": 256})


@pytest.mark.parametrize("method", ["alpha", "dlp", "atp"])
def test_cli_run_of_each_baseline(tmp_path, method):
    run_dir = tmp_path / "run"
    extra = ["allocation.fitness_tokens=64", "allocation.fitness_seqlen=32"] if method == "atp" else []
    proc = msp("model=tiny-llama", "data=tiny", f"allocation={method}", "pruner=wanda", "sparsity=0.7", *extra,
               f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    alloc = json.loads((run_dir / "allocation.json").read_text())
    assert alloc["method"] == method and abs(res["sparsity"] - 0.7) < 0.01
    assert {"alpha": "unit_alpha", "dlp": "unit_score", "atp": "beta_scores"}[method] in alloc["meta"]
    assert (run_dir / "sensitivity.json").exists() == (method == "dlp")
