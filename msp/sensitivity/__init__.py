"""Per-layer sensitivities: pure functions of model + calibration data, cached on disk.

* ``fisher``  — empirical Fisher trace (:mod:`msp.sensitivity.fisher`), per Linear layer.
* ``hessian`` — Hutchinson Hessian trace (:mod:`msp.sensitivity.hessian`), per Linear layer.
* ``owl``     — OWL outlier ratio (:mod:`msp.sensitivity.owl`), per decoder block, given to each of its layers.
* ``dlp``     — DLP's block Wanda score (:mod:`msp.sensitivity.dlp`), per decoder block, given to each of its layers.

:func:`compute_sensitivity` is the entry point allocators use: it takes what it needs as arguments and returns a
:class:`SensitivityReport` (the run writes it to ``sensitivity.json``). Whether the model is streamed one block
at a time is the run's :class:`msp.streaming.StreamingPlan`'s to say; the trace functions take the plan.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from msp.models import find_blocks, layer_block_index
from msp.sensitivity.common import SensitivityError, windows_to_use
from msp.streaming import StreamingPlan, is_streamed

if TYPE_CHECKING:
    from msp.cache import DiskCache

log = logging.getLogger(__name__)

METHODS = ("fisher", "hessian", "owl", "dlp")


@dataclass
class SensitivityReport:
    """One sensitivity computation: per-layer values (normalised when asked), how long it took, its options."""

    method: str
    values: dict[str, float]
    seconds: float
    options: dict

    def to_json(self) -> dict:
        """The ``sensitivity.json`` document of a run."""
        return {"method": self.method, "options": self.options, "layers": self.values}


def _opt(options: Mapping[str, Any], key: str, default: Any) -> Any:
    value = options.get(key, default)
    return default if value is None else value


def compute_sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    windows: torch.Tensor,
    method: str,
    options: Mapping[str, Any] | None = None,
    *,
    device: torch.device,
    plan: StreamingPlan | None = None,
    seed: int = 0,
    batch_size: int = 4,
    cache: DiskCache | None = None,
    cache_fields: Mapping[str, Any] | None = None,
) -> SensitivityReport:
    """Sensitivity of every Linear layer in ``layers`` (name → module of ``model``) from the calibration
    ``windows`` (n, seqlen).

    options (all optional): ``nsamples`` (calibration windows used; null = all), ``normalize`` (divide traces by
    the parameter count; default true), ``probes`` and ``seed`` (hessian; seed defaults to ``seed``), ``M`` (owl;
    default 5), ``reduction`` (dlp: mean | median; default mean). ``plan``: the run's streaming plan (None: the model is resident on ``device``); ``batch_size``: the
    OWL statistics pass's. Raw values are cached in ``cache`` (a :class:`msp.cache.DiskCache`, or None) under a key
    naming ``cache_fields`` (model, data, nsamples, seqlen, seed), the method and these options; normalisation is
    applied after the cache so both variants share an entry.
    """
    options = dict(options or {})
    if method not in METHODS:
        raise SensitivityError(f"unknown sensitivity {method!r}; valid: {', '.join(METHODS)}")
    started = time.perf_counter()
    if method in ("owl", "dlp"):  # one value per decoder block, from one dense statistics pass
        fields, compute = _block_statistic(method, model, windows, device, options, batch_size, plan)
        per_block = _cached(cache, cache_fields, method, fields, compute)
        prefix, _ = find_blocks(model)
        raw = {n: float(per_block[b]) for n in layers if (b := layer_block_index(n, prefix)) in per_block}
        normalize = False  # a ratio (owl) or a mean score (dlp) already
    else:
        used = windows_to_use(windows, options.get("nsamples"))
        fields, compute = _trace(method, model, layers, used, device, plan, options, seed)
        raw = _cached(cache, cache_fields, method, fields, compute)
        normalize = bool(_opt(options, "normalize", True))
    missing = [n for n in layers if n not in raw]
    if missing:  # a stale or foreign cache entry
        raise SensitivityError(f"cached {method} sensitivity lacks {len(missing)} layer(s) (e.g. {missing[0]}); run with use_cache=false")
    values = {n: raw[n] / layers[n].weight.numel() if normalize else raw[n] for n in layers}
    elapsed = time.perf_counter() - started
    log.info("sensitivity %s: %.1f s for %d layers", method, elapsed, len(values))
    return SensitivityReport(method, values, elapsed, options)


def _trace(
    method: str, model: nn.Module, layers: dict[str, nn.Linear], used: torch.Tensor, device: torch.device,
    plan: StreamingPlan | None, options: Mapping[str, Any], seed: int,
) -> tuple[dict[str, Any], Callable[[], dict[str, float]]]:
    """(cache key fields, the computation of the raw traces) of ``fisher`` or ``hessian`` on the windows ``used``.
    Streamed and resident give the same values (tests/test_streamed_sensitivity.py), so they share a cache entry."""
    fields: dict[str, Any] = {"windows": int(used.shape[0])}
    if method == "fisher":
        from msp.sensitivity.fisher import fisher_trace

        return fields, lambda: fisher_trace(model, used, device, normalize=False, layers=layers, plan=plan)
    from msp.sensitivity.hessian import hessian_trace

    probes = int(_opt(options, "probes", 4))
    probe_seed = int(_opt(options, "seed", seed))
    fields.update(probes=probes, probe_seed=probe_seed)
    return fields, lambda: hessian_trace(model, used, device, probes=probes, normalize=False, seed=probe_seed, layers=layers, plan=plan)


def _block_statistic(
    method: str, model: nn.Module, windows: torch.Tensor, device: torch.device, options: Mapping[str, Any], batch_size: int,
    plan: StreamingPlan | None,
) -> tuple[dict[str, Any], Callable[[], dict[int, float]]]:
    """(cache key fields, the computation) of OWL's outlier ratios or DLP's block scores (block index → value)."""
    store_device = plan.store if is_streamed(plan) else None
    if method == "owl":
        from msp.sensitivity.owl import owl_outlier_ratios

        M = float(_opt(options, "M", 5.0))
        return {"M": M}, lambda: owl_outlier_ratios(model, windows, device, M=M, batch_size=batch_size, store_device=store_device)
    from msp.sensitivity.dlp import dlp_block_scores

    reduction = str(_opt(options, "reduction", "mean"))
    used = windows_to_use(windows, options.get("nsamples"))
    return ({"reduction": reduction, "windows": int(used.shape[0])},
            lambda: dlp_block_scores(model, used, device, reduction=reduction, batch_size=batch_size, store_device=store_device))


def _cached(cache: DiskCache | None, cache_fields: Mapping[str, Any] | None, method: str, fields: dict, compute):
    from msp.cache import cache_key

    if cache is None:
        return compute()
    key = cache_key(method, **(cache_fields or {}), **fields)
    return cache.get_or_compute(key, compute)


__all__ = ["compute_sensitivity", "METHODS", "SensitivityReport", "SensitivityError"]
