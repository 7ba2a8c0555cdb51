"""The one small interface every pruner implements.

A pruner turns (weight, input statistics, sparsity, pattern) into a new dense weight with zeros. It never
chooses its own sparsity: the allocation does. Score-based pruners also expose ``scores`` so that the
evolutionary search can build a mask at any level by thresholding one ranking, without re-pruning.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from msp.masks import Pattern, mask_from_scores
from msp.pruners.stats import LayerStats


class Pruner(ABC):
    name: str = "base"
    #: does ``prune_weight`` need the input Hessian XᵀX (and not just column norms)?
    needs_hessian: bool = False
    #: does the pruner use calibration data at all?
    needs_calibration: bool = True

    def new_stats(self, in_features: int) -> LayerStats:
        return LayerStats(in_features=in_features, need_hessian=self.needs_hessian)

    @abstractmethod
    def prune_weight(
        self, weight: torch.Tensor, stats: LayerStats | None, sparsity: float, pattern: Pattern
    ) -> torch.Tensor:
        """Return the pruned weight (same shape, dtype and device as ``weight``), dense with zeros."""

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor | None:
        """Importance of every weight (higher = keep), or None when the pruner is not score-based."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScorePruner(Pruner):
    """A pruner whose mask is the top of a fixed per-weight score (magnitude, Wanda)."""

    def prune_weight(self, weight, stats, sparsity, pattern):
        mask = mask_from_scores(self.scores(weight, stats), sparsity, pattern)
        return weight * mask.to(weight.dtype)
