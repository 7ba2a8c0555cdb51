"""OWL layerwise outlier ratio (Yin et al. 2023, "Outlier Weighed Layerwise sparsity").

For decoder block b with Linear layers ℓ ∈ b, the Wanda scores are A_ij = |W_ij| · ‖X_j‖₂ (X: the layer's
calibration inputs). The block's outlier ratio is the share of scores above M times their mean over the
whole block:

    D_b = #{A_ij > M · mean_b(A)} / #{A_ij},   over all A_ij of all Linear layers of block b.

The dense model is streamed block by block through :func:`msp.pipeline.sequential_pass`; the callback
changes nothing (returns False), so each block's first pass outputs are reused as the next block's inputs.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from msp.pipeline import sequential_pass
from msp.pruners.wanda import wanda_scores
from msp.sensitivity.common import SensitivityError

log = logging.getLogger(__name__)


def outlier_ratio(scores: list[torch.Tensor], M: float) -> float:
    """Share of all entries of ``scores`` above ``M`` × their joint mean (one block's D_b)."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    above = sum(int((s > M * mean).sum()) for s in scores)
    return above / total


def owl_outlier_ratios(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    M: float = 5.0,
    batch_size: int = 4,
    store_device: torch.device | None = None,
) -> dict[int, float]:
    """D_b for every decoder block b (block index → ratio in [0, 1]). windows: (num_windows, seqlen) ids."""
    if not float(M) > 0:
        raise SensitivityError(f"OWL M={M}: the outlier threshold multiple must be positive, e.g. allocation.M=5")
    if windows is None or windows.ndim != 2 or windows.shape[0] == 0:
        raise SensitivityError("OWL needs calibration windows (nsamples, seqlen); set data.nsamples >= 1")
    ratios: dict[int, float] = {}

    def on_block(index, prefix, block, linears, stats):
        scores = [wanda_scores(lin.weight.data, stats[name].col_sq_norm) for name, lin in linears.items()]
        ratios[index] = outlier_ratio(scores, float(M))
        return False  # nothing changed: reuse this block's outputs

    sequential_pass(model, windows, device, on_block, collect_stats=True, need_hessian=False, batch_size=batch_size,
                    store_device=store_device, desc="owl outliers")
    log.info("OWL outlier ratios (M=%s): %s", M, ", ".join(f"{r:.4f}" for _, r in sorted(ratios.items())))
    return ratios
