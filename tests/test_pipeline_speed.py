"""The pipeline's speed-ups change nothing but speed: selection without a full sort gives the stable-sort mask, shared
inputs give the same statistics, and the early-stopping statistics pass gives the same pruned model."""
from __future__ import annotations

import pytest
import torch

from msp.allocation.base import uniform_allocation
from msp.masks import prune_count, topk_row_mask
from msp.models import block_linears, build_tiny_model, find_blocks, prunable_layers
from msp.pipeline import capture_block_inputs, collect_block_stats, sequential_pass
from msp.prune import prune_
from msp.pruners import SparseGPTPruner, WandaPruner
from msp.pruners.stats import LayerStats


def stable_sort_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference: prune the k lowest of each row, ties broken by column index (a stable sort)."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
    return mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [1, 2, 3, 0])  # 0: continuous scores (no ties); 1: every score tied
def test_selection_equals_the_stable_sort_mask(seed, levels):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 7, 1 + 5 * seed
    scores = torch.randn(rows, cols, generator=g) if levels == 0 else torch.randint(0, levels, (rows, cols), generator=g).float()
    for sparsity in (0.0, 0.13, 0.5, 0.8, 0.999):
        assert torch.equal(topk_row_mask(scores, sparsity), stable_sort_mask(scores, sparsity)), (sparsity, scores)


def _reference_stats(block, linears, inputs, need_hessian):
    """Plain per-layer forward hooks, one add_batch per layer (what the pipeline did before sharing)."""
    stats = {n: LayerStats(l.in_features, need_hessian) for n, l in linears.items()}
    handles = [l.register_forward_hook(lambda m, a, o, n=n: stats[n].add_batch(a[0])) for n, l in linears.items()]
    try:
        with torch.no_grad():
            for hidden, kw in zip(inputs.hidden, inputs.kwargs):
                block(hidden, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats


@pytest.mark.parametrize("keep_outputs", [True, False])
def test_shared_inputs_and_early_stop_give_the_same_statistics(cpu, keep_outputs):
    lm = build_tiny_model("tiny-llama", seed=0)
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(lm.model, ids, 2, cpu, cpu)  # 3 batches
    block = find_blocks(lm.model)[1][0]
    linears = block_linears(block)
    ref = _reference_stats(block, linears, inputs, need_hessian=True)
    runs = {"down": 0}
    handle = linears["mlp.down_proj"].register_forward_hook(lambda *a: runs.__setitem__("down", runs["down"] + 1))
    try:
        with torch.no_grad():
            stats, outs = collect_block_stats(block, linears, inputs, cpu, cpu, need_hessian=True, keep_outputs=keep_outputs)
    finally:
        handle.remove()
    for name in linears:
        assert stats[name].tokens == ref[name].tokens == 6 * 16
        torch.testing.assert_close(stats[name].col_sq_norm, ref[name].col_sq_norm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[name].hessian, ref[name].hessian, rtol=1e-5, atol=1e-5)
    # q/k/v read one tensor and gate/up another: each batch's XᵀX is computed once and added to each
    assert torch.equal(stats["self_attn.q_proj"].hessian, stats["self_attn.v_proj"].hessian)
    assert stats["self_attn.q_proj"].hessian is not stats["self_attn.v_proj"].hessian  # separate accumulators
    if keep_outputs:
        assert runs["down"] == 3 and len(outs) == 3
    else:  # batch 0 shows the order; batches 1 and 2 stop before down_proj's matmul
        assert runs["down"] == 1 and outs is None
    assert all(not l._forward_pre_hooks for l in linears.values())


@pytest.mark.parametrize("pruner", [WandaPruner(), SparseGPTPruner()], ids=["wanda", "sparsegpt"])
def test_early_stopping_pass_prunes_exactly_like_the_full_pass(cpu, pruner):
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(2))
    fast = build_tiny_model("tiny-llama", seed=0).model
    layers = prunable_layers(fast)
    alloc = uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, 0.6)
    prune_(fast, pruner, alloc, ids, cpu, "unstructured", batch_size=2)  # modifies_blocks=True

    slow = build_tiny_model("tiny-llama", seed=0).model

    def on_block(index, prefix, block, linears, stats):
        for local, lin in linears.items():
            lin.weight.data.copy_(pruner.prune_weight(lin.weight.data, stats[local], 0.6, pruner_pattern))
        return True

    from msp.masks import Pattern

    pruner_pattern = Pattern.parse("unstructured")
    sequential_pass(slow, ids, cpu, on_block, need_hessian=pruner.needs_hessian, batch_size=2, modifies_blocks=False)
    for (name, a), b in zip(prunable_layers(fast).items(), prunable_layers(slow).values()):
        assert torch.equal(a.weight, b.weight), name


def test_hooks_are_removed_when_the_callback_fails(cpu):
    lm = build_tiny_model("tiny-llama", seed=0)

    def boom(*args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sequential_pass(lm.model, torch.randint(0, 256, (2, 8)), cpu, boom, modifies_blocks=True)
    assert all(not l._forward_pre_hooks and not l._forward_hooks for l in prunable_layers(lm.model).values())


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "pipeline_speed.py"
    spec = importlib.util.spec_from_file_location("pipeline_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_pipeline_speed_benchmark_reports_consistent_measurements(tmp_path, one_thread):
    """bench/pipeline_speed.py end to end on tiny-llama: the report describes the run that was asked for, its ratios are
    the quotients of its own timings, the pruned model has the asked sparsity, a pruned candidate is away from the dense
    model (KL > 0) and a candidate at level 0 (dense) is not (KL = 0)."""
    import json
    import math

    bench = _bench()
    bench.main(["--model", "tiny-llama", "--nsamples", "2", "--seqlen", "32", "--pruners", "wanda", "--search", "wanda,sparsegpt",
                "--fitness-windows", "1", "--fitness-seqlen", "32", "--candidates", "2", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "pipeline_speed_tiny-llama_cpu.json").read_text())
    assert (r["model"], r["nsamples"], r["seqlen"], r["tokens"], r["sparsity"]) == ("tiny-llama", 2, 32, 64, 0.5)
    assert r["forward_s"] > 0 and math.isclose(r["forward_tokens_per_s"], 64 / r["forward_s"])
    assert set(r["pruners"]) == {"wanda", "wanda (true sequential)"}
    for label, p in r["pruners"].items():
        assert math.isclose(p["ratio_to_forward"], p["prune_s"] / r["forward_s"]), label
        assert 0 <= p["prune_weight_s"] <= p["prune_s"] and math.isclose(p["pipeline_s"] + p["prune_weight_s"], p["prune_s"])
        assert abs(p["sparsity"] - 0.5) < 1e-6 and p["true_sequential"] == label.endswith("(true sequential)")
        assert p["meets_target"] == (p["ratio_to_forward"] <= p["target_ratio"])
    s = r["search"]
    assert s["units"] == 2 and s["fitness_tokens"] == 32 and s["levels"] == [0.5, 0.6, 0.7, 0.8, 0.9]
    for name, mode in (("wanda", "ranking"), ("sparsegpt", "store")):
        p = s["pruners"][name]
        assert p["mode"] == mode and math.isfinite(p["last_fitness"]) and p["last_fitness"] > 1e-4, (name, p["last_fitness"])
        assert math.isclose(p["candidate_ratio_to_bare_forward"], p["candidate_s"] / s["bare_forward_s"])
        assert math.isclose(p["fitness_tokens_per_s"], 32 / p["candidate_s"]) and 0 <= p["swap_s"] <= p["candidate_s"]
    md = (tmp_path / "pipeline_speed_tiny-llama_cpu.md").read_text()
    assert "| wanda (true sequential) |" in md and "| sparsegpt | store |" in md

    dense = bench.main(["--model", "tiny-llama", "--nsamples", "2", "--seqlen", "32", "--pruners", "", "--search", "wanda,sparsegpt",
                        "--levels", "0.0,0.0", "--fitness-windows", "1", "--fitness-seqlen", "32", "--candidates", "1",
                        "--out", str(tmp_path / "dense")])
    for name in ("wanda", "sparsegpt"):
        assert abs(dense["search"]["pruners"][name]["last_fitness"]) < 1e-5, name  # level 0 = the dense model: KL 0
