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
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        if self.col_sq_norm is None:
            self.col_sq_norm = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
        self.col_sq_norm += (x * x).sum(dim=0)
        if self.need_hessian:
            if self.hessian is None:
                self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
            self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def to(self, device: torch.device) -> "LayerStats":
        for name in ("col_sq_norm", "hessian"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self
