"""Empirical Fisher trace of every prunable Linear layer (MSP, arXiv 2503.11164).

For a unit u (the weights of one Linear layer) and N calibration sequences x_1 … x_N,

    tr(F_u) ≈ (1/N) Σ_n Σ_{θ∈u} (∂ℓ_n/∂θ)²,

where ℓ_n is the mean next-token cross-entropy of sequence n. Each sequence gets its own backward pass and
its gradient is squared *before* averaging (the empirical Fisher, not the squared mean gradient). With
``normalize`` the trace is divided by the unit's parameter count |u| (mean per-weight Fisher), which makes
layers of different shapes comparable.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from msp.models import prunable_layers
from msp.numerics import check_finite
from msp.sensitivity.common import grads_on, next_token_loss, per_layer_means, windows_to_use
from msp.sensitivity.streamed import streamed_fisher_sums
from msp.streaming import StreamingPlan, is_streamed


def fisher_trace(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    nsamples: int | None = None,
    normalize: bool = True,
    layers: dict[str, nn.Linear] | None = None,
    plan: StreamingPlan | None = None,
) -> dict[str, float]:
    """tr(F_u) for every prunable Linear layer of ``model`` (names as :func:`msp.models.prunable_layers`).

    windows: (num_windows, seqlen) token ids; the first ``nsamples`` (all when None) are used, one backward
    each. Resident (no ``plan``, or one that does not stream): the model already sits on ``device`` and one
    autograd graph spans it; streamed: blocks visit ``device`` one at a time
    (:func:`msp.sensitivity.streamed.streamed_fisher_sums`), same values up to rounding. The model's
    ``requires_grad`` flags and ``.grad`` are restored. Squares are accumulated in float32 whatever the weight dtype.
    """
    layers = layers if layers is not None else prunable_layers(model)
    used = windows_to_use(windows, nsamples)
    if is_streamed(plan):
        sums = streamed_fisher_sums(model, used, device, layers, plan)
    else:
        sums = resident_fisher_sums(model, used, device, layers)
    return per_layer_means(sums, used.shape[0], layers, normalize, "fisher trace" + (" (streamed)" if is_streamed(plan) else ""))


def resident_fisher_sums(model: nn.Module, used: torch.Tensor, device: torch.device, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Σ_n Σ_{θ∈u} (∂ℓ_n/∂θ)² per layer (float32 scalars on ``device``), one whole-model backward per sequence."""
    acc = {name: torch.zeros((), dtype=torch.float32, device=device) for name in layers}
    names = list(layers)
    with grads_on(model, layers) as weights:
        for n in tqdm(range(used.shape[0]), desc="fisher: sequences", unit="seq", leave=False):
            loss = check_finite(next_token_loss(model, used[n : n + 1].to(device)), stage="fisher sensitivity",
                                what=f"the loss of calibration window {n}")
            grads = torch.autograd.grad(loss, weights)
            for name, g in zip(names, grads):
                acc[name] += g.detach().to(torch.float32).pow(2).sum()
    return acc
