#!/usr/bin/env python3
"""The papers' zero-shot table (issue 13 §3) from finished msp runs: mean accuracy ± standard error next to perplexity.

    python experiments/zeroshot_table.py outputs/multirun/zeroshot_smollm2-135m --model smollm2-135m

writes ``experiments/results/zeroshot_<model>/`` (atomically, like ``build_tables.py``, whose loading it reuses):

* ``README.md``   the table in markdown: one row per method @ sparsity (dense first), perplexity, each task's accuracy
  ± lm-eval's standard error, and the mean over the tasks ± ``sqrt(Σ stderr²) / T`` (the tasks' errors taken as
  independent), with how the numbers were made (examples per task, data split, wall time of the runs);
* ``zeroshot_<model>.csv``   the same numbers, unrounded (accuracies as fractions);
* ``zeroshot_<model>.png``   mean accuracy vs sparsity per method (error bars), and mean accuracy vs perplexity.

Only runs of ``--model`` that have zero-shot results count; the dense row comes from ``dense_zeroshot``
(``zeroshot.dense=true``) and the dense perplexity of the same runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tables as bt  # noqa: E402  (a sibling script, not a package)

log = logging.getLogger("zeroshot_table")


def mean_stderr(stderrs: list[float]) -> float:
    """Standard error of the mean of T independent accuracies: ``sqrt(Σ se_t²) / T``."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs) if stderrs else float("nan")


def collect(runs: list[dict], metric: str = "acc") -> tuple[list[str], list[str], list[dict]]:
    """(tasks, perplexity datasets, rows); a row = label, method, sparsity, ppl per dataset, per-task (acc, stderr), mean."""
    zs_runs = [r for r in runs if r.get("zeroshot")]
    tasks: list[str] = []
    for r in zs_runs:
        for t, row in bt.zeroshot_scores(r["zeroshot"]).items():
            if metric in row and t not in tasks:
                tasks.append(t)
    datasets = bt.datasets_of(zs_runs)
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)  # (method, sparsity) -> [(scores, ppl)]
    seen_dense: set[str] = set()
    for r in runs:  # every run carries the same cached dense evaluation: count each distinct one once
        if r.get("dense_zeroshot"):
            key = json.dumps([r["dense_zeroshot"], r.get("dense_ppl", {})], sort_keys=True)
            if key not in seen_dense:
                seen_dense.add(key)
                groups[("dense", 0.0)].append((bt.zeroshot_scores(r["dense_zeroshot"]), r.get("dense_ppl", {})))
    for r in zs_runs:
        groups[(bt.method_of(r), float(r["target_sparsity"]))].append((bt.zeroshot_scores(r["zeroshot"]), r.get("ppl", {})))
    rows = []
    for (method, sparsity), members in sorted(groups.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][1], kv[0][0])):
        row: dict = {"label": "dense" if method == "dense" else f"{method} @ {bt.pct(sparsity)}", "method": method,
                     "sparsity": sparsity, "n_runs": len(members), "ppl": {}, "tasks": {}}
        for d in datasets:
            xs = [float(p[d]) for _, p in members if d in p]
            row["ppl"][d] = mean(xs) if xs else None
        for t in tasks:
            accs = [s[t][metric] for s, _ in members if t in s and metric in s[t]]
            errs = [s[t].get(f"{metric}_stderr") for s, _ in members if t in s and metric in s[t]]
            if accs:  # several runs (seeds) of one cell: their mean, and the error of that mean
                errs = [e for e in errs if e is not None and math.isfinite(e)]
                se = math.sqrt(sum(e * e for e in errs)) / len(errs) if len(errs) == len(accs) else None
                row["tasks"][t] = (mean(accs), se)
        complete = len(row["tasks"]) == len(tasks)  # a mean over fewer tasks would mislead
        row["mean"] = mean(a for a, _ in row["tasks"].values()) if complete and tasks else None
        ses = [se for _, se in row["tasks"].values()]
        row["mean_stderr"] = mean_stderr(ses) if complete and tasks and all(se is not None for se in ses) else None
        rows.append(row)
    return tasks, datasets, rows


def pm(value: float | None, se: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def wall_time(runs: list[dict]) -> tuple[float, float]:
    """(total seconds of the runs, seconds in their zero-shot stages), from ``timings``."""
    total = sum(float((r.get("timings") or {}).get("total", 0.0)) for r in runs)
    zs = sum(float((r.get("timings") or {}).get("zeroshot", 0.0)) + float((r.get("timings") or {}).get("dense_zeroshot", 0.0)) for r in runs)
    return total, zs


def render(model: str, runs: list[dict], command: str) -> dict[str, str]:
    tasks, datasets, rows = collect(runs)
    header = ["method", *(f"ppl {d}" for d in datasets), *tasks, "mean ± se"]
    md_rows = [[r["label"], *(bt.fmt(r["ppl"][d]) for d in datasets), *(pm(*r["tasks"].get(t, (None, None))) for t in tasks),
                f"**{pm(r['mean'], r['mean_stderr'])}**"] for r in rows]
    csv_header = ["model", "method", "sparsity", "n_runs", *(f"ppl_{d}" for d in datasets),
                  *(x for t in tasks for x in (t, f"{t}_stderr")), "mean", "mean_stderr"]
    csv_rows = [[model, r["method"], r["sparsity"], r["n_runs"], *(r["ppl"][d] if r["ppl"][d] is not None else "" for d in datasets),
                 *(x if x is not None else "" for t in tasks for x in r["tasks"].get(t, (None, None))),
                 "" if r["mean"] is None else r["mean"], "" if r["mean_stderr"] is None else r["mean_stderr"]] for r in rows]
    total, zs = wall_time([r for r in runs if r.get("zeroshot")])
    n = len([r for r in runs if r.get("zeroshot")])
    md = [f"# Zero-shot accuracy and perplexity: {model}", "",
          f"Built by `experiments/zeroshot_table.py` from {n} run{'s' if n != 1 else ''}. "
          f"{bt.zeroshot_note(runs)} Each cell: lm-eval's accuracy ± its standard error (points); the mean over the "
          f"{len(tasks)} tasks ± sqrt(Σ stderr²)/{len(tasks)}. Perplexity: lower is better.", "",
          bt.markdown_table(header, md_rows), "",
          f"Wall time of these runs: {total / 3600:.2f} h in all, {zs / 3600:.2f} h of it in zero-shot stages "
          "(the dense zero-shot is computed once and cached).", "",
          f"Rebuild: `{command}`", ""]
    return {"README.md": "\n".join(md), f"zeroshot_{bt.slug(model)}.csv": bt.csv_text(csv_header, csv_rows)}


def plot(model: str, runs: list[dict], out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, datasets, rows = collect(runs)
    rows = [r for r in rows if r["mean"] is not None]
    if not rows:
        return None
    dataset = datasets[0] if datasets else None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dense = [r for r in rows if r["method"] == "dense"]
    series: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense":
            series[r["method"]].append(r)
    for method, pts in sorted(series.items()):
        pts.sort(key=lambda r: r["sparsity"])
        line = left.errorbar([100 * r["sparsity"] for r in pts], [100 * r["mean"] for r in pts],
                             yerr=[100 * (r["mean_stderr"] or 0.0) for r in pts], marker="o", capsize=3, label=method)
        if dataset:
            right.errorbar([r["ppl"][dataset] for r in pts], [100 * r["mean"] for r in pts],
                           yerr=[100 * (r["mean_stderr"] or 0.0) for r in pts], marker="o", capsize=3, linestyle="none",
                           color=line.lines[0].get_color(), label=method)
    for r in dense:
        left.axhline(100 * r["mean"], color="k", linestyle="--", linewidth=1, label="dense")
        if dataset and r["ppl"][dataset] is not None:
            right.errorbar([r["ppl"][dataset]], [100 * r["mean"]], yerr=[100 * (r["mean_stderr"] or 0.0)], marker="*",
                           markersize=10, color="k", capsize=3, linestyle="none", label="dense")
    left.set_xlabel("target sparsity (%)")
    left.set_ylabel(f"mean accuracy over {len(tasks)} tasks (%)")
    left.set_title(f"{model}: zero-shot accuracy vs sparsity", fontsize=10)
    if dataset:
        from matplotlib.ticker import FuncFormatter

        right.set_xscale("log")
        plain = FuncFormatter(lambda x, _: f"{x:.4g}")
        right.xaxis.set_major_formatter(plain)
        right.xaxis.set_minor_formatter(plain)
        right.tick_params(axis="x", which="minor", labelsize=7)
        right.set_xlabel(f"perplexity on {dataset} (log)")
        right.set_title("accuracy vs perplexity", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fname = f"zeroshot_{bt.slug(model)}.png"
    fig.savefig(out / fname, dpi=120)
    plt.close(fig)
    return fname


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mean zero-shot accuracy ± standard error next to perplexity, from finished msp runs.")
    p.add_argument("paths", nargs="+", type=Path, help="sweep folders or results.json files")
    p.add_argument("--model", required=True, help="the model name in results.json (e.g. smollm2-135m)")
    p.add_argument("--out", type=Path, default=bt.DEFAULT_OUT, help="parent folder (default experiments/results)")
    p.add_argument("--name", default=None, help="output folder name (default zeroshot_<model>)")
    p.add_argument("--archive", type=Path, default=None,
                   help="also keep every zero-shot run's results.json under ARCHIVE/<config hash>/ (commit it; a later sweep "
                        "with done_dirs=[ARCHIVE] and skip_done=true skips those runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = [r for r in bt.load_runs(args.paths) if r["model"] == args.model]
    if not any(r.get("zeroshot") for r in runs):
        print(f"zeroshot_table: no run of {args.model} with zero-shot results under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    if args.archive is not None:
        kept = bt.archive_runs(runs, args.archive, keep=lambda r: bool(r.get("zeroshot")))
        print(f"zeroshot_table: {kept} new run(s) kept under {args.archive}/")
    dest = args.out / (args.name or f"zeroshot_{bt.slug(args.model)}")
    command = "python experiments/zeroshot_table.py " + " ".join(bt.shown_path(str(x)) for x in args.paths) + f" --model {args.model}"
    files = render(args.model, runs, command)

    written = bt.write_atomically(files, runs, dest, plotter=lambda rs, folder: [f for f in [plot(args.model, rs, folder)] if f])
    print(f"{len(runs)} runs of {args.model} -> {dest}/ ({', '.join(sorted(files) + written)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
