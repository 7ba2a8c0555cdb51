"""What does 2:4 sparsity buy at inference? Dense vs PyTorch semi-structured sparse, on a CUDA GPU.

1. Per Linear shape of the model (each distinct (out_features, in_features) of its decoder blocks) and per number
   of tokens in the input (``--tokens``): F.linear with the dense-with-zeros weight vs the same weight as
   ``torch.sparse.to_sparse_semi_structured``; the speed-up is dense time / sparse time.
2. End to end, the whole model pruned 2:4 (magnitude: this measures speed, not quality): prefill tokens/s of
   ``--prefill-batch`` × ``--prefill-len`` tokens, and decode latency per token (batch ``--decode-batch``, KV cache,
   ``--decode-steps`` steps after a prefill), dense vs semi-structured; the logits of both are compared too.

Timing: CUDA events around each call, ``--warmup`` untimed calls first, the median of ``--repeats``. Every figure
is written to ``bench/results/sparse24_speed_<model>_<gpu>.json`` and ``.md`` with the GPU's name — including the
shapes and batch sizes where sparse is *slower* than dense (small token counts usually are).

This benchmark needs a CUDA GPU with sparse tensor cores (Ampere or newer); on a CPU it exits with a message.

    python bench/sparse24_speed.py --dtype bfloat16 float16
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from msp.allocation.base import uniform_allocation
from msp.device import cuda_available, device_name, resolve_device
from msp.models import load_model, prunable_layers
from msp.prune import prune_
from msp.pruners import MagnitudePruner

log = logging.getLogger("bench.sparse24_speed")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, each between two CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def random_24(rows: int, cols: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)
    return (w * mask).to(device, dtype)


def bench_linears(model, dtype, device, tokens_list, warmup, repeats) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    shapes = sorted({tuple(l.weight.shape) for l in prunable_layers(model).values()})
    rows = []
    for out_f, in_f in shapes:
        w = random_24(out_f, in_f, dtype, device)
        try:
            ws = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError) as exc:
            rows.append({"shape": [out_f, in_f], "error": str(exc).splitlines()[0]})
            continue
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, dtype=dtype, device=device)
            dense = cuda_time(lambda: F.linear(x, w), warmup, repeats)
            try:
                sparse = cuda_time(lambda: F.linear(x, ws), warmup, repeats)
                err = (F.linear(x, ws).float() - F.linear(x, w).float()).abs().max().item()
            except (RuntimeError, ValueError) as exc:
                rows.append({"shape": [out_f, in_f], "tokens": tokens, "dense_ms": dense * 1e3, "error": str(exc).splitlines()[0]})
                continue
            flops = 2 * tokens * out_f * in_f
            rows.append({
                "shape": [out_f, in_f], "tokens": tokens, "dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3,
                "speedup": dense / sparse, "dense_tflops": flops / dense / 1e12, "max_abs_diff": err,
            })
            log.info("linear %dx%d tokens=%d: dense %.3f ms, 2:4 %.3f ms, speed-up %.2fx", out_f, in_f, tokens, dense * 1e3, sparse * 1e3, dense / sparse)
    return rows


@torch.inference_mode()
def bench_end_to_end(model, device, args) -> dict:
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    prefill = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), generator=g).to(device)
    prefill_s = cuda_time(lambda: model(input_ids=prefill, use_cache=False), args.warmup, args.repeats)
    prompt = torch.randint(0, vocab, (args.decode_batch, args.decode_prompt), generator=g).to(device)

    def decode():
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(args.decode_steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            end.record()
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            end.synchronize()
            steps.append(start.elapsed_time(end) / 1e3)
        return statistics.median(steps)

    decode()  # warm-up
    decode_s = statistics.median([decode() for _ in range(max(1, args.repeats // 5))])
    logits = model(input_ids=prefill[:1, : min(128, args.prefill_len)], use_cache=False).logits.float()
    return {
        "prefill_s": prefill_s, "prefill_tokens_per_s": prefill.numel() / prefill_s,
        "decode_ms_per_token": decode_s * 1e3, "decode_tokens_per_s": args.decode_batch / decode_s, "_logits": logits,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048, 8192], help="input rows of the Linear benchmark")
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not cuda_available():
        print("sparse24_speed: needs a CUDA GPU with sparse tensor cores (Ampere or newer); none is visible, "
              "so nothing was measured. Run it in a GPU session: python bench/sparse24_speed.py", file=sys.stderr)
        return 2
    from msp.export import to_semi_structured_
    from torch.sparse import SparseSemiStructuredTensor

    device = resolve_device("cuda")
    gpu = device_name(device)
    results = {"model": args.model, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
               "backend": "cutlass" if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False) else "default (cuSPARSELt if available)",
               "warmup": args.warmup, "repeats": args.repeats, "runs": {}}
    for dname in args.dtype:
        dtype = DTYPES[dname]
        loaded = load_model(args.model, dtype=dtype)
        model = loaded.model.to(device)
        layers = prunable_layers(model)
        alloc = uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, 0.5)
        prune_(model, MagnitudePruner(), alloc, None, device, "2:4")
        run = {"linears": bench_linears(model, dtype, device, args.tokens, args.warmup, args.repeats)}
        dense = bench_end_to_end(model, device, args)
        report = to_semi_structured_(model)
        sparse = bench_end_to_end(model, device, args)
        diff = (sparse.pop("_logits") - dense["_logits"]).abs().max().item()
        scale = dense.pop("_logits").abs().max().item()
        run["end_to_end"] = {
            "dense": dense, "sparse": sparse, "converted_layers": len(report.converted), "skipped_layers": report.skipped,
            "prefill_speedup": sparse["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "decode_speedup": dense["decode_ms_per_token"] / sparse["decode_ms_per_token"],
            "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "prefill": [args.prefill_batch, args.prefill_len], "decode": [args.decode_batch, args.decode_prompt, args.decode_steps],
        }
        results["runs"][dname] = run
        del model, loaded
        torch.cuda.empty_cache()
    write(results, Path(args.out))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# 2:4 semi-structured vs dense: {r['model']} on {r['gpu']} (torch {r['torch']}, CUDA {r['cuda']})", "",
             f"Median of {r['repeats']} timed calls after {r['warmup']} warm-up calls, CUDA events. Speed-up = dense time / 2:4 time "
             "(< 1: sparse is slower).", ""]
    for dname, run in r["runs"].items():
        e = run["end_to_end"]
        lines += [f"## {dname}", "",
                  f"End to end ({e['converted_layers']} layers converted): prefill {e['prefill'][0]}×{e['prefill'][1]} tokens: "
                  f"dense {e['dense']['prefill_tokens_per_s']:.0f} tok/s, 2:4 {e['sparse']['prefill_tokens_per_s']:.0f} tok/s "
                  f"(**{e['prefill_speedup']:.2f}×**); decode (batch {e['decode'][0]}): dense {e['dense']['decode_ms_per_token']:.2f} ms/token, "
                  f"2:4 {e['sparse']['decode_ms_per_token']:.2f} ms/token (**{e['decode_speedup']:.2f}×**); "
                  f"max |Δlogit| {e['max_abs_logit_diff']:.3g} (max |logit| {e['max_abs_logit']:.3g}).", "",
                  "| shape (out × in) | tokens | dense ms | 2:4 ms | speed-up |", "|---|---:|---:|---:|---:|"]
        for row in run["linears"]:
            if "error" in row:
                lines.append(f"| {row['shape'][0]} × {row['shape'][1]} | {row.get('tokens', '—')} | {row.get('dense_ms', float('nan')):.3f} | — | {row['error']} |")
            else:
                lines.append(f"| {row['shape'][0]} × {row['shape'][1]} | {row['tokens']} | {row['dense_ms']:.3f} | {row['sparse_ms']:.3f} | {row['speedup']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gpu = "".join(c if c.isalnum() else "_" for c in results["gpu"]).strip("_")
    stem = f"sparse24_speed_{results['model'].replace('/', '_')}_{gpu}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
