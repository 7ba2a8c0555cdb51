"""The one place in msp that knows about CUDA, dtypes and memory accounting.

Everything else receives a ``torch.device`` / ``torch.dtype`` chosen here. Importing this module
does not initialise CUDA; only the functions below touch ``torch.cuda``, and only when asked.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from msp.errors import MspError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(MspError):
    """A device or dtype the user asked for cannot be used on this machine."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_gpu(device: torch.device | str) -> bool:
    """True for a CUDA device; the rest of msp asks this instead of comparing device strings."""
    return torch.device(device).type == "cuda"


def bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 on ``device``: always on CPU; on a GPU only where the hardware has it (Ampere and
    newer). Emulated bf16 on older GPUs is not counted: it is slower than float16 and gives no benefit."""
    if not is_gpu(device):
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation argument
        return bool(torch.cuda.is_bf16_supported())


def device_name(device: torch.device) -> str:
    """A human-readable name of the device (the GPU's marketing name, or ``cpu``)."""
    return torch.cuda.get_device_name(device) if is_gpu(device) else "cpu"


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on a GPU right now (bytes); None on CPU, whose memory msp does not budget by default."""
    if not is_gpu(device):
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def available_memory_bytes() -> int | None:
    """Host memory available right now (``MemAvailable`` of ``/proc/meminfo``, bytes); None where the system has none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (also inside tuples, lists and dicts, e.g. a block's keyword arguments)
    moved to ``device``; anything else is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (whatever device they are on)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → first GPU if there is one, else CPU; ``cpu``; ``cuda`` / ``cuda:N``. With several ranks
    (torchrun, SLURM tasks) ``auto`` and ``cuda`` are the rank's own GPU, ``cuda:LOCAL_RANK``."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda", _rank_gpu()) if cuda_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not cuda_available():
            raise DeviceError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
        dev = torch.device(name)
        index = dev.index if dev.index is not None else _rank_gpu()
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")


def _rank_gpu() -> int:
    """The GPU of this process: ``LOCAL_RANK`` (torchrun) or ``SLURM_LOCALID`` when a run has several ranks
    (:mod:`msp.distributed`: one GPU per rank), else 0; 0 too where each rank sees one GPU only."""
    from msp.distributed import ranks

    r = ranks()
    if not r.many or torch.cuda.device_count() == 1:  # one GPU visible: the rank's own (srun --gpus-per-task=1)
        return 0
    if r.local >= torch.cuda.device_count():
        raise DeviceError(f"{r} has local rank {r.local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                          f"start one process per GPU (torchrun --nproc-per-node {torch.cuda.device_count()})")
    return r.local


def use_device(device: torch.device) -> None:
    """Make ``device`` the current GPU of this process (NCCL's collectives run there); nothing on the CPU."""
    if is_gpu(device):
        torch.cuda.set_device(device)


def resolve_devices(spec) -> list[torch.device]:
    """``eval.devices``: None / empty → [] (evaluate on the run's device); ``all`` → every visible GPU; a list (or a
    comma-separated string) of device names, each checked like ``device=``."""
    if spec is None or spec == "" or (isinstance(spec, (list, tuple)) and not spec):
        return []
    if isinstance(spec, str) and spec.strip().lower() == "all":
        if not cuda_available():
            raise DeviceError("eval.devices=all but no CUDA GPU is visible; leave eval.devices=null to evaluate on device=")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    devices = [resolve_device(str(n)) for n in names if str(n).strip()]
    if len(set(devices)) != len(devices):
        raise DeviceError(f"eval.devices={spec} names a device twice; list each device once, e.g. eval.devices=[cuda:0,cuda:1]")
    return devices


def balanced_split(sizes: list[int], parts: int) -> list[int]:
    """Part index of each item: contiguous runs in order, starting at part 0 and never skipping a part, each part's
    total as close to an equal share as the order allows (an item goes to the part its midpoint falls in). Used to
    lay decoder blocks over devices."""
    if parts < 1:
        raise ValueError("need at least one part")
    total = max(1, sum(int(x) for x in sizes))
    out: list[int] = []
    seen = 0
    for size in sizes:
        p = min(parts - 1, (2 * seen + int(size)) * parts // (2 * total))
        p = 0 if not out else min(max(p, out[-1]), out[-1] + 1)
        out.append(p)
        seen += int(size)
    return out


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → float32 on CPU, bfloat16 on GPUs that support it (else float16)."""
    name = str(name).strip().lower()
    if name == "auto":
        if is_gpu(device):
            return torch.bfloat16 if bf16_supported(device) else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; valid: auto, {', '.join(_DTYPES)}")
    dtype = _DTYPES[name]
    if is_gpu(device) and dtype == torch.bfloat16 and not bf16_supported(device):
        raise DeviceError(
            f"dtype=bfloat16 is not supported natively by {device_name(device)} (needs compute capability 8.0+); "
            "use dtype=float16 or dtype=auto"
        )
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 on CPU is slow and inaccurate; float32 is recommended (dtype=float32)")
    return dtype


def synchronize(device: torch.device) -> None:
    if is_gpu(device):
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if is_gpu(device):
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if is_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if is_gpu(device) else 0


_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"
_process_peak_rss = 0  # the lifetime peak, kept across resets of the kernel's high-water mark


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``: RSS high-water mark, ``VmRSS``: RSS now) in bytes, or None."""
    try:
        with open(_PROC_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _vm_hwm_bytes() -> int | None:
    return _proc_status_bytes("VmHWM")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (bytes), across stage resets."""
    global _process_peak_rss
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = int(rss if sys.platform == "darwin" else rss * 1024)
    _process_peak_rss = max(_process_peak_rss, rss, _vm_hwm_bytes() or 0)
    return _process_peak_rss


def reset_peak_rss() -> bool:
    """Restart the RSS high-water mark so the next reading is the peak of what follows (Linux:
    ``echo 5 > /proc/self/clear_refs``). Returns False where this is impossible; readings are then the
    process's peak so far. The lifetime peak is folded into :func:`peak_rss_bytes` first."""
    peak_rss_bytes()
    try:
        with open(_PROC_CLEAR_REFS, "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _vm_hwm_bytes() is not None


def _rss_since_reset() -> int:
    hwm = _vm_hwm_bytes()
    return hwm if hwm is not None else peak_rss_bytes()


@dataclass
class StageMeter:
    """Wall time and peak memory of each named stage of a run.

    ``peak_memory[stage] = {"cpu_rss": bytes, "gpu": bytes, "cpu_rss_start": bytes}``: the largest resident set
    of the process and the largest GPU allocation *during that stage*, and the resident set when it began (so
    ``cpu_rss - cpu_rss_start`` is what the stage added at its peak). Stages may nest; an outer stage's peak
    includes its inner stages'; a stage entered twice keeps the larger peak and the summed time. Where the RSS
    high-water mark cannot be reset (not Linux), ``cpu_rss`` is the process's peak up to the end of the stage.
    """

    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, dict[str, int]] = field(default_factory=dict)
    _open: list[list[int]] = field(default_factory=list, repr=False)  # running [cpu, gpu] peak of open stages

    def _fold_open(self) -> None:
        """Before the counters are reset, credit their current peaks to every stage still open."""
        cpu, gpu = _rss_since_reset(), peak_gpu_memory(self.device)
        for running in self._open:
            running[0], running[1] = max(running[0], cpu), max(running[1], gpu)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        self._fold_open()
        reset_peak_rss()
        reset_peak_memory(self.device)
        running = [0, 0]
        rss_start = _proc_status_bytes("VmRSS") or 0
        self._open.append(running)
        start = time.perf_counter()
        log.info("stage %s: start", name)
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            self._open.pop()
            cpu = max(running[0], _rss_since_reset())
            gpu = max(running[1], peak_gpu_memory(self.device))
            for outer in self._open:
                outer[0], outer[1] = max(outer[0], cpu), max(outer[1], gpu)
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            old = self.peak_memory.get(name, {"cpu_rss": 0, "gpu": 0, "cpu_rss_start": rss_start})
            self.peak_memory[name] = {"cpu_rss": max(old["cpu_rss"], cpu), "gpu": max(old["gpu"], gpu),
                                      "cpu_rss_start": old["cpu_rss_start"]}
            log.info("stage %s: %.1f s, peak RSS %.2f GiB, peak GPU %.2f GiB", name, elapsed, cpu / 2**30, gpu / 2**30)

    @property
    def peak_bytes(self) -> int:
        return max([peak_rss_bytes()] + [m["gpu"] for m in self.peak_memory.values()])
