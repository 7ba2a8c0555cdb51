"""Weights & Biases tracker (``logger=wandb``): offline by default, ``logger.mode=online`` to stream.

Offline runs need no network and no login; their files land under ``<run dir>/wandb/offline-run-*`` and
``wandb sync <that folder>`` uploads them later. :class:`msp.tracking.SafeTracker` wraps this class, so an
exception here is logged once and never loses ``results.json`` (which :func:`msp.run.run` writes first).
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from msp.errors import MspError

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class TrackerError(MspError):
    """The logger cannot be set up as configured; the message names the fix."""


def flatten(prefix: str, value: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"prefix/a/b": 1}``; keeps finite numbers only (what a summary/plot can show)."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(float(value)):
            out[prefix] = value
    return out


def summary_metrics(results: dict) -> dict[str, float]:
    """The scalar metrics of one run, with stable W&B keys (``ppl/wiki``, ``zeroshot/boolq/acc``, ``timings/prune``)."""
    out: dict[str, Any] = {}
    for key in ("dense_ppl", "ppl", "timings", "cache", "zeroshot"):
        flatten(key, results.get(key) or {}, out)
    for key in ("sparsity", "target_sparsity", "peak_memory_bytes"):
        if isinstance(results.get(key), (int, float)):
            out[key] = results[key]
    return out


def layer_rows(results: dict) -> tuple[list[str], list[list[Any]]]:
    """Per-layer table: name, params, sensitivity, target and measured sparsity."""
    columns = ["index", "name", "params", "sensitivity", "target", "measured"]
    rows = [[i, r["name"], int(r["params"]), r.get("sensitivity"), float(r["target"]), float(r["measured"])]
            for i, r in enumerate(results.get("layers") or [])]
    return columns, rows


class WandbTracker:
    """Logs one msp run to W&B. Constructed from ``conf/logger/wandb.yaml`` minus ``name``."""

    def __init__(self, project: str = "msp", entity: str | None = None, mode: str = "offline",
                 job_type: str = "prune", log_artifacts: bool = True, console: str = "off", **extra: Any):
        if mode not in MODES:
            raise TrackerError(f"logger.mode={mode!r}; valid: {', '.join(MODES)}")
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise TrackerError("logger=wandb needs the wandb package: pip install wandb (or use logger=none)") from exc
        self.project, self.entity, self.mode, self.job_type = project, entity, mode, job_type
        self.log_artifacts, self.console, self.extra = log_artifacts, console, extra
        self.run = None

    def start(self, config: dict, run_dir: Path, name: str, group: str | None, tags: list[str]) -> None:
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, job_type=self.job_type, dir=str(run_dir),
            name=name, group=group, tags=[str(t)[:64] for t in tags if t], config=config,
            reinit="finish_previous",  # the jobs of a basic-launcher sweep share one process
            settings=wandb.Settings(console=self.console, silent=True, **self.extra),
        )
        log.info("W&B run %s (%s) in %s", self.run.id, self.mode, self.run.dir)
        if self.mode == "offline":
            log.info("upload later with: wandb sync %s", Path(self.run.dir).parent)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        if self.run is not None:
            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_results(self, results: dict, run_dir: Path) -> None:
        import wandb

        if self.run is None:
            return
        run = self.run
        metrics = summary_metrics(results)
        run.summary.update(metrics)

        columns, rows = layer_rows(results)
        if rows:
            table = wandb.Table(columns=columns, data=rows)
            charts: dict[str, Any] = {
                "layers": table,
                "layers/sparsity": wandb.plot.bar(table, "name", "measured", title="per-layer sparsity (measured)"),
            }
            if any(r[3] is not None for r in rows):
                sens = wandb.Table(columns=["index", "sensitivity"], data=[[r[0], r[3]] for r in rows if r[3] is not None])
                charts["layers/sensitivity"] = wandb.plot.line(sens, "index", "sensitivity", title="sensitivity profile")
            run.log(charts)

        # the whole search history (a resumed search logged only its new generations live, as search/*)
        history = (results.get("search") or {}).get("history") or []
        if history:
            run.define_metric("search_history/generation")
            run.define_metric("search_history/*", step_metric="search_history/generation")
            for h in history:
                run.log({"search_history/generation": h.get("generation"),
                         **{f"search_history/{k}": v for k, v in h.items() if k != "generation" and isinstance(v, (int, float))}})

        allocation = Path(run_dir) / "allocation.json"
        if self.log_artifacts and allocation.exists():
            art = wandb.Artifact(f"allocation-{run.id}", type="allocation",
                                 metadata={k: results.get(k) for k in ("model", "pruner", "pattern", "allocation", "target_sparsity")})
            art.add_file(str(allocation))
            run.log_artifact(art)
        results_json = Path(run_dir) / "results.json"
        if results_json.exists():  # files in run.dir are uploaded with the run (a copy: no symlink warning)
            shutil.copyfile(results_json, Path(run.dir) / "results.json")

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1 if failed else 0)
