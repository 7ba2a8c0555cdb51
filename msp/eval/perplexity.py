"""Perplexity over non-overlapping windows (the SparseGPT/Wanda protocol): PPL = exp(mean token NLL).

``perplexity`` runs the whole model on ``device``; ``streamed_perplexity`` gives the same number for a model
that stays on the CPU: embeddings → every block one at a time on ``device`` (:func:`msp.pipeline.stream_blocks`)
→ final norm and lm_head per batch of windows (:func:`msp.pipeline.head_from_hidden`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Σ_t −log p(x_{t+1} | x_≤t) over a batch (float32), and the number of predicted tokens."""
    shift = logits[:, :-1, :].float()
    target = batch[:, 1:].to(shift.device)
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), target.numel()


@torch.inference_mode()
def window_nll(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, desc: str = "perplexity") -> tuple[float, int]:
    """Sum of next-token NLL over all windows and the number of predicted tokens. windows: (n, seqlen)."""
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        nll, n = batch_nll(model(input_ids=batch, use_cache=False).logits, batch)
        total += nll
        count += n
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, desc: str = "perplexity") -> float:
    total, count = window_nll(model, windows, device, batch_size, desc)
    return math.exp(total / count)


@torch.inference_mode()
def streamed_window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    desc: str = "perplexity",
    *,
    store_device: torch.device | None = None,
    windows_per_pass: int | None = None,
) -> tuple[float, int]:
    """:func:`window_nll` for a model bigger than the device: blocks visit ``device`` one at a time.

    Windows go through the blocks in passes of ``windows_per_pass`` (all at once when None), whose hidden
    states live on ``store_device`` between blocks; each pass moves every block to the device once.
    """
    from msp.pipeline import streamed_logits

    per_pass = int(windows_per_pass or windows.shape[0])
    per_pass = max(batch_size, per_pass - per_pass % batch_size)  # whole batches, as window_nll groups them
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], per_pass):
        chunk = windows[start : start + per_pass]
        for batch, logits in streamed_logits(model, chunk, device, batch_size=batch_size, store_device=store_device,
                                             desc=f"{desc}: windows {start + 1}-{start + chunk.shape[0]}/{windows.shape[0]}"):
            nll, n = batch_nll(logits, batch)
            total += nll
            count += n
    return total, count


def streamed_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    desc: str = "perplexity",
    *,
    store_device: torch.device | None = None,
    windows_per_pass: int | None = None,
) -> float:
    total, count = streamed_window_nll(model, windows, device, batch_size, desc, store_device=store_device, windows_per_pass=windows_per_pass)
    return math.exp(total / count)
