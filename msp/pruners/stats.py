"""Calibration statistics of one Linear layer's inputs, accumulated in float32 whatever the weight dtype.

float32 matters for half-precision models: an fp16 activation of 300 is representable (fp16's largest value is
65504), its square is not, so Σx² and XᵀX of an fp16 model would overflow to inf if they were accumulated in the
model's dtype (tests/test_numerics.py). :func:`check_stats` checks the accumulated statistics once per block.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from msp.numerics import Hint, check_all_finite


@dataclass
class LayerStats:
    """Running statistics of the inputs X (tokens × in_features) seen by one Linear layer.

    ``col_sq_norm[j] = Σ_t X[t, j]²`` (Wanda's ‖X_j‖₂²); ``hessian = Σ_t X[t]ᵀ X[t]`` (SparseGPT's H up to a
    constant factor, which cancels in the OBS update and in the relative dampening). ``name``: the layer's full
    name (``model.layers.3.mlp.up_proj``) when the pipeline built the statistics, for log lines and errors.
    """

    in_features: int
    need_hessian: bool
    tokens: int = 0
    col_sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    name: str | None = None

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


def check_stats(stats: Mapping[str, LayerStats], *, stage: str, block: int | None = None, hint: Hint = None) -> None:
    """:class:`msp.numerics.NonFiniteError` naming the first layer whose accumulated Σx² or XᵀX holds NaN or inf
    (``stats``: local layer name → statistics; the error names ``LayerStats.name`` when set). One host
    synchronisation for all of them."""
    items = []
    for local, st in stats.items():
        layer = st.name or local
        items.append((layer, "the input statistics Σx² (the column norms)", st.col_sq_norm))
        items.append((layer, "the input statistics XᵀX (the Hessian)", st.hessian))
    check_all_finite(items, stage=stage, block=block, hint=hint)
