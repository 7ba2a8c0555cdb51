"""Wanda and SparseGPT against independent textbook references on one layer.

The references (tests/textbook.py) are written from the papers, plainly: a column loop, float64, no code shared with
msp. msp's pruners see the same inputs through their own statistics (float32) and must give the same masks and, up to
float32 rounding, the same values.
"""
from __future__ import annotations

import pytest
import torch
from textbook import sparsegpt_reference, wanda_reference

from msp.masks import Pattern
from msp.pruners import LayerStats, SparseGPTPruner, WandaPruner


def layer(seed: int, rows: int = 32, cols: int = 256, tokens: int = 1024, dead: tuple[int, ...] = ()):
    """A random layer and correlated calibration inputs with uneven column scales; ``dead`` inputs are always 0."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.exp(0.5 * torch.randn(cols, generator=g))
    x[:, list(dead)] = 0.0
    w = torch.randn(rows, cols, generator=g)
    return w, x


def msp_stats(x: torch.Tensor, need_hessian: bool, batches: int = 4) -> LayerStats:
    stats = LayerStats(x.shape[1], need_hessian=need_hessian)
    for part in x.chunk(batches):  # as the pipeline does: several calibration batches
        stats.add_batch(part)
    return stats


# ---------------------------------------------------------------- the references are what they claim
def test_references_hit_the_count_and_sparsegpt_reconstructs_better_than_wanda():
    w, x = layer(0, rows=8, cols=64, tokens=256)
    dense = x.double() @ w.double().T
    wanda = wanda_reference(w, x, 0.5)
    sgpt = sparsegpt_reference(w, x, 0.5, blocksize=16)
    assert int((wanda == 0).sum()) == int((sgpt == 0).sum()) == 8 * 32
    assert ((wanda == 0).sum(dim=1) == 32).all()  # Wanda: per row
    nm = sparsegpt_reference(w, x, 0.5, n=2, m=4, blocksize=16)
    assert ((nm != 0).view(8, 16, 4).sum(-1) == 2).all()
    err = lambda q: float(((x.double() @ q.T - dense) ** 2).sum())  # noqa: E731
    assert err(sgpt) < err(wanda)


# ---------------------------------------------------------------- msp against the references
CASES = [("unstructured", 0.5, 0, 0), ("2:4", 0.5, 2, 4)]


def test_wanda_count_rounds_to_the_nearest_weight():
    """Where s·in is not whole, msp removes round(s·in) weights per row (msp.masks.prune_count); the Wanda authors'
    code removes int(s·in) (truncation). The paper does not say; at the usual 50% of an even width they agree."""
    w, x = layer(0, rows=4, cols=10, tokens=64)
    got = WandaPruner().prune_weight(w, msp_stats(x, need_hessian=False), 0.55, Pattern.parse("unstructured"))
    assert ((got == 0).sum(dim=1) == 6).all()  # 5.5 → 6 (the authors' code: 5)
    assert torch.equal(got != 0, wanda_reference(w, x, 0.55) != 0)


@pytest.mark.parametrize("pattern,sparsity,n,m", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_equals_the_textbook(seed, pattern, sparsity, n, m):
    w, x = layer(seed)
    got = WandaPruner().prune_weight(w, msp_stats(x, need_hessian=False), sparsity, Pattern.parse(pattern))
    ref = wanda_reference(w, x, sparsity, n, m)
    assert torch.equal(got != 0, ref != 0)
    assert torch.equal(got, w * (ref != 0))  # kept weights are untouched


def _sparsegpt_vs_reference(seed, blocksize, dead, pattern, sparsity, n, m, hessian_scale=None):
    w, x = layer(seed, dead=dead)
    pruner = SparseGPTPruner(blocksize=blocksize, percdamp=0.01)
    got = pruner.prune_weight(w, msp_stats(x, need_hessian=True), sparsity, Pattern.parse(pattern)).double()
    # hessian_scale=c: the reference's H = 2XᵀX/n is c·(2XᵀX/n): feed it X·√c
    x_ref = x if hessian_scale is None else x * hessian_scale**0.5
    ref = sparsegpt_reference(w, x_ref, sparsity, n, m, blocksize=blocksize, percdamp=0.01)
    assert torch.equal(got != 0, ref != 0), f"masks differ in {int(((got != 0) != (ref != 0)).sum())} weights"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("pattern,sparsity,n,m", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed,blocksize", [(0, 128), (1, 64), (2, 32)], ids=["B128", "B64", "B32"])
def test_sparsegpt_equals_the_textbook(seed, blocksize, pattern, sparsity, n, m):
    """256 columns: two or more column blocks, so the lazy batch update is exercised; unstructured and 2:4."""
    _sparsegpt_vs_reference(seed, blocksize, (), pattern, sparsity, n, m)


@pytest.mark.parametrize("pattern,sparsity,n,m", [("unstructured", 0.7, 0, 0), ("4:8", 0.5, 4, 8), ("1:4", 0.75, 1, 4)],
                         ids=["70%", "4:8", "1:4"])
def test_sparsegpt_equals_the_textbook_beyond_half(pattern, sparsity, n, m):
    """Issue 10 §4's other protocol points: 70% (40 rows x 64-column blocks: 0.7·numel is whole in every block, so the
    paper's per-block count and msp's cumulative exact count agree) and N:M with N ≠ M − N (msp's N counts kept
    weights), over 4 column blocks of 64."""
    w, x = layer(3, rows=40)
    got = SparseGPTPruner(blocksize=64).prune_weight(w, msp_stats(x, need_hessian=True), sparsity, Pattern.parse(pattern))
    ref = sparsegpt_reference(w, x, sparsity, n, m, blocksize=64)
    assert int((got == 0).sum()) == int((ref == 0).sum()) == int(round(sparsity * w.numel()))
    assert torch.equal(got != 0, ref != 0), f"masks differ in {int(((got != 0) != (ref != 0)).sum())} weights"
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


DEAD_INPUTS_DIFFER = (
    "msp's H is ΣXᵀX (msp/pruners/stats.py), not the paper's 2XᵀX/n, and msp/pruners/sparsegpt.py:"
    "inverse_hessian_cholesky sets a dead input's H_jj to 1 on that unnormalised scale: the dead diagonal then weighs "
    "n/2 times less in λ = percdamp·mean(diag H) than in the paper, so λ (relative to H) is slightly smaller whenever "
    "an input is dead (here 32 of 256 inputs dead, 1024 tokens: λ 2.2% smaller; a few mask entries and the kept "
    "weights differ). It matters only for inputs that are exactly 0 on every calibration token"
)
DEAD = tuple(range(5, 256, 8))  # one input in eight never fires


@pytest.mark.xfail(strict=True, reason=DEAD_INPUTS_DIFFER)
@pytest.mark.parametrize("pattern,sparsity,n,m", CASES, ids=[c[0] for c in CASES])
def test_sparsegpt_with_dead_inputs_equals_the_textbook(pattern, sparsity, n, m):
    _sparsegpt_vs_reference(1, 64, DEAD, pattern, sparsity, n, m)


@pytest.mark.parametrize("pattern,sparsity,n,m", CASES, ids=[c[0] for c in CASES])
def test_sparsegpt_with_dead_inputs_equals_the_textbook_on_msps_hessian_scale(pattern, sparsity, n, m):
    """The difference above is only that scale: the textbook run with H = ΣXᵀX (= n/2 · 2XᵀX/n) agrees with msp."""
    _sparsegpt_vs_reference(1, 64, DEAD, pattern, sparsity, n, m, hessian_scale=1024 / 2)
