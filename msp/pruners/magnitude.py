from __future__ import annotations

import torch

from msp.pruners.base import ScorePruner


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij|."""
    return weight.detach().abs().to(torch.float32)


class MagnitudePruner(ScorePruner):
    """Remove the smallest |W| of every output row. Needs no calibration data."""

    name = "magnitude"
    needs_calibration = False

    def scores(self, weight, stats=None):
        return magnitude_scores(weight)
