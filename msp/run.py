"""One msp run as a sequence of stages: load → data → dense eval → allocation → prune → eval → zero-shot → export → results → summary.

Library code with typed inputs; :mod:`msp.cli` composes the Hydra config, checks it once (:func:`validate_early`)
and calls :func:`run`. Each stage is a small function; the stage meter records its time, and the results document
(:class:`msp.results.RunResults`) is built once at the end.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from msp import data as data_mod
from msp import provenance
from msp.allocation.budget import check_target
from msp.allocation.build import Allocated, AllocationContext, build_allocation, check_allocation_on_model, check_allocation_options
from msp.cache import DiskCache, cache_key
from msp.device import StageMeter, is_gpu, resolve_device, resolve_devices, resolve_dtype
from msp.distributed import is_writer
from msp.errors import MspError
from msp.eval.perplexity import perplexity
from msp.interrupt import RunStatus
from msp.io import atomic_dir, write_json_atomic
from msp.masks import Pattern
from msp.models import EMBEDDED_GEMMA3, LoadedModel, load_model, prunable_layers, save_pruned_model
from msp.prune import apply_weights_, check_pattern_fits, prune_, weighted_sparsity
from msp.results import RunResults
from msp.sensitivity import SensitivityReport
from msp.streaming import StreamingError, StreamingPlan, plan_streaming
from msp.streaming import parse_mode as parse_streaming_mode
from msp.tracking import Tracker

log = logging.getLogger(__name__)


class ConfigError(MspError):
    """A run configuration that cannot work; raised before any heavy work."""


@dataclass
class RunSpec:
    """The validated, typed view of one run's configuration."""

    model: str
    model_revision: str | None
    pruner: Any  # a msp.pruners.Pruner
    pruner_config: dict
    sparsity: float  # in [0, 1); a fixed N:M pattern's 1 - N/M
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
    export: dict | None = None  # {"semi_structured": bool}: 2:4 layers to semi-structured tensors on a GPU (msp.export) at the end
    true_sequential: bool = False  # prune inside each block's forward, the calibration set as one batch (msp.prune.prune_)
    model_loader: str = "auto"  # model.loader: hf | gguf | tiny (auto: from the name)
    max_seqlen: int | None = None  # model.max_seqlen: the context checked before loading (None: checked after loading)
    report: bool = True  # render summary.png / summary.md next to results.json (msp.report); a failure is a warning
    bos_per_window: bool = False  # model.bos_per_window: every window starts with the tokenizer's BOS token
    model_blocks: str | None = None  # model.blocks: the decoder blocks' dotted path (None: found automatically)


def prune_batch_size(spec: RunSpec) -> int:
    """Windows per block forward while pruning: all of them with ``true_sequential`` (one inline pass)."""
    return int(spec.data["nsamples"]) if spec.true_sequential else int(spec.batch_size)


def validate_early(spec: RunSpec) -> None:
    """Every value check that can run before loading weights, once (types and keys were checked at compose time)."""
    from msp.models import check_model_source, local_max_seqlen, skeleton_layers

    check_target(spec.sparsity, "sparsity")
    d = spec.data
    if int(d["nsamples"]) < 1:
        raise ConfigError(f"data.nsamples={d['nsamples']}: need at least 1 calibration window")
    if int(d["seqlen"]) < 2:
        raise ConfigError(f"data.seqlen={d['seqlen']}: need at least 2 tokens per window")
    data_mod.check_source(d["calibration"])  # known, and an embedded source's file is there and not empty
    for src in d.get("evaluation", []):
        data_mod.check_source(src, evaluation=True)  # ... or heldout: the calibration text's held-out tail
    check_model_source(spec.model, spec.model_loader)  # a local folder: config, tokenizer, weights (safetensors lengths)
    if int(spec.batch_size) < 1:
        raise ConfigError(f"batch_size={spec.batch_size}: need at least 1")
    check_allocation_options(dict(spec.allocation), spec.sparsity, spec.pattern)  # keys, bounds, N:M grid, allocation file
    if spec.allocation.get("method") == "file":
        from msp.allocation.build import check_file_fits

        check_file_fits(dict(spec.allocation), skeleton_layers(spec.model))  # another model's file: before loading, where the config is local
    if spec.model == EMBEDDED_GEMMA3 and spec.model_loader in ("auto", "gguf"):
        from msp.embedded_gemma import check_gemma_assets

        check_gemma_assets()  # the chunk wheels are installed (no hashing yet): one line naming install.sh --gemma
    max_seqlen = spec.max_seqlen if spec.max_seqlen is not None else local_max_seqlen(spec.model)  # model=hf: a local folder's config
    if max_seqlen is not None:
        data_mod.check_seqlen(int(d["seqlen"]), max_seqlen)
    if spec.pattern.is_nm:  # N:M must divide every layer: check on a weightless skeleton where the config is local
        for name, lin in (skeleton_layers(spec.model, spec.model_blocks) or {}).items():
            spec.pattern.check_divides(name, lin.in_features)
    if spec.allocation.get("method") == "atp":  # ATP's β grid over the model's blocks, where the config is local
        from msp.models import skeleton_model

        skeleton = skeleton_model(spec.model, spec.model_blocks)
        if skeleton is not None:
            check_allocation_on_model(skeleton, dict(spec.allocation), spec.sparsity, spec.pattern)
    _check_devices_and_memory(spec)
    _check_export(spec)
    if spec.zeroshot and spec.zeroshot.get("tasks"):
        from msp.eval.zeroshot import check_tasks

        check_tasks(list(spec.zeroshot["tasks"]), spec.zeroshot.get("include_path"))  # a typo fails before pruning


def _check_export(spec: RunSpec) -> None:
    """export.semi_structured needs a 2:4 pattern; export.quantized a SparseGPT pruner that quantizes (pruner.bits)
    and the compressed-tensors package: refuse before any pruning."""
    export = spec.export or {}
    if export.get("semi_structured"):
        from msp.export import ExportError, check_export_pattern

        try:
            check_export_pattern(spec.pattern)  # a model that will not be 2:4
        except ExportError as exc:
            raise ConfigError(str(exc)) from None
    if export.get("quantized"):
        from msp.quantized_export import SUPPORTED_BITS, check_available

        bits = getattr(spec.pruner, "bits", None)
        if spec.pruner.name != "sparsegpt" or bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"export.quantized=true needs pruner=sparsegpt pruner.bits=<{'|'.join(map(str, SUPPORTED_BITS))}> (the joint quantization "
                f"whose grid it writes); got pruner={spec.pruner.name} pruner.bits={bits}. Add pruner=sparsegpt pruner.bits=4, or drop export.quantized=true"
            )
        check_available()  # compressed-tensors missing: one line now, not after the pruning
        from msp.models import check_quantized_export, skeleton_model

        skeleton = skeleton_model(spec.model, spec.model_blocks)
        if skeleton is not None:
            check_quantized_export(skeleton)  # GPT-2's Conv1D layers: compressed-tensors cannot load them


def _check_devices_and_memory(spec: RunSpec) -> None:
    """device=cuda without a GPU, bf16 on an old GPU, eval.devices naming a missing GPU, an unknown streaming mode,
    a model or block too big for the memory budget (planned on a weightless skeleton): fail before loading."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    resolve_devices(spec.eval.get("devices"))
    try:
        parse_streaming_mode(spec.streaming)
    except StreamingError as exc:
        raise ConfigError(str(exc)) from None
    if spec.gpu_budget_gb is not None or is_gpu(device):
        from msp.models import skeleton_model

        skeleton = skeleton_model(spec.model, spec.model_blocks)
        if skeleton is not None:
            d = spec.data
            plan_streaming(skeleton.to(dtype), device, spec.streaming, spec.gpu_budget_gb, batch_size=prune_batch_size(spec),
                           seqlen=int(d["seqlen"]), nsamples=int(d["nsamples"]), need_hessian=bool(getattr(spec.pruner, "needs_hessian", False)))


@dataclass
class Evaluator:
    """How perplexity is measured in this run: the function (resident or streamed) and the input device, or the
    model spread over ``eval.devices`` for the duration of one evaluation stage."""

    model: torch.nn.Module
    ppl_fn: Callable
    device: torch.device
    devices: list[torch.device]
    batch_size: int

    @contextmanager
    def on_devices(self) -> Iterator[tuple[Callable, torch.device]]:
        """(perplexity function, input device): the run's own, or the model spread over ``eval.devices``."""
        if not self.devices:
            yield self.ppl_fn, self.device
            return
        from msp.eval.multi_device import spread_over

        with spread_over(self.model, self.devices) as first:
            yield perplexity, first


@dataclass
class StatusMeter(StageMeter):
    """The stage meter that also names each stage in the run's ``status.json`` as it starts (:mod:`msp.interrupt`)."""

    status: RunStatus | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self.status.stage(name) if self.status is not None else nullcontext(), super().stage(name):
            yield


@dataclass
class RunData:
    calibration_ids: torch.Tensor  # (nsamples, seqlen) calibration windows
    heldout_tokens: torch.Tensor  # the calibration text's held-out tail (search fitness)
    eval_windows: dict[str, torch.Tensor]  # dataset → (windows, seqlen)
    bos: int | None = None  # the token every window starts with (model.bos_per_window), None: plain token stream


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None, status: RunStatus | None = None) -> dict:
    """Execute one run (checked beforehand by :func:`validate_early`) and write ``run_dir/results.json``
    (atomically). Returns the results document (:meth:`msp.results.RunResults.to_json`). ``status`` (the CLI's
    ``status.json``) is told each stage as it starts."""
    tracker = tracker or Tracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    torch.manual_seed(spec.seed)
    meter = StatusMeter(device, status=status)
    cache = DiskCache(spec.cache_dir, enabled=spec.use_cache)
    model_key = {"model": spec.model, "revision": spec.model_revision, "dtype": str(dtype)}
    if spec.bos_per_window:  # other windows: other cached statistics and dense perplexities (other keys unchanged)
        model_key["bos_per_window"] = True
    # the stages every run has are metered here; those a config can switch off meter themselves when they run, so
    # ``timings`` names exactly the stages that ran ("total" last, the whole sequence)
    with meter.stage("total"):
        with meter.stage("load_model"):
            loaded, plan = load_stage(spec, device, dtype)
            weights = model_hash_stage(spec, loaded)  # before pruning rewrites the weights
        evaluator = make_evaluator(spec, loaded.model, device, plan)
        with meter.stage("data"):
            data = data_stage(spec, loaded, cache, model_key)
        dense_ppl = dense_eval_stage(spec, evaluator, data, cache, model_key, meter)
        dense_zs = dense_zeroshot_stage(spec, loaded, cache, model_key, meter)
        with meter.stage("allocation"):
            outcome = allocation_stage(spec, loaded.model, device, data, cache, model_key, plan, run_dir, tracker)
        qparams = quantization_grid_stage(spec, loaded.model)
        with meter.stage("prune"):
            if outcome.weights is not None:  # the search's allocation.final=candidate: the model it scored, as it is
                reports = apply_weights_(loaded.model, outcome.weights, outcome.allocation, spec.pattern)
            else:
                reports = prune_(loaded.model, spec.pruner, outcome.allocation, data.calibration_ids, device, spec.pattern, spec.batch_size,
                                 store_device=plan.store, true_sequential=spec.true_sequential)
        measured = weighted_sparsity(reports)
        log.info("measured sparsity (parameter-weighted over %d Linear layers): %.4f", len(reports), measured)
        ppl = eval_stage(spec, evaluator, data, meter)
        zeroshot = zeroshot_stage(spec, loaded, device, plan, meter)
        saved = save_stage(spec, loaded, run_dir, meter)
        quantized = quantized_export_stage(spec, loaded, qparams, run_dir, meter)
        export = export_stage(spec, loaded, data, run_dir, meter)  # last: on a GPU it converts 2:4 layers in place
    results = RunResults(
        model=spec.model, pruner=spec.pruner.name, pruner_config=spec.pruner_config, pattern=str(spec.pattern),
        allocation=outcome.allocation.method, target_sparsity=outcome.allocation.target, sparsity=measured, dense_ppl=dense_ppl, ppl=ppl,
        layers=layer_rows(reports, outcome.sensitivity), data=data_summary(spec, data), seed=spec.seed, device=str(device),
        dtype=str(dtype).replace("torch.", ""), timings=meter.timings, peak_memory_bytes=meter.peak_bytes,
        peak_memory_by_stage=meter.peak_memory, streaming=plan.to_json(), eval_devices=[str(d) for d in evaluator.devices] or [str(device)],
        true_sequential=spec.true_sequential, cache={"hits": cache.hits, "misses": cache.misses}, experiment=spec.experiment,
        config_hash=spec.config_hash, search=outcome.search,
        sensitivity_method=outcome.sensitivity.method if outcome.sensitivity is not None else None,
        sensitivity_seconds=outcome.sensitivity.seconds if outcome.sensitivity is not None else None,
        dense_zeroshot=dense_zs, zeroshot=zeroshot, saved_model=saved, export=export, quantized_export=quantized,
        provenance=provenance_of(spec, device, weights, data),
    ).to_json()
    if is_writer():  # several ranks (msp.distributed): rank 0 alone writes the run's files
        write_json_atomic(run_dir / "results.json", results)
        if spec.report:
            report_stage(run_dir)
        tracker.log_results(results, run_dir)
    return results


def load_stage(spec: RunSpec, device: torch.device, dtype: torch.dtype) -> tuple[LoadedModel, StreamingPlan]:
    """The model, checked against the data and the pattern, and the streaming plan (resident models moved now)."""
    loaded = load_model(spec.model, dtype=dtype, seed=spec.seed, revision=spec.model_revision, loader=spec.model_loader,
                        blocks=spec.model_blocks)
    data_mod.check_seqlen(int(spec.data["seqlen"]), loaded.max_seqlen)
    check_pattern_fits(loaded.model, spec.pattern)
    check_allocation_on_model(loaded.model, dict(spec.allocation), spec.sparsity, spec.pattern)
    if (spec.export or {}).get("quantized"):
        from msp.models import check_quantized_export

        check_quantized_export(loaded.model)  # a hub GPT-2 had no skeleton to check before loading
    plan = plan_streaming(loaded.model, device, spec.streaming, spec.gpu_budget_gb, batch_size=prune_batch_size(spec),
                          seqlen=int(spec.data["seqlen"]), nsamples=int(spec.data["nsamples"]),
                          need_hessian=bool(getattr(spec.pruner, "needs_hessian", False)))
    if not plan.stream:
        loaded.model.to(device)  # streaming keeps the model on the CPU; msp.pipeline moves one block at a time
    return loaded, plan


def model_hash_stage(spec: RunSpec, loaded: LoadedModel) -> dict:
    """SHA-256 of the weights as loaded (files hashed once per path, size and mtime; see :mod:`msp.provenance`)."""
    memo = Path(spec.cache_dir) / "file-hashes.json" if spec.cache_dir else None
    return provenance.model_hash(spec.model, spec.model_loader, loaded.model, spec.model_revision, memo)


def provenance_of(spec: RunSpec, device: torch.device, weights: dict, data: RunData) -> dict:
    """``results.json``'s ``provenance``: code, libraries, device, seeds, config hash, weights and data hashes."""
    return {**provenance.environment(device), "seeds": provenance.seeds_of(spec.seed, dict(spec.allocation)),
            "config_hash": spec.config_hash, "model_sha256": weights,
            "data_sha256": provenance.data_hashes(data.calibration_ids, data.heldout_tokens, data.eval_windows)}


def make_evaluator(spec: RunSpec, model: torch.nn.Module, device: torch.device, plan: StreamingPlan) -> Evaluator:
    ppl_fn = partial(perplexity, plan=plan)  # streamed or resident, as the plan says
    return Evaluator(model, ppl_fn, device, resolve_devices(spec.eval.get("devices")), int(spec.eval.get("batch_size", 1)))


def data_stage(spec: RunSpec, loaded: LoadedModel, cache: DiskCache, model_key: dict) -> RunData:
    d = spec.data
    seqlen = int(d["seqlen"])
    bos = data_mod.window_bos(loaded.tokenizer, spec.bos_per_window)
    split = data_mod.split_calibration(tokens_of(cache, loaded, d["calibration"], "train", model_key), float(d.get("heldout_fraction", 0.1)))
    calibration_ids = data_mod.random_windows(split.calibration_tokens, int(d["nsamples"]), seqlen, spec.seed, bos=bos)

    def windows_of(name: str) -> torch.Tensor:  # heldout: the calibration text's unseen tail; else the source's test split
        if name == data_mod.HELDOUT:
            return data_mod.heldout_windows(split.heldout_tokens, seqlen, d.get("eval_windows"), bos=bos,
                                            reserved_tokens=data_mod.HELDOUT_RESERVED_TOKENS)
        return data_mod.sequential_windows(tokens_of(cache, loaded, name, "test", model_key), seqlen, d.get("eval_windows"), bos=bos)

    eval_windows = {name: windows_of(name) for name in d.get("evaluation", [])}
    return RunData(calibration_ids, split.heldout_tokens, eval_windows, bos)


def dense_eval_stage(spec: RunSpec, evaluator: Evaluator, data: RunData, cache: DiskCache, model_key: dict, meter: StageMeter) -> dict[str, float]:
    """The dense model's perplexity per dataset (cached across runs); {} with ``eval.skip`` or ``eval.dense=false``."""
    dense_ppl: dict[str, float] = {}
    if spec.eval.get("skip", False) or not spec.eval.get("dense", True):
        return dense_ppl
    seqlen = int(spec.data["seqlen"])
    with meter.stage("dense_eval"), evaluator.on_devices() as (ppl_of, eval_device):
        for name, windows in data.eval_windows.items():
            key = cache_key("dense_ppl", **model_key, dataset=eval_source_key(spec, name), seqlen=seqlen, windows=int(windows.shape[0]))
            dense_ppl[name] = float(cache.get_or_compute(
                key, lambda w=windows: ppl_of(evaluator.model, w, eval_device, evaluator.batch_size, f"dense ppl {name}")))
            log.info("dense perplexity on %s: %.3f", name, dense_ppl[name])
    return dense_ppl


def dense_zeroshot_stage(spec: RunSpec, loaded: LoadedModel, cache: DiskCache, model_key: dict, meter: StageMeter) -> dict:
    if not (spec.zeroshot and spec.zeroshot.get("tasks") and spec.zeroshot.get("dense")):
        return {}
    from msp.eval.zeroshot import dense_zeroshot  # lazy: lm-eval is heavy

    with meter.stage("dense_zeroshot"):  # before pruning; cached like the dense perplexity
        return dense_zeroshot(loaded.model, loaded.tokenizer, spec.zeroshot, cache, model_key)


def eval_source_key(spec: RunSpec, name: str) -> str:
    """What an evaluation source's windows depend on besides the model and seqlen: its name, and for ``heldout`` the
    calibration source and the held-out fraction it is cut from."""
    if name != data_mod.HELDOUT:
        return name
    d = spec.data
    return f"{name}:{d['calibration']}:{float(d.get('heldout_fraction', 0.1))}:{data_mod.HELDOUT_RESERVED_TOKENS}"


def allocation_stage(spec: RunSpec, model: torch.nn.Module, device: torch.device, data: RunData, cache: DiskCache, model_key: dict,
                     plan: StreamingPlan, run_dir: Path, tracker: Tracker) -> Allocated:
    """The allocation (written to ``allocation.json``) and its sensitivity report (``sensitivity.json``)."""
    d = spec.data
    ctx = AllocationContext(
        model=model, layers=prunable_layers(model), target=spec.sparsity, pattern=spec.pattern, device=device, pruner=spec.pruner,
        calibration_ids=data.calibration_ids, heldout_tokens=data.heldout_tokens, seqlen=int(d["seqlen"]), seed=spec.seed, cache=cache,
        cache_fields={**model_key, "data": d["calibration"], "nsamples": int(d["nsamples"]), "seqlen": int(d["seqlen"]), "seed": spec.seed},
        run_dir=run_dir, batch_size=spec.batch_size, tracker=tracker, plan=plan, bos_token_id=data.bos,
        true_sequential=bool(spec.true_sequential),
    )
    outcome = build_allocation(ctx, dict(spec.allocation))
    if not is_writer():
        return outcome
    outcome.allocation.save(run_dir / "allocation.json")
    if outcome.sensitivity is not None:
        write_json_atomic(run_dir / "sensitivity.json", outcome.sensitivity.to_json())
    return outcome


def eval_stage(spec: RunSpec, evaluator: Evaluator, data: RunData, meter: StageMeter) -> dict[str, float]:
    ppl: dict[str, float] = {}
    if spec.eval.get("skip", False):
        return ppl
    with meter.stage("eval"), evaluator.on_devices() as (ppl_of, eval_device):
        for name, windows in data.eval_windows.items():
            ppl[name] = ppl_of(evaluator.model, windows, eval_device, evaluator.batch_size, f"pruned ppl {name}")
            log.info("pruned perplexity on %s: %.3f", name, ppl[name])
    return ppl


def zeroshot_stage(spec: RunSpec, loaded: LoadedModel, device: torch.device, plan: StreamingPlan, meter: StageMeter) -> dict | None:
    """lm-eval on the pruned model: ``{"zeroshot": ..., "zeroshot_source": ...}``, or None without tasks."""
    if not (spec.zeroshot and spec.zeroshot.get("tasks")):
        return None
    from msp.eval.zeroshot import run_zeroshot  # lazy: lm-eval is heavy

    zs_device = device
    if plan.stream:  # lm-eval needs the whole model on one device: the CPU, where a streamed model lives
        zs_device = torch.device("cpu")
        log.warning("streaming: zero-shot evaluation runs on the CPU (the model does not fit %s)", device)
        loaded.model.to(zs_device)
    with meter.stage("zeroshot"):
        return run_zeroshot(loaded.model, loaded.tokenizer, spec.zeroshot, zs_device)


def save_stage(spec: RunSpec, loaded: LoadedModel, run_dir: Path, meter: StageMeter) -> str | None:
    if not spec.save_model or not is_writer():
        return None
    with meter.stage("save_model"):
        save_pruned_model(loaded, run_dir / "model")  # written whole or not at all (msp.io.atomic_dir)
    return str(run_dir / "model")


def quantization_grid_stage(spec: RunSpec, model: torch.nn.Module) -> dict | None:
    """export.quantized: the per-row grid of every prunable weight, taken from the *dense* weights (SparseGPT's joint
    quantization takes its grid there), before pruning changes them; None otherwise."""
    if not (spec.export or {}).get("quantized"):
        return None
    from msp.quantized_export import qparams_from_dense

    return qparams_from_dense({n: lin.weight for n, lin in prunable_layers(model).items()}, int(spec.pruner.bits))


def quantized_export_stage(spec: RunSpec, loaded: LoadedModel, qparams: dict | None, run_dir: Path, meter: StageMeter) -> dict | None:
    """export.quantized: write ``<run dir>/model-quantized`` (compressed-tensors pack-quantized, float16 scales and
    unpacked tensors, as deployed); its :class:`~msp.quantized_export.QuantizedExport` as JSON, with the dense
    float16 size beside it."""
    if qparams is None or not is_writer():
        return None
    from msp.quantized_export import save_pack_quantized

    with meter.stage("quantized_export"):
        result = save_pack_quantized(loaded.model, loaded.tokenizer, run_dir / "model-quantized", qparams,
                                     bits=int(spec.pruner.bits), dtype=torch.float16)
    dense_fp16 = 2 * sum(p.numel() for p in loaded.model.parameters())  # parameters() counts tied weights once
    return {**result.to_json(), "dense_float16_bytes": dense_fp16}


def report_stage(run_dir: Path) -> None:
    """summary.png and summary.md next to results.json (:func:`msp.report.render_run`); a failure is one warning,
    never the run's: the results are already written."""
    try:
        from msp.report import render_run

        render_run(run_dir)  # logs where it wrote
    except Exception as exc:  # noqa: BLE001 - a picture must never fail a finished run
        log.warning("run summary not written (%s: %s); python -m msp.report %s retries it", type(exc).__name__, exc, run_dir)


def export_stage(spec: RunSpec, loaded: LoadedModel, data: RunData, run_dir: Path, meter: StageMeter) -> dict | None:
    if not (spec.export or {}).get("semi_structured") or not is_writer():
        return None
    from msp.export import export_run  # last: on a GPU it converts the model's 2:4 layers in place

    with meter.stage("export"):
        return export_run(loaded.model, data.calibration_ids[:1])


def layer_rows(reports: list, sensitivity: SensitivityReport | None) -> list[dict]:
    return [{**r.to_json(), **({"sensitivity": sensitivity.values.get(r.name)} if sensitivity is not None else {})} for r in reports]


def data_summary(spec: RunSpec, data: RunData) -> dict:
    d = spec.data
    return {"calibration": d["calibration"], "evaluation": list(d.get("evaluation", [])), "nsamples": int(d["nsamples"]),
            "seqlen": int(d["seqlen"]), "eval_windows": {k: int(v.shape[0]) for k, v in data.eval_windows.items()}}


def tokens_of(cache: DiskCache, loaded: LoadedModel, source: str, split: str, model_key: dict) -> torch.Tensor:
    """The tokenized text of one data source and split (cached per model)."""
    key = cache_key("tokens", **model_key, source=source, split=split)
    return cache.get_or_compute(key, lambda: data_mod.tokenize(loaded.tokenizer, data_mod.source_text(source, split)))
