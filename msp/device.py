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
from typing import Iterator

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A device or dtype the user asked for cannot be used on this machine."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → first GPU if there is one, else CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not cuda_available():
            raise DeviceError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto")
        dev = torch.device(name)
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → float32 on CPU, bfloat16 on GPUs that support it (else float16)."""
    name = str(name).strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; valid: auto, {', '.join(_DTYPES)}")
    dtype = _DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"dtype=bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use dtype=float16")
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 on CPU is slow and inaccurate; float32 is recommended (dtype=float32)")
    return dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class StageMeter:
    """Wall time and peak memory of each named stage of a run."""

    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, dict[str, int]] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        log.info("stage %s: start", name)
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.peak_memory[name] = {"cpu_rss": peak_rss_bytes(), "gpu": peak_gpu_memory(self.device)}
            log.info("stage %s: %.1f s", name, elapsed)

    @property
    def peak_bytes(self) -> int:
        return max([peak_rss_bytes()] + [m["gpu"] for m in self.peak_memory.values()])
