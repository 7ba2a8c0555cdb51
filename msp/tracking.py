"""Experiment tracking behind one tiny interface: W&B (imported lazily) or nothing.

A tracker failure is logged and never loses the run's results on disk.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from msp.errors import MspError

log = logging.getLogger(__name__)


class Tracker:
    """The no-op tracker (``logger=none``); subclasses send things somewhere."""

    def start(self, config: dict, run_dir: Path, name: str, group: str | None, tags: list[str]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_results(self, results: dict, run_dir: Path) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


class SafeTracker(Tracker):
    """Wraps a tracker so that any exception it raises is logged once and then ignored."""

    def __init__(self, inner: Tracker):
        self.inner = inner
        self.failed = False

    def _call(self, method: str, *args, **kwargs):
        if self.failed:
            return None
        try:
            return getattr(self.inner, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a logger must never take the run down
            self.failed = True
            log.warning("logger %s failed in %s (%s: %s); results on disk are unaffected, logging stops here",
                        type(self.inner).__name__, method, type(exc).__name__, exc)
            return None

    def start(self, *a, **k):
        return self._call("start", *a, **k)

    def log_metrics(self, *a, **k):
        return self._call("log_metrics", *a, **k)

    def log_table(self, *a, **k):
        return self._call("log_table", *a, **k)

    def log_results(self, *a, **k):
        return self._call("log_results", *a, **k)

    def finish(self, *a, **k):
        # always try to close the run, even after an earlier failure, so the logger's files are flushed
        try:
            return self.inner.finish(*a, **k)
        except Exception as exc:  # noqa: BLE001
            log.warning("logger %s failed to finish (%s: %s); results on disk are unaffected", type(self.inner).__name__, type(exc).__name__, exc)
            return None


def make_tracker(options: dict | None) -> Tracker:
    name = (options or {}).get("name", "none")
    if name == "none":
        return Tracker()
    if name == "wandb":
        from msp.tracking_wandb import WandbTracker  # lazy: wandb is heavy

        return SafeTracker(WandbTracker(**{k: v for k, v in options.items() if k != "name"}))
    raise MspError(f"unknown logger {name!r}; valid: none, wandb (e.g. logger=wandb)")
