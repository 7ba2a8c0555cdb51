"""The results document of one run (``results.json``), built in one place.

Its keys are a contract: ``experiments/build_tables.py``, the W&B tracker, the skip-done sweep and the tests read
them. Optional sections (``search``, ``sensitivity_method``, ``dense_zeroshot``, ``zeroshot``, ``saved_model``,
``export``, ``quantized_export``) appear only when the run produced them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResults:
    model: str
    pruner: str
    pruner_config: dict
    pattern: str
    allocation: str  # the allocation's method (``file:<method>`` for allocation=file)
    target_sparsity: float  # the allocation's target (the file's target for allocation=file)
    sparsity: float  # measured, parameter-weighted over the pruned Linear layers
    dense_ppl: dict[str, float]
    ppl: dict[str, float]
    layers: list[dict]  # one PruneReport.to_json() per layer (+ its "sensitivity" when the allocation had one)
    data: dict
    seed: int
    device: str
    dtype: str
    timings: dict[str, float]  # the stage meter's seconds per stage, "total" last
    peak_memory_bytes: int
    peak_memory_by_stage: dict[str, dict[str, int]]  # per stage, and "total": the whole run (the meter's outer stage)
    streaming: dict
    eval_devices: list[str]
    true_sequential: bool
    cache: dict[str, int]  # {"hits": n, "misses": n}
    experiment: str
    config_hash: str | None
    search: dict | None = None  # the search's report (allocation=msp)
    sensitivity_method: str | None = None
    sensitivity_seconds: float | None = None
    dense_zeroshot: dict = field(default_factory=dict)
    zeroshot: dict | None = None  # msp.eval.zeroshot.run_zeroshot: {"zeroshot": ..., "zeroshot_source": ...}
    saved_model: str | None = None
    export: dict | None = None
    provenance: dict | None = None  # msp.run.provenance_of: versions, git, device name, seeds, weights and data SHA-256
    quantized_export: dict | None = None  # export.quantized: msp.quantized_export.QuantizedExport.to_json() + dense_float16_bytes

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _ALWAYS}
        if self.search is not None:
            out["search"] = self.search
        if self.sensitivity_method is not None:
            out["sensitivity_method"] = self.sensitivity_method
            out["sensitivity_seconds"] = self.sensitivity_seconds
        if self.dense_zeroshot:
            out["dense_zeroshot"] = self.dense_zeroshot
        out.update(self.zeroshot or {})  # zeroshot, zeroshot_source
        if self.saved_model is not None:
            out["saved_model"] = self.saved_model
        if self.export is not None:
            out["export"] = self.export
        if self.provenance is not None:
            out["provenance"] = self.provenance
        if self.quantized_export is not None:
            out["quantized_export"] = self.quantized_export
        return out


_ALWAYS = ("model", "pruner", "pruner_config", "pattern", "allocation", "target_sparsity", "sparsity", "dense_ppl", "ppl", "layers",
           "data", "seed", "device", "dtype", "timings", "peak_memory_bytes", "peak_memory_by_stage", "streaming", "eval_devices",
           "true_sequential", "cache", "experiment", "config_hash")


def summary_table(results: dict) -> str:
    """A short human-readable table of a run's perplexities and timings (from ``results.json``'s dict)."""
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


__all__ = ["RunResults", "summary_table"]
