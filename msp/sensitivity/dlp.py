"""DLP's per-block Wanda score (Chen et al., ICML 2025; the map to sparsities is
:func:`msp.allocation.layerwise.dlp_sparsities`).

For decoder block b with Linear layers ℓ ∈ b, the Wanda metric is A_ij = |W_ij| · ‖X_j‖₂ (X: the layer's
calibration inputs, propagated through the *dense* blocks). The block's score is its mean (or, as in the paper,
median) over every A_ij of every Linear of the block:

    A_b = mean_{ℓ ∈ b, i, j} A_ij      (``reduction="mean"``; ``"median"`` takes the median instead).

The model is streamed block by block through :func:`msp.pipeline.sequential_pass` with a callback that changes
nothing, exactly like OWL's statistics (:mod:`msp.sensitivity.owl`): one statistics pass, no new block loop.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from msp.allocation.layerwise import dlp_block_score
from msp.pipeline import sequential_pass
from msp.pruners.wanda import wanda_scores

log = logging.getLogger(__name__)


def dlp_block_scores(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    reduction: str = "mean",
    batch_size: int = 4,
    store_device: torch.device | None = None,
) -> dict[int, float]:
    """A_b for every decoder block b (block index → score ≥ 0). windows: (num_windows, seqlen) token ids."""
    if windows is None or windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError("DLP needs calibration windows (nsamples, seqlen); set data.nsamples >= 1")
    dlp_block_score([torch.zeros(1)], reduction)  # an unknown reduction fails here, before the pass
    scores: dict[int, float] = {}

    def on_block(index, prefix, block, linears, stats):
        metrics = [wanda_scores(lin.weight.data, stats[name].col_sq_norm) for name, lin in linears.items()]
        scores[index] = dlp_block_score(metrics, reduction)
        return False  # nothing changed: reuse this block's outputs

    sequential_pass(model, windows, device, on_block, collect_stats=True, need_hessian=False, batch_size=batch_size,
                    store_device=store_device, desc="dlp scores")
    log.info("DLP block scores (%s): %s", reduction, ", ".join(f"{s:.4g}" for _, s in sorted(scores.items())))
    return scores


__all__ = ["dlp_block_scores"]
