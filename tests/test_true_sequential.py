"""true_sequential: each Linear pruned inside its block's forward, one block pass, later layers see pruned inputs."""
from __future__ import annotations

import copy

import pytest
import torch

from msp.allocation.base import uniform_allocation
from msp.masks import Pattern
from msp.models import block_linears, build_tiny_model, find_blocks, prunable_layers
from msp.pipeline import capture_block_inputs, inline_block_pass, run_block
from msp.prune import prune_
from msp.pruners import LayerStats, MagnitudePruner, SparseGPTPruner, WandaPruner
from msp.sweep import config_hash

CPU = torch.device("cpu")
UNSTRUCTURED = Pattern.parse("unstructured")


def _setup(seed=0):
    loaded = build_tiny_model("tiny-llama", seed, torch.float32)
    model = loaded.model.eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    layers = prunable_layers(model)
    return model, ids, uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, 0.5)


@pytest.mark.parametrize("pruner", [WandaPruner(), SparseGPTPruner(blocksize=16)])
def test_inline_pass_hits_the_sparsity_and_differs_from_the_two_pass_order(pruner, one_thread):
    model, ids, alloc = _setup()
    reference, _, _ = _setup()
    inline = prune_(model, pruner, alloc, ids, CPU, true_sequential=True)
    two_pass = prune_(reference, pruner, alloc, ids, CPU)
    assert [r.name for r in inline] == [r.name for r in two_pass]
    for r in inline:
        assert abs(r.measured - 0.5) < 1e-6
    names = [r.name for r in inline]
    first = prunable_layers(model)[names[0]].weight
    assert torch.equal(first, prunable_layers(reference)[names[0]].weight)  # block 0's first layer: same input either way
    assert any(not torch.equal(prunable_layers(model)[n].weight, prunable_layers(reference)[n].weight) for n in names)


def test_inline_pass_equals_pruning_each_layer_on_its_pruned_predecessors_input(one_thread):
    """The reference: prune the block's layers one at a time in call order, re-running the block after each."""
    model, ids, alloc = _setup(1)
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, ids.shape[0], CPU, CPU)
    block = blocks[0]
    linears = block_linears(block)
    pruner = WandaPruner()
    expected = {}
    ref_block = copy.deepcopy(block)
    ref_linears = block_linears(ref_block)
    for name in linears:  # call order in LLaMA = definition order (q, k, v, o, gate, up, down)
        seen = {}
        h = ref_linears[name].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        run_block(ref_block, inputs, CPU, CPU)
        h.remove()
        stats = LayerStats(ref_linears[name].in_features, False)
        stats.add_batch(seen["x"])
        ref_linears[name].weight.data.copy_(pruner.prune_weight(ref_linears[name].weight.data, stats, 0.5, UNSTRUCTURED))
        expected[name] = ref_linears[name].weight.detach().clone()
    outs = inline_block_pass(
        block, linears, inputs, CPU, CPU, False,
        lambda local, lin, st: lin.weight.data.copy_(pruner.prune_weight(lin.weight.data, st, 0.5, UNSTRUCTURED)),
    )
    for name, lin in linears.items():
        assert torch.allclose(lin.weight, expected[name], atol=1e-6), name
    assert torch.allclose(outs[0], run_block(ref_block, inputs, CPU, CPU)[0], atol=1e-5)


def test_inline_pass_needs_one_batch():
    model, ids, _ = _setup()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, 2, CPU, CPU)
    with pytest.raises(ValueError, match="one batch"):
        inline_block_pass(blocks[0], block_linears(blocks[0]), inputs, CPU, CPU, False, lambda *a: None)


def test_magnitude_ignores_true_sequential(one_thread):
    model, ids, alloc = _setup()
    reference, _, _ = _setup()
    prune_(model, MagnitudePruner(), alloc, None, CPU, true_sequential=True)
    prune_(reference, MagnitudePruner(), alloc, None, CPU)
    for (n, a), (_, b) in zip(prunable_layers(model).items(), prunable_layers(reference).items()):
        assert torch.equal(a.weight, b.weight), n


def test_true_sequential_false_keeps_earlier_config_hashes():
    base = {"sparsity": 0.5, "pruner": {"name": "wanda"}}
    assert config_hash({**base, "true_sequential": False}) == config_hash(base)
    assert config_hash({**base, "true_sequential": True}) != config_hash(base)
