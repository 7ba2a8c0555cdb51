"""A small on-disk cache shared by the jobs of a sweep (dense perplexity, tokenised data, sensitivities).

Keys are JSON-able dicts that name everything the value depends on (model, data, nsamples, seqlen, seed,
method) plus a code version per statistic, so a stale entry cannot be hit. Values are written to a temp file,
fsynced and renamed, so concurrent jobs never read half a file; a corrupt entry is detected, warned about, and
recomputed.

Concurrent jobs (a joblib sweep, two ``msp --multirun`` processes, SLURM jobs on a shared file system) that miss
the same entry at once compute it once: :meth:`DiskCache.get_or_compute` takes ``<key>.lock`` with an atomic
create (``O_CREAT | O_EXCL``) holding the owner's pid and host; the others poll until the entry appears. A lock
whose owner is dead (its pid gone on this host) or that is older than ``stale_after`` seconds is broken with a
warning, so a killed job never blocks the next one for good.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from msp.io import fsync_dir

log = logging.getLogger(__name__)

#: bump the entry of a statistic when its computation changes; old entries then miss
CODE_VERSIONS = {"dense_ppl": 1, "tokens": 1, "fisher": 1, "hessian": 1, "owl": 1, "dlp": 1}


def cache_key(kind: str, **fields: Any) -> str:
    payload = json.dumps({"kind": kind, "version": CODE_VERSIONS.get(kind, 0), **fields}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


#: a lock older than this is taken to be left by a job on another host that died (longest single computation: a
#: 70B model's sensitivities take a few hours)
STALE_AFTER_S = 12 * 3600.0
POLL_S = 0.5
LOCK_ATTEMPTS = 5  # owners that may fail in turn (their lock vanishes without an entry) before we compute unlocked


class DiskCache:
    def __init__(self, root: str | Path | None, enabled: bool = True, stale_after: float = STALE_AFTER_S, poll: float = POLL_S):
        self.root = Path(root) if root else None
        self.enabled = enabled and self.root is not None
        self.hits = 0
        self.misses = 0
        self.stale_after = stale_after
        self.poll = poll

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key}.pt"

    def get(self, key: str) -> Any | None:
        if not self.enabled:
            return None
        path = self.path(key)
        if not path.exists():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated / corrupt
            log.warning("cache entry %s is corrupt (%s); recomputing it", path, type(exc).__name__)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        self.hits += 1
        log.info("cache hit: %s", key)
        return value

    def put(self, key: str, value: Any) -> None:
        if not self.enabled:
            return
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(value, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them (kill -9, power loss)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key``, else ``compute()`` stored under it; of several processes missing the same key
        at once, one computes (holding ``<key>.lock``) and the others wait for its entry."""
        value = self.get(key)
        if value is not None:
            return value
        if not self.enabled:
            self.misses += 1
            return compute()
        lock = None
        for _attempt in range(LOCK_ATTEMPTS):  # each wait ends with the entry, or with the lock gone / broken as stale
            lock = self._try_lock(key)
            if lock is not None:
                break
            value = self._wait_for(key)
            if value is not None:
                return value
        if lock is None:
            log.warning("cache: %s: %d owners in turn failed to write it; computing it here without the lock", key, LOCK_ATTEMPTS)
        try:
            value = self.get(key)  # finished by another process between our miss and our lock
            if value is not None:
                return value
            self.misses += 1
            value = compute()
            self.put(key, value)
            return value
        finally:
            if lock is not None:
                _release(lock)

    def lock_path(self, key: str) -> Path:
        return self.path(key).with_suffix(".lock")

    def _try_lock(self, key: str) -> Path | None:
        """Create ``<key>.lock`` atomically with our pid and host; None when another process holds it."""
        lock = self.lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
        return lock

    def _wait_for(self, key: str) -> Any | None:
        """Poll while another process holds the lock: its entry once written, or None when the lock went away
        without one (the owner failed, or the lock was stale and is broken here) so the caller may take it."""
        lock = self.lock_path(key)
        log.info("cache: %s is being computed by another process (%s); waiting", key, _describe(lock))
        while lock.exists():
            if self.path(key).exists():
                break
            reason = self._stale(lock)
            if reason:
                log.warning("cache: breaking the stale lock %s (%s)", lock, reason)
                _unlink(lock)
                return None
            time.sleep(self.poll)
        return self.get(key)

    def _stale(self, lock: Path) -> str | None:
        """Why ``lock`` is stale (its owner is dead on this host, or it is older than ``stale_after``), else None."""
        try:
            info = json.loads(lock.read_text() or "{}")
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info, age = {}, 0.0  # half-written by its owner right now: judge it by age once it has one
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
            return f"pid {info['pid']} on {info['host']} is no longer running"
        if age > self.stale_after:
            return f"held for {age:.0f}s, longer than {self.stale_after:.0f}s"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"pid {info.get('pid')} on {info.get('host')}"
    except (OSError, ValueError):
        return "owner unknown"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _release(lock: Path) -> None:
    """Remove our lock, unless it was broken as stale and retaken by another process meanwhile."""
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        _unlink(lock)
