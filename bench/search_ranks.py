"""Candidates per second of the search with 1 and with 2 ranks (issue 12 §4: target >= 1.8x with 2 ranks).

The same short ``allocation=msp`` search on the embedded SmolLM2-135M, once as ``python -m msp`` (one rank) and once
as ``torchrun --nproc-per-node 2 -m msp`` (two ranks, gloo), each process on one thread (OMP_NUM_THREADS=1): on a
2-core machine the two ranks have a core each. Candidates per second = the search's evaluations (initial population
and every generation) ÷ its wall seconds (``results.json["search"]["wall_seconds"]["search"]``: without the model
load, the variant pass and the start allocation, which every rank repeats). The two searches must agree (same
history): the script checks it.

    python bench/search_ranks.py                      # ~5-10 min on 2 quiet cores
    python bench/search_ranks.py --generations 2      # a quick check that it works

Writes ``bench/results/search_ranks.json`` and ``.md``, with the load average before and after each run (other jobs
on the machine slow the ranks unequally: quote figures measured on a quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(ranks: int, overrides: list[str], work: Path) -> dict:
    """One search with ``ranks`` processes; its results.json search section, wall time and the load around it."""
    run_dir = work / f"ranks{ranks}"
    args = [*overrides, f"hydra.run.dir={run_dir}", f"cache_dir={work / 'cache'}"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "msp", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port()), "-m", "msp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    search = json.loads((run_dir / "results.json").read_text())["search"]
    history = [json.loads(line) for line in (run_dir / "search_history.jsonl").read_text().splitlines()]
    seconds = search["wall_seconds"]["search"]
    return {"ranks": ranks, "evaluations": search["evaluations"], "search_seconds": seconds,
            "candidates_per_s": search["evaluations"] / seconds, "run_seconds": wall, "best_fitness": search["best_fitness"],
            "history": [(r["best"], r["mean"]) for r in history], "load_before": load_before, "load_after": os.getloadavg()}


def markdown(doc: dict) -> str:
    rows = doc["runs"]
    one = rows[0]["candidates_per_s"]
    lines = [
        "# Search candidates per second, 1 and 2 ranks (issue 12 §4)", "",
        f"`{doc['command']}` (one rank) and the same under `torchrun --nproc-per-node 2 -m msp` (gloo), "
        f"OMP_NUM_THREADS=1 per process, on {doc['machine']} with {doc['cores']} cores. Candidates/s = the search's "
        "evaluations ÷ its wall seconds (initial population and generations; not the model load, the variant pass or "
        "the start allocation, which every rank repeats).", "",
        "| ranks | evaluations | search s | candidates/s | speed-up | whole run s | load avg before → after (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['evaluations']} | {r['search_seconds']:.1f} | {r['candidates_per_s']:.3f} | "
                     f"{r['candidates_per_s'] / one:.2f}x | {r['run_seconds']:.0f} | {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
    lines += ["", f"Same search on both: {'yes' if doc['same_history'] else 'NO'} (best and mean per generation within 1e-5 relative).",
              "", doc["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the .md)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for search_ranks.json / .md")
    ap.add_argument("--name", default="search_ranks", help="file name stem of the results")
    ap.add_argument("overrides", nargs="*", help="more msp overrides, e.g. allocation.fitness_blockwise=false")
    args = ap.parse_args()
    overrides = ["model=smollm2-135m", "device=cpu", "allocation=msp", f"allocation.generations={args.generations}",
                 "allocation.init=uniform", "data.nsamples=8", "data.seqlen=256", "eval=none", "report=false", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="search_ranks_") as tmp:
        runs = [run(1, overrides, Path(tmp)), run(2, overrides, Path(tmp))]
    same = all(abs(a - b) <= 1e-5 * abs(b) for x, y in zip(runs[0]["history"], runs[1]["history"]) for a, b in zip(x, y))
    same = same and len(runs[0]["history"]) == len(runs[1]["history"])
    doc = {"command": "msp " + " ".join(overrides), "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "runs": runs, "speedup": runs[1]["candidates_per_s"] / runs[0]["candidates_per_s"], "same_history": same,
           "note": args.note, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
