"""Does the search's per-generation checkpoint cost grow with the generations? (issue 12 §5)

A search on a cheap synthetic fitness (a separable quadratic in numpy, no model) with its checkpoint written
every generation, as ``allocation=msp`` does: generations/s over the first ``--window`` generations and over
``--window`` generations after ``--late`` generations, and the size of the checkpoint files at the end. The
checkpoint writes are timed on their own too (the search's own work per generation changes as it converges).

    python bench/search_checkpoint.py --label after
    PYTHONPATH=<checkout of the previous commit> python bench/search_checkpoint.py --label before

Each run adds its row (by ``--label``) to ``bench/results/search_checkpoint.json`` and rewrites the ``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import msp.search.evolution as evolution
from msp.search.evolution import Evolution, EvolutionConfig, SearchSpace

RESULTS = Path(__file__).resolve().parent / "results"


class TimedEvolution(Evolution):
    """The search with the time of every checkpoint write recorded (works with any version's ``_save``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_seconds: list[float] = []

    def _save(self, *args, **kwargs):
        t0 = time.perf_counter()
        super()._save(*args, **kwargs)
        self.save_seconds.append(time.perf_counter() - t0)


def measure(units: int, late: int, window: int, seed: int) -> dict:
    """Generations/s at the start and after ``late`` generations, the checkpoint's milliseconds per generation in
    both windows, and the checkpoint bytes at the end."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 9, units)
    curvature = rng.uniform(0.5, 2.0, units)
    space = SearchSpace((0,) * units, (8,) * units, (1,) * units, int(target.sum()))
    fitness = lambda g, s: float(np.sum(curvature * (g - target) ** 2)) + 0.01 * s  # noqa: E731
    stamps: list[float] = []
    cfg = EvolutionConfig(generations=late + window, population=4, offspring=8, survivors=(2,), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "search_state.json"
        search = TimedEvolution(space, cfg, checkpoint=checkpoint, on_generation=lambda *a: stamps.append(time.perf_counter()))
        start = np.full(units, int(target.sum()) // units, np.int64)
        start[: int(target.sum()) - int(start.sum())] += 1
        search.run(fitness, [start])
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
    rate = lambda a, b: (b - a) / (stamps[b] - stamps[a])  # noqa: E731  generations per second between stamps a, b
    first, last = rate(0, window), rate(late, late + window)
    saves = search.save_seconds  # [0]: generation 0, [g]: generation g
    ms = lambda a, b: 1e3 * float(np.mean(saves[a + 1 : b + 1]))  # noqa: E731
    return {"units": units, "window": window, "late": late, "start_gen_per_s": first, "late_gen_per_s": last,
            "late_over_start": last / first, "start_save_ms": ms(0, window), "late_save_ms": ms(late, late + window),
            "checkpoint_bytes": files, "state_version": evolution.STATE_VERSION}


def write_markdown(rows: dict) -> str:
    any_row = next(iter(rows.values()))
    lines = [
        "# Search checkpoint cost (issue 12 §5)", "",
        f"Synthetic separable fitness (numpy, no model), {any_row['units']} units, population 4, offspring 8, two stages; "
        f"the checkpoint written every generation. Rates over {any_row['window']} generations from generation 0 and from "
        f"generation {any_row['late']}. Machine: {platform.processor() or platform.machine()}, shared CPU (figures are ratios).", "",
        "The search's own work per generation changes as it converges (more duplicate offspring redrawn near the optimum), so "
        "the checkpoint is also timed on its own: milliseconds per generation spent writing it.", "",
        "| version | checkpoint format | gen/s at start | gen/s after " + str(any_row["late"]) + " | late ÷ start | "
        "checkpoint ms/gen at start | after " + str(any_row["late"]) + " | files at the end (bytes) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in rows.items():
        fmt = "state + history JSON lines" if r["state_version"] >= 2 else "one JSON with the whole history"
        files = ", ".join(f"{k} {v:,}" for k, v in sorted(r["checkpoint_bytes"].items()))
        lines.append(f"| {label} | {fmt} (v{r['state_version']}) | {r['start_gen_per_s']:.0f} | {r['late_gen_per_s']:.0f} | "
                     f"{r['late_over_start']:.2f} | {r['start_save_ms']:.2f} | {r['late_save_ms']:.2f} | {files} |")
    lines += ["", "Rows are measured one after the other on a 2-core machine shared with other jobs: absolute rates are noisy; "
              "the late ÷ start ratio and the checkpoint's ms/gen are the figures. `before`: the checkpoint of commit 83a42fd "
              "(the whole history in `search_state.json`, rewritten with `json.dump(indent=2)` after `asdict` copied it)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="the row's name, e.g. before / after")
    ap.add_argument("--units", type=int, default=224, help="search units (224 = LLaMA-2-7B at layer granularity)")
    ap.add_argument("--late", type=int, default=2000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    row = measure(args.units, args.late, args.window, args.seed)
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / "search_checkpoint.json"
    rows = json.loads(store.read_text()) if store.exists() else {}
    rows[args.label] = row
    store.write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "search_checkpoint.md").write_text(write_markdown(rows))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
