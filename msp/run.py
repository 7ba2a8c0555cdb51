"""One msp run: validate → load model and data → dense PPL → allocation → prune → PPL → results.json.

Library code with typed inputs; :mod:`msp.cli` only composes the Hydra config and calls :func:`run`.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from msp import data as data_mod
from msp.allocation import Allocation
from msp.allocation.build import AllocationContext, build_allocation
from msp.cache import DiskCache, cache_key
from msp.device import StageMeter, is_gpu, resolve_device, resolve_devices, resolve_dtype
from msp.eval.perplexity import perplexity
from msp.io import write_json_atomic
from msp.masks import Pattern, check_sparsity
from msp.models import EMBEDDED_SMOLLM2, TINY_MODELS, LoadedModel, load_model, prunable_layers, save_pruned_model
from msp.prune import check_pattern_fits, prune_, weighted_sparsity
from msp.streaming import StreamingError, plan_streaming
from msp.streaming import parse_mode as parse_streaming_mode
from msp.tracking import Tracker

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A run configuration that cannot work; raised before any heavy work."""


@dataclass
class RunSpec:
    """The validated, typed view of one run's configuration."""

    model: str
    model_revision: str | None
    pruner: Any  # a msp.pruners.Pruner
    pruner_config: dict
    sparsity: float
    pattern: Pattern
    allocation: dict
    data: dict
    eval: dict
    seed: int
    device: str
    dtype: str
    batch_size: int
    save_model: bool
    cache_dir: str | None
    use_cache: bool
    zeroshot: dict | None = None
    experiment: str = "default"
    config_hash: str | None = None  # msp.sweep.config_hash of the resolved config (skip_done matches on it)
    streaming: str = "auto"  # auto | true | false: one decoder block at a time on the device (msp.streaming)
    gpu_budget_gb: float | None = None  # device memory budget for streaming decisions (None: the GPU's free memory)
    export: dict | None = None  # {"semi_structured": bool}: pack 2:4 layers (msp.export) at the end of the run
    true_sequential: bool = False  # prune inside each block's forward, the calibration set as one batch (msp.prune.prune_)


def prune_batch_size(spec: RunSpec) -> int:
    """Windows per block forward while pruning: all of them with ``true_sequential`` (one inline pass)."""
    return int(spec.data["nsamples"]) if spec.true_sequential else int(spec.batch_size)


def validate_early(spec: RunSpec) -> None:
    """Everything that can be checked before loading weights."""
    try:
        check_sparsity(spec.sparsity, "sparsity")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if spec.pattern.kind == "nm" and abs(spec.pattern.fixed_sparsity() - spec.sparsity) > 1e-9 and spec.allocation.get("method") == "uniform":
        log.info("pattern=%s fixes every layer at %.3f sparsity; sparsity=%s is ignored", spec.pattern, spec.pattern.fixed_sparsity(), spec.sparsity)
    d = spec.data
    if int(d["nsamples"]) < 1:
        raise ConfigError(f"data.nsamples={d['nsamples']}: need at least 1 calibration window")
    if int(d["seqlen"]) < 2:
        raise ConfigError(f"data.seqlen={d['seqlen']}: need at least 2 tokens per window")
    for src in [d["calibration"], *d.get("evaluation", [])]:
        if src not in data_mod.SOURCES:
            raise ConfigError(f"unknown dataset {src!r}; valid: {', '.join(data_mod.SOURCES)}")
    if int(spec.batch_size) < 1:
        raise ConfigError(f"batch_size={spec.batch_size}: need at least 1")
    from msp.allocation.build import check_allocation_options

    check_allocation_options(dict(spec.allocation), spec.sparsity, spec.pattern)  # bounds, N:M grid, allocation file
    if spec.model in (EMBEDDED_SMOLLM2, *TINY_MODELS):
        max_len = 8192 if spec.model == EMBEDDED_SMOLLM2 else 512
        data_mod.check_seqlen(int(d["seqlen"]), max_len)
    if spec.pattern.is_nm:  # N:M must divide every layer: check on a weightless skeleton where the config is local
        from msp.models import skeleton_layers

        for name, lin in (skeleton_layers(spec.model) or {}).items():
            spec.pattern.check_divides(name, lin.in_features)
    resolve_dtype(spec.dtype, resolve_device(spec.device))  # device=cuda without a GPU, bf16 on an old GPU: fail now
    resolve_devices(spec.eval.get("devices"))  # eval.devices naming a GPU that is not there: fail now
    try:
        parse_streaming_mode(spec.streaming)
    except StreamingError as exc:
        raise ConfigError(str(exc)) from None
    device = resolve_device(spec.device)
    if spec.gpu_budget_gb is not None or is_gpu(device):  # a model or block too big for the budget: fail before loading
        from msp.models import skeleton_model

        skeleton = skeleton_model(spec.model)
        if skeleton is not None:
            plan_streaming(skeleton.to(resolve_dtype(spec.dtype, device)), device, spec.streaming, spec.gpu_budget_gb,
                           batch_size=prune_batch_size(spec), seqlen=int(d["seqlen"]), nsamples=int(d["nsamples"]),
                           need_hessian=bool(getattr(spec.pruner, "needs_hessian", False)))
    if (spec.export or {}).get("semi_structured"):
        from msp.export import ExportError, check_export_pattern

        try:
            check_export_pattern(spec.pattern)  # a model that will not be 2:4: refuse before any pruning
        except ExportError as exc:
            raise ConfigError(str(exc)) from None
    if spec.zeroshot and spec.zeroshot.get("tasks"):
        from msp.eval.zeroshot import check_tasks

        check_tasks(list(spec.zeroshot["tasks"]), spec.zeroshot.get("include_path"))  # a typo fails before pruning


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict:
    """Execute one run and write ``run_dir/results.json`` (atomically). Returns the results dict."""
    tracker = tracker or Tracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_early(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    torch.manual_seed(spec.seed)
    meter = StageMeter(device)
    cache = DiskCache(spec.cache_dir, enabled=spec.use_cache)
    d = spec.data
    seqlen, nsamples = int(d["seqlen"]), int(d["nsamples"])
    started = time.perf_counter()

    with meter.stage("load_model"):
        loaded: LoadedModel = load_model(spec.model, dtype=dtype, seed=spec.seed, revision=spec.model_revision)
        data_mod.check_seqlen(seqlen, loaded.max_seqlen)
        check_pattern_fits(loaded.model, spec.pattern)
        plan = plan_streaming(loaded.model, device, spec.streaming, spec.gpu_budget_gb, batch_size=prune_batch_size(spec),
                              seqlen=seqlen, nsamples=nsamples, need_hessian=bool(getattr(spec.pruner, "needs_hessian", False)))
        if not plan.stream:
            loaded.model.to(device)  # streaming keeps the model on the CPU; msp.pipeline moves one block at a time
    model = loaded.model
    ppl_fn = partial(perplexity, plan=plan)  # streamed or resident, as the plan says
    eval_devices = resolve_devices(spec.eval.get("devices"))

    @contextmanager
    def evaluation_devices():
        """(perplexity function, input device): the run's own, or the model spread over ``eval.devices``."""
        if not eval_devices:
            yield ppl_fn, device
            return
        from msp.eval.multi_device import spread_over

        with spread_over(model, eval_devices) as first:
            yield perplexity, first
    model_key = {"model": spec.model, "revision": spec.model_revision, "dtype": str(dtype)}

    with meter.stage("data"):
        calib_tokens = _tokens(cache, loaded, d["calibration"], "train", model_key)
        split = data_mod.split_calibration(calib_tokens, float(d.get("heldout_fraction", 0.1)))
        calibration_ids = data_mod.random_windows(split.calibration_tokens, nsamples, seqlen, spec.seed)
        eval_windows = {
            name: data_mod.sequential_windows(_tokens(cache, loaded, name, "test", model_key), seqlen, d.get("eval_windows"))
            for name in d.get("evaluation", [])
        }

    skip_eval = bool(spec.eval.get("skip", False))
    eval_bs = int(spec.eval.get("batch_size", 1))
    dense_ppl: dict[str, float] = {}
    if not skip_eval and spec.eval.get("dense", True):
        with meter.stage("dense_eval"), evaluation_devices() as (ppl_of, eval_device):
            for name, windows in eval_windows.items():
                key = cache_key("dense_ppl", **model_key, dataset=name, seqlen=seqlen, windows=int(windows.shape[0]))
                dense_ppl[name] = float(cache.get_or_compute(key, lambda w=windows: ppl_of(model, w, eval_device, eval_bs, f"dense ppl {name}")))
                log.info("dense perplexity on %s: %.3f", name, dense_ppl[name])

    dense_zs: dict = {}
    if spec.zeroshot and spec.zeroshot.get("tasks") and spec.zeroshot.get("dense"):
        from msp.eval.zeroshot import dense_zeroshot  # lazy: lm-eval is heavy

        with meter.stage("dense_zeroshot"):  # before pruning; cached like the dense perplexity
            dense_zs = dense_zeroshot(model, loaded.tokenizer, spec.zeroshot, cache, model_key)

    layers = prunable_layers(model)
    ctx = AllocationContext(
        model=model, layers=layers, target=spec.sparsity, pattern=spec.pattern, device=device, pruner=spec.pruner,
        calibration_ids=calibration_ids, heldout_tokens=split.heldout_tokens, seqlen=seqlen, seed=spec.seed,
        cache=cache, cache_fields={**model_key, "data": d["calibration"], "nsamples": nsamples, "seqlen": seqlen, "seed": spec.seed},
        run_dir=run_dir, batch_size=spec.batch_size, tracker=tracker, plan=plan,
    )
    with meter.stage("allocation"):
        outcome = build_allocation(ctx, dict(spec.allocation))
    allocation: Allocation = outcome.allocation
    allocation.save(run_dir / "allocation.json")
    sensitivity = outcome.sensitivity
    if sensitivity is not None:
        write_json_atomic(run_dir / "sensitivity.json", sensitivity.to_json())

    with meter.stage("prune"):
        reports = prune_(model, spec.pruner, allocation, calibration_ids, device, spec.pattern, spec.batch_size, store_device=plan.store,
                         true_sequential=spec.true_sequential)
    measured = weighted_sparsity(reports)
    log.info("measured sparsity (parameter-weighted over %d Linear layers): %.4f", len(reports), measured)

    ppl: dict[str, float] = {}
    if not skip_eval:
        with meter.stage("eval"), evaluation_devices() as (ppl_of, eval_device):
            for name, windows in eval_windows.items():
                ppl[name] = ppl_of(model, windows, eval_device, eval_bs, f"pruned ppl {name}")
                log.info("pruned perplexity on %s: %.3f", name, ppl[name])

    results: dict[str, Any] = {
        "model": spec.model,
        "pruner": spec.pruner.name,
        "pruner_config": spec.pruner_config,
        "pattern": str(spec.pattern),
        "allocation": allocation.method,
        "target_sparsity": allocation.target,  # the file's target for allocation=file
        "sparsity": measured,
        "dense_ppl": dense_ppl,
        "ppl": ppl,
        "layers": [
            {**r.to_json(), **({"sensitivity": sensitivity.values.get(r.name)} if sensitivity is not None else {})}
            for r in reports
        ],
        "data": {"calibration": d["calibration"], "evaluation": list(d.get("evaluation", [])), "nsamples": nsamples,
                 "seqlen": seqlen, "eval_windows": {k: int(v.shape[0]) for k, v in eval_windows.items()}},
        "seed": spec.seed,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "timings": meter.timings,
        "peak_memory_bytes": meter.peak_bytes,
        "peak_memory_by_stage": meter.peak_memory,
        "streaming": plan.to_json(),
        "eval_devices": [str(d) for d in eval_devices] or [str(device)],
        "true_sequential": spec.true_sequential,
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "experiment": spec.experiment,
        "config_hash": spec.config_hash,
    }
    if outcome.search is not None:
        results["search"] = outcome.search
    if sensitivity is not None:
        results["sensitivity_method"] = sensitivity.method
        results["sensitivity_seconds"] = sensitivity.seconds
    if dense_zs:
        results["dense_zeroshot"] = dense_zs
    if spec.zeroshot and spec.zeroshot.get("tasks"):
        from msp.eval.zeroshot import run_zeroshot  # lazy: lm-eval is heavy

        zs_device = device
        if plan.stream:  # lm-eval needs the whole model on one device: the CPU, where a streamed model lives
            zs_device = torch.device("cpu")
            log.warning("streaming: zero-shot evaluation runs on the CPU (the model does not fit %s)", device)
            model.to(zs_device)
        with meter.stage("zeroshot"):
            results.update(run_zeroshot(model, loaded.tokenizer, spec.zeroshot, zs_device))  # zeroshot, zeroshot_source
        results["timings"] = meter.timings
    if spec.save_model:
        with meter.stage("save_model"):
            save_pruned_model(loaded, run_dir / "model")
        results["saved_model"] = str(run_dir / "model")
    if (spec.export or {}).get("semi_structured"):
        from msp.export import export_run  # last: on a GPU it converts the model's 2:4 layers in place

        with meter.stage("export"):
            results["export"] = export_run(model, loaded.tokenizer, run_dir / "model-2of4", calibration_ids[:1])
        results["timings"] = meter.timings
    results["timings"]["total"] = time.perf_counter() - started
    results["peak_memory_bytes"] = meter.peak_bytes
    write_json_atomic(run_dir / "results.json", results)
    tracker.log_results(results, run_dir)
    return results


def _tokens(cache: DiskCache, loaded: LoadedModel, source: str, split: str, model_key: dict) -> torch.Tensor:
    key = cache_key("tokens", **model_key, source=source, split=split)
    return cache.get_or_compute(key, lambda: data_mod.tokenize(loaded.tokenizer, data_mod.source_text(source, split)))


def summary_table(results: dict) -> str:
    """A short human-readable table of the run's perplexities and timings."""
    lines = [
        f"model={results['model']} pruner={results['pruner']} pattern={results['pattern']} allocation={results['allocation']}",
        f"target sparsity {results['target_sparsity']:.3f}, measured {results['sparsity']:.4f}",
        "",
        f"{'dataset':<12}{'dense ppl':>12}{'pruned ppl':>12}",
    ]
    for name in results["ppl"] or results["dense_ppl"]:
        dense = results["dense_ppl"].get(name, math.nan)
        pruned = results["ppl"].get(name, math.nan)
        lines.append(f"{name:<12}{dense:>12.3f}{pruned:>12.3f}")
    lines.append("")
    lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in results["timings"].items()))
    lines.append(f"peak memory: {results['peak_memory_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)
