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


@pytest.mark.parametrize(
    "pattern, levels, extra",
    [
        ("unstructured", [0.3, 0.5, 0.7, 0.9], {}),
        ("N:8", [0.25, 0.5, 0.75, 0.0, 1.0], {}),
        ("unstructured", [0.4, 0.6], {"saliency": "isc", "bits": 4}),
    ],
)
def test_sparsegpt_levels_in_one_sweep_match_separate_calls(pattern, levels, extra, monkeypatch):
    """The search's variant store prunes every level in one stacked sweep; each level equals its own call."""
    import msp.pruners.sparsegpt as sg

    w, x, stats = correlated_layer(seed=2, tokens=1024, d_in=64, d_out=16)
    pruner, pat = SparseGPTPruner(blocksize=16, **extra), Pattern.parse(pattern)
    monkeypatch.setattr(sg, "_LEVELS_MAX_ELEMENTS", 2 * 64 * 16)  # chunks of two levels: the chunking path too
    together = pruner.prune_weight_levels(w, stats, levels, pat)
    assert len(together) == len(levels)
    for s, got in zip(levels, together):
        alone = pruner.prune_weight(w, stats, s, pat)
        assert torch.equal(got == 0, alone == 0), f"level {s}: masks differ"
        assert torch.allclose(got, alone, rtol=1e-4, atol=1e-5), f"level {s}: weights differ"
        if not extra.get("bits"):  # (quantization may round a kept weight to zero)
            assert abs(float((got == 0).float().mean()) - s) <= 0.5 / got.numel() + 1e-9  # nearest whole weight count
