"""Atomic file writes: readers never see half a file, a crash never leaves one."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msp.errors import MspError


class DiskFullError(MspError):
    """The disk filled up while msp wrote something; nothing half-written was left behind."""


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path: Path, fix: str = "free space there") -> Iterator[Path]:
    """A folder written whole or not at all: the caller writes into a hidden sibling, renamed to ``path`` when the
    block ends; any failure removes the sibling (and leaves an existing ``path`` as it was). A full disk
    (``ENOSPC``) becomes :class:`DiskFullError`, whose message ends with ``fix``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # plain mkdir, not mkdtemp: the umask's permissions, as for any other run output
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on the device while writing {path} (nothing of it was kept); {fix}") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class UnwritableDirError(MspError):
    """An output folder that cannot be created or written."""


def check_writable_dir(path: str | Path, key: str) -> None:
    """``path`` can be created and written: its nearest existing ancestor is a folder this process may write
    (a read-only mount or a file in the way fails here, before any work). ``key`` names the setting in the message."""
    probe = Path(os.path.expanduser(str(path))).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UnwritableDirError(f"{key}={path} cannot be created: {probe} is a file, not a folder; choose another {key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UnwritableDirError(f"{key}={path} is not writable ({probe}: permission denied or a read-only file system); choose a folder you can write")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: Path):
    return json.loads(Path(path).read_text())
