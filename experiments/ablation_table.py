#!/usr/bin/env python3
"""One row per finished run of an ablation: what its command line changed, and what came out.

    python experiments/ablation_table.py outputs/gemma_sparsegpt_ablation --name search_ablation_gemma3_sparsegpt

writes ``experiments/results/<name>/README.md`` (and ``runs.csv``), atomically: per run its overrides (those every
run shares are printed once, above the table), the allocation, the perplexity per evaluation dataset (``heldout``:
the calibration text's unseen tail, see docs/data-and-results.md), the search's fitness at its start and at its
best, which finalist a verification chose (``allocation.verify_tokens``), and the wall time of the allocation
stage and of the whole run. ``build_tables.py`` groups runs by method; this keeps every run of the same method apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tables as bt  # noqa: E402  (a sibling script, not a package)


def overrides_of(run_dir: Path) -> list[str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``), without ``hydra.*``; [] when absent."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    lines = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return [o for o in lines if not o.startswith("hydra.")]


def row_of(results_file: Path) -> dict:
    r = json.loads(results_file.read_text())
    search = r.get("search") or {}
    verify = search.get("verify") or {}
    return {
        "run": results_file.parent.name,
        "overrides": overrides_of(results_file.parent),
        "allocation": r["allocation"],
        "ppl": dict(r.get("ppl") or {}),
        "dense_ppl": dict(r.get("dense_ppl") or {}),
        "start_fitness": search.get("initial_fitness"),
        "best_fitness": search.get("best_fitness"),
        "verified": verify.get("chosen"),
        "allocation_s": (r.get("timings") or {}).get("allocation"),
        "total_s": (r.get("timings") or {}).get("total"),
    }


def render(rows: list[dict]) -> tuple[str, str]:
    """(markdown, csv) of the rows; overrides shared by every row are listed once."""
    shared = set.intersection(*(set(r["overrides"]) for r in rows))
    datasets = sorted({d for r in rows for d in r["ppl"]}, key=lambda d: (d != "wiki", d))
    dense = {d: next((r["dense_ppl"][d] for r in rows if d in r["dense_ppl"]), None) for d in datasets}
    header = ["run", "changes", *[f"{d} ppl" for d in datasets], "fitness start → best", "verified pick", "allocation s", "total s"]
    shown, raw = [], []
    for r in sorted(rows, key=lambda r: r["run"]):
        changes = " ".join(o for o in r["overrides"] if o not in shared) or "(defaults)"
        ppl = [r["ppl"].get(d) for d in datasets]
        fitness = "–" if r["best_fitness"] is None else f"{bt.fmt(r['start_fitness'], 3)} → {bt.fmt(r['best_fitness'], 3)}"
        shown.append([r["run"], f"`{changes}`", *[bt.fmt(p, 1) for p in ppl], fitness, r["verified"] or "–",
                      bt.fmt(r["allocation_s"], 0), bt.fmt(r["total_s"], 0)])
        raw.append([r["run"], changes, *ppl, r["start_fitness"], r["best_fitness"], r["verified"] or "", r["allocation_s"], r["total_s"]])
    every = " ".join(o for o in rows[0]["overrides"] if o in shared)
    markdown = (f"Every run: `{every}`\n\nDense perplexity: " + ", ".join(f"{d} {bt.fmt(v)}" for d, v in dense.items())
                + "\n\n" + bt.markdown_table(header, shown) + "\n")
    csv_header = ["run", "changes", *[f"ppl_{d}" for d in datasets], "start_fitness", "best_fitness", "verified", "allocation_s", "total_s"]
    return markdown, bt.csv_text(csv_header, raw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="folders holding finished runs (searched recursively)")
    ap.add_argument("--name", required=True, help="output folder name under --out")
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--title", default=None, help="the README's first line (default: the name)")
    args = ap.parse_args(argv)
    files = bt.find_result_files(args.paths)
    if not files:
        print(f"ablation_table: no finished runs (results.json) under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    markdown, table = render([row_of(f) for f in files])
    folder = args.out / args.name
    readme = f"# {args.title or args.name}\n\nBuilt by `experiments/ablation_table.py` from {len(files)} runs. Perplexity: lower is better.\n\n{markdown}"
    bt.write_atomically({"README.md": readme, "runs.csv": table}, [], folder, plots=False)
    print(f"ablation_table: {len(files)} runs -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
