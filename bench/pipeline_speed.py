"""How fast is the pruning pipeline itself? Stage times as ratios to one forward pass over the same tokens.

For each pruner (magnitude, Wanda, SparseGPT by default) on the same calibration windows:

* ``forward``: one full-model forward (embeddings → blocks → lm_head) over the calibration windows in batches of
  ``--batch-size`` — the unit every ratio is expressed in; ``blocks_forward``: the same without the lm_head and
  block by block through :func:`msp.pipeline.stream_blocks` (what the pipeline's passes cost at best);
* ``prune``: :func:`msp.prune.prune_` with a uniform allocation — wall time, split into the pruner's math
  (``prune_weight``, timed around each call) and the rest (hooks, statistics, the block passes);
* peak memory (CPU RSS and GPU) of every stage, from :class:`msp.device.StageMeter`;
* ``search`` (per pruner, ``--search``): the search's precompute (one dense calibration pass building the
  per-layer variants: score rankings for magnitude/Wanda, a per-level weight store for SparseGPT) as a ratio to
  the forward, and one candidate's fitness — put the genome's weights in place, then KL to the dense model on
  ``--fitness-windows`` × ``--fitness-seqlen`` held-out tokens — as a ratio to a bare forward over the same
  tokens, with the weight swap timed on its own; a random genome over ``--levels`` levels per block, then
  candidates that each move 1-3 blocks of the previous one to another level (the search's mutation).

Runs on the CPU now and on a GPU later (``--device cuda``); timings are medians of ``--repeats`` after a warm-up.
Writes ``bench/results/pipeline_speed_<model>_<device>.json`` and ``.md``. Issue 5 targets: Wanda ≤ 1.3×
forward, SparseGPT ≤ 3× forward, a search candidate's fitness ≤ 1.2× a bare forward over its tokens.

    python bench/pipeline_speed.py --nsamples 16 --seqlen 512
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
from pathlib import Path

import torch

from msp import data as data_mod
from msp.allocation.base import uniform_allocation
from msp.masks import Pattern
from msp.device import StageMeter, device_name, resolve_device, resolve_dtype, synchronize
from msp.models import load_model, prunable_layers
from msp.pipeline import stream_blocks
from msp.prune import prune_, weighted_sparsity
from msp.pruners import make_pruner

log = logging.getLogger("bench.pipeline_speed")
TARGETS = {"wanda": 1.3, "sparsegpt": 3.0}
FITNESS_TARGET = 1.2


def timed(fn, device: torch.device, repeats: int, warmup: bool = True) -> list[float]:
    """Wall times of ``repeats`` calls (after one warm-up call), with the device synchronised around each."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), tiny-llama, or a HF name/folder")
    ap.add_argument("--pruners", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of each timing (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--true-sequential", default="wanda,sparsegpt",
                    help="pruners also timed with true_sequential=true (one inline block pass, all windows in one batch)")
    ap.add_argument("--search", default="wanda,sparsegpt", help="pruners whose search candidates are timed ('' = none)")
    ap.add_argument("--levels", default="0.5,0.6,0.7,0.8,0.9", help="sparsity levels of the search benchmark's grid")
    ap.add_argument("--fitness-windows", type=int, default=2)
    ap.add_argument("--fitness-seqlen", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=8, help="random genomes timed per pruner (median reported)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    meter = StageMeter(device)

    with meter.stage("load_model"):
        loaded = load_model(args.model, dtype=dtype)
        model = loaded.model.to(device)
    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    text = data_mod.source_text("book", "train")
    tokens = data_mod.tokenize(loaded.tokenizer, text)
    ids = data_mod.random_windows(tokens, args.nsamples, args.seqlen, seed=0)
    n_tokens = ids.numel()

    def full_forward():
        with torch.inference_mode():
            for s in range(0, ids.shape[0], args.batch_size):
                model(input_ids=ids[s : s + args.batch_size].to(device), use_cache=False)

    def blocks_forward():
        with torch.inference_mode():
            stream_blocks(model, ids, device, batch_size=args.batch_size, desc="blocks forward")

    with meter.stage("forward"):
        fwd = timed(full_forward, device, args.repeats)
    with meter.stage("blocks_forward"):
        blk = timed(blocks_forward, device, args.repeats)
    forward_s = statistics.median(fwd)
    results: dict = {
        "model": args.model, "device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size, "tokens": n_tokens,
        "sparsity": args.sparsity, "pattern": args.pattern, "repeats": args.repeats,
        "forward_s": forward_s, "forward_tokens_per_s": n_tokens / forward_s,
        "blocks_forward_s": statistics.median(blk), "blocks_forward_ratio": statistics.median(blk) / forward_s,
        "pruners": {},
    }
    layers = prunable_layers(model)
    allocation = uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, args.sparsity)
    names = [p.strip() for p in args.pruners.split(",") if p.strip()]
    inline = {p.strip() for p in args.true_sequential.split(",") if p.strip()}
    runs = [(n, n, False) for n in names] + [(f"{n} (true sequential)", n, True) for n in names if n in inline]
    for label, name, true_sequential in runs:
        pruner = make_pruner(name)
        math_time = [0.0]
        inner = pruner.prune_weight

        def timed_prune_weight(*a, _inner=inner, **kw):
            synchronize(device)
            start = time.perf_counter()
            out = _inner(*a, **kw)
            synchronize(device)
            math_time[0] += time.perf_counter() - start
            return out

        pruner.prune_weight = timed_prune_weight
        times, maths = [], []
        for _ in range(args.repeats):
            model.load_state_dict(original)
            math_time[0] = 0.0
            with meter.stage(f"prune_{label}"):
                synchronize(device)
                start = time.perf_counter()
                reports = prune_(model, pruner, allocation, ids, device, args.pattern, args.batch_size, true_sequential=true_sequential)
                synchronize(device)
                times.append(time.perf_counter() - start)
            maths.append(math_time[0])
        t, m = statistics.median(times), statistics.median(maths)
        results["pruners"][label] = {
            "prune_s": t, "ratio_to_forward": t / forward_s, "prune_weight_s": m, "pipeline_s": t - m,
            "pipeline_ratio_to_forward": (t - m) / forward_s, "target_ratio": TARGETS.get(name),
            "meets_target": (t / forward_s <= TARGETS[name]) if name in TARGETS else None,
            "sparsity": weighted_sparsity(reports), "peak_memory": meter.peak_memory[f"prune_{label}"],
            "true_sequential": true_sequential,
        }
        log.info("%s: %.2f s = %.2f x forward (math %.2f s)", label, t, t / forward_s, m)
    model.load_state_dict(original)
    search = [p.strip() for p in args.search.split(",") if p.strip()]
    if search:
        results["search"] = bench_search(model, loaded.tokenizer, ids, device, meter, args, search, forward_s)
        model.load_state_dict(original)
    results["peak_memory_by_stage"] = meter.peak_memory
    results["timings"] = meter.timings
    write(results, Path(args.out))
    return results


def bench_search(model, tokenizer, ids, device, meter, args, pruners: list[str], forward_s: float) -> dict:
    """Precompute and per-candidate fitness cost of the search, for each pruner in ``pruners``."""
    import numpy as np

    from msp.models import find_blocks, layer_block_index
    from msp.search.fitness import CandidateModel, ModelFitness, precompute_variants, resolve_mode

    layers = prunable_layers(model)
    prefix, blocks = find_blocks(model)
    units = [[n for n in layers if layer_block_index(n, prefix) == b] for b in range(len(blocks))]
    levels = [float(x) for x in args.levels.split(",")]
    heldout = data_mod.tokenize(tokenizer, data_mod.source_text("book", "train"))[-args.fitness_windows * args.fitness_seqlen :]
    windows = data_mod.sequential_windows(heldout, args.fitness_seqlen, args.fitness_windows)
    fit_tokens = windows.numel()

    def bare_forward():
        with torch.inference_mode():
            for s in range(0, windows.shape[0], 4):
                model(input_ids=windows[s : s + 4].to(device), use_cache=False).logits.float()

    bare_s = statistics.median(timed(bare_forward, device, max(3, args.repeats)))
    rng = np.random.default_rng(0)
    genomes = [rng.integers(0, len(levels), len(units))]
    for _ in range(args.candidates):  # like the search's mutations: each candidate moves 1-3 units of the previous one
        g = genomes[-1].copy()
        for u in rng.choice(len(units), size=int(rng.integers(1, 4)), replace=False):
            g[u] = (g[u] + int(rng.integers(1, len(levels)))) % len(levels)
        genomes.append(g)
    out = {"levels": levels, "units": len(units), "fitness_tokens": fit_tokens, "bare_forward_s": bare_s,
           "bare_forward_tokens_per_s": fit_tokens / bare_s, "pruners": {}}
    for name in pruners:
        pruner = make_pruner(name)
        mode = resolve_mode("auto", pruner)
        layer_levels = {n: levels for n in layers} if mode == "store" else None
        with meter.stage(f"search_precompute_{name}"):
            synchronize(device)
            start = time.perf_counter()
            variants = precompute_variants(model, layers, pruner, Pattern.parse(args.pattern), ids, device, mode=mode, levels=layer_levels,
                                           max_levels=len(levels), batch_size=args.batch_size)
            synchronize(device)
            pre_s = time.perf_counter() - start
        candidate = CandidateModel(layers, variants, units, lambda u, l: levels[l])
        fitness = ModelFitness(model, candidate, windows, [windows.shape[0]], device, "kl", batch_size=4)
        swap, total = [], []
        with meter.stage(f"search_candidates_{name}"):
            fitness(genomes[0], 0)  # warm-up
            for g in genomes[1:]:
                synchronize(device)
                start = time.perf_counter()
                candidate.apply(g)
                synchronize(device)
                mid = time.perf_counter()
                value = fitness(g, 0)  # weights already in place: this is the forward + KL alone
                synchronize(device)
                swap.append(mid - start)
                total.append(time.perf_counter() - start)
        candidate.restore()
        variants.close()
        t = statistics.median(total)
        out["pruners"][name] = {
            "mode": mode, "precompute_s": pre_s, "precompute_ratio_to_forward": pre_s / forward_s,
            "variants_mib": variants.nbytes() / 2**20, "candidate_s": t, "swap_s": statistics.median(swap),
            "candidate_ratio_to_bare_forward": t / bare_s, "fitness_tokens_per_s": fit_tokens / t,
            "meets_target": t / bare_s <= FITNESS_TARGET, "last_fitness": value,
            "peak_memory": meter.peak_memory[f"search_candidates_{name}"],
        }
        log.info("search (%s, %s): precompute %.1f s; candidate %.3f s = %.2f x bare forward (swap %.3f s)",
                 name, mode, pre_s, t, t / bare_s, statistics.median(swap))
    return out


def markdown(r: dict) -> str:
    gib = 2**30
    lines = [
        f"# Pipeline speed: {r['model']} on {r['device_name']} ({r['device']}, {r['dtype']}, torch {r['torch']}, {r['threads']} threads)",
        "",
        f"Calibration: {r['nsamples']} windows × {r['seqlen']} tokens = {r['tokens']} tokens, batch {r['batch_size']} "
        f"(true sequential: all windows in one batch); "
        f"sparsity {r['sparsity']} {r['pattern']}; median of {r['repeats']} run(s).",
        "",
        f"One forward over these tokens: **{r['forward_s']:.2f} s** ({r['forward_tokens_per_s']:.0f} tokens/s); "
        f"blocks only, block by block: {r['blocks_forward_s']:.2f} s ({r['blocks_forward_ratio']:.2f}× forward).",
        "",
        "| pruner | prune stage (s) | × forward | target | pruner math (s) | hooks + block passes (s) | × forward | peak RSS (GiB) | peak GPU (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["pruners"].items():
        target = f"≤ {p['target_ratio']}×" + (" ✓" if p["meets_target"] else " ✗") if p["target_ratio"] else "—"
        lines.append(
            f"| {name} | {p['prune_s']:.2f} | {p['ratio_to_forward']:.2f} | {target} | {p['prune_weight_s']:.2f} | "
            f"{p['pipeline_s']:.2f} | {p['pipeline_ratio_to_forward']:.2f} | {p['peak_memory']['cpu_rss'] / gib:.2f} | {p['peak_memory']['gpu'] / gib:.2f} |"
        )
    if r.get("search"):
        s = r["search"]
        lines += [
            "",
            f"Search ({s['units']} block units, levels {', '.join(f'{x:g}' for x in s['levels'])}; each candidate moves 1-3 units of the "
            f"previous one, as the search's mutations do): fitness = KL to the "
            f"dense model on {s['fitness_tokens']} held-out tokens; bare forward over them {s['bare_forward_s']:.3f} s "
            f"({s['bare_forward_tokens_per_s']:.0f} tokens/s).",
            "",
            "| pruner | variants | precompute (s) | × forward | MiB held | candidate (s) | weight swap (s) | × bare forward | target | fitness tokens/s | peak RSS (GiB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, p in s["pruners"].items():
            lines.append(
                f"| {name} | {p['mode']} | {p['precompute_s']:.2f} | {p['precompute_ratio_to_forward']:.2f} | {p['variants_mib']:.0f} | "
                f"{p['candidate_s']:.3f} | {p['swap_s']:.3f} | {p['candidate_ratio_to_bare_forward']:.2f} | "
                f"≤ {FITNESS_TARGET}× {'✓' if p['meets_target'] else '✗'} | {p['fitness_tokens_per_s']:.0f} | {p['peak_memory']['cpu_rss'] / gib:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline_speed_{results['model'].replace('/', '_')}_{results['device'].replace(':', '')}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
