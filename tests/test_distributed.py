"""Several ranks (msp.distributed): the search's candidates split across processes with torch.distributed (gloo).

* the ranks come from torchrun's or SLURM's environment; the master address from MASTER_* or the SLURM node list;
* ``DistributedFitness`` on 2 real processes: rank r scores genomes r, r+2, …, every rank gets every value in order;
  a rank that dies or hangs makes the other stop with one RankError line within ``allocation.dist_timeout_s``;
* the CLI: ``torchrun --nproc-per-node 2 -m msp allocation=msp ...`` gives the single-process history and allocation,
  rank 0 alone logs; two SLURM-style tasks, one SIGKILLed mid-search, stop the other with the message; the checkpoint
  they left, resumed on ONE rank, ends where the uninterrupted single-process search ends.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from msp.distributed import RankError, Ranks, master_address, ranks, split_fitness
from msp.search.evolution import Evolution, EvolutionConfig, SearchSpace

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 4.0  # seconds a rank waits for the others in these tests


def free_port(lo: int = 20000, hi: int = 40000) -> int:
    """A TCP port nobody listens on now, in [lo, hi) (the SLURM path derives its port from the job id there)."""
    for port in np.random.default_rng().permutation(np.arange(lo, hi))[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port")


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC"))}
    return {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


# ------------------------------------------------------------------------------------------------ the environment


def test_ranks_from_torchrun_slurm_or_nothing():
    assert ranks({}) == Ranks() and not Ranks().many and Ranks().writer
    assert ranks({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(1, 4, 1, "torchrun")
    # SLURM: the step's tasks (srun) win over the job's; torchrun's variables win over SLURM's
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0"}
    assert ranks(slurm) == Ranks(2, 4, 0, "slurm")
    assert ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Ranks(0, 1, 0, "slurm") and not ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).many
    assert ranks({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"
    assert not ranks({"RANK": "1", "WORLD_SIZE": "2"}).writer
    with pytest.raises(RankError, match="need 0 <= rank < world size"):
        ranks({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(RankError, match="WORLD_SIZE='two' is not an integer"):
        ranks({"RANK": "0", "WORLD_SIZE": "two"})


def test_master_address_from_the_environment_or_the_slurm_job():
    slurm = Ranks(0, 2, 0, "slurm")
    assert master_address(slurm, {"SLURM_JOB_NODELIST": "gpu[03-05,07],cpu1", "SLURM_JOB_ID": "123456"}) == ("gpu03", 20000 + 123456 % 20000)
    assert master_address(slurm, {"SLURM_JOB_NODELIST": "node7,node8", "SLURM_JOB_ID": "5"}) == ("node7", 20005)
    assert master_address(slurm, {"SLURM_JOB_NODELIST": "a", "MASTER_ADDR": "b", "MASTER_PORT": "1234"}) == ("b", 1234)
    assert master_address(Ranks(0, 2, 0, "torchrun"), {}) == ("127.0.0.1", 29500)


def test_the_timeout_is_checked_and_does_not_change_the_config_hash():
    from hydra import compose, initialize_config_dir

    from msp.allocation.base import AllocationError
    from msp.cli import CONF_DIR
    from msp.masks import Pattern
    from msp.search.settings import parse_options
    from msp.sweep import config_hash_of

    assert parse_options({"dist_timeout_s": 30}, 0.5, Pattern.parse("unstructured")).dist_timeout_s == 30.0
    with pytest.raises(AllocationError, match=r"allocation.dist_timeout_s=0 must be > 0"):
        parse_options({"dist_timeout_s": 0}, 0.5, Pattern.parse("unstructured"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hashes = {config_hash_of(compose(config_name="config", overrides=["allocation=msp", "cache_dir=/tmp/x", *extra]))
                  for extra in ([], ["allocation.dist_timeout_s=5"])}
        other = config_hash_of(compose(config_name="config", overrides=["allocation=msp", "cache_dir=/tmp/x", "allocation.generations=3"]))
    assert len(hashes) == 1 and other not in hashes


def test_one_rank_scores_with_the_fitness_itself():
    fitness = lambda g, s: 1.0  # noqa: E731
    assert split_fitness(fitness, Ranks(), TIMEOUT) is fitness


def test_a_search_that_does_not_write_makes_the_same_search_without_files(tmp_path):
    """Ranks other than 0 run the same Evolution with writer=False: same result, no checkpoint, no history."""
    space = SearchSpace((0,) * 5, (4,) * 5, (1,) * 5, 10)
    target = np.array([4, 3, 2, 1, 0])
    fitness = lambda g, s: float(np.sum((g - target) ** 2)) + 0.1 * s  # noqa: E731
    cfg = EvolutionConfig(generations=6, population=3, offspring=5, survivors=(2,), seed=3)
    a = Evolution(space, cfg, checkpoint=tmp_path / "a" / "search_state.json").run(fitness, [np.full(5, 2)])
    b = Evolution(space, cfg, checkpoint=tmp_path / "b" / "search_state.json", writer=False).run(fitness, [np.full(5, 2)])
    assert (tmp_path / "a" / "search_state.json").exists() and not (tmp_path / "b").exists()
    assert [(r["best"], r["mean"], r["evaluations"]) for r in b.history] == [(r["best"], r["mean"], r["evaluations"]) for r in a.history]
    assert b.best.tolist() == a.best.tolist()


# ------------------------------------------------------------------------------------------------ two real ranks

WORKER = r"""
import json, os, sys, time
import numpy as np
from msp.distributed import RankError, ranks, same_search, search_group, split_fitness
mode, out, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
r = ranks()

class Inner:
    def __init__(self):
        self.seen, self.batches = [], []
    def __call__(self, g, stage):
        self.seen.append(int(g[0]))
        if r.rank == 1 and len(self.seen) == 3:
            if mode == "dies":
                os._exit(3)
            if mode == "hangs":
                time.sleep(120)
        return float(g[0]) * 10 + stage + 0.1

class Many(Inner):
    def many(self, genomes, stage):
        self.batches.append([int(g[0]) for g in genomes])
        return [float(g[0]) * 10 + stage + 0.1 for g in genomes]

record = {}
try:
    with search_group("cpu", timeout) as rr:
        for name, inner in [("call", Inner()), ("many", Many())][: 1 if mode != "ok" else 2]:
            f = split_fitness(inner, rr, timeout, "cpu")
            genomes = [np.array([k]) for k in range(7)]
            record[name] = {"many": f.many(genomes, 1), "one": f(np.array([5]), 0), "few": f.many(genomes[:3], 0),
                            "seen": inner.seen, "batches": inner.batches, "scored": f.scored}
        if mode == "ok":  # the ranks agree on rank 0's checkpoint source, and refuse to run different searches
            record["source"] = str(same_search("fp", f"/runs/rank{r.rank}/search_state.json", rr, timeout))
            try:
                same_search(f"fp{r.rank}", None, rr, timeout)
            except RankError as exc:
                record["differ"] = str(exc)
except RankError as exc:
    record["error"] = str(exc)
with open(out, "w") as fh:
    json.dump(record, fh)
"""


def _ranks(tmp_path: Path, mode: str, world: int = 2, start: int | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world if start is None else start):
        e = env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode, str(tmp_path / f"rank{rank}.json"), str(TIMEOUT)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _record(tmp_path: Path, rank: int) -> dict:
    return json.loads((tmp_path / f"rank{rank}.json").read_text())


def test_two_ranks_score_their_share_and_get_every_value_in_order(tmp_path):
    procs = _ranks(tmp_path, "ok")
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-2000:]
    want = [k * 10 + 1.1 for k in range(7)]
    r0, r1 = _record(tmp_path, 0), _record(tmp_path, 1)
    for rec in (r0["call"], r0["many"], r1["call"], r1["many"]):
        assert rec["many"] == want and rec["one"] == 50.1 and rec["few"] == [0.1, 10.1, 20.1]  # bit for bit
    # one inner call per own genome: rank 0 has 0, 2, 4, 6, then the single genome, then 0, 2
    assert r0["call"]["seen"] == [0, 2, 4, 6, 5, 0, 2] and r1["call"]["seen"] == [1, 3, 5, 1]
    # the inner fitness's own many, with this rank's share (not called when it has none)
    assert r0["many"]["batches"] == [[0, 2, 4, 6], [5], [0, 2]] and r1["many"]["batches"] == [[1, 3, 5], [1]]
    assert (r0["call"]["scored"], r1["call"]["scored"]) == (7, 4)
    assert r0["source"] == r1["source"] == "/runs/rank0/search_state.json"
    assert r0["differ"] == r1["differ"] == ("rank(s) 1 of 2 run another search than rank 0 (other settings or data); "
                                            "start every rank with the same command")


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_other_with_one_line(tmp_path, mode):
    procs = _ranks(tmp_path, mode)
    try:
        out, _ = procs[0].communicate(timeout=60)  # a hang here would be the bug
        assert procs[0].returncode == 0, out[-2000:]
        error = _record(tmp_path, 0)["error"]
        assert error.startswith("rank 0 of 2: another rank stopped or did not answer within allocation.dist_timeout_s=4 s")
        assert "allocation.resume=true" in error and "\n" not in error
    finally:
        procs[1].kill()
        procs[1].wait()
    if mode == "dies":
        assert procs[1].returncode == 3


def test_a_rank_that_never_comes_stops_the_first_with_one_line(tmp_path):
    (proc,) = _ranks(tmp_path, "ok", world=2, start=1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    error = _record(tmp_path, 0)["error"]
    assert error.startswith("rank 0 of 2: the other ranks did not join within allocation.dist_timeout_s=4 s") and "\n" not in error


# ------------------------------------------------------------------------------------------------ the CLI

GENERATIONS = 16
SEARCH = ["model=tiny-llama", "data=tiny", "device=cpu", "allocation=msp", "allocation.granularity=layer", "eval=none",
          "report=false", "sparsity=0.6"]


def _msp(run_dir: Path, *overrides: str, ranks_: int = 1, extra_env: dict | None = None, launcher: str = "python") -> subprocess.Popen:
    args = [*SEARCH, *overrides, f"cache_dir={run_dir.parent / ('cache-' + run_dir.name)}", f"hydra.run.dir={run_dir}"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks_), "--master-port", str(free_port()), "-m", "msp", *args]
    else:
        cmd = [sys.executable, "-m", "msp", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out, err


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "search_history.jsonl").read_text().splitlines()]


def _same_history(a: list[dict], b: list[dict], evaluations: bool = True) -> None:
    """best and mean within 1e-5 relative per generation (and the evaluation counts: a resumed search re-scores the
    genomes of earlier generations that its memo, rebuilt from the population, no longer holds)."""
    assert [r["generation"] for r in a] == [r["generation"] for r in b] == list(range(GENERATIONS + 1))
    for x, y in zip(a, b):
        for key in ("best", "mean"):
            assert abs(x[key] - y[key]) <= 1e-5 * abs(y[key]), (x, y)
        assert not evaluations or x["evaluations"] == y["evaluations"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One rank; two ranks with torchrun; two SLURM-style tasks, one SIGKILLed mid-search, resumed on one rank."""
    base = tmp_path_factory.mktemp("dist")
    gens = f"allocation.generations={GENERATIONS}"
    one = _msp(base / "one", gens)
    two = _msp(base / "two", gens, ranks_=2, launcher="torchrun")
    # srun-like: each task finds its rank in SLURM_PROCID / SLURM_STEP_NUM_TASKS, the port from the job id; a long
    # search (so that it is still running when rank 1 is killed), whose checkpoint is resumed to GENERATIONS below
    port = free_port()
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)}
    killed = [_msp(base / "killed", "allocation.generations=2000", "allocation.dist_timeout_s=60",
                   extra_env={**slurm, "SLURM_PROCID": str(k), "SLURM_LOCALID": str(k)}) for k in (0, 1)]
    history = base / "killed" / "search_history.jsonl"
    while (not history.exists() or len(history.read_text().splitlines()) < 3) and killed[0].poll() is None:
        time.sleep(0.02)
    killed[1].send_signal(signal.SIGKILL)
    out = {"one": _finish(one), "two": _finish(two), "killed": _finish(killed[0]), "killed_rank1": _finish(killed[1])}
    out["killed_at"] = len(_history(base / "killed")) - 1 if history.exists() else None
    out["resumed"] = _finish(_msp(base / "killed", gens, "allocation.resume=true"))
    return base, out


def test_two_ranks_give_the_single_process_search(runs):
    base, out = runs
    for name in ("one", "two"):
        assert out[name][0] == 0, out[name][2][-3000:]
    _same_history(_history(base / "two"), _history(base / "one"))
    alloc = lambda d: json.loads((base / d / "allocation.json").read_text())["sparsities"]  # noqa: E731
    assert alloc("two") == alloc("one")
    results = json.loads((base / "two" / "results.json").read_text())
    assert results["search"]["ranks"] == 2 and json.loads((base / "one" / "results.json").read_text())["search"]["ranks"] == 1
    log = (base / "two" / "cli.log").read_text()  # rank 0 alone writes the log: each generation once
    assert all(log.count(f"search generation {g}/{GENERATIONS}:") == 1 for g in range(GENERATIONS + 1)), log[-3000:]
    assert out["two"][1].count("results: ") == 1  # one summary printed


def test_a_killed_rank_stops_the_other_and_one_rank_resumes_its_checkpoint(runs):
    base, out = runs
    rc, _, err = out["killed"]
    assert out["killed_rank1"][0] == -signal.SIGKILL
    assert rc == 2, err[-3000:]
    assert "msp: error: rank 0 of 2: another rank stopped or did not answer within allocation.dist_timeout_s=60 s" in err
    assert out["killed_at"] is not None and 2 <= out["killed_at"] < GENERATIONS
    rc, _, err = out["resumed"]
    assert rc == 0, err[-3000:]
    results = json.loads((base / "killed" / "results.json").read_text())
    assert results["search"]["resumed_from"] == out["killed_at"] and results["search"]["ranks"] == 1
    _same_history(_history(base / "killed"), _history(base / "one"), evaluations=False)
    alloc = lambda d: json.loads((base / d / "allocation.json").read_text())["sparsities"]  # noqa: E731
    assert alloc("killed") == alloc("one")
