"""Stopping cleanly on SIGINT / SIGTERM, and the run directory's ``status.json`` that says how to resume.

SLURM (and ``kill``, and Ctrl-C) ask a job to stop with SIGTERM / SIGINT before they kill it. Inside
:func:`stop_on_signals` either signal raises :class:`RunInterrupted` in the main thread at the next Python
instruction, so the stage that is running unwinds through its ``finally`` blocks (hooks removed, locks released,
temp files deleted); every file msp writes is atomic (:mod:`msp.io`), so what is on disk stays complete: the last
search generation's checkpoint, the allocation, the cache. :mod:`msp.cli` then marks the run ``interrupted`` in
``status.json``, writes no ``results.json``, logs the exact command that resumes the run as its last line and
exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal while stopping stops at once.

``status.json`` (:class:`RunStatus`, rewritten atomically): ``{"status": "running" | "interrupted" | "done" |
"failed", "stage": ..., "signal": ..., "resume": "<command>", ...}``; ``running`` from the start (with the resume
command, for a job killed with ``kill -9``), the stage updated as the run's stages start (:mod:`msp.run`).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from msp.io import read_json, write_json_atomic

STATUS_FILE = "status.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind and stop. A :class:`BaseException` (like :class:`KeyboardInterrupt`) so
    that no ``except Exception`` on the way swallows it; not an :class:`~msp.errors.MspError` (nothing to fix)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.signal = signal.Signals(self.signum).name
        self.stage: str | None = None  # the innermost stage running when it arrived (RunStatus.stage)
        self.resume: str | None = None  # the line that says how to resume, once the CLI knows it
        self.sweep_dir: str | None = None  # a sweep's job: the sweep's folder
        super().__init__(f"interrupted by {self.signal}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):  # across processes (a joblib launcher's worker): the signal, stage and resume line kept
        return _rebuild, (self.signum, self.stage, self.resume, self.sweep_dir)


def _rebuild(signum: int, stage: str | None, resume: str | None, sweep_dir: str | None = None) -> RunInterrupted:
    exc = RunInterrupted(signum)
    exc.stage, exc.resume, exc.sweep_dir = stage, resume, sweep_dir
    return exc


_depth = 0  # nesting of stop_on_signals (the CLI's main around the jobs of a sweep, each job inside)
_stopping = False  # a RunInterrupted was raised: the next signal stops at once


def _handler(signum: int, frame) -> None:
    global _stopping
    if _stopping:  # a second signal while unwinding: the default action now (files are atomic: nothing torn)
        print(f"msp: second {signal.Signals(signum).name} while stopping: stopping at once", file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _stopping = True
    raise RunInterrupted(signum)


@contextmanager
def stop_on_signals(signals: Sequence[int] = SIGNALS) -> Iterator[None]:
    """SIGINT / SIGTERM raise :class:`RunInterrupted` inside the block; the previous handlers come back after it.
    Outside the main thread (signals cannot be caught there) the block runs unchanged."""
    global _depth, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    if _depth == 0:
        _stopping = False
    _depth += 1
    for s in signals:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        _depth -= 1
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------- resume commands

_REPLACED = ("hydra.run.dir=", "hydra.sweep.dir=", "allocation.resume=", "skip_done=")


def _is_msp_argv(argv: Sequence[str]) -> bool:
    first = Path(argv[0]) if argv else Path()
    return first.name == "msp" or (first.name == "__main__.py" and first.parent.name == "msp")


def _program(argv0: str) -> str:
    """How to start msp again: ``msp`` (the console script) or ``python -m msp``, each by its name on PATH when it
    is the same file, else by its full path."""
    def on_path(path: str) -> str:
        name = os.path.basename(path)
        found = shutil.which(name)
        same = found is not None and os.path.realpath(found) == os.path.realpath(path)
        return name if same else shlex.quote(path)

    if Path(argv0).name == "msp":
        return on_path(argv0)
    return f"{on_path(sys.executable)} -m msp"


def resume_command(overrides: Sequence[str], *, argv0: str, cwd: Path, multirun: bool, run_dir: Path,
                   sweep_dir: Path | None, search: bool) -> str:
    """The command line that continues this run: the same overrides, then for a sweep ``skip_done=true`` and the same
    ``hydra.sweep.dir`` (finished jobs are skipped), for a single run the same ``hydra.run.dir`` and, for a search
    (``allocation=msp``), ``allocation.resume=true`` (the search continues from its last checkpoint)."""
    replaced = _REPLACED if not multirun or sweep_dir is not None else ("skip_done=",)  # unknown sweep dir: the user's stays
    kept = [a for a in overrides if not a.lstrip("+").startswith(replaced)]
    if multirun:
        extra = ["skip_done=true"] + ([f"hydra.sweep.dir={Path(sweep_dir).resolve()}"] if sweep_dir is not None else [])
    else:
        extra = (["allocation.resume=true"] if search else []) + [f"hydra.run.dir={Path(run_dir).resolve()}"]
    return " ".join([f"cd {shlex.quote(str(Path(cwd).resolve()))} &&", _program(argv0), *map(shlex.quote, [*kept, *extra])])


def sweep_resume_command(argv: Sequence[str], sweep_dir: str | Path | None) -> str | None:
    """For a ``--multirun`` msp command line, the command that resumes the sweep (``sweep_dir``: the folder of the
    interrupted job's sweep, when known); None for anything else."""
    if not _is_msp_argv(argv) or not any(a in ("-m", "--multirun") for a in argv[1:]):
        return None
    return resume_command(argv[1:], argv0=argv[0], cwd=Path.cwd(), multirun=True, run_dir=Path.cwd(),
                          sweep_dir=Path(sweep_dir) if sweep_dir is not None else None, search=False)


def command_of_this_job(job_overrides: Sequence[str], *, multirun: bool, run_dir: Path, sweep_dir: Path | None,
                        search: bool, argv: Sequence[str] | None = None) -> tuple[str, str]:
    """(the command line that started this process, the one that resumes this run). From ``sys.argv`` when msp was
    started as ``msp`` / ``python -m msp``; otherwise (a launcher's worker process) from the job's own overrides, as
    a single run in the job's folder."""
    argv = list(sys.argv if argv is None else argv)
    cwd = Path.cwd()
    if _is_msp_argv(argv):
        original = " ".join([_program(argv[0]), *map(shlex.quote, argv[1:])])
        return original, resume_command(argv[1:], argv0=argv[0], cwd=cwd, multirun=multirun, run_dir=run_dir,
                                        sweep_dir=sweep_dir, search=search)
    original = " ".join(["msp", *map(shlex.quote, job_overrides)])
    return original, resume_command(job_overrides, argv0="msp", cwd=cwd, multirun=False, run_dir=run_dir, sweep_dir=None, search=search)


# ---------------------------------------------------------------------------------------------- status.json


class RunStatus:
    """``<run dir>/status.json``: what the run is doing and how to resume it (rewritten atomically at each change)."""

    def __init__(self, run_dir: Path, command: str, resume: str, *, write: bool = True):
        self.path = Path(run_dir) / STATUS_FILE
        self.write = write  # False on the ranks other than 0 (msp.distributed.is_writer): rank 0 alone writes the file
        self.fields: dict = {"status": "running", "stage": None, "signal": None, "resume": resume, "command": command,
                             "pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "updated": None}
        self.started = time.time()
        self._stages: list[str] = []

    def _write(self, **changes) -> None:
        self.fields.update(changes, updated=_now())
        if self.write:
            write_json_atomic(self.path, self.fields)

    def running(self) -> None:
        self._write(status="running")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """The run is in stage ``name`` (nested stages: the innermost is named); a :class:`RunInterrupted` passing
        through records it."""
        self._stages.append(name)
        try:
            self._write(stage=name)
            yield
        except RunInterrupted as exc:
            if exc.stage is None:
                exc.stage = name
            raise
        finally:
            self._stages.pop()

    def interrupted(self, exc: RunInterrupted, **facts) -> None:
        self._write(status="interrupted", signal=exc.signal, stage=exc.stage or self.fields.get("stage"), **facts)

    def done(self) -> None:
        self._write(status="done")

    def failed(self, error: str) -> None:
        self._write(status="failed", error=error)


def read_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATUS_FILE
    return read_json(path) if path.exists() else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["RunInterrupted", "stop_on_signals", "RunStatus", "read_status", "resume_command", "sweep_resume_command",
           "command_of_this_job", "STATUS_FILE"]
