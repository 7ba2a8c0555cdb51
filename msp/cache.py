"""A small on-disk cache shared by the jobs of a sweep (dense perplexity, tokenised data, sensitivities).

Keys are JSON-able dicts that name everything the value depends on (model, data, nsamples, seqlen, seed,
method) plus a code version per statistic, so a stale entry cannot be hit. Values are written to a temp file
and renamed, so concurrent jobs never read half a file; a corrupt entry is detected, warned about, and
recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

#: bump the entry of a statistic when its computation changes; old entries then miss
CODE_VERSIONS = {"dense_ppl": 1, "tokens": 1, "fisher": 1, "hessian": 1, "owl": 1, "dlp": 1}


def cache_key(kind: str, **fields: Any) -> str:
    payload = json.dumps({"kind": kind, "version": CODE_VERSIONS.get(kind, 0), **fields}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


class DiskCache:
    def __init__(self, root: str | Path | None, enabled: bool = True):
        self.root = Path(root) if root else None
        self.enabled = enabled and self.root is not None
        self.hits = 0
        self.misses = 0

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
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is not None:
            return value
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value
