"""How fast is the zero-shot stage? lm-eval's requests/s and tokens/s against a bare forward over the same tokens.

For each implementation of the lm-eval model object:

* ``lm-eval``: lm-eval's own ``HFLM`` as shipped (the zero-shot stage before issue 13);
* ``msp``: what :func:`msp.eval.zeroshot.make_lm` returns (the stage as it runs now);

the script runs :func:`msp.eval.zeroshot.run_zeroshot` on the embedded zero-shot data (``--tasks``, first ``--limit``
examples each) and records the stage's wall time, the time spent inside ``loglikelihood`` (tokenisation + forwards +
scoring), every request's tokens (context + continuation, lm-eval's truncation) and the per-task accuracies.

The reference, ``bare forward``: the same token sequences (each request's ``(context + continuation)[:-1]``, what
lm-eval feeds the model), longest first in batches of ``--batch-size``, right-padded, one ``model(ids).logits`` per
batch and nothing else (no lm-eval, no log-softmax, no scoring). Token rates count real tokens (no padding), so the
ratio ``stage tokens/s ÷ bare tokens/s`` says what the stage costs beyond the forward it needs; it can exceed 1 when the
stage does less work than the bare forward (e.g. lm_head only where a continuation token is scored).

Times are this process's CPU seconds (``time.process_time``; run it with one thread, ``OMP_NUM_THREADS=1``): on a
shared machine they move far less with the other processes' load than wall times do, which are recorded too, with
the load average before and after each row. Compare ratios, not absolute rates.

A second reference, ``distinct inputs``: lm-eval forwards requests whose input ``(context + continuation)[:-1]`` is
the same only once (one-token continuations such as BoolQ's " yes"/" no"), so a bare forward over the distinct inputs
is the fairer yardstick for what the stage must compute.

Accuracies of the implementations must be identical (the script says so, and exits 1 otherwise).
``--count-only --limit 500`` counts the requests and tokens per task of a full run (no forward), for wall-time estimates.

    OMP_NUM_THREADS=1 python bench/zeroshot_speed.py --limit 3 --batch-size 4 16 --out bench/results/zeroshot_speed_smollm2-135m_cpu
    OMP_NUM_THREADS=1 python bench/zeroshot_speed.py --count-only --limit 500
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from msp.eval import zeroshot as zs
from msp.models import load_model

log = logging.getLogger("bench.zeroshot_speed")
TARGET = 0.7


def instrumented(make, count_only: bool = False):
    """Wrap a ``make_lm``: the lm object records its requests' tokens and the time in ``loglikelihood``; with
    ``count_only`` it scores nothing (every request gets log-likelihood 0: the accuracies are meaningless)."""
    record: dict = {"sequences": [], "loglikelihood_s": 0.0, "loglikelihood_cpu_s": 0.0, "requests": 0}

    def make_lm(model, tokenizer, options):
        lm = make(model, tokenizer, options)
        inner_tokens, inner_ll = lm._loglikelihood_tokens, lm.loglikelihood

        def _loglikelihood_tokens(requests, *args, **kwargs):
            for _, ctx, cont in requests:
                record["sequences"].append((ctx + cont)[-(lm.max_length + 1):][:-1])
            if count_only:
                return [(0.0, False)] * len(requests)
            return inner_tokens(requests, *args, **kwargs)

        def loglikelihood(requests, *args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return inner_ll(requests, *args, **kwargs)
            finally:
                record["loglikelihood_s"] += time.perf_counter() - start
                record["loglikelihood_cpu_s"] += time.process_time() - cpu
                record["requests"] += len(requests)

        lm._loglikelihood_tokens, lm.loglikelihood = _loglikelihood_tokens, loglikelihood
        return lm

    return make_lm, record


def plain_hflm(model, tokenizer, options):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=zs.as_hf_tokenizer(tokenizer), batch_size=int(options.get("batch_size", 4)),
                max_length=options.get("max_length"))


IMPLS = {"lm-eval": plain_hflm, "msp": None}  # None: msp.eval.zeroshot.make_lm as it is now


def bare_forward(model, sequences: list[list[int]], batch_size: int, pad_id: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds for ``model(ids).logits`` over ``sequences``, longest first, right-padded batches."""
    order = sorted(sequences, key=len, reverse=True)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            width = len(chunk[0])
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
            model(ids).logits
    return time.perf_counter() - start, time.process_time() - cpu


def run_impl(name: str, loaded, tasks: list[str], limit: int | None, batch_size: int, count_only: bool = False) -> dict:
    original = zs.make_lm
    make, record = instrumented(IMPLS[name] or original, count_only)
    options = {"tasks": tasks, "limit": limit, "batch_size": batch_size, "source": "embedded"}
    zs.make_lm = make
    try:
        start = time.perf_counter()
        out = zs.run_zeroshot(loaded.model, loaded.tokenizer, options, "cpu")
        stage = time.perf_counter() - start
    finally:
        zs.make_lm = original
    tokens = sum(len(s) for s in record["sequences"])
    acc = {t: {k: v for k, v in row.items() if k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
           for t, row in out["zeroshot"].items() if t != "mean"}
    return {"impl": name, "stage_s": stage, "loglikelihood_s": record["loglikelihood_s"], "loglikelihood_cpu_s": record["loglikelihood_cpu_s"],
            "requests": record["requests"], "tokens": tokens, "requests_per_s": record["requests"] / record["loglikelihood_cpu_s"],
            "tokens_per_s": tokens / record["loglikelihood_cpu_s"], "stage_tokens_per_s": tokens / stage,
            "n": {t: v.get("n") for t, v in out["zeroshot_source"]["tasks"].items()},
            "accuracy": acc, "sequences": record["sequences"]}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=",".join(zs.PAPER_TASKS))
    parser.add_argument("--limit", type=int, default=20, help="examples per task (first N)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4])
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--out", default="bench/results/zeroshot_speed")
    parser.add_argument("--note", default="", help="what else ran on the machine (written with the figures)")
    parser.add_argument("--count-only", action="store_true",
                        help="only count the requests and tokens per task (no forward; e.g. --limit 500 for the table's size)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    tasks = [t for t in args.tasks.split(",") if t]
    loaded = load_model(args.model)
    loaded.model.eval()
    if args.count_only:
        return count_tokens(loaded, tasks, args.limit, Path(args.out))
    rows, load_before = [], loadavg()
    for bs in args.batch_size:
        bare: dict = {}
        for impl in args.impl:
            r = run_impl(impl, loaded, tasks, args.limit, bs)
            r["batch_size"] = bs
            sequences = r.pop("sequences")
            if not bare:  # the same sequences for every implementation: one reference per batch size
                unique = [list(s) for s in dict.fromkeys(tuple(s) for s in sequences)]
                wall, cpu = bare_forward(loaded.model, sequences, bs)
                wall_u, cpu_u = bare_forward(loaded.model, unique, bs)
                bare = {"tokens": r["tokens"], "bare_forward_wall_s": wall, "bare_forward_s": cpu,
                        "unique_sequences": len(unique), "unique_tokens": sum(len(s) for s in unique),
                        "bare_unique_forward_wall_s": wall_u, "bare_unique_forward_s": cpu_u}
            if bare["tokens"] != r["tokens"]:
                raise SystemExit(f"{impl} scored {r['tokens']} tokens, the first implementation {bare['tokens']}")
            r.update({k: v for k, v in bare.items() if k != "tokens"})
            r["bare_tokens_per_s"] = r["tokens"] / r["bare_forward_s"]
            r["ratio"] = r["tokens_per_s"] / r["bare_tokens_per_s"]
            r["ratio_unique"] = r["tokens_per_s"] / (r["tokens"] / r["bare_unique_forward_s"])
            r["load_after"] = loadavg()
            print(f"batch {bs:3d} {impl:8s}: {r['requests']} requests, {r['tokens']} tokens; loglikelihood {r['loglikelihood_s']:.1f} s wall, {r['loglikelihood_cpu_s']:.1f} CPU s "
                  f"({r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} tok/s), stage {r['stage_s']:.1f} s; "
                  f"bare forward {r['bare_forward_s']:.1f} CPU s ({r['bare_tokens_per_s']:.0f} tok/s); ratio {r['ratio']:.2f}; "
                  f"bare forward over the {r['unique_sequences']} distinct inputs {r['bare_unique_forward_s']:.1f} s, ratio {r['ratio_unique']:.2f}",
                  flush=True)
            rows.append(r)
    same = all(r["accuracy"] == rows[0]["accuracy"] for r in rows)
    doc = {"model": args.model, "tasks": tasks, "limit": args.limit, "device": "cpu", "dtype": str(next(loaded.model.parameters()).dtype),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
           "load_before": load_before, "note": args.note, "target_ratio": TARGET, "accuracies_identical": same, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {out.with_suffix('.json')} and .md; accuracies identical across implementations: {same}")
    return 0 if same else 1


def count_tokens(loaded, tasks: list[str], limit: int | None, out: Path) -> int:
    """Requests, tokens and distinct inputs per task at ``limit`` (what a zero-shot run will forward)."""
    per_task = {}
    for task in tasks:
        r = run_impl("msp", loaded, [task], limit, 1, count_only=True)
        seqs = r["sequences"]
        distinct = {tuple(s) for s in seqs}
        per_task[task] = {"n": r["n"].get(task), "requests": len(seqs), "tokens": sum(map(len, seqs)),
                          "distinct_inputs": len(distinct), "distinct_tokens": sum(map(len, distinct))}
        print(task, per_task[task], flush=True)
    total = {k: sum(v[k] for v in per_task.values()) for k in ("requests", "tokens", "distinct_inputs", "distinct_tokens")}
    doc = {"limit": limit, "tasks": per_task, "total": total}
    out = out.with_name(out.name + f"_count_limit{limit}")
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"total {total}; wrote {out.with_suffix('.json')}")
    return 0


def markdown(doc: dict) -> str:
    lines = [f"# Zero-shot speed: {doc['model']} on {doc['device']} ({doc['dtype']}, torch {doc['torch']}, {doc['threads']} thread(s))", "",
             f"Tasks: {', '.join(doc['tasks'])}; first {doc['limit']} examples each (embedded data). "
             f"Load average before: {doc['load_before']}. {doc['note']}", "",
             "Rates are over `loglikelihood` (tokenisation + forwards + scoring), in CPU seconds of this (single-threaded) "
             "process — the machine is shared, and CPU time is what another process's load disturbs least — and count real "
             "tokens (no padding). "
             "Bare forward: the same sequences, same batch size, longest first, `model(ids).logits` only. "
             f"Target: ratio ≥ {doc['target_ratio']}.", "",
             "Distinct inputs: lm-eval forwards a request whose input `(context + continuation)[:-1]` equals another's once "
             "(one-token continuations, e.g. BoolQ's yes/no); the last ratio is against a bare forward over those only.", "",
             "| batch | implementation | requests | tokens | loglikelihood (CPU s) | requests/s | tokens/s | stage (wall s) | bare forward (CPU s) | bare tokens/s | ratio | distinct inputs: bare forward (CPU s) | ratio | load after |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['batch_size']} | {r['impl']} | {r['requests']} | {r['tokens']} | {r['loglikelihood_cpu_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['stage_s']:.1f} | {r['bare_forward_s']:.1f} | "
                     f"{r['bare_tokens_per_s']:.0f} | {r['ratio']:.2f} | {r['bare_unique_forward_s']:.1f} | {r['ratio_unique']:.2f} | {r['load_after']} |")
    lines += ["", f"Per-task accuracy identical across implementations: **{doc['accuracies_identical']}**", "",
              "| task | n | " + " | ".join(f"{r['impl']} bs{r['batch_size']} acc / acc_norm" for r in doc["rows"]) + " |",
              "|---|---:|" + "---:|" * len(doc["rows"])]
    for task in doc["rows"][0]["accuracy"]:
        cells = [f"{r['accuracy'][task].get('acc', float('nan')):.4f} / {r['accuracy'][task].get('acc_norm', float('nan')):.4f}" for r in doc["rows"]]
        lines.append(f"| {task} | {doc['rows'][0]['n'].get(task)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
