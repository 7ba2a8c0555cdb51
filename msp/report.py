"""One-page pictures of finished runs and sweeps (issue 13 §4).

``render_run(run_dir)`` reads what a run wrote (``results.json``; ``allocation.json`` and ``sensitivity.json``
when present) and writes, next to ``results.json``:

* ``summary.png``: per-layer sparsity bars coloured by module type (the last part of the layer name:
  q_proj, k_proj, …, fc1, fc2) with the per-layer sensitivity on a second, logarithmic axis; the search
  convergence curve (best and mean fitness per generation) when the run searched; dense vs pruned perplexity.
* ``summary.md``: the same facts as markdown tables, and a link to the image.

``render_sweep(dirs, out)`` draws perplexity against measured sparsity, one line per method
(allocation, pruner; the pattern and model join the label when a sweep mixes them).

Matplotlib is imported lazily, through its object-oriented API on the Agg canvas (no pyplot, no global
backend switch), so ``import msp.report`` stays light and rendering works without a display. Every file is
written to a temporary name in its folder and renamed, so a reader never sees half a picture.

Command line::

    python -m msp.report <run dir>            # summary.png + summary.md next to results.json
    python -m msp.report <sweep dir>          # pareto.png + pareto.md in the sweep dir
    python -m msp.report <dir> --out DIR      # write them into DIR instead
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from msp.errors import MspError
from msp.io import atomic_path

log = logging.getLogger(__name__)

RESULTS = "results.json"
ALLOCATION = "allocation.json"
SENSITIVITY = "sensitivity.json"
RUN_PNG, RUN_MD = "summary.png", "summary.md"
SWEEP_PNG, SWEEP_MD = "pareto.png", "pareto.md"


class ReportError(MspError):
    """The folder holds nothing to render; the message says what was expected."""


# ----------------------------------------------------------------------------------------------- reading a run


@dataclass
class LayerFacts:
    name: str
    kind: str  # module type: the last part of the name (q_proj, fc1, ...)
    block: int | None
    params: int
    allocated: float  # the allocation's sparsity for the layer
    measured: float
    sensitivity: float | None


@dataclass
class RunFacts:
    """What one finished run says about itself, read from its folder."""

    run_dir: Path
    results: dict
    layers: list[LayerFacts]
    sensitivity_method: str | None = None
    history: list[dict] = field(default_factory=list)  # results["search"]["history"]

    @property
    def title(self) -> str:
        r = self.results
        return f"{r.get('model', '?')}: {r.get('pruner', '?')}, allocation={r.get('allocation', '?')}, pattern={r.get('pattern', '?')}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); was the run interrupted while writing it?") from None


def _block_of(name: str) -> int | None:
    """The decoder block index in a layer name (``model.layers.3.mlp.up_proj`` → 3): the first all-digit part."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def load_run(run_dir: str | Path) -> RunFacts:
    """Read ``results.json`` (required), ``allocation.json`` and ``sensitivity.json`` (optional) of a run."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise ReportError(f"{run_dir} has no {RESULTS}; give the folder of a finished run (the one the run printed as 'results: ...')")
    results = _read_json(path)
    allocated: dict[str, float] = {}
    if (run_dir / ALLOCATION).is_file():
        allocated = {k: float(v) for k, v in _read_json(run_dir / ALLOCATION).get("sparsities", {}).items()}
    sens: dict[str, float] = {}
    method = results.get("sensitivity_method")
    if (run_dir / SENSITIVITY).is_file():
        data = _read_json(run_dir / SENSITIVITY)
        sens = {k: float(v) for k, v in (data.get("layers") or {}).items() if v is not None}
        method = data.get("method", method)
    layers = []
    for entry in results.get("layers", []):
        name = entry["name"]
        s = sens.get(name, entry.get("sensitivity"))
        layers.append(LayerFacts(
            name=name, kind=name.rsplit(".", 1)[-1], block=_block_of(name), params=int(entry.get("params", 0)),
            allocated=float(allocated.get(name, entry.get("target", entry.get("measured", math.nan)))),
            measured=float(entry.get("measured", math.nan)), sensitivity=None if s is None else float(s),
        ))
    if not any(l.sensitivity is not None for l in layers):
        method = None
    history = list((results.get("search") or {}).get("history") or [])
    return RunFacts(run_dir, results, layers, method, history)


# ------------------------------------------------------------------------------------------------ atomic writes


def _atomic(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then fsync and rename it onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def _write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def _save_figure(fig, path: Path) -> Path:
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (lazy import; no pyplot state, works without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------------------------------- one run


def _colours(kinds: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    order = list(dict.fromkeys(kinds))
    return {k: palette[i % len(palette)] for i, k in enumerate(order)}


def _draw_layers(ax, facts: RunFacts) -> None:
    layers = facts.layers
    x = list(range(len(layers)))
    colours = _colours([l.kind for l in layers])
    ax.bar(x, [l.allocated for l in layers], width=0.85, color=[colours[l.kind] for l in layers], edgecolor="none")
    target = facts.results.get("target_sparsity")
    if isinstance(target, (int, float)):
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    # block boundaries and one tick per block
    starts: dict[int, int] = {}
    for i, l in enumerate(layers):
        if l.block is not None:
            starts.setdefault(l.block, i)
    for b, i in starts.items():
        if i:
            ax.axvline(i - 0.5, color="0.85", linewidth=0.8, zorder=0)
    if starts:
        ends = list(starts.values())[1:] + [len(layers)]
        step = max(1, len(starts) // 16)  # at most ~16 labels
        ticks = [(i + e - 1) / 2 for (b, i), e in zip(starts.items(), ends)]
        ax.set_xticks(ticks[::step], [str(b) for b in list(starts)[::step]])
        ax.set_xlabel("decoder block (bars: its Linear layers in model order)")
    else:
        ax.set_xlabel("layer")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    values = [l.allocated for l in layers if not math.isnan(l.allocated)] or [0.0]
    ax.set_ylim(max(0.0, min(values) - 0.1), min(1.0, max(values) + 0.08))
    ax.set_ylabel("sparsity")
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in colours.items()]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    sens = [(i, l.sensitivity) for i, l in enumerate(layers) if l.sensitivity is not None and l.sensitivity > 0]
    if sens:
        ax2 = ax.twinx()
        ax2.plot([i for i, _ in sens], [s for _, s in sens], "o-", color="black", markersize=3 if len(sens) <= 60 else 1.5, linewidth=0.8,
                 label=f"sensitivity ({facts.sensitivity_method or 'per layer'})")
        ax2.set_yscale("log")
        ax2.set_ylabel(f"sensitivity ({facts.sensitivity_method or '?'}, log)")
        handles += ax2.get_legend_handles_labels()[0]
    # above the axes, so it never hides a bar or the sensitivity curve
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=min(len(handles), 10), fontsize=8, frameon=False)


def _draw_search(ax, facts: RunFacts) -> None:
    gens = [h.get("generation", i) for i, h in enumerate(facts.history)]
    best = [h.get("best") for h in facts.history]
    mean = [h.get("mean") for h in facts.history]
    ax.plot(gens, best, "o-", color="tab:blue", markersize=3, label="best")
    if any(m is not None for m in mean):
        ax.plot(gens, mean, "s--", color="tab:orange", markersize=3, label="population mean")
    positive = [v for v in best + mean if isinstance(v, (int, float)) and v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    search = facts.results.get("search") or {}
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel(f"fitness ({search.get('fitness', '?')}, lower is better)")
    ax.set_title(f"search: {search.get('generations', len(gens))} generations, {search.get('evaluations', '?')} evaluations", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _draw_perplexity(ax, facts: RunFacts) -> None:
    dense, pruned = facts.results.get("dense_ppl") or {}, facts.results.get("ppl") or {}
    names = list(dict.fromkeys([*pruned, *dense]))
    if not names:
        ax.text(0.5, 0.5, "no perplexity evaluated (eval.skip=true)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.38
    for offset, (label, values, colour) in zip((-width / 2, width / 2), (("dense", dense, "0.6"), ("pruned", pruned, "tab:red"))):
        xs = [i + offset for i, n in enumerate(names) if n in values]
        ys = [values[n] for n in names if n in values]
        bars = ax.bar(xs, ys, width=width, color=colour, label=label)
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5 - width * 1.5, len(names) - 0.5 + width * 1.5)  # one dataset: bars of a sensible width
    every = [v for v in [*dense.values(), *pruned.values()] if v > 0]
    if every and max(every) / min(every) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(every or [1]) * 1.3)
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity at {facts.results.get('sparsity', math.nan):.3f} measured sparsity", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)


def draw_run(facts: RunFacts):
    """The summary figure of one run (a matplotlib Figure)."""
    fig = _new_figure(12, 7.5)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
    _draw_layers(fig.add_subplot(grid[0, :]), facts)
    if facts.history:
        _draw_search(fig.add_subplot(grid[1, 0]), facts)
        _draw_perplexity(fig.add_subplot(grid[1, 1]), facts)
    else:
        _draw_perplexity(fig.add_subplot(grid[1, :]), facts)
    r = facts.results
    fig.suptitle(f"{facts.title}\ntarget sparsity {r.get('target_sparsity', math.nan):.3f}, measured {r.get('sparsity', math.nan):.4f}", fontsize=11)
    return fig


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)) else "–"


def run_markdown(facts: RunFacts, image: str) -> str:
    """``summary.md``: the run's facts as markdown tables, with the image link."""
    r = facts.results
    total = (r.get("timings") or {}).get("total")
    lines = [f"# {facts.title}", "", f"![run summary]({image})", "", "| | |", "|---|---|"]
    rows = [
        ("model", r.get("model")), ("pruner", r.get("pruner")), ("pattern", r.get("pattern")), ("allocation", r.get("allocation")),
        ("target sparsity", _fmt(r.get("target_sparsity"), ".4f")), ("measured sparsity", _fmt(r.get("sparsity"), ".4f")),
        ("sensitivity", facts.sensitivity_method or "–"), ("layers", len(facts.layers)),
        ("calibration", f"{(r.get('data') or {}).get('calibration', '?')}, {(r.get('data') or {}).get('nsamples', '?')} x {(r.get('data') or {}).get('seqlen', '?')} tokens"),
        ("device / dtype", f"{r.get('device', '?')} / {r.get('dtype', '?')}"), ("total time", f"{_fmt(total, '.1f')} s"),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    dense, pruned = r.get("dense_ppl") or {}, r.get("ppl") or {}
    if dense or pruned:
        lines += ["", "## Perplexity", "", "| dataset | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
        for name in dict.fromkeys([*pruned, *dense]):
            d, p = dense.get(name), pruned.get(name)
            ratio = p / d if isinstance(d, (int, float)) and isinstance(p, (int, float)) and d else None
            lines.append(f"| {name} | {_fmt(d, '.3f')} | {_fmt(p, '.3f')} | {_fmt(ratio, '.3f')} |")
    if facts.history:
        s = r.get("search") or {}
        lines += ["", f"## Search ({s.get('fitness', '?')} fitness, lower is better; {s.get('evaluations', '?')} evaluations)", "",
                  "| generation | best | mean | evaluations |", "|---:|---:|---:|---:|"]
        for h in facts.history:
            lines.append(f"| {h.get('generation', '')} | {_fmt(h.get('best'), '.6g')} | {_fmt(h.get('mean'), '.6g')} | {h.get('evaluations', '')} |")
    lines += ["", "## Layers", "", "| layer | type | params | allocated | measured | sensitivity |", "|---|---|---:|---:|---:|---:|"]
    for l in facts.layers:
        lines.append(f"| {l.name} | {l.kind} | {l.params} | {_fmt(l.allocated, '.4f')} | {_fmt(l.measured, '.4f')} | {_fmt(l.sensitivity, '.3e')} |")
    return "\n".join(lines) + "\n"


def render_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``summary.png`` and ``summary.md`` for a finished run (into ``out``, default: the run folder).
    Returns their paths."""
    facts = load_run(run_dir)
    out = Path(out) if out is not None else facts.run_dir
    fig = draw_run(facts)
    png = _save_figure(fig, out / RUN_PNG)
    md = _write_text(out / RUN_MD, run_markdown(facts, RUN_PNG))
    log.info("run summary: %s, %s", png, md)
    return png, md


# ----------------------------------------------------------------------------------------------------- sweeps


def sweep_results(dirs: Iterable[str | Path]) -> list[tuple[Path, dict]]:
    """(path, results) of every finished run under ``dirs`` (a run folder counts as its own sweep); a job that
    ``skip_done`` answered with an earlier run (``skipped.json``) contributes that run. Each run once."""
    from msp.sweep import finished_results

    out = []
    for p in finished_results([Path(d) for d in dirs]):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            log.warning("report: cannot read %s; ignoring it", p)
    return out


@dataclass
class SweepPoint:
    method: str
    sparsity: float
    ppl: float
    dense_ppl: float | None
    path: Path


def sweep_points(runs: list[tuple[Path, dict]], dataset: str | None = None) -> tuple[str, list[SweepPoint]]:
    """The evaluation dataset drawn (the given one, else the most common) and one point per run that has it."""
    if dataset is None:
        counts: dict[str, int] = {}
        for _, r in runs:
            for name in r.get("ppl") or {}:
                counts[name] = counts.get(name, 0) + 1
        if not counts:
            raise ReportError("no run in the sweep has a pruned perplexity (all with eval.skip=true?); nothing to plot")
        dataset = max(counts, key=counts.get)
    vary = {key: len({str(r.get(key)) for _, r in runs}) > 1 for key in ("model", "pattern")}
    points = []
    for path, r in runs:
        ppl = (r.get("ppl") or {}).get(dataset)
        if ppl is None:
            continue
        label = f"{r.get('allocation', '?')}, {r.get('pruner', '?')}"
        if vary["pattern"]:
            label += f", {r.get('pattern')}"
        if vary["model"]:
            label = f"{r.get('model')}: {label}"
        points.append(SweepPoint(label, float(r.get("sparsity", math.nan)), float(ppl), (r.get("dense_ppl") or {}).get(dataset), path))
    return dataset, points


def draw_sweep(points: list[SweepPoint], dataset: str):
    fig = _new_figure(9, 6)
    ax = fig.add_subplot()
    methods: dict[str, list[SweepPoint]] = {}
    for p in points:
        methods.setdefault(p.method, []).append(p)
    markers = "os^vDP*X<>"
    for i, (method, pts) in enumerate(sorted(methods.items())):
        pts = sorted(pts, key=lambda p: p.sparsity)
        ax.plot([p.sparsity for p in pts], [p.ppl for p in pts], marker=markers[i % len(markers)], label=method)
    dense = sorted({round(p.dense_ppl, 6) for p in points if p.dense_ppl})
    for j, d in enumerate(dense):
        ax.axhline(d, color="0.4", linestyle=":", linewidth=1, label="dense" if j == 0 else None)
    values = [p.ppl for p in points] + dense
    if values and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")
    ax.set_xlabel("measured sparsity (parameter-weighted over the pruned Linear layers)")
    ax.set_ylabel(f"perplexity on {dataset}")
    ax.set_title(f"perplexity vs sparsity: {len(points)} runs, {len(methods)} methods", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def sweep_markdown(points: list[SweepPoint], dataset: str, image: str) -> str:
    lines = [f"# Perplexity vs sparsity ({dataset})", "", f"![pareto]({image})", "",
             "| method | sparsity | perplexity | dense | run |", "|---|---:|---:|---:|---|"]
    for p in sorted(points, key=lambda p: (p.method, p.sparsity)):
        lines.append(f"| {p.method} | {p.sparsity:.4f} | {p.ppl:.3f} | {_fmt(p.dense_ppl, '.3f')} | {p.path.parent} |")
    return "\n".join(lines) + "\n"


def render_sweep(sweep_dirs: Iterable[str | Path], out: str | Path, dataset: str | None = None) -> tuple[Path, Path]:
    """Write ``pareto.png`` (perplexity vs sparsity, one line per (allocation, pruner)) and ``pareto.md``
    into the folder ``out`` from every finished run under ``sweep_dirs``. Returns their paths."""
    sweep_dirs = [Path(d) for d in ([sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else sweep_dirs)]
    runs = sweep_results(sweep_dirs)
    if not runs:
        raise ReportError(f"no {RESULTS} under {', '.join(map(str, sweep_dirs))}; give a sweep folder (hydra.sweep.dir) or run folders")
    dataset, points = sweep_points(runs, dataset)
    out = Path(out)
    png = _save_figure(draw_sweep(points, dataset), out / SWEEP_PNG)
    md = _write_text(out / SWEEP_MD, sweep_markdown(points, dataset, SWEEP_PNG))
    log.info("sweep plot of %d runs: %s, %s", len(points), png, md)
    return png, md


# -------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msp.report", description="Render a finished run (summary.png/.md) or a sweep (pareto.png/.md).")
    parser.add_argument("dir", help="a run folder (holds results.json) or a sweep folder (runs below it)")
    parser.add_argument("--out", default=None, help="folder to write into (default: the given folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path(args.dir)
    try:
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder; give a run folder (with {RESULTS}) or a sweep folder")
        if (folder / RESULTS).is_file():
            paths = render_run(folder, args.out)
        else:
            paths = render_sweep([folder], args.out or folder)
    except ReportError as exc:
        print(f"msp.report: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
