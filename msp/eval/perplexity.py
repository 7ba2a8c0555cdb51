"""Perplexity over non-overlapping windows (the SparseGPT/Wanda protocol): PPL = exp(mean token NLL).

The logits come from :func:`msp.pipeline.batch_logits`, which runs the whole model on ``device`` or, when the
run's :class:`msp.streaming.StreamingPlan` streams it, a model that stays on the CPU: embeddings → every block
one at a time on ``device`` → final norm and lm_head per batch of windows. Both give the same number.

A NaN or inf NLL (a model whose logits overflow or hold NaN) is :class:`msp.numerics.NonFiniteError` naming the
stage (``desc``, e.g. ``pruned ppl wiki``) and the first batch where it appeared: no NaN perplexity is ever reported.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msp.numerics import check_finite_value, weights_hint
from msp.pipeline import batch_logits
from msp.streaming import StreamingPlan


def batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Σ_t −log p(x_{t+1} | x_≤t) over a batch (float32), and the number of predicted tokens."""
    shift = logits[:, :-1, :].float()
    target = batch[:, 1:].to(shift.device)
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), target.numel()


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    desc: str = "perplexity",
    *,
    plan: StreamingPlan | None = None,
) -> float:
    """exp(mean next-token NLL) over all ``windows`` (n, seqlen), in batches of ``batch_size``; ``plan`` says
    whether the model is streamed one block at a time (None: resident on ``device``)."""
    total, count = 0.0, 0
    for b, (batch, logits) in enumerate(batch_logits(model, windows, device, plan=plan, batch_size=batch_size, desc=desc)):
        nll, n = batch_nll(logits, batch)  # a Python float already: checking it costs no synchronisation
        first, last = b * batch_size, b * batch_size + batch.shape[0] - 1
        check_finite_value(nll, stage=desc, what=f"the next-token NLL of window{f's {first}-{last}' if last > first else f' {first}'}",
                           hint=weights_hint(model))
        total += nll
        count += n
    mean = total / count
    try:
        ppl = math.exp(mean)
    except OverflowError:  # beyond ~709.78 nats
        ppl = math.inf
    return check_finite_value(ppl, stage=desc, what=f"the perplexity (mean NLL {mean:.4g})",
                              hint="the mean NLL overflows exp(): check the model's weights and the evaluation windows")
