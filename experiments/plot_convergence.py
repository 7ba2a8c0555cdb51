#!/usr/bin/env python3
"""The search's convergence from different starts: best fitness vs fitness evaluations, one panel per model.

    python experiments/plot_convergence.py outputs/multirun/convergence --name convergence

reads every finished run under the folders (``results.json`` with a ``search`` section) and writes, atomically,
``experiments/results/<name>/``: ``convergence.png`` (best fitness per generation against the evaluations spent,
the start's fitness at 0, one line per ``allocation.init``), ``convergence.md`` and ``convergence.csv`` (start and
final fitness, evaluations until the curve is within 1% of the best final fitness of its panel, perplexity).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from build_tables import load_runs, write_atomically  # noqa: E402


def curve(run: dict) -> tuple[list[int], list[float]]:
    """(evaluations, best fitness so far), starting at the start allocation's fitness before any generation."""
    s = run["search"]
    xs, ys = [0], [float(s["initial_fitness"])]
    for h in s["history"]:
        xs.append(int(h["evaluations"]))
        ys.append(min(ys[-1], float(h["best"])))
    return xs, ys


def reach(xs: list[int], ys: list[float], level: float) -> int | None:
    """The evaluations after which the curve is at or below ``level`` (None: never)."""
    return next((x for x, y in zip(xs, ys) if y <= level), None)


def rows_of(runs: list[dict]) -> list[dict]:
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        panels[(r["model"], r["pruner"], r["target_sparsity"], r.get("pattern", "unstructured"))].append(r)
    rows = []
    for (model, pruner, target, pattern), group in sorted(panels.items()):
        finals = [curve(r)[1][-1] for r in group]
        level = min(finals) * 1.01
        for r in sorted(group, key=lambda r: r["search"].get("init", "")):
            xs, ys = curve(r)
            ppl = r.get("ppl") or {}
            rows.append({
                "model": model, "pruner": pruner, "sparsity": target, "pattern": pattern, "init": r["search"].get("init"),
                "start_fitness": ys[0], "final_fitness": ys[-1], "generations": len(xs) - 1, "evaluations": xs[-1],
                "evaluations_to_within_1pct": reach(xs, ys, level), "ppl": "; ".join(f"{k} {v:.2f}" for k, v in ppl.items()),
            })
    return rows


def markdown(rows: list[dict], roots: list[str]) -> str:
    out = ["# Search convergence by start", "",
           f"Built by `experiments/plot_convergence.py` from {len(rows)} runs under {', '.join(roots)}. Fitness: KL to the dense "
           "model on the held-out calibration tail (lower is better). *To within 1%*: evaluations until the best fitness is "
           "within 1% of the best final fitness of the panel (— never).", "",
           "| model | pruner | sparsity | init | start fitness | final fitness | evaluations | to within 1% | perplexity |",
           "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['pruner']} | {100 * r['sparsity']:g}% | {r['init']} | {r['start_fitness']:.4f} | "
                   f"{r['final_fitness']:.4f} | {r['evaluations']} | {r['evaluations_to_within_1pct'] or '—'} | {r['ppl']} |")
    return "\n".join(out) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        panels[(r["model"], r["pruner"], r["target_sparsity"])].append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, ((model, pruner, target), group) in zip(axes[0], sorted(panels.items())):
        for r in sorted(group, key=lambda r: r["search"].get("init", "")):
            xs, ys = curve(r)
            ax.step(xs, ys, where="post", label=f"init={r['search'].get('init')}")
        ax.set_xlabel("fitness evaluations")
        ax.set_ylabel("best KL to dense (lower is better)")
        ax.set_title(f"{model}, {pruner}, {100 * target:g}%", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", help="folders of finished msp runs")
    ap.add_argument("--name", default="convergence")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results"))
    args = ap.parse_args(argv)
    runs = [r for r in load_runs([Path(p) for p in args.roots]) if (r.get("search") or {}).get("history")]
    if not runs:
        raise SystemExit(f"plot_convergence: no finished search runs under {', '.join(args.roots)}")
    rows = rows_of(runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    dest = Path(args.out) / args.name
    files = {"convergence.md": markdown(rows, args.roots), "convergence.csv": buf.getvalue()}
    write_atomically(files, runs, dest, plots=False)
    tmp = dest / ".convergence.png.tmp.png"
    plot(runs, tmp)
    tmp.replace(dest / "convergence.png")
    print(f"plot_convergence: {len(runs)} runs -> {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
