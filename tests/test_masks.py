"""Hand-computed goldens and exact-count properties of the masks."""
from __future__ import annotations

import pytest
import torch

from msp.allocation.budget import check_target
from msp.masks import Pattern, PatternError, mask_from_scores, nm_mask, topk_row_mask
from msp.pruners import LayerStats, MagnitudePruner, SparseGPTPruner, WandaPruner

W = torch.tensor([[0.5, -2.0, 1.0, 0.1, -0.3, 3.0, -0.8, 0.05]])
NORMS = torch.tensor([4.0, 0.25, 1.5, 12.0, 2.0, 0.1, 1.0, 30.0])  # ‖X_j‖₂ of the 8 input columns


def stats_with_norms(norms: torch.Tensor) -> LayerStats:
    stats = LayerStats(len(norms), need_hessian=False)
    stats.add_batch(torch.diag(norms))  # token t has norms[t] at column t → Σ_t X_tj² = norms[j]²
    return stats


def keep(weight: torch.Tensor) -> list[int]:
    return (weight != 0).int().flatten().tolist()


def test_golden_magnitude_unstructured_and_24():
    # |W| = .5 2 1 .1 .3 3 .8 .05 → drop the 4 smallest: .05 (7), .1 (3), .3 (4), .5 (0)
    assert keep(MagnitudePruner().prune_weight(W, None, 0.5, Pattern.parse("unstructured"))) == [0, 1, 1, 0, 0, 1, 1, 0]
    # 2:4: group [.5 2 1 .1] keeps 1,2; group [.3 3 .8 .05] keeps 5,6
    assert keep(MagnitudePruner().prune_weight(W, None, 0.5, Pattern.parse("2:4"))) == [0, 1, 1, 0, 0, 1, 1, 0]


def test_golden_wanda_unstructured_and_24():
    stats = stats_with_norms(NORMS)
    # scores |W|·‖X‖ = 2.0 .5 1.5 1.2 .6 .3 .8 1.5 → drop .3 (5), .5 (1), .6 (4), .8 (6)
    assert keep(WandaPruner().prune_weight(W, stats, 0.5, Pattern.parse("unstructured"))) == [1, 0, 1, 1, 0, 0, 0, 1]
    # 2:4: [2.0 .5 1.5 1.2] keeps 0,2; [.6 .3 .8 1.5] keeps 6,7
    assert keep(WandaPruner().prune_weight(W, stats, 0.5, Pattern.parse("2:4"))) == [1, 0, 1, 0, 0, 0, 1, 1]


def test_golden_wanda_differs_from_magnitude_where_activations_matter():
    stats = stats_with_norms(NORMS)
    mag = keep(MagnitudePruner().prune_weight(W, None, 0.5, Pattern.parse("unstructured")))
    wanda = keep(WandaPruner().prune_weight(W, stats, 0.5, Pattern.parse("unstructured")))
    assert mag != wanda  # column 7 (tiny weight, huge activation) survives only under Wanda


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.7, 0.9])
def test_exact_counts_per_row_under_heavy_ties(sparsity):
    gen = torch.Generator().manual_seed(1)
    # 4-bit-like weights: only 16 distinct magnitudes → very many ties
    w = torch.randint(-8, 8, (37, 96), generator=gen).float() / 8
    mask = topk_row_mask(w.abs(), sparsity)
    expected_pruned = int(sparsity * 96 + 0.5)
    assert ((~mask).sum(dim=1) == expected_pruned).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_groups_hold_exactly_n(n, m):
    gen = torch.Generator().manual_seed(2)
    w = torch.randint(-3, 4, (16, 64), generator=gen).float()
    mask = nm_mask(w.abs(), n, m)
    assert (mask.reshape(16, 64 // m, m).sum(-1) == n).all()


def test_mixed_nm_picks_n_from_the_layer_sparsity():
    p = Pattern.parse("N:8")
    assert p.kind == "mixed_nm" and p.m == 8
    assert p.for_layer(0.75) == Pattern("nm", 2, 8)
    assert p.for_layer(0.5) == Pattern("nm", 4, 8)
    mask = mask_from_scores(torch.rand(4, 16), 0.625, p)
    assert (mask.reshape(4, 2, 8).sum(-1) == 3).all()


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "a:4", "2:x", "dense"])
def test_bad_patterns_name_the_fix(text):
    with pytest.raises(PatternError, match="pattern"):
        Pattern.parse(text)


def test_pattern_must_divide_the_layer():
    with pytest.raises(PatternError, match="not a multiple of M=5"):
        Pattern.parse("2:5").check_divides("layer", 64)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "abc"])
def test_sparsity_outside_unit_interval(value):
    with pytest.raises(ValueError, match=r"\[0, 1\)|not a number"):
        check_target(value)


def test_sparsegpt_counts_are_exact_for_the_layer():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 300, generator=gen)
    x = torch.randn(512, 300, generator=gen)
    stats = LayerStats(300, need_hessian=True)
    stats.add_batch(x)
    out = SparseGPTPruner(blocksize=128).prune_weight(w, stats, 0.6, Pattern.parse("unstructured"))
    assert int((out == 0).sum()) == int(0.6 * w.numel() + 0.5)
    out24 = SparseGPTPruner().prune_weight(w, stats, 0.5, Pattern.parse("2:4"))
    assert ((out24 != 0).reshape(24, 75, 4).sum(-1) == 2).all()
