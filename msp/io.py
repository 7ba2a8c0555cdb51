"""Atomic file writes: readers never see half a file, a crash (``kill -9``, power loss) never leaves one.

Every writer goes temp file (or folder) beside the target → flush → ``fsync`` → ``os.replace`` → ``fsync`` of the
folder, so the name points either at the old complete content or at the new complete content. A kill can leave a
hidden temp (``.<name>.*``) beside the target, never a half-written file under the target's name.
"""
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


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable; a no-op where folders cannot be opened (Windows) or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a closed file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp file path beside ``path`` for the body to write (any writer: ``savefig``, ``torch.save``, ...); on
    success it is fsynced and renamed onto ``path``, on any exception (a signal included) deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    write_text_atomic(Path(path), json.dumps(data, indent=2, default=_json_default) + "\n")


@contextmanager
def atomic_dir(path: Path, fix: str = "free space there") -> Iterator[Path]:
    """A folder written whole or not at all: the body fills a hidden sibling (``save_pretrained`` and the like); on
    success every file in it is fsynced and it takes ``path``'s place (an existing ``path`` is replaced whole), on
    any exception it is deleted and ``path`` is left as it was. A full disk (``ENOSPC``) becomes
    :class:`DiskFullError`, whose message ends with ``fix``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # plain mkdir, not mkdtemp: the umask's permissions, as for any other run output
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(root) / name)
            for name in dirs:
                fsync_dir(Path(root) / name)
        fsync_dir(tmp)
        old = None
        if path.exists():  # rename the old one aside first: a kill between the renames leaves both complete
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
