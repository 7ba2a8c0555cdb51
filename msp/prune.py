"""``prune_(model, pruner, allocation, calibration)``: the verb that prunes a model in place.

Data flow: allocation (per-layer sparsity) + pattern → pruner, block by block through
:func:`msp.pipeline.sequential_pass`, which propagates each pruned block's outputs to the next.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from msp.allocation import Allocation
from msp.errors import MspError
from msp.masks import Pattern, PatternError
from msp.models import prunable_layers
from msp.pipeline import sequential_pass
from msp.pruners import Pruner

log = logging.getLogger(__name__)


class PruneError(MspError):
    """The model cannot be pruned as asked (an allocation missing layers, a pruner without its calibration data)."""


@dataclass
class LayerReport:
    name: str
    params: int
    target: float
    measured: float
    pattern: str

    def to_json(self) -> dict:
        return asdict(self)


def check_pattern_fits(model: nn.Module, pattern: Pattern) -> None:
    """Fail before any heavy work if an N:M pattern does not divide some layer."""
    for name, lin in prunable_layers(model).items():
        pattern.check_divides(name, lin.in_features)


def _check_inputs(model: nn.Module, pruner: Pruner, allocation: Allocation, calibration_ids: torch.Tensor | None,
                  pattern: Pattern) -> None:
    """Fail before any heavy work: a pattern that does not divide a layer, a layer without a sparsity, no data."""
    check_pattern_fits(model, pattern)
    missing = [n for n in prunable_layers(model) if n not in allocation.sparsities]
    if missing:
        raise PruneError(f"allocation has no sparsity for {len(missing)} layer(s), e.g. {missing[0]}")
    if pruner.needs_calibration and (calibration_ids is None or calibration_ids.numel() == 0):
        raise PruneError(f"pruner {pruner.name} needs calibration data but none was given (data.nsamples >= 1)")


@torch.no_grad()
def prune_(
    model: nn.Module,
    pruner: Pruner,
    allocation: Allocation,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    pattern: Pattern | str = "unstructured",
    batch_size: int = 4,
    store_device: torch.device | None = None,
    true_sequential: bool = False,
) -> list[LayerReport]:
    """Prune every decoder Linear layer of ``model`` in place to ``allocation[name]`` with ``pruner``.

    ``calibration_ids``: (nsamples, seqlen) token windows; may be None for pruners that need no data.
    ``true_sequential``: prune each Linear inside the block's forward as soon as its input is known, with the
    whole calibration set as one batch, so later layers of a block see pruned inputs and each block runs once
    (:func:`msp.pipeline.inline_block_pass`); the default runs a statistics pass on the block's inputs, prunes
    the block, then runs it again to propagate (Wanda's and SparseGPT's reference order).
    Returns one :class:`LayerReport` per layer with the measured sparsity.
    """
    pattern = Pattern.parse(pattern)
    _check_inputs(model, pruner, allocation, calibration_ids, pattern)
    # non-zero counts stay on the device until the pass ends: no host round trip inside the per-layer loop
    pending: list[tuple[str, int, float, str, torch.Tensor]] = []

    def prune_layer(index, prefix, local, lin, stats):
        name = f"{prefix}.{index}.{local}"
        target = allocation[name]
        layer_pattern = pattern.for_layer(target)
        new_weight = pruner.prune_weight(lin.weight.data, stats, target, layer_pattern)
        lin.weight.data.copy_(new_weight)
        pending.append((name, lin.weight.numel(), target, str(layer_pattern), torch.count_nonzero(lin.weight.data)))

    def on_block(index, prefix, block, linears, stats):
        for local, lin in linears.items():
            prune_layer(index, prefix, local, lin, stats.get(local))
        return True

    def after_inline_block(index, prefix, block, linears, stats):
        return True  # its layers were pruned inside the forward

    needs_data = pruner.needs_calibration
    inline = bool(true_sequential) and needs_data
    sequential_pass(
        model, calibration_ids if needs_data else torch.empty(0, 1, dtype=torch.long), device,
        after_inline_block if inline else on_block, collect_stats=needs_data, need_hessian=pruner.needs_hessian,
        propagate=needs_data, batch_size=batch_size, store_device=store_device, desc=f"pruning ({pruner.name})",
        modifies_blocks=True, on_layer=prune_layer if inline else None,
    )
    return [LayerReport(name, params, target, 1.0 - int(nonzero) / params, pat) for name, params, target, pat, nonzero in pending]


@torch.no_grad()
def apply_weights_(model: nn.Module, weights: dict[str, torch.Tensor], allocation: Allocation,
                   pattern: Pattern | str = "unstructured") -> list[LayerReport]:
    """Put already-pruned weights into ``model``'s prunable layers in place, with no pruner pass: the model the
    search scored (``allocation.final=candidate``). Returns one :class:`LayerReport` per layer, as :func:`prune_`."""
    pattern = Pattern.parse(pattern)
    layers = prunable_layers(model)
    missing = [n for n in layers if n not in weights or n not in allocation.sparsities]
    if missing:
        raise PruneError(f"the delivered weights or the allocation miss {len(missing)} layer(s), e.g. {missing[0]}")
    reports = []
    for name, lin in layers.items():
        weight = weights[name]
        if tuple(weight.shape) != tuple(lin.weight.shape):
            raise PruneError(f"the delivered weight of {name} has shape {tuple(weight.shape)}, the layer {tuple(lin.weight.shape)}")
        lin.weight.data.copy_(weight.to(lin.weight.device, lin.weight.dtype))
        target = allocation[name]
        nonzero = int(torch.count_nonzero(lin.weight.data))
        reports.append(LayerReport(name, lin.weight.numel(), target, 1.0 - nonzero / lin.weight.numel(), str(pattern.for_layer(target))))
    return reports


def weighted_sparsity(reports: list[LayerReport]) -> float:
    total = sum(r.params for r in reports)
    return sum(r.measured * r.params for r in reports) / total if total else 0.0


__all__ = ["prune_", "apply_weights_", "LayerReport", "PruneError", "weighted_sparsity", "check_pattern_fits", "PatternError"]
