"""SparseGPT (Frantar & Alistarh 2023): one-shot OBS pruning with weight reconstruction.

For a layer W (out × in) with input Hessian H = XᵀX, columns are processed left to right in blocks of
``blocksize``. Inside a block the mask is chosen adaptively from the OBS saliency w²/[H⁻¹]²_jj (eq. 3 of the
paper, with [H⁻¹] the upper Cholesky factor of the inverse Hessian, as in the paper's Algorithm 1), and each
removed weight's error is spread over the not-yet-processed columns: W[:, j:] -= (err/d_j) · Hinv[j, j:].
N:M masks are chosen every M columns inside the same sweep. Optional joint quantization (GPTQ-style,
per output channel, asymmetric min-max) rounds the kept weights inside the same sweep.
"""
from __future__ import annotations

import math

import torch

from msp.masks import Pattern, lowest_k_mask
from msp.pruners.base import Pruner
from msp.pruners.stats import LayerStats


def minmax_quant_params(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-row asymmetric scale and zero point for ``bits``-bit quantization. weight: (out, in)."""
    maxq = 2**bits - 1
    wmin = weight.min(dim=1).values.clamp(max=0)
    wmax = weight.max(dim=1).values.clamp(min=0)
    same = wmin == wmax
    wmin[same], wmax[same] = -1.0, 1.0
    scale = (wmax - wmin) / maxq
    zero = torch.round(-wmin / scale)
    return scale, zero, maxq


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dampened H (dead inputs set to identity), the upper Cholesky factor of H⁻¹, and the dead-input mask."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        # an ill-conditioned H: raise the dampening until it factorises (bounded number of tries)
        for factor in (10.0, 100.0, 1000.0):
            h.diagonal().add_(damp * factor)
            lower, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                break
        else:
            raise
    hinv = torch.cholesky_inverse(lower)
    return h, torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    saliency: str = "obs",
    bits: int | None = None,
) -> torch.Tensor:
    """Return the pruned (and optionally quantized) weight; ``weight`` itself is not modified.

    weight: (out, in) any float dtype; hessian: (in, in) float32 Σ XᵀX. ``saliency``: ``obs`` = w²/d²
    (SparseGPT) or ``isc`` = w²·(H_jj + 1/d²) (arXiv 2310.09499). Unstructured masks hit the layer's exact
    weight count: each block removes the cumulative target minus what earlier blocks removed.
    """
    if saliency not in ("obs", "isc"):
        raise ValueError(f"unknown SparseGPT saliency {saliency!r}; valid: obs, isc")
    pattern = pattern.for_layer(sparsity)
    rows, cols = weight.shape
    w = weight.detach().to(torch.float32).clone()
    h, hinv, dead = inverse_hessian_cholesky(hessian.to(w.device, torch.float32), percdamp)
    w[:, dead] = 0
    hdiag = torch.diag(h)
    qparams = minmax_quant_params(w, bits) if bits else None

    total_to_prune = int(math.floor(sparsity * rows * cols + 0.5)) if pattern.kind == "unstructured" else 0
    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)

        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            target = int(math.floor(sparsity * rows * i2 + 0.5)) if i2 < cols else total_to_prune
            k = max(0, min(target - pruned_so_far, w1.numel()))
            if k:
                sal = _saliency(w1, d1, hdiag[i1:i2], saliency)
                prune1 = lowest_k_mask(sal.reshape(1, -1), k).view_as(w1)  # = a stable sort's first k, without sorting
            pruned_so_far += k

        for i in range(count):
            col = w1[:, i]
            d = d1[i]
            if pattern.kind == "nm" and i % pattern.m == 0:
                sal = _saliency(w1[:, i : i + pattern.m], d1[i : i + pattern.m], hdiag[i1 + i : i1 + i + pattern.m], saliency)
                drop = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
                prune1[:, i : i + pattern.m].scatter_(1, drop, True)
            # masked_fill / where instead of boolean indexing: no data-dependent shapes, so no host sync on a GPU
            q = col.masked_fill(prune1[:, i], 0.0)
            if qparams is not None:
                scale, zero, maxq = qparams
                q = torch.where(prune1[:, i], q, quantize(q, scale, zero, maxq))
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)  # w1[:, i:] -= err ⊗ Hinv[i, i:]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)


def _saliency(w: torch.Tensor, d: torch.Tensor, hdiag: torch.Tensor, kind: str) -> torch.Tensor:
    obs = w * w / (d * d).unsqueeze(0)
    if kind == "obs":
        return obs
    return w * w * (hdiag.unsqueeze(0) + 1.0 / (d * d).unsqueeze(0))


class SparseGPTPruner(Pruner):
    name = "sparsegpt"
    needs_hessian = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, saliency: str = "obs", bits: int | None = None):
        if saliency not in ("obs", "isc"):
            raise ValueError(f"pruner.saliency={saliency!r} is unknown; valid: obs, isc")
        if bits is not None and bits not in (2, 3, 4, 8):
            raise ValueError(f"pruner.bits={bits} is unsupported; valid: null (no quantization), 2, 3, 4, 8")
        if not 0 <= percdamp < 1:
            raise ValueError(f"pruner.percdamp={percdamp} must be in [0, 1), e.g. 0.01")
        self.blocksize, self.percdamp, self.saliency, self.bits = int(blocksize), float(percdamp), saliency, bits

    def prune_weight(self, weight, stats, sparsity, pattern):
        if stats is None or stats.hessian is None:
            raise ValueError("SparseGPT needs the input Hessian XᵀX; no calibration statistics were collected")
        return sparsegpt_prune(
            weight, stats.hessian, sparsity, pattern, self.blocksize, self.percdamp, self.saliency, self.bits
        )

    def __repr__(self):
        return f"SparseGPTPruner(blocksize={self.blocksize}, percdamp={self.percdamp}, saliency={self.saliency}, bits={self.bits})"
