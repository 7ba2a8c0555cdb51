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

import torch
from torch import nn
from tqdm.auto import tqdm

from msp.models import prunable_layers
from msp.numerics import check_finite
from msp.sensitivity.common import (check_probes, grads_on, math_attention, next_token_loss, per_layer_means,
                                    rademacher_like, windows_to_use)
from msp.sensitivity.streamed import streamed_hessian_sums
from msp.streaming import StreamingPlan, is_streamed


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
    plan: StreamingPlan | None = None,
) -> dict[str, float]:
    """Hutchinson tr(H_u) for every prunable Linear layer (names as :func:`msp.models.prunable_layers`).

    windows: (num_windows, seqlen) token ids, the first ``nsamples`` used (all when None); ``probes``
    Rademacher vectors per sequence, drawn from ``seed``. ``normalize`` divides by the parameter count.
    Resident (no ``plan``, or one that does not stream): one double backward through the whole model per
    sequence; streamed: blocks visit ``device`` one at a time
    (:func:`msp.sensitivity.streamed.streamed_hessian_sums`), the same probes, the same estimate up to rounding.
    """
    probes = check_probes(probes)
    layers = layers if layers is not None else prunable_layers(model)
    used = windows_to_use(windows, nsamples)
    if is_streamed(plan):
        sums = streamed_hessian_sums(model, used, device, layers, plan, probes=probes, seed=seed)
    else:
        sums = resident_hessian_sums(model, used, device, layers, probes=probes, seed=seed)
    what = f"hessian trace ({used.shape[0]} sequences x {probes} probes{', streamed' if is_streamed(plan) else ''})"
    return per_layer_means(sums, used.shape[0] * probes, layers, normalize, what)


def resident_hessian_sums(
    model: nn.Module, used: torch.Tensor, device: torch.device, layers: dict[str, nn.Linear], *, probes: int, seed: int
) -> dict[str, torch.Tensor]:
    """Σ_n Σ_p z_pᵀ (H_n z_p)_u per layer (float32 scalars on ``device``), the probes drawn from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    acc = {name: torch.zeros((), dtype=torch.float32, device=device) for name in layers}
    names = list(layers)
    with grads_on(model, layers) as weights, math_attention():
        for n in tqdm(range(used.shape[0]), desc="hessian: sequences", unit="seq", leave=False):
            ids = used[n : n + 1].to(device)
            loss_fn = lambda: check_finite(next_token_loss(model, ids), stage="hessian sensitivity",  # noqa: E731
                                           what=f"the loss of calibration window {n}")
            sums = hutchinson_trace(loss_fn, weights, probes=probes, generator=gen)
            for name, s in zip(names, sums):
                acc[name] += s.detach()
    return acc
