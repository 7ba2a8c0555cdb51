"""On one Linear layer with correlated inputs: output error SparseGPT < Wanda < magnitude."""
from __future__ import annotations

import pytest
import torch

from msp.masks import Pattern
from msp.pruners import LayerStats, MagnitudePruner, SparseGPTPruner, WandaPruner


def correlated_layer(seed: int = 0, tokens: int = 4096, d_in: int = 128, d_out: int = 64):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen) / d_in**0.5 + torch.eye(d_in)  # correlated features
    scales = torch.exp(1.0 * torch.randn(d_in, generator=gen))  # uneven column norms, as in LLM activations
    x = (torch.randn(tokens, d_in, generator=gen) @ mix) * scales
    w = torch.randn(d_out, d_in, generator=gen)
    stats = LayerStats(d_in, need_hessian=True)
    stats.add_batch(x)
    return w, x, stats


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern):
    w, x, stats = correlated_layer()
    dense = x @ w.t()
    errors = {}
    for pruner in (MagnitudePruner(), WandaPruner(), SparseGPTPruner()):
        pruned = pruner.prune_weight(w, stats, 0.5, Pattern.parse(pattern))
        assert abs(float((pruned == 0).float().mean()) - 0.5) < 1e-6
        errors[pruner.name] = float(((x @ pruned.t() - dense) ** 2).sum())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_joint_quantization_keeps_few_levels_per_row():
    w, x, stats = correlated_layer(seed=1, tokens=1024, d_in=64, d_out=8)
    q = SparseGPTPruner(bits=3).prune_weight(w, stats, 0.5, Pattern.parse("unstructured"))
    for row in q:
        assert len(torch.unique(row[row != 0])) <= 2**3  # 3-bit: at most 8 distinct non-zero values per channel
