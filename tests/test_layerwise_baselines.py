"""DLP's importance → sparsity map and ATP's linear ramp with its β grid search, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from msp.allocation.base import AllocationError
from msp.allocation.budget import fit_to_budget, weighted_mean
from msp.allocation.layerwise import (
    atp_max_beta,
    atp_ramp,
    beta_grid,
    check_atp_grid,
    default_beta_grid,
    dlp_block_score,
    dlp_importance,
    dlp_sparsities,
    search_beta,
)

# ------------------------------------------------------------------------------------------------ DLP


def test_dlp_symmetric_scores_give_target_plus_minus_alpha():
    # A = 1, 2, 3, 4 (Σ 10) → I = 0.9, 0.8, 0.7, 0.6 → scaled to [0, 0.3]: 0.3, 0.2, 0.1, 0 (mean 0.15)
    # keep = scaled − 0.15 + 0.3 → 0.45, 0.35, 0.25, 0.15 → sparsity 0.55, 0.65, 0.75, 0.85
    scores = {"b0": 1.0, "b1": 2.0, "b2": 3.0, "b3": 4.0}
    assert dlp_importance(scores) == pytest.approx({"b0": 0.9, "b1": 0.8, "b2": 0.7, "b3": 0.6})
    got = dlp_sparsities(scores, target=0.7, alpha=0.15)
    assert got == pytest.approx({"b0": 0.55, "b1": 0.65, "b2": 0.75, "b3": 0.85}, abs=1e-12)


def test_dlp_asymmetric_scores_by_hand():
    # A = 1, 1, 4 (Σ 6) → I = 5/6, 5/6, 1/3 → scaled (I − 1/3)/0.5 · 0.3 = 0.3, 0.3, 0 (mean 0.2)
    # s = t + 0.2 − scaled = 0.4, 0.4, 0.7 at t = 0.5: the band is [t − 0.1, t + 0.2], width 2α, mean t
    got = dlp_sparsities({"a": 1.0, "b": 1.0, "c": 4.0}, target=0.5, alpha=0.15)
    assert got == pytest.approx({"a": 0.4, "b": 0.4, "c": 0.7}, abs=1e-12)
    assert sum(got.values()) / 3 == pytest.approx(0.5)


def test_dlp_equal_scores_are_uniform_and_unequal_sizes_fit_the_budget():
    assert dlp_sparsities({"a": 2.0, "b": 2.0}, target=0.6) == {"a": 0.6, "b": 0.6}
    raw = dlp_sparsities({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, target=0.7)
    params = {"a": 100, "b": 100, "c": 100, "d": 700}
    final = fit_to_budget(raw, params, 0.7, (0.0, 0.99))
    assert weighted_mean(final, params) == pytest.approx(0.7, abs=1e-12)
    gaps = [final[u] - raw[u] for u in raw]
    assert max(gaps) - min(gaps) < 1e-12  # one common shift: DLP's spacing is kept


def test_dlp_block_score_mean_and_median():
    metrics = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([10.0])]
    assert dlp_block_score(metrics, "mean") == pytest.approx(4.0)  # (1 + 2 + 3 + 10) / 4: size-weighted
    assert dlp_block_score(metrics, "median") == 2.0  # torch's lower median of [1, 2, 3, 10]
    with pytest.raises(AllocationError, match="allocation.reduction"):
        dlp_block_score(metrics, "max")


def test_dlp_bad_input_names_the_fix():
    with pytest.raises(AllocationError, match="allocation.alpha"):
        dlp_sparsities({"a": 1.0, "b": 2.0}, 0.5, alpha=0.6)
    with pytest.raises(AllocationError, match="non-negative"):
        dlp_sparsities({"a": -1.0, "b": 2.0}, 0.5)
    with pytest.raises(AllocationError, match="every DLP score is 0"):
        dlp_sparsities({"a": 0.0, "b": 0.0}, 0.5)
    with pytest.raises(AllocationError, match="sparsity"):
        dlp_sparsities({"a": 1.0}, 1.2)


# ------------------------------------------------------------------------------------------------ ATP


def test_atp_ramp_is_exactly_linear_and_centred():
    ramp = atp_ramp(5, target=0.6, beta=0.02)
    assert ramp == pytest.approx([0.56, 0.58, 0.60, 0.62, 0.64], abs=1e-15)
    ramp = atp_ramp(30, target=0.7, beta=0.006)
    diffs = [b - a for a, b in zip(ramp, ramp[1:])]
    assert max(abs(d - 0.006) for d in diffs) < 1e-15
    assert sum(ramp) / 30 == pytest.approx(0.7, abs=1e-15)
    assert atp_ramp(1, 0.5, 0.03) == [0.5]


def test_atp_ramp_fitted_is_on_budget_and_stays_linear():
    ramp = atp_ramp(6, target=0.7, beta=0.01)
    units = [f"model.layers.{i}" for i in range(6)]
    raw = dict(zip(units, ramp))
    equal = {u: 1000 for u in units}
    assert fit_to_budget(raw, equal, 0.7) == pytest.approx(raw, abs=1e-12)  # equal blocks: already on budget
    unequal = {u: 1000 * (i + 1) for i, u in enumerate(units)}
    final = fit_to_budget(raw, unequal, 0.7)
    assert weighted_mean(final, unequal) == pytest.approx(0.7, abs=1e-12)
    values = [final[u] for u in units]
    assert max(abs((b - a) - 0.01) for a, b in zip(values, values[1:])) < 1e-12


def test_beta_grid_default():
    grid = beta_grid()
    assert len(grid) == 16 and grid[0] == 0.0 and grid[-1] == 0.03 and grid[1] == 0.002
    assert beta_grid(0.01, 0.01, 0.002) == [0.01]
    with pytest.raises(AllocationError, match="beta_grid"):
        beta_grid(0.0, 0.03, 0.0)


def test_atp_grid_leaving_bounds_is_one_error_naming_the_fix():
    # 30 blocks at t = 0.9: β = 0.03 spans [0.465, 1.335]; largest β inside [0, 0.99] = 2 · 0.09 / 29
    assert atp_max_beta(30, 0.9) == pytest.approx(2 * 0.09 / 29)
    with pytest.raises(AllocationError) as err:
        check_atp_grid(30, 0.9, beta_grid())
    msg = str(err.value)
    assert "\n" not in msg and "β=0.03" in msg and "0.006207" in msg and "allocation.beta_grid=[0.0, 0.0062, 0.002]" in msg
    check_atp_grid(18, 0.7, beta_grid())  # Gemma's 18 blocks: 0.7 ± 0.255 fits
    with pytest.raises(AllocationError, match=">= 0"):
        check_atp_grid(18, 0.7, [-0.01])


def test_default_grid_is_cut_at_the_largest_feasible_beta():
    # 30 blocks (SmolLM2) at 0.7: β = 0.03 would span [0.265, 1.135]; β_max = 2 · 0.29 / 29 = 0.02
    grid = default_beta_grid(30, 0.7)
    assert grid == beta_grid(0.0, 0.02, 0.002)
    assert default_beta_grid(18, 0.7) == beta_grid()  # Gemma: the whole default grid fits
    assert default_beta_grid(30, 0.7, (0.0, 0.99))[-1] <= atp_max_beta(30, 0.7)


def test_search_picks_the_minimiser_and_records_every_score():
    calls = []

    def score(beta, ramp):
        calls.append((beta, ramp))
        return (beta - 0.0125) ** 2

    found = search_beta(18, 0.6, score)
    assert found.beta == 0.012 and found.sparsities == atp_ramp(18, 0.6, 0.012)
    assert list(found.scores) == beta_grid() and found.scores[0.012] == min(found.scores.values())
    assert [c[0] for c in calls] == beta_grid() and calls[3][1] == atp_ramp(18, 0.6, 0.006)


def test_search_ties_nan_and_bounds_before_scoring():
    assert search_beta(10, 0.5, lambda b, r: 1.0).beta == 0.0  # ties: the smallest β
    scores = {0.0: float("nan"), 0.002: 3.0, 0.004: 2.0}
    found = search_beta(10, 0.5, lambda b, r: scores[b], grid=list(scores))
    assert found.beta == 0.004 and found.scores[0.0] == math.inf
    with pytest.raises(AllocationError, match="NaN/inf"):
        search_beta(10, 0.5, lambda b, r: float("nan"), grid=[0.0, 0.002])
    calls = []
    with pytest.raises(AllocationError, match="largest β that fits"):
        search_beta(30, 0.9, lambda b, r: calls.append(b) or 0.0, grid=beta_grid())
    assert calls == []  # refused before any (expensive) scoring


# ------------------------------------------------------------------------------------ DLP on a tiny model


def _reference_block_scores(model, windows, reduction):
    """Independent of the pipeline: one dense forward of the whole model, hooks keep every Linear's inputs."""
    from msp.models import find_blocks, prunable_layers

    prefix, _ = find_blocks(model)
    from textbook import linear_inputs

    layers = prunable_layers(model)
    inputs = linear_inputs(model, windows)
    per_block: dict[int, list[torch.Tensor]] = {}
    for n, l in layers.items():
        x = inputs[n].double()
        metric = l.weight.detach().double().abs() * (x * x).sum(0).sqrt().unsqueeze(0)
        per_block.setdefault(int(n[len(prefix) + 1 :].split(".")[0]), []).append(metric.reshape(-1))
    return {b: float(torch.cat(m).mean() if reduction == "mean" else torch.cat(m).float().median()) for b, m in per_block.items()}


@pytest.mark.parametrize("reduction", ["mean", "median"])
def test_dlp_scores_match_a_whole_model_reference_and_land_on_budget(tiny_llama, reduction, one_thread):
    from msp.models import prunable_layers
    from msp.sensitivity.dlp import dlp_block_scores

    model = tiny_llama.model
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    got = dlp_block_scores(model, windows, torch.device("cpu"), reduction=reduction, batch_size=2)
    want = _reference_block_scores(model, windows, reduction)
    assert got == pytest.approx(want, rel=1e-4)
    raw = dlp_sparsities({f"model.layers.{b}": s for b, s in got.items()}, target=0.7)
    layers = prunable_layers(model)
    per_layer = {n: raw[f"model.layers.{n.split('.')[2]}"] for n in layers}  # every Linear gets its block's value
    params = {n: l.weight.numel() for n, l in layers.items()}
    final = fit_to_budget(per_layer, params, 0.7)
    assert weighted_mean(final, params) == pytest.approx(0.7, abs=1e-12)
    with pytest.raises(AllocationError, match="allocation.reduction"):
        dlp_block_scores(model, windows, torch.device("cpu"), reduction="max")
