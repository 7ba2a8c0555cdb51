"""Several processes (ranks) for one run: the search's candidates split across them with ``torch.distributed``.

``torchrun --nproc-per-node N -m msp allocation=msp ...`` (or ``srun`` / Hydra's submitit launcher with one SLURM task
per GPU) starts N copies of the same run. Every rank loads the model, builds the same variants and runs the same
search: the search state and its RNG are identical everywhere (same seed, same fitness values), so every rank makes
the same offspring. Only the scoring is split: :class:`DistributedFitness` gives rank r the genomes r, r+N, … of a
stage, and one ``all_reduce`` (float64, each value written by exactly one rank, zeros elsewhere: the sum *is* the
value, bit for bit) hands every rank all of them. Rank 0 alone writes (:func:`is_writer`): the search checkpoint,
``results.json``, ``allocation.json``, saved models, the run summary, the log file and W&B. The other stages
(calibration, pruning, evaluation) run identically on every rank.

The ranks come from the environment (:func:`ranks`): torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, else
SLURM's ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) / ``SLURM_LOCALID``. One rank: nothing here
does anything. The process group (gloo on the CPU, NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``:
:func:`msp.device.resolve_device`) lives for the search only (:func:`search_group`), with a bounded timeout
(``allocation.dist_timeout_s``): a rank that dies or hangs makes the others stop with one :class:`RankError` line
instead of waiting forever. A resumed search may use another number of ranks: nothing rank-specific is saved.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from msp.errors import MspError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torch.distributed's usual MASTER_PORT


class RankError(MspError):
    """The ranks of a run cannot work together: a bad environment, a rank that stopped or did not answer in time."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes: ``rank`` of ``world``, ``local`` (its GPU on the node)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def many(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RankError(f"{name}={env[name]!r} is not an integer; launch with torchrun or srun, which set it") from None


def ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """The ranks from the environment: torchrun's variables first, then SLURM's (one task per rank), else one rank."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        r = Ranks(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, "torchrun")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"  # the step's tasks (srun)
        r = Ranks(_int(env, "SLURM_PROCID"), _int(env, world), _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, "slurm")
    else:
        return Ranks()
    if r.world < 1 or not 0 <= r.rank < r.world or r.local < 0:
        raise RankError(f"the launcher says rank {r.rank} of {r.world} (local {r.local}): need 0 <= rank < world size; relaunch with torchrun or srun")
    return r


def is_writer() -> bool:
    """True on the one process that writes the run's files (rank 0; always true with one rank)."""
    return ranks().writer


def quiet_progress() -> None:
    """On ranks other than 0: no progress bars (``TQDM_DISABLE``; tqdm reads it when it is first imported)."""
    if not is_writer():
        os.environ.setdefault("TQDM_DISABLE", "1")


def quiet_other_ranks(argv: list[str]) -> None:
    """Before Hydra starts, on ranks other than 0: no ``.hydra/`` copies of the config (``hydra.output_subdir=null``,
    appended to ``argv``): rank 0 writes them."""
    if is_writer():
        return
    if not any(a.startswith(("hydra.output_subdir=", "++hydra.output_subdir=")) for a in argv[1:]):
        argv.append("hydra.output_subdir=null")


def quiet_logging() -> None:
    """On ranks other than 0: no log file (rank 0 writes it) and only warnings on the console."""
    if is_writer():
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)
    logging.getLogger("msp").setLevel(logging.WARNING)


def master_address(r: Ranks, environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(host, port) of rank 0's store: ``MASTER_ADDR`` / ``MASTER_PORT`` (torchrun sets them); under SLURM the first
    host of ``SLURM_JOB_NODELIST`` and a port derived from the job id (every task derives the same)."""
    env = os.environ if environ is None else environ
    host = env.get("MASTER_ADDR") or (_first_host(env.get("SLURM_JOB_NODELIST", "")) if r.launcher == "slurm" else "") or "127.0.0.1"
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    elif r.launcher == "slurm" and env.get("SLURM_JOB_ID", "").isdigit():
        port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        port = DEFAULT_PORT
    return host, port


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,07],cpu1`` → ``gpu03``; ``a,b`` → ``a``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return ""
    prefix, ranges = m.group(1), m.group(2)
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def backend_for(device) -> str:
    """NCCL between GPUs, gloo on the CPU."""
    from msp.device import is_gpu

    return "nccl" if is_gpu(device) else "gloo"


@contextmanager
def search_group(device, timeout_s: float) -> Iterator[Ranks]:
    """The process group of the search (one rank: nothing), destroyed on exit; its collectives give up after
    ``timeout_s`` seconds. A group someone else initialised (an outer script) is used as it is and left alone."""
    r = ranks()
    if not r.many:
        yield r
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield r
        return
    from msp.device import use_device

    use_device(device)  # NCCL: this rank's GPU is the current one
    host, port = master_address(r)
    os.environ.setdefault("MASTER_ADDR", host)
    os.environ.setdefault("MASTER_PORT", str(port))
    backend = backend_for(device)
    log.info("search: %s (%s, %s at %s:%d), candidates split across the ranks", r, r.launcher, backend, host, port)
    try:  # env://: under torchrun the agent's store is joined; otherwise rank 0 starts one
        dist.init_process_group(backend, init_method="env://", rank=r.rank, world_size=r.world, timeout=timedelta(seconds=float(timeout_s)))
    except Exception as exc:  # noqa: BLE001 - DistStoreError, RuntimeError, ValueError: the others never came
        raise RankError(
            f"{r}: the other ranks did not join within allocation.dist_timeout_s={timeout_s:g} s at {host}:{port} ({_brief(exc)}); "
            f"start all {r.world} together (torchrun --nproc-per-node {r.world}, or srun)"
        ) from None
    try:
        yield r
    finally:
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - a group broken by a dead rank: nothing left to release
            log.debug("destroy_process_group: %s", exc)


def _brief(exc: BaseException) -> str:
    """The first line of an exception, short: torch's distributed errors carry a C++ backtrace."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _lost(r: Ranks, timeout_s: float, exc: BaseException) -> RankError:
    return RankError(
        f"{r}: another rank stopped or did not answer within allocation.dist_timeout_s={timeout_s:g} s ({_brief(exc)}); "
        f"see the other ranks' output, then rerun all ranks with allocation.resume=true to continue from the checkpoint"
    )


def agree(values: tuple, r: Ranks, timeout_s: float) -> list[tuple]:
    """Every rank's ``values`` (picklable), in rank order; one rank: ``[values]``."""
    if not r.many:
        return [values]
    import torch.distributed as dist

    out: list = [None] * r.world
    try:
        dist.all_gather_object(out, values)
    except Exception as exc:  # noqa: BLE001
        raise _lost(r, timeout_s, exc) from None
    return out


def same_search(fingerprint: str, source, r: Ranks, timeout_s: float, resume: bool = False):
    """Check that every rank runs the same search (its checkpoint ``fingerprint``) and return the checkpoint source
    of rank 0, which every rank resumes from (another rank's Hydra run dir may differ: its ``${now:...}`` second).
    With ``resume``, every rank must also see that checkpoint (or none may): else one would start afresh."""
    views = agree((fingerprint, None if source is None else str(source)), r, timeout_s)
    odd = [k for k, (fp, _) in enumerate(views) if fp != views[0][0]]
    if odd:
        raise RankError(f"rank(s) {', '.join(map(str, odd))} of {r.world} run another search than rank 0 (other settings or data); "
                        f"start every rank with the same command")
    chosen = None if views[0][1] is None else Path(views[0][1])
    if resume and r.many:
        seen = [bool(v[0]) for v in agree((chosen is not None and chosen.exists(),), r, timeout_s)]
        blind = [k for k, ok in enumerate(seen) if ok != seen[0]]
        if blind:
            raise RankError(f"rank(s) {', '.join(map(str, blind))} of {r.world} do not see rank 0's search checkpoint {chosen} "
                            f"(another filesystem?); put the run dir (or allocation.resume_from) where every rank can read it")
    return chosen


class DistributedFitness:
    """A fitness whose stage is scored by all ranks together: rank r scores genomes r, r+N, … of each
    :meth:`many` call (with ``inner.many`` when the inner fitness offers it, else one ``inner(genome, stage)`` each)
    and every rank gets every value back, in order. Every rank must make the same calls (the search does: its
    state is identical on all ranks). ``scored``: the genomes this rank scored itself."""

    def __init__(self, inner, r: Ranks, timeout_s: float, device=None):
        self.inner, self.ranks, self.timeout_s = inner, r, float(timeout_s)
        self.comm_device = device if device is not None and backend_for(device) == "nccl" else "cpu"
        self.scored = 0

    def __call__(self, genome: np.ndarray, stage: int) -> float:
        return self.many([genome], stage)[0]

    def many(self, genomes: Sequence[np.ndarray], stage: int) -> list[float]:
        import torch

        r = self.ranks
        mine = list(range(r.rank, len(genomes), r.world))
        own = [genomes[i] for i in mine]
        inner_many = getattr(self.inner, "many", None)
        if not own:
            values: list[float] = []
        elif inner_many is not None:
            values = [float(v) for v in inner_many(own, stage)]
        else:
            values = [float(self.inner(g, stage)) for g in own]
        self.scored += len(own)
        if not r.many:
            return values
        import torch.distributed as dist

        buf = torch.zeros(len(genomes), dtype=torch.float64)
        buf[mine] = torch.tensor(values, dtype=torch.float64)
        buf = buf.to(self.comm_device)
        try:
            dist.all_reduce(buf)  # x + 0 + … + 0 = x exactly: every value comes back bit for bit
        except Exception as exc:  # noqa: BLE001 - gloo: "Connection closed by peer" / a timeout
            raise _lost(r, self.timeout_s, exc) from None
        return buf.cpu().tolist()


def split_fitness(inner, r: Ranks, timeout_s: float, device=None):
    """``inner`` itself with one rank, else a :class:`DistributedFitness` around it."""
    return DistributedFitness(inner, r, timeout_s, device) if r.many else inner


__all__ = ["Ranks", "RankError", "ranks", "is_writer", "quiet_progress", "quiet_other_ranks", "quiet_logging", "master_address", "backend_for",
           "search_group", "agree", "same_search", "DistributedFitness", "split_fitness"]
