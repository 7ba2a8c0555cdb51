"""Per-layer sensitivities: pure functions of model + calibration data, cached on disk.

* ``fisher``  — empirical Fisher trace (:mod:`msp.sensitivity.fisher`), per Linear layer.
* ``hessian`` — Hutchinson Hessian trace (:mod:`msp.sensitivity.hessian`), per Linear layer.
* ``owl``     — OWL outlier ratio (:mod:`msp.sensitivity.owl`), per decoder block, given to each of its layers.

:func:`compute_sensitivity` is the entry point allocators use; :func:`per_block` aggregates to blocks.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from msp.models import find_blocks, layer_block_index

log = logging.getLogger(__name__)

METHODS = ("fisher", "hessian", "owl")


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


def per_block(sens: Mapping[str, float], prefix: str, weights: Mapping[str, int] | None = None) -> dict[int, float]:
    """Block index → Σ of its layers' values (``prefix``: the blocks' module path, e.g. ``model.layers``).

    With ``weights`` (layer → parameter count) the block value is the weighted mean Σ w_l σ_l / Σ w_l instead,
    which is the right aggregate for per-parameter (normalised) traces: total trace / total parameters.
    """
    sums: dict[int, float] = {}
    mass: dict[int, float] = {}
    for name, value in sens.items():
        b = layer_block_index(name, prefix)
        w = float(weights[name]) if weights is not None else 1.0
        sums[b] = sums.get(b, 0.0) + w * float(value)
        mass[b] = mass.get(b, 0.0) + w
    if weights is None:
        return dict(sorted(sums.items()))
    return {b: sums[b] / mass[b] for b in sorted(sums)}


def _opt(options: Mapping[str, Any], key: str, default: Any) -> Any:
    value = options.get(key, default)
    return default if value is None else value


def compute_sensitivity(ctx, method: str, options: Mapping[str, Any] | None = None) -> SensitivityReport:
    """Sensitivity of every prunable Linear layer of ``ctx.model`` (a :class:`msp.allocation.build.AllocationContext`).

    options (all optional): ``nsamples`` (calibration windows used; null = all), ``normalize`` (divide traces by
    the parameter count; default true), ``probes`` and ``seed`` (hessian; seed defaults to the run's seed),
    ``M`` (owl; default 5). Raw values are cached on disk under a key naming model, data, nsamples, seqlen,
    seed, method and these options; normalisation is applied after the cache so both variants share an entry.
    """
    options = dict(options or {})
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity {method!r}; valid: {', '.join(METHODS)}")
    windows = ctx.calibration_ids
    layers = ctx.layers
    started = time.perf_counter()
    plan = ctx.plan
    streamed = plan is not None and plan.stream
    store_device = plan.store if streamed else None
    grad_device = ctx.device
    if streamed and method != "owl":  # no whole-model graph: blocks visit the device one at a time (msp.sensitivity.streamed)
        log.info("%s sensitivity on a streamed model: block-streamed forward/backward on %s", method, ctx.device)
    if method in ("fisher", "hessian"):
        from msp.sensitivity._grad import windows_to_use

        nsamples = options.get("nsamples")
        used = windows_to_use(windows, nsamples)
        normalize = bool(_opt(options, "normalize", True))
        fields: dict[str, Any] = {"windows": int(used.shape[0])}
        if method == "fisher":
            from msp.sensitivity.fisher import fisher_trace
            from msp.sensitivity.streamed import streamed_fisher_trace

            if streamed:  # same values as fisher_trace (tests/test_streamed_sensitivity.py), so the cache entry is shared
                compute = lambda: streamed_fisher_trace(ctx.model, used, grad_device, normalize=False, layers=layers, store_device=store_device)  # noqa: E731
            else:
                compute = lambda: fisher_trace(ctx.model, used, grad_device, normalize=False, layers=layers)  # noqa: E731
        else:
            from msp.sensitivity.hessian import hessian_trace

            probes = int(_opt(options, "probes", 4))
            probe_seed = int(_opt(options, "seed", ctx.seed))
            fields.update(probes=probes, probe_seed=probe_seed)
            if streamed:
                from msp.sensitivity.streamed import streamed_hessian_trace

                compute = lambda: streamed_hessian_trace(ctx.model, used, grad_device, probes=probes, normalize=False, seed=probe_seed,  # noqa: E731
                                                         layers=layers, store_device=store_device)
            else:
                compute = lambda: hessian_trace(ctx.model, used, grad_device, probes=probes, normalize=False, seed=probe_seed, layers=layers)  # noqa: E731
        raw = _cached(ctx, method, fields, compute)
        values = {n: raw[n] / layers[n].weight.numel() if normalize else raw[n] for n in layers}
    else:
        from msp.sensitivity.owl import owl_outlier_ratios

        M = float(_opt(options, "M", 5.0))
        prefix, _ = find_blocks(ctx.model)
        ratios = _cached(ctx, method, {"M": M}, lambda: owl_outlier_ratios(ctx.model, windows, ctx.device, M=M, batch_size=ctx.batch_size, store_device=store_device))
        values = {n: float(ratios[layer_block_index(n, prefix)]) for n in layers}
    missing = [n for n in layers if n not in values]
    if missing:  # a stale or foreign cache entry
        raise ValueError(f"cached {method} sensitivity lacks {len(missing)} layer(s) (e.g. {missing[0]}); run with use_cache=false")
    elapsed = time.perf_counter() - started
    log.info("sensitivity %s: %.1f s for %d layers", method, elapsed, len(values))
    return SensitivityReport(method, values, elapsed, options)


def _cached(ctx, method: str, fields: dict, compute):
    from msp.cache import cache_key

    if ctx.cache is None:
        return compute()
    key = cache_key(method, **ctx.cache_fields, **fields)
    return ctx.cache.get_or_compute(key, compute)


__all__ = ["compute_sensitivity", "per_block", "METHODS", "SensitivityReport"]
