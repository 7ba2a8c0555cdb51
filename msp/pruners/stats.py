"""Calibration statistics of one Linear layer's inputs, accumulated in float32 whatever the weight dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Running statistics of the inputs X (tokens × in_features) seen by one Linear layer.

    ``col_sq_norm[j] = Σ_t X[t, j]²`` (Wanda's ‖X_j‖₂²); ``hessian = Σ_t X[t]ᵀ X[t]`` (SparseGPT's H up to a
    constant factor, which cancels in the OBS update and in the relative dampening).
    """

    in_features: int
    need_hessian: bool
    tokens: int = 0
    col_sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.add_update(input_update(inputs, self.need_hessian))

    def add_update(self, update: "StatsUpdate") -> None:
        """Add one batch's contribution (computed once by :func:`input_update`, possibly shared by several
        layers that read the same input tensor, e.g. q/k/v or gate/up)."""
        if self.col_sq_norm is None:
            self.col_sq_norm = torch.zeros(self.in_features, dtype=torch.float32, device=update.col_sq.device)
        self.col_sq_norm += update.col_sq
        if self.need_hessian:
            if update.xtx is None:
                raise ValueError("this layer collects the Hessian XᵀX but the update was computed without it")
            if self.hessian is None:
                self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=update.xtx.device)
            self.hessian += update.xtx
        self.tokens += update.tokens


@dataclass
class StatsUpdate:
    """One batch's contribution to :class:`LayerStats`: Σ_t X_tj² (in,), XᵀX (in, in) or None, token count."""

    col_sq: torch.Tensor
    xtx: torch.Tensor | None
    tokens: int


def input_update(inputs: torch.Tensor, need_hessian: bool) -> StatsUpdate:
    """The statistics of one batch of Linear inputs (…, in), in float32 whatever the input dtype."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
    xtx = x.t() @ x if need_hessian else None
    # the Hessian's diagonal is Σ_t X_tj² already: reuse it instead of another pass over X
    col_sq = xtx.diagonal().clone() if xtx is not None else (x * x).sum(dim=0)
    return StatsUpdate(col_sq, xtx, x.shape[0])
