"""On one Linear layer with correlated inputs: output error SparseGPT < Wanda < magnitude; the search's stacked SparseGPT
levels equal the textbook SparseGPT."""
from __future__ import annotations

import pytest
import torch

from textbook import sparsegpt_reference

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
    "pattern, levels",
    [("unstructured", [0.25, 0.5, 0.75, 0.875]), ("N:8", [0.25, 0.5, 0.75, 0.0, 1.0])],
)
def test_sparsegpt_levels_in_one_sweep_equal_the_textbook(pattern, levels, monkeypatch):
    """The search's variant store prunes every level in one stacked sweep: each level is what the textbook SparseGPT
    (tests/textbook.py) gives at that sparsity, N:8 levels included (levels 0 and 1: 8:8 and 0:8)."""
    import msp.pruners.sparsegpt as sg

    w, x, stats = correlated_layer(seed=2, tokens=1024, d_in=64, d_out=16)
    pruner, pat = SparseGPTPruner(blocksize=16), Pattern.parse(pattern)
    monkeypatch.setattr(sg, "_LEVELS_MAX_ELEMENTS", 2 * 64 * 16)  # chunks of two levels: the chunking path too
    together = pruner.prune_weight_levels(w, stats, levels, pat)
    assert len(together) == len(levels)
    for s, got in zip(levels, together):
        layer_pattern = pat.for_layer(s)
        n, m = (layer_pattern.n, layer_pattern.m) if layer_pattern.kind == "nm" else (0, 0)
        ref = sparsegpt_reference(w, x, s, n, m, blocksize=16)
        assert torch.equal(got != 0, ref != 0), f"level {s}: masks differ"
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=f"level {s}")


def test_sparsegpt_extras_in_one_sweep_match_separate_calls(monkeypatch):
    """isc saliency + 4-bit (no textbook to compare with): the stacked levels equal one call per level, and more
    sparsity costs more reconstruction error."""
    import msp.pruners.sparsegpt as sg

    w, x, stats = correlated_layer(seed=2, tokens=1024, d_in=64, d_out=16)
    pruner, pat = SparseGPTPruner(blocksize=16, saliency="isc", bits=4), Pattern.parse("unstructured")
    monkeypatch.setattr(sg, "_LEVELS_MAX_ELEMENTS", 2 * 64 * 16)
    levels = [0.3, 0.5, 0.7]
    together = pruner.prune_weight_levels(w, stats, levels, pat)
    errors = []
    for s, got in zip(levels, together):
        alone = pruner.prune_weight(w, stats, s, pat)
        assert torch.equal(got == 0, alone == 0), f"level {s}: masks differ"
        assert torch.allclose(got, alone, rtol=1e-4, atol=1e-5), f"level {s}: weights differ"
        assert all(len(torch.unique(row[row != 0])) <= 2**4 for row in got)
        errors.append(float(((x @ (got - w).t()) ** 2).sum()))
    assert errors == sorted(errors), errors
