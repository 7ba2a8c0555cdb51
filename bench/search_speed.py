"""What does one search candidate cost? The search's fitness before and after issue 12 (§1, §2, §6).

On the embedded SmolLM2-135M at the default search settings (``allocation=msp``: block units, step 0.025 within
±0.2 of the target, population 4, 8 offspring, stages of 256 and 512 held-out tokens with 2 survivors, KL to the
dense model; :class:`msp.search.settings.SearchConfig`), the same seeded evolution runs twice for each placement
of the model, resident and streamed (``streaming=true`` with a pretend-small ``gpu_budget_gb``):

* **before**: one forward per candidate (``allocation.fitness_blockwise=false``: ``ModelFitness.__call__``);
* **after**: a stage's candidates scored together block by block, each from the longest cached prefix of hidden
  states (``ModelFitness.many``).

Reported per candidate evaluation: the fitness cost as a multiple of a bare forward over the same tokens (the
model's own forward with its logits over the same windows, timed before the search and after every generation:
:class:`BareForward`), the mean fraction and number of decoder
blocks run, the bytes moved to the compute device (:class:`msp.search.fitness.FitnessCost`; on a CPU run counted
as a GPU run would move them), and the variant source's bytes per prunable weight. The start population is the
uniform allocation and mutated copies of it (the Fisher start is not a fitness cost). Both paths must give the same
history (checked: same best genome, best fitness within 1e-5 relative). Times are process CPU seconds (1 thread),
robust to other jobs on a shared machine; wall seconds are reported too.

    python bench/search_speed.py --generations 10
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from msp import data as data_mod
from msp.device import device_name, resolve_device, resolve_dtype, synchronize
from msp.masks import Pattern
from msp.models import find_blocks, layer_block_index, load_model, prunable_layers
from msp.pruners import make_pruner
from msp.search.evolution import Evolution, mutate, snap
from msp.search.fitness import CandidateModel, ModelFitness, StoredVariants, precompute_variants, resolve_mode
from msp.search.grid import build_grid, fit_store_levels
from msp.search.settings import parse_options
from msp.streaming import plan_streaming

log = logging.getLogger("bench.search_speed")
TARGET = 0.8  # issue 12 §2: fitness per candidate ≤ 0.8 × a bare forward over its tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pruner", default="wanda", help="wanda (ranking variants, the default pruner) or sparsegpt (stored variants)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows of the variant pass (allocation.variant_nsamples)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--gpu-budget-gb", type=float, default=0.6, help="the streamed runs' pretend budget (GiB; streaming=true streams whatever it is)")
    ap.add_argument("--placements", default="resident,streamed")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    loaded = load_model(args.model, dtype=dtype)
    model = loaded.model.eval()
    settings = parse_options({}, args.sparsity, Pattern.parse("unstructured"))
    bos = data_mod.window_bos(loaded.tokenizer, False)
    split = data_mod.split_calibration(data_mod.tokenize(loaded.tokenizer, data_mod.source_text("book", "train")), 0.1)
    calibration = data_mod.random_windows(split.calibration_tokens, args.nsamples, args.seqlen, 0, bos=bos)
    stage_windows = [max(1, -(-t // settings.fitness_seqlen)) for t in settings.tokens]
    windows = data_mod.sequential_windows(split.heldout_tokens, settings.fitness_seqlen, max(stage_windows), bos=bos)

    layers = prunable_layers(model)
    prefix, blocks = find_blocks(model)
    units = [[n for n in layers if layer_block_index(n, prefix) == b] for b in range(len(blocks))]
    unit_params = [sum(layers[n].weight.numel() for n in u) for u in units]
    pruner = make_pruner(args.pruner)
    mode = resolve_mode(settings.candidates, pruner)
    grid_args = (unit_params, settings.target, Pattern.parse("unstructured"), settings.bounds, settings.step)
    grid, step = fit_store_levels(*grid_args, settings.max_levels) if mode == "store" else (build_grid(*grid_args), settings.step)
    levels = {n: grid.levels(u) for u, names in enumerate(units) for n in names} if mode == "store" else None

    model.to(device)
    variants = precompute_variants(model, layers, pruner, Pattern.parse("unstructured"), calibration, device, mode=mode, levels=levels,
                                   max_levels=settings.max_levels, batch_size=4)
    weights = sum(unit_params)
    results: dict = {
        "model": args.model, "device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "note": args.note, "pruner": args.pruner, "candidates": mode, "sparsity": args.sparsity, "units": len(units),
        "levels_per_unit": grid.most_levels(), "step": step, "generations": args.generations,
        "population": settings.config.population, "offspring": settings.config.offspring, "stage_tokens": settings.tokens,
        "fitness_seqlen": settings.fitness_seqlen, "prunable_weights": weights,
        "runs": {},
    }
    try:
        for placement in [p.strip() for p in args.placements.split(",") if p.strip()]:
            plan = None
            if placement == "streamed":
                plan = plan_streaming(model, device, "true", args.gpu_budget_gb, batch_size=settings.fitness_batch_size,
                                      seqlen=settings.fitness_seqlen, nsamples=windows.shape[0])
                model.to("cpu")
            for path in ("before", "after"):
                results["runs"][f"{placement}/{path}"] = run_search(model, layers, variants, units, grid, settings, windows,
                                                                     stage_windows, device, plan, path == "after",
                                                                     args.generations)
            if placement == "streamed":
                model.to(device)
            same = results["runs"][f"{placement}/before"], results["runs"][f"{placement}/after"]
            if same[0]["best_genome"] != same[1]["best_genome"] or abs(same[0]["best_fitness"] - same[1]["best_fitness"]) > 1e-5 * abs(same[0]["best_fitness"]):
                raise SystemExit(f"{placement}: before and after differ: {same[0]['best_fitness']} vs {same[1]['best_fitness']}")
        results["variant_bytes_per_weight"] = variant_bytes_per_weight(variants, weights)
    finally:
        variants.close()
    write(results, Path(args.out))
    return results


def variant_bytes_per_weight(variants, weights: int) -> dict:
    """The variant source per prunable weight: the dense copy, and the levels (store) or the ranking plus the sorted
    order the blockwise fitness's level steps use (ranking)."""
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts) / weights  # noqa: E731
    if isinstance(variants, StoredVariants):
        return {"dense": nbytes(variants.dense.values()), "levels": variants.store_bytes() / weights}
    return {"dense": nbytes(variants.dense.values()), "ranking": nbytes(variants.ranks.values()), "order": nbytes(variants.orders.values())}


class BareForward:
    """The reference: the model's own forward (logits included) over a stage's fitness windows, in the fitness's
    batches (streamed: the same blocks-one-at-a-time forward the per-genome fitness runs), timed in CPU and wall
    seconds *during* each search — before it and after every generation, cycling through the stages' window counts —
    so that it shares the machine's conditions with the fitness it is compared to."""

    def __init__(self, model, windows, stage_windows: list[int], device, plan, batch_size: int):
        self.model, self.windows, self.device, self.plan, self.batch_size = model, windows, device, plan, batch_size
        self.counts = sorted(set(stage_windows))
        self.samples: dict[int, list[tuple[float, float]]] = {n: [] for n in self.counts}
        self.spent = (0.0, 0.0)  # CPU and wall seconds of the reference forwards made inside the search

    def forward(self, n: int) -> None:
        from msp.pipeline import batch_logits

        with torch.inference_mode():
            for _, logits in batch_logits(self.model, self.windows[:n], self.device, plan=self.plan, batch_size=self.batch_size):
                logits.float()

    def measure(self, n: int) -> tuple[float, float]:
        synchronize(self.device)
        c0, w0 = time.process_time(), time.perf_counter()
        self.forward(n)
        synchronize(self.device)
        sample = (time.process_time() - c0, time.perf_counter() - w0)
        self.samples[n].append(sample)
        return sample

    def on_generation(self, generation: int, *_) -> None:
        c, w = self.measure(self.counts[generation % len(self.counts)])
        self.spent = (self.spent[0] + c, self.spent[1] + w)

    def seconds(self, n: int, kind: int) -> float:
        return statistics.median(x[kind] for x in self.samples[n])

    def total(self, evaluations: int, windows_scored: int, kind: int) -> float:
        """Σ over evaluations of a bare forward over that evaluation's windows. Two stages: the evaluations per stage
        follow from the windows scored (e₀ w₀ + e₁ w₁ = windows, e₀ + e₁ = evaluations); otherwise per window of the last."""
        w = self.counts
        if len(w) == 2:
            e1 = (windows_scored - w[0] * evaluations) / (w[1] - w[0])
            return (evaluations - e1) * self.seconds(w[0], kind) + e1 * self.seconds(w[1], kind)
        return windows_scored * self.seconds(w[-1], kind) / w[-1]

    def to_json(self) -> dict:
        return {str(n): {"cpu_s": self.seconds(n, 0), "wall_s": self.seconds(n, 1), "samples": len(self.samples[n])} for n in self.counts}


def run_search(model, layers, variants, units, grid, settings, windows, stage_windows, device, plan, blockwise: bool,
               generations: int) -> dict:
    """One seeded search (uniform start + mutated copies), its fitness cost per evaluation."""
    candidate = CandidateModel(layers, variants, units, grid.sparsity)
    fitness = ModelFitness(model, candidate, windows, stage_windows, device, settings.metric, settings.fitness_batch_size, plan=plan,
                           blockwise=blockwise, memory_gb=settings.fitness_memory_gb)
    bare = BareForward(model, windows, stage_windows, device, plan, settings.fitness_batch_size)
    bare.forward(bare.counts[-1])  # warm-up
    for n in bare.counts:
        bare.measure(n)
    evolution = Evolution(grid.space, replace(settings.config, generations=generations), on_generation=bare.on_generation)
    uniform = snap(grid.real_levels([settings.target] * len(units)), grid.space)
    rng = np.random.default_rng(settings.config.seed + 1)
    start = [uniform] + [mutate(uniform, grid.space, rng, settings.init_swaps) for _ in range(settings.config.population - 1)]
    synchronize(device)
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        result = evolution.run(fitness, start)
    finally:
        candidate.restore()
    synchronize(device)
    cpu, wall = time.process_time() - c0 - bare.spent[0], time.perf_counter() - w0 - bare.spent[1]  # the search without the reference forwards
    cost = fitness.cost.to_json()
    evals, tokens = cost["evaluations"], cost["tokens"]
    scored = tokens // windows.shape[1]
    out = {
        "blockwise": blockwise, "streamed": plan is not None, "evaluations": evals, "tokens": tokens, "cpu_s": cpu, "wall_s": wall,
        "cpu_s_per_candidate": cpu / max(1, evals),
        "cost_x_bare_forward": cpu / bare.total(evals, scored, 0),
        "wall_cost_x_bare_forward": wall / bare.total(evals, scored, 1),
        "blocks_fraction": cost["blocks_fraction"],
        "blocks_per_candidate": cost["block_windows"] / max(1, evals),
        "blocks_per_candidate_full": cost["block_windows_full"] / max(1, evals),
        "bytes_to_device_per_candidate": cost["bytes_to_device_total"] / max(1, evals),
        "bytes_to_device_per_candidate_by_kind": {k: v / max(1, evals) for k, v in cost["bytes_to_device"].items()},
        "passes": cost["passes"], "stride": fitness.stride, "layer_swaps": candidate.swaps,
        "best_fitness": result.best_fitness, "best_genome": result.best.tolist(), "generations": result.generations,
        "bare_forward": bare.to_json(),
    }
    log.info("%s %s: %.2f x bare forward (CPU), %.2f (wall); blocks %.0f%%; %.1f MiB to the device per candidate; best %.6f",
             "streamed" if plan is not None else "resident", "after" if blockwise else "before", out["cost_x_bare_forward"],
             out["wall_cost_x_bare_forward"], 100 * out["blocks_fraction"], out["bytes_to_device_per_candidate"] / 2**20, result.best_fitness)
    return out


def markdown(r: dict) -> str:
    mib = 2**20
    lines = [
        f"# Search fitness cost: {r['model']} on {r['device_name']} ({r['device']}, {r['dtype']}, torch {r['torch']}, {r['threads']} thread(s))",
        "",
        f"Default search settings: {r['units']} block units, {r['levels_per_unit']} levels per unit (step {r['step']:g}), "
        f"sparsity {r['sparsity']}, population {r['population']}, {r['offspring']} offspring, stages {r['stage_tokens']} tokens "
        f"(windows of {r['fitness_seqlen']}), {r['generations']} generations, pruner {r['pruner']} ({r['candidates']} variants). "
        f"Streamed: `streaming=true`, the blocks visit the device one at a time. Machine: {r['note'] or 'not noted'}.",
        "",
        "| placement | fitness | evaluations | CPU s per candidate | × bare forward (CPU s) | × bare forward (wall) | blocks run per candidate | fraction | MiB to the device per candidate | passes | best fitness |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in r["runs"].items():
        placement, path = name.split("/")
        label = "before: one forward each" if path == "before" else "after: block by block, cached prefixes"
        by_kind = ", ".join(f"{k} {v / mib:.1f}" for k, v in x["bytes_to_device_per_candidate_by_kind"].items() if v)
        lines.append(
            f"| {placement} | {label} | {x['evaluations']} | {x['cpu_s_per_candidate']:.3f} | **{x['cost_x_bare_forward']:.2f}** | {x['wall_cost_x_bare_forward']:.2f} | "
            f"{x['blocks_per_candidate']:.1f} of {x['blocks_per_candidate_full']:.1f} | {x['blocks_fraction']:.2f} | "
            f"{x['bytes_to_device_per_candidate'] / mib:.1f} ({by_kind}) | {x['passes']} | {x['best_fitness']:.6f} |"
        )
    v = r["variant_bytes_per_weight"]
    lines.append("")
    for placement in dict.fromkeys(k.split("/")[0] for k in r["runs"]):
        b, a = r["runs"].get(f"{placement}/before"), r["runs"].get(f"{placement}/after")
        if a and b:
            lines.append(f"{placement}: after / before = {a['cpu_s'] / b['cpu_s']:.2f} of the CPU time, "
                         f"{a['bytes_to_device_per_candidate'] / b['bytes_to_device_per_candidate']:.2f} of the bytes to the device; same best genome.")
    lines += [
        "",
        "Variant source, bytes per prunable weight: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()) +
        f" ({r['prunable_weights']:,} weights). Target (issue 12 §2): ≤ {TARGET}× a bare forward per candidate.",
        "Blocks run per candidate: decoder-block forwards over one fitness window, per evaluation (a full forward runs "
        "windows × blocks). Bytes to the device are counted as a GPU run moves them (`FitnessCost`).",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"search_speed_{results['model'].replace('/', '_')}_{results['device'].replace(':', '')}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
