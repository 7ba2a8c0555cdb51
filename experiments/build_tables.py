#!/usr/bin/env python3
"""Tables and plots from finished msp runs (reads only ``results.json`` files; W&B not needed).

    python experiments/build_tables.py outputs/multirun/2026-01-01/12-00-00 --name smollm2_table
    python experiments/build_tables.py outputs/ --name everything          # any tree of run folders

writes ``experiments/results/<name>/`` (atomically: a finished folder replaces the old one in one rename):

* ``README.md``      every table below in markdown, with the runs it was built from
* ``ppl_<dataset>.csv``   method x sparsity perplexity, dense as the reference row (one table per model)
* ``zeroshot.csv``   method @ sparsity x task accuracy (+ mean), dense first, when runs have zero-shot results
* ``runs.csv``       one row per run: settings, measured sparsity, every perplexity, zero-shot mean, time
* ``ppl_<model>_<dataset>.png``  perplexity vs sparsity per method (log y), dense as a dashed line
* ``layers_<model>.png``  per-layer sparsity of each allocation (one panel per target sparsity)
* ``search_<model>.png``  search convergence (best and mean fitness per generation) when runs have a search

A method is ``pruner`` (uniform allocation) or ``pruner + allocation``, with the pattern appended when it is not
unstructured. Several runs of one method and sparsity (e.g. seeds) are averaged; ``n`` in the CSV says how many.
Folders holding a ``skipped.json`` (``skip_done=true``) count the run they point to.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

log = logging.getLogger("build_tables")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "experiments" / "results"


# ----------------------------------------------------------------------------------------------- loading
def find_result_files(roots: list[Path]) -> list[Path]:
    """``results.json`` under each root (W&B's copies left out), plus the runs that ``skipped.json`` files name."""
    from msp.sweep import finished_results

    found: dict[Path, None] = {}
    folders = []
    for root in map(Path, roots):
        if root.is_file() and root.name == "results.json":
            found[root.resolve()] = None
        elif root.is_dir():
            folders.append(root)
        else:
            raise SystemExit(f"build_tables: {root} is not a folder of msp runs")
    found.update(dict.fromkeys(finished_results(folders)))
    return list(found)


def load_runs(roots: list[Path]) -> list[dict]:
    """Every readable run, newest first per config hash (a re-run replaces an older identical run)."""
    runs: list[dict] = []
    for path in find_result_files(roots):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable %s (%s)", path, exc)
            continue
        if not isinstance(r, dict) or "model" not in r or "ppl" not in r:
            log.warning("skipping %s: not an msp results.json", path)
            continue
        r["_path"] = str(path)
        r["_mtime"] = path.stat().st_mtime
        runs.append(r)
    runs.sort(key=lambda r: -r["_mtime"])
    seen: set[str] = set()
    unique = []
    for r in runs:
        h = r.get("config_hash")
        if h and h in seen:
            continue
        if h:
            seen.add(h)
        unique.append(r)
    unique.sort(key=lambda r: (r["model"], method_of(r), r.get("target_sparsity", 0.0), r["_path"]))
    return unique


def method_of(r: dict) -> str:
    label = r["pruner"] if r.get("allocation", "uniform") == "uniform" else f"{r['pruner']} + {r['allocation']}"
    init = (r.get("search") or {}).get("init")
    if r.get("allocation") == "msp" and init not in (None, "fisher"):  # the search's default start is fisher
        label += f" (init={init})"
    verify = (r.get("search") or {}).get("verify")
    mode = verify.get("mode", "rerank") if verify else None  # session 7's check had no mode: it re-ranked
    if r.get("allocation") == "msp" and mode not in (None, "rerank_guard"):  # a final check other than the default
        label += f" (verify={mode})"
    if r.get("pattern", "unstructured") != "unstructured":
        label += f" {r['pattern']}"
    if r.get("true_sequential"):
        label += " (true sequential)"
    return label


def pct(x: float) -> str:
    return f"{100 * x:g}%"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# ----------------------------------------------------------------------------------------------- provenance
#: the provenance fields one table's runs should share (seeds and config hashes may differ: they are averaged / listed)
SHARED_FIELDS = ("msp_version", "git.revision", "git.dirty", "versions", "device_name", "model_sha256", "data_sha256.calibration")


def provenance_fields(r: dict, dataset: str) -> dict[str, object]:
    """The fields of a run's ``provenance`` compared across a table (``versions.<package>``, the dataset's hash)."""
    p = r.get("provenance") or {}
    out: dict[str, object] = {}
    for name in SHARED_FIELDS:
        value: object = p
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if name == "versions":
            out.update({f"versions.{k}": v for k, v in (value or {}).items()})
        else:
            out[name] = json.dumps(value, sort_keys=True)  # dicts (model_sha256) compare as text
    out[f"data_sha256.evaluation.{dataset}"] = ((p.get("data_sha256") or {}).get("evaluation") or {}).get(dataset)
    return out


def mixed_provenance(runs: list[dict], dataset: str) -> list[str]:
    """The provenance fields that differ between the runs of one table (``provenance`` when only some have one)."""
    with_prov = [r for r in runs if r.get("provenance")]
    if not with_prov:
        return []
    fields = [provenance_fields(r, dataset) for r in with_prov]
    differ = sorted({k for f in fields for k in f if len({json.dumps(g.get(k)) for g in fields}) > 1})
    if len(with_prov) < len(runs):
        differ.insert(0, f"provenance (missing in {len(runs) - len(with_prov)} of {len(runs)} runs)")
    return differ


def warn_mixed(model: str, dataset: str, runs: list[dict]) -> None:
    differ = mixed_provenance([r for r in runs if dataset in r.get("ppl", {}) or dataset in r.get("dense_ppl", {})], dataset)
    if differ:
        log.warning("warning: table %s / perplexity on %s mixes runs that differ in %s", model, dataset, ", ".join(differ))


# ----------------------------------------------------------------------------------------------- tables
def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def datasets_of(runs: list[dict]) -> list[str]:
    out: list[str] = []
    for r in runs:
        for name in list(r.get("dense_ppl", {})) + list(r.get("ppl", {})):
            if name not in out:
                out.append(name)
    return out


def ppl_table(runs: list[dict], dataset: str, sparsities: list[float] | None = None) -> tuple[list[str], list[list[str]], list[list]]:
    """Method x sparsity perplexity on ``dataset``; the dense row first. Returns header, markdown rows, CSV rows."""
    if sparsities is None:
        sparsities = sorted({r["target_sparsity"] for r in runs if dataset in r.get("ppl", {})})
    cells: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        if dataset in r.get("ppl", {}):
            cells[(method_of(r), r["target_sparsity"])].append(float(r["ppl"][dataset]))
    dense = [float(r["dense_ppl"][dataset]) for r in runs if dataset in r.get("dense_ppl", {})]
    methods = sorted({m for m, _ in cells})
    header = ["method", *(pct(s) for s in sparsities)]
    md_rows, csv_rows = [], []
    if dense:
        d = mean(dense)
        md_rows.append(["dense", *(fmt(d) for _ in sparsities)])
        csv_rows.append(["dense", *(round(d, 4) for _ in sparsities)])
    for m in methods:
        vals = [mean(cells[(m, s)]) if cells.get((m, s)) else None for s in sparsities]
        md_rows.append([m, *(fmt(v) for v in vals)])
        csv_rows.append([m, *("" if v is None else round(v, 4) for v in vals)])
    return header, md_rows, csv_rows


SEARCH = "msp"  # the allocation whose rows are compared against the best of the others


def is_plain(r: dict) -> bool:
    """Unstructured, not true-sequential: the runs that the comparison of allocations is made on."""
    return r.get("pattern", "unstructured") == "unstructured" and not r.get("true_sequential")


def comparison_table(runs: list[dict], dataset: str) -> tuple[list[str], list[list[str]]] | None:
    """Per pruner x sparsity: the best baseline allocation (lowest mean perplexity among the non-search methods), each
    search method's perplexity, and the search's gain over that baseline (%, negative = the search is better)."""
    cells: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in runs:
        if dataset in r.get("ppl", {}) and is_plain(r):
            cells[(r["pruner"], r["target_sparsity"], method_of(r))].append(float(r["ppl"][dataset]))
    searches = sorted({m for (_, _, m) in cells if f" + {SEARCH}" in m}, key=lambda m: (m.count("init="), m))
    if not searches:
        return None
    labels = list(dict.fromkeys(m.split(" + ", 1)[1] for m in searches))  # "msp", "msp (init=best)", ...
    header = ["pruner", "sparsity", "best baseline", "its ppl", *labels, "search vs best baseline"]
    rows = []
    for pruner, sp in sorted({(p, s) for (p, s, _) in cells}):
        here = {m: mean(v) for (p, s, m), v in cells.items() if (p, s) == (pruner, sp)}
        base = {m: v for m, v in here.items() if f" + {SEARCH}" not in m}
        if not base:
            continue
        best = min(base, key=base.get)
        found = [here.get(f"{pruner} + {l}") for l in labels]
        got = [v for v in found if v is not None]
        gain = "–" if not got else f"{100 * (min(got) / base[best] - 1):+.1f}%"
        rows.append([pruner, pct(sp), best.split(" + ", 1)[1] if " + " in best else "uniform", fmt(base[best]),
                     *(fmt(v) for v in found), gain])
    return header, rows


def timing_table(runs: list[dict], stage: str = "allocation") -> tuple[list[str], list[list[str]]]:
    """Method x sparsity: the wall time of one stage (s), mean over runs."""
    cells: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        t = (r.get("timings") or {}).get(stage)
        if t is not None:
            cells[(method_of(r), r["target_sparsity"])].append(float(t))
    sparsities = sorted({s for _, s in cells})
    header = ["method", *(pct(s) for s in sparsities)]
    rows = [[m, *(f"{mean(cells[(m, s)]):.0f}" if cells.get((m, s)) else "–" for s in sparsities)]
            for m in sorted({m for m, _ in cells})]
    return header, rows


def noise_table(runs: list[dict], dataset: str) -> tuple[list[str], list[list[str]]] | None:
    """The cells run more than once (calibration seeds): mean, sample standard deviation and the single values."""
    cells: dict[tuple[str, float], list[tuple[int, float]]] = defaultdict(list)
    for r in runs:
        if dataset in r.get("ppl", {}):
            cells[(method_of(r), r["target_sparsity"])].append((int(r.get("seed", 0)), float(r["ppl"][dataset])))
    repeated = {k: sorted(v) for k, v in cells.items() if len(v) > 1}
    if not repeated:
        return None
    header = ["method", "sparsity", "n", "mean", "sd", "per seed"]
    rows = [[m, pct(s), str(len(v)), fmt(mean(x for _, x in v)), fmt(stdev([x for _, x in v])),
             ", ".join(f"{seed}: {fmt(x)}" for seed, x in v)] for (m, s), v in sorted(repeated.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return header, rows


def zeroshot_scores(zs: dict) -> dict[str, dict[str, float]]:
    return {k: v for k, v in zs.items() if isinstance(v, dict)}


def zeroshot_table(runs: list[dict], metric: str = "acc") -> tuple[list[str], list[list[str]], list[list]] | None:
    """Rows: dense, then method @ sparsity; columns: tasks (``metric``, x100) and their mean."""
    zs_runs = [r for r in runs if r.get("zeroshot")]
    if not zs_runs:
        return None
    tasks: list[str] = []
    for r in zs_runs:
        for t, row in zeroshot_scores(r["zeroshot"]).items():
            if metric in row and t not in tasks:
                tasks.append(t)
    rows: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        if r.get("dense_zeroshot"):
            rows["dense"].append(zeroshot_scores(r["dense_zeroshot"]))
    for r in sorted(zs_runs, key=lambda r: (r["target_sparsity"], method_of(r))):
        rows[f"{method_of(r)} @ {pct(r['target_sparsity'])}"].append(zeroshot_scores(r["zeroshot"]))
    header = ["method", *tasks, "mean"]
    md_rows, csv_rows = [], []
    for label, scores in rows.items():
        vals = []
        for t in tasks:
            xs = [s[t][metric] for s in scores if t in s and metric in s[t]]
            vals.append(mean(xs) if xs else None)
        present = [v for v in vals if v is not None]
        avg = mean(present) if len(present) == len(tasks) else None  # a mean over fewer tasks would mislead
        md_rows.append([label, *(fmt(None if v is None else 100 * v) for v in [*vals, avg])])
        csv_rows.append([label, *("" if v is None else round(100 * v, 4) for v in [*vals, avg])])
    return header, md_rows, csv_rows


def runs_csv(runs: list[dict]) -> str:
    datasets = datasets_of(runs)
    header = ["model", "pruner", "allocation", "pattern", "target_sparsity", "sparsity", "seed",
              *(f"dense_ppl_{d}" for d in datasets), *(f"ppl_{d}" for d in datasets), "zeroshot_mean", "total_s", "path"]
    rows = []
    for r in runs:
        rows.append([r["model"], r["pruner"], r.get("allocation"), r.get("pattern"), r.get("target_sparsity"),
                     round(float(r.get("sparsity", float("nan"))), 6), r.get("seed"),
                     *(r.get("dense_ppl", {}).get(d, "") for d in datasets), *(r.get("ppl", {}).get(d, "") for d in datasets),
                     (r.get("zeroshot") or {}).get("mean", ""), round(float(r.get("timings", {}).get("total", float("nan"))), 2),
                     shown_path(r["_path"])])
    return csv_text(header, rows)


def shown_path(path: str) -> str:
    """Relative to the repository when inside it (committed tables stay machine-independent), else absolute."""
    p = Path(path)
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def zeroshot_note(runs: list[dict], metric: str = "acc") -> str:
    """One line on how the zero-shot numbers were made: limit, data source and split, typical standard error."""
    zs_runs = [r for r in runs if r.get("zeroshot")]
    parts = ["Accuracy (%), 0-shot"]
    limits = sorted({(r.get("zeroshot_source") or {}).get("limit") for r in zs_runs} - {None})
    if limits:
        parts.append(f"first {', '.join(str(x) for x in limits)} examples per task (zeroshot.limit)")
    prov: dict[str, dict] = {}
    for r in zs_runs:
        for t, p in ((r.get("zeroshot_source") or {}).get("tasks") or {}).items():
            prov.setdefault(t, p)
    if prov:
        used = sorted({f"{p.get('source')} {p.get('split')}" for p in prov.values()})
        moved = sorted(t for t, p in prov.items() if p.get("builtin_split") and p.get("builtin_split") != p.get("split"))
        text = f"data: {', '.join(used)} split"
        if moved:
            text += f" (lm-eval's default split differs for {', '.join(moved)})"
        parts.append(text)
    errs = [row[f"{metric}_stderr"] for r in zs_runs for row in r["zeroshot"].values()
            if isinstance(row, dict) and f"{metric}_stderr" in row]
    if errs:
        parts.append(f"typical standard error ±{100 * mean(errs):.1f} points")
    return "; ".join(parts) + "."


def build(runs: list[dict], name: str) -> dict[str, str]:
    """All text outputs: ``{file name: content}``."""
    files: dict[str, str] = {}
    md = [f"# {name}", "", f"Built by `experiments/build_tables.py` from {len(runs)} run{'s' if len(runs) != 1 else ''}. "
          "Perplexity: lower is better; dense = the unpruned model. Columns are target sparsities.", ""]
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_model[r["model"]].append(r)
    ppl_csv: dict[str, list[list]] = defaultdict(list)
    zs_csv: list[list] = []
    zs_header: list[str] = []
    ppl_headers: dict[str, list[str]] = {}
    for model, mruns in by_model.items():
        d0 = mruns[0].get("data", {})
        windows = ", ".join(f"{k} {v}" for k, v in (d0.get("eval_windows") or {}).items())
        md += [f"## {model}", "", f"Calibration: {d0.get('calibration')}, {d0.get('nsamples')} x {d0.get('seqlen')} tokens. "
               f"Evaluation windows of {d0.get('seqlen')} tokens: {windows}.", ""]
        for dataset in datasets_of(mruns):
            warn_mixed(model, dataset, mruns)
            header, md_rows, _ = ppl_table(mruns, dataset)
            md += [f"### Perplexity on {dataset}", "", markdown_table(header, md_rows), ""]
            cmp_ = comparison_table(mruns, dataset)
            if cmp_:
                md += [f"### The search against the best baseline allocation ({dataset})", "",
                       "Unstructured rows; the best baseline is the non-search allocation of lowest perplexity in that "
                       "row; the last column compares the better search run with it (negative: the search wins).", "",
                       markdown_table(*cmp_), ""]
            noise = noise_table(mruns, dataset)
            if noise:
                md += [f"### Run-to-run noise ({dataset}, calibration seeds)", "", markdown_table(*noise), ""]
            every = sorted({r["target_sparsity"] for r in runs if dataset in r.get("ppl", {})})  # same columns for all models
            header, _, csv_rows = ppl_table(mruns, dataset, every)
            ppl_headers[dataset] = ["model", *header]
            ppl_csv[dataset] += [[model, *row] for row in csv_rows]
        t_header, t_rows = timing_table(mruns)
        if t_rows:
            md += ["### Wall time of the allocation stage (s)", "",
                   "Signal, search and fit to the budget; a signal cached by an earlier run of the same model and data "
                   "(Fisher, Hessian trace, spectra) is read back, so the first run of a method pays for it.", "",
                   markdown_table(t_header, t_rows), ""]
        zs = zeroshot_table(mruns)
        if zs:
            header, md_rows, csv_rows = zs
            md += ["### Zero-shot accuracy", "", zeroshot_note(mruns), "", markdown_table(header, md_rows), ""]
            zs_header = ["model", *header]
            zs_csv += [[model, *row] for row in csv_rows]
    for dataset, rows in ppl_csv.items():
        files[f"ppl_{slug(dataset)}.csv"] = csv_text(ppl_headers[dataset], rows)
    if zs_csv:
        files["zeroshot.csv"] = csv_text(zs_header, zs_csv)
    files["runs.csv"] = runs_csv(runs)
    files["README.md"] = "\n".join(md).rstrip() + "\n"
    return files


# ----------------------------------------------------------------------------------------------- plots
def block_profile(layers: list[dict]) -> list[float]:
    """Parameter-weighted measured sparsity per decoder block (the first integer in a layer's name), in block
    order; one value per layer when the names carry no block index."""
    sums: dict[int, list[float]] = {}
    for l in layers:
        m = re.search(r"\.(\d+)\.", l["name"])
        if m is None:
            return [float(x["measured"]) for x in layers]
        acc = sums.setdefault(int(m.group(1)), [0.0, 0.0])
        w = float(l.get("params") or 1)
        acc[0] += w * float(l["measured"])
        acc[1] += w
    return [sums[k][0] / sums[k][1] for k in sorted(sums)]


def plot_all(runs: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written: list[str] = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_model[r["model"]].append(r)
    for model, mruns in by_model.items():
        for dataset in datasets_of(mruns):
            series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in mruns:
                if dataset in r.get("ppl", {}):
                    series[method_of(r)][r["target_sparsity"]].append(float(r["ppl"][dataset]))
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for m, pts in sorted(series.items()):
                xs = sorted(pts)
                ax.plot([100 * x for x in xs], [mean(pts[x]) for x in xs], marker="o", label=m)
            dense = [float(r["dense_ppl"][dataset]) for r in mruns if dataset in r.get("dense_ppl", {})]
            if dense:
                ax.axhline(mean(dense), color="k", linestyle="--", linewidth=1, label="dense")
            ax.set_yscale("log")
            plain = FuncFormatter(lambda y, _: f"{y:.4g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel(f"perplexity on {dataset} (log)")
            ax.set_title(f"{model}: perplexity vs sparsity")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fname = f"ppl_{slug(model)}_{slug(dataset)}.png"
            fig.savefig(out / fname, dpi=120)
            plt.close(fig)
            written.append(fname)

        # per-block sparsity profile of each allocation: one panel per target sparsity (rows) and pruner (columns)
        profiles: dict[tuple[float, str], dict[str, list[float]]] = defaultdict(dict)
        for r in mruns:
            if r.get("layers") and is_plain(r):
                label = method_of(r).split(" + ", 1)[1] if " + " in method_of(r) else "uniform"
                profiles[(r["target_sparsity"], r["pruner"])].setdefault(label, block_profile(r["layers"]))
        if profiles:
            rows_ = sorted({s for s, _ in profiles})
            cols = sorted({p for _, p in profiles})
            fig, axes = plt.subplots(len(rows_), len(cols), figsize=(7 * len(cols), 2.8 * len(rows_)), squeeze=False)
            for i, s in enumerate(rows_):
                for j, pruner in enumerate(cols):
                    ax = axes[i, j]
                    for alloc, prof in sorted(profiles.get((s, pruner), {}).items()):
                        ax.plot(range(len(prof)), [100 * p for p in prof], label=alloc, linewidth=1.2, marker=".", markersize=3)
                    ax.axhline(100 * s, color="k", linestyle=":", linewidth=0.8)
                    ax.set_ylabel("sparsity (%)")
                    ax.set_title(f"{model}, {pruner}: per-block sparsity at target {pct(s)}", fontsize=9)
                    if ax.lines[:-1]:
                        ax.legend(fontsize=7, ncol=4)
                    ax.grid(True, alpha=0.3)
            for ax in axes[-1]:
                ax.set_xlabel("block index (parameter-weighted mean over its layers)")
            fig.tight_layout()
            fname = f"layers_{slug(model)}.png"
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            written.append(fname)

        searched = [r for r in mruns if (r.get("search") or {}).get("history")]
        if searched:
            fig, ax = plt.subplots(figsize=(6, 4))
            for r in searched:
                hist = r["search"]["history"]
                gens = [h["generation"] for h in hist]
                label = f"{method_of(r)} @ {pct(r['target_sparsity'])}"
                line, = ax.plot(gens, [h["best"] for h in hist], label=f"{label} best")
                if all("mean" in h for h in hist):
                    ax.plot(gens, [h["mean"] for h in hist], linestyle="--", color=line.get_color(), alpha=0.6, label=f"{label} mean")
            ax.set_xlabel("generation")
            metrics = sorted({str(r["search"].get("fitness", "fitness")) for r in searched})
            ax.set_ylabel(f"{' / '.join(metrics)} (lower is better)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"{model}: search convergence")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fname = f"search_{slug(model)}.png"
            fig.savefig(out / fname, dpi=120)
            plt.close(fig)
            written.append(fname)
    return written


# ----------------------------------------------------------------------------------------------- main
def archive_runs(runs: list[dict], folder: Path, keep=lambda r: True) -> int:
    """Copy the results.json of every run that ``keep`` accepts to ``folder/<config hash>/results.json`` (atomically,
    byte for byte; one already there is kept), so that finished runs outlive their sweep folder: a sweep with
    ``done_dirs=[folder] skip_done=true`` skips them and the tables read them back. Returns how many were new."""
    from msp.io import write_text_atomic

    new = 0
    for r in runs:
        digest = r.get("config_hash")
        if not digest or not keep(r):
            continue
        dest = folder / slug(digest) / "results.json"
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dest, Path(r["_path"]).read_text())
        new += 1
    return new


def write_atomically(files: dict[str, str], runs: list[dict], dest: Path, plots: bool = True, plotter=None) -> list[str]:
    """Build everything in a temp folder next to ``dest``, then swap it in with renames; ``plotter(runs, folder)``
    (default :func:`plot_all`) draws the PNGs and returns their names."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        for fname, text in files.items():
            (tmp / fname).write_text(text)
        written = (plotter or plot_all)(runs, tmp) if plots else []
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown/CSV tables and PNG plots from finished msp runs.")
    p.add_argument("paths", nargs="+", type=Path, help="sweep folders, outputs/, or results.json files")
    p.add_argument("--name", required=True, help="output folder name under --out")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"parent folder (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--archive", type=Path, default=None,
                   help="also keep every run's results.json under ARCHIVE/<config hash>/ (commit it; a later sweep with "
                        "done_dirs=[ARCHIVE] and skip_done=true skips those runs, and the tables read them back)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = load_runs(args.paths)
    if not runs:
        print(f"build_tables: no results.json under {', '.join(map(str, args.paths))}; finished runs write one", file=sys.stderr)
        return 1
    if args.archive is not None:
        print(f"build_tables: {archive_runs(runs, args.archive)} new run(s) kept under {args.archive}/")
    dest = args.out / args.name
    files = build(runs, args.name)
    plots = write_atomically(files, runs, dest, plots=not args.no_plots)
    print(f"{len(runs)} runs -> {dest}/ ({', '.join(sorted(files) + plots)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
