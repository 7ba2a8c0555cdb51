from __future__ import annotations

import torch

from msp.pruners.base import ScorePruner
from msp.pruners.stats import LayerStats


def wanda_scores(weight: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023, eq. 1): S_ij = |W_ij| · ‖X_j‖₂, compared within each output row i.

    weight: (out, in); col_sq_norm: (in,) = Σ_t X_tj².
    """
    return weight.detach().abs().to(torch.float32) * col_sq_norm.to(weight.device).sqrt().unsqueeze(0)


class WandaPruner(ScorePruner):
    name = "wanda"

    def scores(self, weight, stats: LayerStats | None):
        if stats is None or stats.col_sq_norm is None:
            raise ValueError("Wanda needs calibration statistics (input column norms); none were collected")
        return wanda_scores(weight, stats.col_sq_norm)
