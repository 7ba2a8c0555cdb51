"""Shared plumbing for the gradient-based sensitivities: the loss, and a context that enables gradients on
the prunable weights only and restores the model exactly as it was afterwards."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy ℓ = −(1/(T−1)) Σ_t log p(x_{t+1} | x_≤t) of ``ids`` (batch, T), in float32."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@contextmanager
def grads_on(model: nn.Module, layers: dict[str, nn.Linear]) -> Iterator[list[torch.Tensor]]:
    """Gradients enabled for the weights of ``layers`` only; every parameter's ``requires_grad`` and ``.grad``
    are restored in ``finally`` (also after an exception), so the model leaves exactly as it came."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    weights = [lin.weight for lin in layers.values()]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield weights
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def windows_to_use(windows: torch.Tensor, nsamples: int | None) -> torch.Tensor:
    """The first ``nsamples`` calibration windows (all when None); a clear error when there are too few."""
    if windows is None or windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError("sensitivity needs calibration windows (nsamples, seqlen); set data.nsamples >= 1")
    if windows.shape[1] < 2:
        raise ValueError(f"sensitivity needs windows of at least 2 tokens, got seqlen={windows.shape[1]}; raise data.seqlen")
    if nsamples is None:
        return windows
    n = int(nsamples)
    if n < 1:
        raise ValueError(f"sensitivity nsamples={nsamples}: need at least 1 (e.g. allocation.nsamples=8), or null for all")
    if n > windows.shape[0]:
        raise ValueError(
            f"sensitivity nsamples={n} exceeds the {windows.shape[0]} calibration windows; "
            f"lower allocation.nsamples or raise data.nsamples to {n}"
        )
    return windows[:n]
