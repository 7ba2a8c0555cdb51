"""Atomic file writes: readers never see half a file, a crash (``kill -9``, power loss) never leaves one.

Every writer goes temp file (or folder) beside the target → flush → ``fsync`` → ``os.replace`` → ``fsync`` of the
folder, so the name points either at the old complete content or at the new complete content. A kill can leave a
hidden temp (``.<name>.*``) beside the target, never a half-written file under the target's name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
def atomic_dir(folder: Path) -> Iterator[Path]:
    """A temp folder beside ``folder`` for the body to fill (``save_pretrained`` and the like); on success every
    file in it is fsynced and it takes ``folder``'s place (an existing ``folder`` is replaced whole), on any
    exception it is deleted and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(root) / name)
            for name in dirs:
                fsync_dir(Path(root) / name)
        fsync_dir(tmp)
        old = None
        if folder.exists():  # rename the old one aside first: a kill between the renames leaves both complete
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
