"""Shared plumbing of the sensitivities: their error type, the loss, the calibration windows they use, a context
that enables gradients on the prunable weights only (and restores the model exactly as it was afterwards), the
Rademacher probes and attention kernel of the Hessian trace, and the per-layer mean every trace ends with."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from msp.errors import MspError
from msp.numerics import check_finite_value

log = logging.getLogger(__name__)


class SensitivityError(MspError):
    """A sensitivity cannot be computed as configured (too few windows, no probes, a stale cache entry ...)."""


def logits_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy ℓ = −(1/(T−1)) Σ_t log p(x_{t+1} | x_≤t) of ``ids`` (batch, T) under
    ``logits`` (batch, T, vocab), in float32."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """:func:`logits_loss` of the model's own forward on ``ids``."""
    return logits_loss(model(input_ids=ids, use_cache=False).logits, ids)


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


@contextmanager
def math_attention() -> Iterator[None]:
    """Double backward needs the reference ("math") scaled-dot-product attention: the fused kernels do not
    implement a derivative of their backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def rademacher_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 entries (float32, on CPU from a seeded generator so probes do not depend on the device)."""
    return torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)


def check_probes(probes: int) -> int:
    if int(probes) < 1:
        raise SensitivityError(f"hessian probes={probes}: need at least 1 Rademacher probe (e.g. allocation.probes=4)")
    return int(probes)


def windows_to_use(windows: torch.Tensor, nsamples: int | None) -> torch.Tensor:
    """The first ``nsamples`` calibration windows (all when None); a clear error when there are too few."""
    if windows is None or windows.ndim != 2 or windows.shape[0] == 0:
        raise SensitivityError("sensitivity needs calibration windows (nsamples, seqlen); set data.nsamples >= 1")
    if windows.shape[1] < 2:
        raise SensitivityError(f"sensitivity needs windows of at least 2 tokens, got seqlen={windows.shape[1]}; raise data.seqlen")
    if nsamples is None:
        return windows
    n = int(nsamples)
    if n < 1:
        raise SensitivityError(f"sensitivity nsamples={nsamples}: need at least 1 (e.g. allocation.nsamples=8), or null for all")
    if n > windows.shape[0]:
        raise SensitivityError(
            f"sensitivity nsamples={n} exceeds the {windows.shape[0]} calibration windows; "
            f"lower allocation.nsamples or raise data.nsamples to {n}"
        )
    return windows[:n]


def per_layer_means(
    sums: dict[str, torch.Tensor], count: int, layers: dict[str, nn.Linear], normalize: bool, what: str
) -> dict[str, float]:
    """``sums[name] / count`` for every layer (a Python float), divided by the layer's parameter count when
    ``normalize``; ``what`` names the trace in the log line and in the :class:`msp.numerics.NonFiniteError` raised
    for a layer whose sum is NaN or inf (overflowing squared gradients, a NaN loss)."""
    out = {}
    for name, lin in layers.items():
        value = check_finite_value(float(sums[name].item()) / count, stage=what.split(" (")[0], layer=name,
                                   what=f"the {what} of {name}")
        out[name] = value / lin.weight.numel() if normalize else value
    log.info("%s over %d terms: %d layers, range [%.3e, %.3e]", what, count, len(out), min(out.values()), max(out.values()))
    return out
