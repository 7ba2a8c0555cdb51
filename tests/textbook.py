"""Textbook Wanda and SparseGPT, written from the papers in float64 with plain loops; no code shared with msp.

- Wanda (Sun et al. 2023, eq. 1): per output row i, remove the k = round(s·in) weights with the smallest
  |W_ij|·‖X_j‖₂; for N:M, the M−N smallest of every group of M consecutive inputs.
- SparseGPT (Frantar & Alistarh 2023, Algorithm 1): see :func:`sparsegpt_reference`.
"""
from __future__ import annotations

import torch


def wanda_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    w, x = w.double(), x.double()
    score = w.abs() * x.norm(dim=0)  # |W_ij|·‖X_j‖₂
    keep = torch.ones_like(w, dtype=torch.bool)
    rows, cols = w.shape
    for i in range(rows):
        if m:
            for g in range(0, cols, m):
                drop = torch.argsort(score[i, g : g + m])[: m - n]
                keep[i, g + drop] = False
        else:
            k = int(sparsity * cols + 0.5)
            keep[i, torch.argsort(score[i])[:k]] = False
    return w * keep


def sparsegpt_reference(w, x, sparsity, n=0, m=0, blocksize=128, percdamp=0.01) -> torch.Tensor:
    """H = 2XᵀX/n (n = tokens), then :func:`sparsegpt_reference_hessian`. w: (out, in), x: (tokens, in)."""
    X = x.double()
    return sparsegpt_reference_hessian(w, 2.0 * X.T @ X / X.shape[0], sparsity, n, m, blocksize, percdamp)


def sparsegpt_reference_hessian(w, hessian, sparsity, n=0, m=0, blocksize=128, percdamp=0.01) -> torch.Tensor:
    """Algorithm 1 on a given H (in, in), float64: dead inputs (H_jj = 0) get H_jj = 1 and W_:,j = 0; H += λI,
    λ = percdamp·mean(diag H); U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Columns in blocks of B: at each block
    start (unstructured) the block's mask removes the round(p·numel) smallest w²/U_jj² of the whole block (all rows
    together); for N:M (n = kept, m = group), at every M-th column, the M−N smallest of each row's next M. Each column's
    pruning error E_:,j = (1−M_:,j)·W_:,j/U_jj is spread over the block's remaining columns (OBS update), and after the
    block over every later column at once (lazy batch update)."""
    W, H = w.double().clone(), hessian.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # upper factor: H⁻¹ = UᵀU
    keep = torch.ones_like(W, dtype=torch.bool)
    for i in range(0, cols, blocksize):
        j2 = min(i + blocksize, cols)
        E = torch.zeros(rows, j2 - i, dtype=W.dtype)
        if not m:  # the block's mask: the p% smallest saliencies of the whole block
            sal = W[:, i:j2] ** 2 / torch.diag(U)[i:j2] ** 2
            k = int(sparsity * sal.numel() + 0.5)
            block_keep = torch.ones(sal.numel(), dtype=torch.bool)
            block_keep[torch.argsort(sal.flatten())[:k]] = False
            keep[:, i:j2] = block_keep.view_as(sal)
        for j in range(i, j2):
            if m and (j - i) % m == 0:  # every row's M−N smallest of the next M, on the updated weights
                sal = W[:, j : j + m] ** 2 / torch.diag(U)[j : j + m] ** 2
                drop = torch.argsort(sal, dim=1)[:, : m - n]
                keep[:, j : j + m].scatter_(1, drop, False)
            E[:, j - i] = (~keep[:, j]) * W[:, j] / U[j, j]
            W[:, j:j2] -= torch.outer(E[:, j - i], U[j, j:j2])  # OBS update (column j of a pruned weight becomes 0)
        W[:, j2:] -= E @ U[i:j2, j2:]  # lazy batch update of every later column
    return W * keep


def linear_inputs(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every prunable Linear of ``model`` on ``windows``, (tokens, in_features) each, from one ordinary
    forward of the whole model with hooks: an independent reference for msp's block-by-block statistics passes."""
    from msp.models import prunable_layers

    layers = prunable_layers(model)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [lin.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
               for n, lin in layers.items()]
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}
