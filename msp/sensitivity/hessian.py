"""Hutchinson estimate of the Hessian trace of every prunable Linear layer (arXiv 2310.09499).

For a unit u and the loss L = (1/N) Σ_n ℓ_n (mean next-token cross-entropy per sequence),

    tr(H_uu) = E_z[ z_uᵀ (H z)_u ],   z ~ Rademacher (independent ±1 entries),

because E[z zᵀ] = I: the cross terms z_uᵀ H_uv z_v (v ≠ u) have zero mean, so one probe vector over all
units at once estimates every diagonal block's trace. The Hessian-vector product H z is one double
backprop: H z = ∂/∂θ (∇_θ ℓ · z). Estimate: (1/N)(1/P) Σ_n Σ_p z_pᵀ H_n z_p with P probes per sequence.

The per-entry variance of z_uᵀ H_uu z_u is 2 Σ_{i≠j} H_ij², so the estimate is unbiased, and its standard
error shrinks as 1/√(N·P). The trace of a non-convex loss's Hessian may be negative for some units.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from msp.models import prunable_layers
from msp.sensitivity._grad import grads_on, next_token_loss, windows_to_use

log = logging.getLogger(__name__)


@contextmanager
def _math_attention():
    """Double backward needs the reference ("math") scaled-dot-product attention: the fused kernels do not
    implement a derivative of their backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def rademacher_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 entries (float32, on CPU from a seeded generator so probes do not depend on the device)."""
    return torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)


def hutchinson_trace(
    loss_fn,
    params: list[torch.Tensor],
    *,
    probes: int,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Σ_p z_pᵀ (H z_p) restricted to each tensor of ``params`` (float32 scalars, summed — not averaged — over probes).

    ``loss_fn()`` returns a scalar whose Hessian w.r.t. ``params`` is wanted; the gradient graph is built once
    and reused for every probe.
    """
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sums = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
    for k in range(probes):
        zs = [rademacher_like(p, generator).to(device=p.device, dtype=p.dtype) for p in params]
        dot = sum((g * z).sum() for g, z in zip(grads, zs))
        hvs = torch.autograd.grad(dot, params, retain_graph=k + 1 < probes)
        for i, (hv, z) in enumerate(zip(hvs, zs)):
            sums[i] += (hv.to(torch.float32) * z.to(torch.float32)).sum()
    return sums


def hessian_trace(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    probes: int = 4,
    nsamples: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    layers: dict[str, nn.Linear] | None = None,
) -> dict[str, float]:
    """Hutchinson tr(H_u) for every prunable Linear layer (names as :func:`msp.models.prunable_layers`).

    windows: (num_windows, seqlen) token ids, the first ``nsamples`` used (all when None); ``probes``
    Rademacher vectors per sequence, drawn from ``seed``. ``normalize`` divides by the parameter count.
    """
    if int(probes) < 1:
        raise ValueError(f"hessian probes={probes}: need at least 1 Rademacher probe (e.g. allocation.probes=4)")
    layers = layers if layers is not None else prunable_layers(model)
    used = windows_to_use(windows, nsamples)
    gen = torch.Generator().manual_seed(int(seed))
    acc = {name: torch.zeros((), dtype=torch.float32, device=device) for name in layers}
    names = list(layers)
    with grads_on(model, layers) as weights, _math_attention():
        for n in tqdm(range(used.shape[0]), desc="hessian: sequences", unit="seq", leave=False):
            ids = used[n : n + 1].to(device)
            sums = hutchinson_trace(lambda: next_token_loss(model, ids), weights, probes=int(probes), generator=gen)
            for name, s in zip(names, sums):
                acc[name] += s.detach()
    count = used.shape[0] * int(probes)
    out = {}
    for name, lin in layers.items():
        value = float(acc[name].item()) / count
        out[name] = value / lin.weight.numel() if normalize else value
    log.info("hessian trace (%d sequences x %d probes): %d layers, range [%.3e, %.3e]", used.shape[0], probes, len(out), min(out.values()), max(out.values()))
    return out
