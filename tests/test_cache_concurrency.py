"""DiskCache under concurrency, with real processes: two workers missing the same key at once compute it once and
both get the value; a lock left by a killed process, or one naming a dead pid, does not block; a lock from another
host is broken only once it is older than ``stale_after``."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msp.cache import DiskCache

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, os, sys, time
from pathlib import Path
from msp.cache import DiskCache

root, counter, ready, go, sleep_s = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5])
ready.touch()
deadline = time.time() + 120
while not go.exists() and time.time() < deadline:  # start both workers' lookups together
    time.sleep(0.01)

def compute():
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(sleep_s)
    return {"value": 42, "computed_by": os.getpid()}

cache = DiskCache(root, poll=0.05)
value = cache.get_or_compute("k", compute)
print(json.dumps({"value": value, "hits": cache.hits, "misses": cache.misses}))
"""


def start_worker(tmp_path: Path, name: str, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(tmp_path / "calls"), str(tmp_path / f"ready-{name}"),
                             str(tmp_path / "go"), str(sleep_s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_processes_compute_the_same_entry_once(tmp_path):
    workers = [start_worker(tmp_path, name, sleep_s=2.0) for name in ("a", "b")]
    for name in ("a", "b"):
        wait_for(tmp_path / f"ready-{name}")
    (tmp_path / "go").touch()
    outs = []
    for w in workers:
        stdout, stderr = w.communicate(timeout=180)
        assert w.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    calls = (tmp_path / "calls").read_text().split()
    assert len(calls) == 1  # exactly one process paid for it
    assert outs[0]["value"] == outs[1]["value"] == {"value": 42, "computed_by": int(calls[0])}
    assert sorted((o["hits"], o["misses"]) for o in outs) == [(0, 1), (1, 0)]  # the waiter read the entry
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k.pt"]  # no lock, no temp file left


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, caplog):
    (tmp_path / "go").touch()
    victim = start_worker(tmp_path, "victim", sleep_s=600.0)
    cache = DiskCache(tmp_path / "cache", poll=0.05)
    wait_for(cache.lock_path("k"))
    wait_for(tmp_path / "calls")  # inside compute(), holding the lock
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="msp.cache"):
        assert cache.get_or_compute("k", lambda: "mine") == "mine"
    assert f"pid {victim.pid} on {socket.gethostname()} is no longer running" in caplog.text
    assert "breaking the stale lock" in caplog.text
    assert not cache.lock_path("k").exists() and DiskCache(tmp_path / "cache").get("k") == "mine"


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def write_lock(cache: DiskCache, key: str, pid: int, host: str, age_s: float = 0.0) -> Path:
    lock = cache.lock_path(key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host, "time": time.time() - age_s}))
    if age_s:
        os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_lock_naming_a_dead_pid_is_broken(tmp_path, caplog):
    cache = DiskCache(tmp_path / "cache", poll=0.01)
    pid = dead_pid()
    write_lock(cache, "k", pid, socket.gethostname())
    with caplog.at_level(logging.WARNING, logger="msp.cache"):
        assert cache.get_or_compute("k", lambda: 7) == 7
    assert f"pid {pid}" in caplog.text and "no longer running" in caplog.text
    assert (cache.hits, cache.misses) == (0, 1)


def test_a_lock_from_another_host_is_stale_only_when_old(tmp_path, caplog):
    cache = DiskCache(tmp_path / "cache", stale_after=60.0, poll=0.01)
    fresh = write_lock(cache, "k", os.getpid(), "some-other-node")
    assert cache._stale(fresh) is None  # its pid cannot be checked from here: trusted while young
    write_lock(cache, "k", os.getpid(), "some-other-node", age_s=120.0)
    with caplog.at_level(logging.WARNING, logger="msp.cache"):
        assert cache.get_or_compute("k", lambda: [1, 2]) == [1, 2]
    assert "longer than 60s" in caplog.text


def test_a_live_lock_owner_is_waited_for(tmp_path):
    """A lock held by a live process on this host is not broken: its entry, once written, is returned."""
    import threading

    cache = DiskCache(tmp_path / "cache", poll=0.01)
    lock = write_lock(cache, "k", os.getpid(), socket.gethostname())
    assert cache._stale(lock) is None

    def owner_finishes():
        DiskCache(tmp_path / "cache").put("k", "theirs")
        lock.unlink()

    timer = threading.Timer(0.5, owner_finishes)
    timer.start()
    try:
        assert cache.get_or_compute("k", lambda: pytest.fail("must not compute")) == "theirs"
    finally:
        timer.join()
    assert (cache.hits, cache.misses) == (1, 0)
