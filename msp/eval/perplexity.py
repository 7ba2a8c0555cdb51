"""Perplexity over non-overlapping windows (the SparseGPT/Wanda protocol): PPL = exp(mean token NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, desc: str = "perplexity") -> tuple[float, int]:
    """Sum of next-token NLL over all windows and the number of predicted tokens. windows: (n, seqlen)."""
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        shift = logits[:, :-1, :].float()
        target = batch[:, 1:]
        nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(nll)
        count += target.numel()
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, desc: str = "perplexity") -> float:
    total, count = window_nll(model, windows, device, batch_size, desc)
    return math.exp(total / count)
