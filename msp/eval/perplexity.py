"""Perplexity over non-overlapping windows (the SparseGPT/Wanda protocol): PPL = exp(mean token NLL).

The logits come from :func:`msp.pipeline.batch_logits`, which runs the whole model on ``device`` or, when the
run's :class:`msp.streaming.StreamingPlan` streams it, a model that stays on the CPU: embeddings → every block
one at a time on ``device`` → final norm and lm_head per batch of windows. Both give the same number.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
    for batch, logits in batch_logits(model, windows, device, plan=plan, batch_size=batch_size, desc=desc):
        nll, n = batch_nll(logits, batch)
        total += nll
        count += n
    return math.exp(total / count)
