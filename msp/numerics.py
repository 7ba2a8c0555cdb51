"""Numerical guards: NaN or inf is caught where it first appears, with the stage, block and layer named.

A non-finite value that slips through one stage poisons every later one (a NaN Hessian gives NaN pruned weights,
NaN block outputs, a NaN perplexity in a results table). The stages therefore check what they produce and stop
with one line (:class:`NonFiniteError`, an :class:`msp.errors.MspError`) at the first place it shows:

* the block-by-block passes (:mod:`msp.pipeline`): the embeddings' output (block 0's inputs) and every block's
  outputs; the calibration statistics Σx² and XᵀX of every Linear layer (:func:`msp.pruners.stats.check_stats`);
* the sensitivities (:mod:`msp.sensitivity`): every sequence's loss and every layer's summed squared gradients /
  Hutchinson trace;
* the evaluation (:mod:`msp.eval.perplexity`): the summed NLL, so no NaN perplexity is ever reported;
* the search (:mod:`msp.search.evolution`, :mod:`msp.search.allocator`): the dense reference and every fitness
  (a NaN fitness stops the search; an honest +inf, a candidate whose KL overflows, ranks last and the search goes on).

The checks cost one ``torch.isfinite(t).all()`` per tensor and one host synchronisation per call of
:func:`check_all_finite` (per device), never one per column or per batch; counting the NaN and inf values, and
looking for the weights that hold them, happens on the error path only. No check changes any number.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Optional, Union

import torch
from torch import nn

from msp.errors import MspError

#: the fix named by default: a corrupt checkpoint or an overflowing half-precision activation are the usual causes
DEFAULT_HINT = "check the model's weights (a corrupt checkpoint?) or run in a wider dtype (dtype=float32)"

#: the fix a message names: a fixed text, or a callable evaluated on the error path only (None: DEFAULT_HINT)
Hint = Union[str, Callable[[], Optional[str]], None]


class NonFiniteError(MspError):
    """NaN or inf in a tensor or value msp produced; ``stage``, ``block`` and ``layer`` say where it first appeared."""

    def __init__(self, message: str, *, stage: str, block: int | None = None, layer: str | None = None):
        super().__init__(message)
        self.stage, self.block, self.layer = stage, block, layer


def location(stage: str, block: int | None = None, layer: str | None = None) -> str:
    """``stage 'pruning (wanda)', block 1, layer model.layers.1.mlp.up_proj`` (the parts that are known)."""
    parts = [f"stage '{stage}'"]
    if block is not None:
        parts.append(f"block {block}")
    if layer is not None:
        parts.append(f"layer {layer}")
    return ", ".join(parts)


def _counts(t: torch.Tensor) -> str:
    t = t.detach()
    if not (t.is_floating_point() or t.is_complex()):
        return f"{t.numel()} values"
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN, {inf} inf of {t.numel()} values"


def _hint_text(hint: Hint) -> str:
    text = hint() if callable(hint) else hint
    return text or DEFAULT_HINT


def _error(what: str, counts: str, stage: str, block: int | None, layer: str | None, hint: Hint) -> NonFiniteError:
    message = f"NaN/inf in {what} ({counts}) at {location(stage, block, layer)}; {_hint_text(hint)}"
    return NonFiniteError(" ".join(message.split()), stage=stage, block=block, layer=layer)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on ``t``'s device: are all entries finite? (no host synchronisation)."""
    return torch.isfinite(t.detach()).all()


def check_finite(
    tensor: torch.Tensor, *, stage: str, block: int | None = None, layer: str | None = None, what: str = "values",
    hint: Hint = None,
) -> torch.Tensor:
    """``tensor`` unchanged if every entry is finite, else :class:`NonFiniteError` naming ``what`` and where.
    One ``isfinite(...).all()`` and one host synchronisation."""
    if not bool(all_finite(tensor)):
        raise _error(what, _counts(tensor), stage, block, layer, hint)
    return tensor


def check_all_finite(
    items: Iterable[tuple[str | None, str, torch.Tensor | None]], *, stage: str, block: int | None = None, hint: Hint = None,
) -> None:
    """Check many tensors with one host synchronisation per device: ``items`` are ``(layer or None, what, tensor)``
    (None tensors are skipped). On failure the first non-finite item, in order, is the one named."""
    items = [(layer, what, t) for layer, what, t in items if t is not None]
    if not items:
        return
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for _, _, t in items:
        flags.setdefault(t.device, []).append(all_finite(t))
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return
    for layer, what, t in items:
        if not bool(all_finite(t)):
            raise _error(what, _counts(t), stage, block, layer, hint)


def check_finite_value(
    value: float, *, stage: str, block: int | None = None, layer: str | None = None, what: str = "value", hint: Hint = None,
) -> float:
    """A Python number: ``value`` if finite, else :class:`NonFiniteError` (e.g. a perplexity, a summed NLL, a fitness)."""
    value = float(value)
    if not math.isfinite(value):
        raise _error(what, f"{value}", stage, block, layer, hint)
    return value


def nonfinite_parameters(module: nn.Module, prefix: str = "") -> list[str]:
    """Names (``prefix`` + parameter name) of the parameters of ``module`` holding NaN or inf: for error messages
    only (one synchronisation per parameter)."""
    return [f"{prefix}{name}" for name, p in module.named_parameters() if not bool(all_finite(p))]


def weights_hint(module: nn.Module, prefix: str = "") -> Callable[[], str]:
    """A hint (evaluated on the error path only) that names the non-finite weights of ``module``, if any."""

    def hint() -> str:
        bad = nonfinite_parameters(module, prefix)
        if not bad:
            return DEFAULT_HINT
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return f"non-finite weights: {shown}; check the model's checkpoint (or what changed these weights)"

    return hint


__all__ = ["NonFiniteError", "check_finite", "check_all_finite", "check_finite_value", "all_finite", "location",
           "nonfinite_parameters", "weights_hint", "DEFAULT_HINT"]
