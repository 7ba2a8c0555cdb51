"""SparseGPT (Frantar & Alistarh 2023): one-shot OBS pruning with weight reconstruction.

For a layer W (out × in) with input Hessian H = XᵀX, columns are processed left to right in blocks of
``blocksize``. Inside a block the mask is chosen adaptively from the OBS saliency w²/[H⁻¹]²_jj (eq. 3 of the
paper, with [H⁻¹] the upper Cholesky factor of the inverse Hessian, as in the paper's Algorithm 1), and each
removed weight's error is spread over the not-yet-processed columns: W[:, j:] -= (err/d_j) · Hinv[j, j:].
N:M masks are chosen every M columns inside the same sweep. Optional joint quantization (GPTQ-style,
per output channel, asymmetric min-max) rounds the kept weights inside the same sweep.
"""
from __future__ import annotations

import logging
import math

import torch

from msp.errors import MspError
from msp.masks import Pattern, lowest_k_mask
from msp.pruners.base import Pruner

log = logging.getLogger(__name__)


class SparseGPTError(MspError):
    """SparseGPT cannot prune a layer as configured (a Hessian that stays indefinite); the message names the fix."""


#: after a failed factorisation, the dampening added to the diagonal on each retry, as multiples of the first
#: one: effective dampening 11×, 111×, 1111× ``percdamp`` (bounded: then :class:`SparseGPTError`)
RETRY_DAMPENING = (10.0, 100.0, 1000.0)


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


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dampened H (dead inputs set to identity), the upper Cholesky factor of H⁻¹, and the dead-input mask.

    H + λ·I with λ = ``percdamp`` · mean(diag H). An H that is not positive definite even so (rank-deficient
    calibration inputs in float32, outlier-heavy models such as Mistral's) is retried with more dampening, a
    bounded number of times (:data:`RETRY_DAMPENING`), each retry logged as a warning naming ``layer`` and the
    dampening; when every retry fails, :class:`SparseGPTError` names the layer and ``pruner.percdamp``. With
    ``percdamp=0`` the retries start from 1% of mean(diag H).
    """
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(h))
    damp = percdamp * mean_diag
    h.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        # an indefinite or ill-conditioned H: raise the dampening until it factorises (bounded number of tries)
        step = damp if percdamp > 0 else 0.01 * mean_diag
        added = percdamp
        name = layer or "a layer"
        for factor in RETRY_DAMPENING:
            h.diagonal().add_(step * factor)
            added += (percdamp if percdamp > 0 else 0.01) * factor
            log.warning("SparseGPT: the Hessian of %s is not positive definite after dampening; retrying with dampening "
                        "%.4g x mean(diag H) (pruner.percdamp=%g)", name, added, percdamp)
            lower, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                break
        else:
            suggest = 0.1 if percdamp < 0.1 else min(0.9, round(percdamp * 3, 2))
            raise SparseGPTError(
                f"SparseGPT: the Hessian XᵀX of {name} is not positive definite even with dampening {added:.4g} x mean(diag H) "
                f"(pruner.percdamp={percdamp} and {len(RETRY_DAMPENING)} retries); raise the dampening (e.g. pruner.percdamp={suggest:g}) "
                f"or calibrate on more tokens (data.nsamples)"
            )
    hinv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:  # H factorised but its inverse is too ill-conditioned to
        raise SparseGPTError(f"SparseGPT: the inverse Hessian of {layer or 'a layer'} is not positive definite in float32 "
                             f"(pruner.percdamp={percdamp}); raise the dampening (e.g. pruner.percdamp=0.1)")
    return h, upper, dead


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
    layer: str | None = None,
) -> torch.Tensor:
    """Return the pruned (and optionally quantized) weight; ``weight`` itself is not modified.

    weight: (out, in) any float dtype; hessian: (in, in) float32 Σ XᵀX. ``saliency``: ``obs`` = w²/d²
    (SparseGPT) or ``isc`` = w²·(H_jj + 1/d²) (arXiv 2310.09499). Unstructured masks hit the layer's exact
    weight count: each block removes the cumulative target minus what earlier blocks removed. ``layer``: the
    layer's name, for the dampening warnings and errors (:func:`inverse_hessian_cholesky`).
    """
    return sparsegpt_prune_levels(weight, hessian, [sparsity], pattern, blocksize, percdamp, saliency, bits, layer)[0]


# levels swept together hold at most this many float32 weights (512 MiB); more levels are swept in chunks
_LEVELS_MAX_ELEMENTS = 2**27


@torch.no_grad()
def sparsegpt_prune_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsities: list[float],
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    saliency: str = "obs",
    bits: int | None = None,
    layer: str | None = None,
) -> list[torch.Tensor]:
    """:func:`sparsegpt_prune` at several sparsities in one column sweep.

    The inverse-Hessian factor depends on the inputs only, and every row of W is reconstructed independently
    given it, so the L copies of W (one per level) are stacked into one (L·out, in) matrix and swept once: the
    factorisation is shared and the per-column loop runs once instead of L times. Each level keeps its own mask
    (its own per-block removal count, or its own N for mixed N:M).
    """
    if saliency not in ("obs", "isc"):
        raise ValueError(f"unknown SparseGPT saliency {saliency!r}; valid: obs, isc")
    sparsities = [float(s) for s in sparsities]
    if not sparsities:
        return []
    rows, cols = weight.shape
    w0 = weight.detach().to(torch.float32).clone()
    h, hinv, dead = inverse_hessian_cholesky(hessian.to(w0.device, torch.float32), percdamp, layer)
    w0[:, dead] = 0
    per_chunk = max(1, _LEVELS_MAX_ELEMENTS // max(1, rows * cols))
    out: list[torch.Tensor] = []
    for c in range(0, len(sparsities), per_chunk):
        chunk = sparsities[c : c + per_chunk]
        swept = _sweep(w0, h, hinv, chunk, pattern, blocksize, saliency, bits)
        out.extend(swept[j * rows : (j + 1) * rows].to(weight.dtype) for j in range(len(chunk)))
    return out


def _sweep(w0, h, hinv, sparsities, pattern, blocksize, saliency, bits) -> torch.Tensor:
    """One SparseGPT column sweep over the stacked levels; returns the (L·out, in) float32 result."""
    rows, cols = w0.shape
    patterns = [pattern.for_layer(s) for s in sparsities]
    levels = len(sparsities)
    w = w0.repeat(levels, 1)
    hdiag = torch.diag(h)
    qparams = None
    if bits:
        scale, zero, maxq = minmax_quant_params(w0, bits)
        qparams = (scale.repeat(levels), zero.repeat(levels), maxq)
    part = [slice(j * rows, (j + 1) * rows) for j in range(levels)]
    unstructured = [j for j, p in enumerate(patterns) if p.kind == "unstructured"]
    nm = [j for j, p in enumerate(patterns) if p.kind == "nm"]
    total = {j: int(math.floor(sparsities[j] * rows * cols + 0.5)) for j in unstructured}
    pruned_so_far = dict.fromkeys(unstructured, 0)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)

        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for j in unstructured:
            target = int(math.floor(sparsities[j] * rows * i2 + 0.5)) if i2 < cols else total[j]
            k = max(0, min(target - pruned_so_far[j], rows * count))
            if k:
                sal = _saliency(w1[part[j]], d1, hdiag[i1:i2], saliency)
                prune1[part[j]] = lowest_k_mask(sal.reshape(1, -1), k).view(rows, count)  # a stable sort's first k
            pruned_so_far[j] += k

        for i in range(count):
            col = w1[:, i]
            d = d1[i]
            for j in nm:
                m, drop_n = patterns[j].m, patterns[j].m - patterns[j].n
                if i % m == 0 and drop_n:
                    sal = _saliency(w1[part[j], i : i + m], d1[i : i + m], hdiag[i1 + i : i1 + i + m], saliency)
                    drop = torch.sort(sal, dim=1, stable=True).indices[:, :drop_n]
                    prune1[part[j], i : i + m].scatter_(1, drop, True)
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
    return w


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
            weight, stats.hessian, sparsity, pattern, self.blocksize, self.percdamp, self.saliency, self.bits, stats.name
        )

    def prune_weight_levels(self, weight, stats, sparsities, pattern):
        """Every level of the search's variant store in one shared sweep (:func:`sparsegpt_prune_levels`) instead
        of the base class's one ``prune_weight`` per level: the factorisation and the column loop are shared."""
        if stats is None or stats.hessian is None:
            raise ValueError("SparseGPT needs the input Hessian XᵀX; no calibration statistics were collected")
        return sparsegpt_prune_levels(
            weight, stats.hessian, sparsities, pattern, self.blocksize, self.percdamp, self.saliency, self.bits, stats.name
        )

    def __repr__(self):
        return f"SparseGPTPruner(blocksize={self.blocksize}, percdamp={self.percdamp}, saliency={self.saliency}, bits={self.bits})"
