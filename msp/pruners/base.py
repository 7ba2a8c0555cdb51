"""The one small interface every pruner implements.

A pruner turns (weight, input statistics, sparsity, pattern) into a new dense weight with zeros. It never
chooses its own sparsity: the allocation does. Two optional capabilities are declared here, so that callers
(the evolutionary search) ask the interface instead of probing the class:

* ``score_based``: the mask is the top of a fixed per-weight score (:class:`ScorePruner`: magnitude, Wanda),
  so the search builds a mask at any level by thresholding one ranking of ``scores``, without re-pruning;
* ``prune_weight_levels``: the pruned weight at several sparsities; one ``prune_weight`` per level unless a
  pruner shares work between levels (SparseGPT: one stacked sweep).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

from msp.masks import Pattern, mask_from_scores
from msp.pruners.stats import LayerStats


class Pruner(ABC):
    name: str = "base"
    #: does ``prune_weight`` need the input Hessian XᵀX (and not just column norms)?
    needs_hessian: bool = False
    #: does the pruner use calibration data at all?
    needs_calibration: bool = True
    #: is the mask the top of ``scores`` (then any level's mask is a threshold of one ranking)?
    score_based: bool = False

    @abstractmethod
    def prune_weight(
        self, weight: torch.Tensor, stats: LayerStats | None, sparsity: float, pattern: Pattern
    ) -> torch.Tensor:
        """Return the pruned weight (same shape, dtype and device as ``weight``), dense with zeros."""

    def prune_weight_levels(
        self, weight: torch.Tensor, stats: LayerStats | None, sparsities: Sequence[float], pattern: Pattern
    ) -> Iterable[torch.Tensor]:
        """The pruned weight at each of ``sparsities``, in order (the search's variant store). The default
        prunes one level at a time, lazily, so only one pruned copy is alive while the caller stores it."""
        return (self.prune_weight(weight, stats, s, pattern) for s in sparsities)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScorePruner(Pruner):
    """A pruner whose mask is the top of a fixed per-weight score (magnitude, Wanda)."""

    score_based = True

    @abstractmethod
    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of every weight (higher = keep), same shape as ``weight``, float32."""

    def prune_weight(self, weight, stats, sparsity, pattern):
        mask = mask_from_scores(self.scores(weight, stats), sparsity, pattern)
        return weight * mask.to(weight.dtype)
