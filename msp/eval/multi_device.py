"""Evaluation spread over several devices (``eval.devices=[cuda:0,cuda:1]`` or ``all``): an accelerate device map.

The decoder blocks are laid over the devices in order, in contiguous runs of about equal bytes
(:func:`msp.device.balanced_split`); everything outside the blocks (embeddings, rotary embeddings, final norm,
lm_head — tied to the embeddings in many models) stays together on the first device. accelerate's hooks move
each block's inputs to its device, so a forward pass runs through the devices one after the other (pipeline
style: memory is spread, compute is not parallel). On leaving the context the hooks are removed and every
module goes back where it was, so pruning, saving and export see the model as before.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from msp.device import balanced_split, module_bytes
from msp.models import find_blocks

log = logging.getLogger(__name__)


def block_device_map(model: nn.Module, devices: list[torch.device]) -> dict[str, torch.device]:
    """Module name → device for accelerate's ``dispatch_model``: blocks split over ``devices``, the rest on the first."""
    prefix, blocks = find_blocks(model)
    parts = balanced_split([module_bytes(b) for b in blocks], len(devices))
    block_names = {f"{prefix}.{i}": devices[p] for i, p in enumerate(parts)}
    device_map: dict[str, torch.device] = {}
    for name, module in model.named_modules():
        if not name or any(name == m or name.startswith(m + ".") for m in device_map):
            continue  # the root, or inside a module already placed
        if name in block_names:
            device_map[name] = block_names[name]
        elif name == prefix or any(b.startswith(name + ".") for b in block_names):
            continue  # an ancestor of the blocks: its other children are placed one by one
        elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            device_map[name] = devices[0]
    return device_map


@contextmanager
def spread_over(model: nn.Module, devices: list[torch.device]) -> Iterator[torch.device]:
    """Inside: the model dispatched over ``devices``; yields the device its inputs go to (the first)."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    home = next(model.parameters()).device
    device_map = block_device_map(model, devices)
    counts: dict[str, int] = {}
    for d in device_map.values():
        counts[str(d)] = counts.get(str(d), 0) + 1
    log.info("evaluation over %d devices: %s modules", len(devices), ", ".join(f"{k}: {v}" for k, v in counts.items()))
    dispatch_model(model, device_map={k: str(v) for k, v in device_map.items()}, main_device=str(devices[0]))
    try:
        yield devices[0]
    finally:
        remove_hook_from_submodules(model)
        model.to(home)
