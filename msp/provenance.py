"""Provenance of one run: what code, libraries, hardware, weights and data produced its numbers.

Small functions, each answering one question; :func:`run_provenance` gathers them into ``results.json``'s
``provenance`` section. Two runs that differ in any of these fields can be told apart, and
``experiments/build_tables.py`` warns when one table mixes them.

Hashes are SHA-256. Weight files are hashed once per (path, size, mtime) and remembered in a small JSON file next
to the cache (a 70B checkpoint is not re-read every run); tiny random models, which have no file, hash their state
dict; token windows hash their tensors' bytes (dtype and shape included).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from collections.abc import Iterable, Mapping

import torch

from msp.io import write_json_atomic

log = logging.getLogger(__name__)

#: the libraries whose versions can change a number (distribution names)
PACKAGES = ("torch", "transformers", "lm_eval", "datasets")
_CHUNK = 1 << 22  # 4 MiB reads


def msp_version() -> str:
    from msp import __version__

    return __version__


def git_revision(root: str | Path | None = None) -> dict:
    """``{"revision": sha or None, "dirty": bool or None}`` of the checkout holding ``root`` (msp's own by default);
    both None when msp is not run from a git checkout (an installed wheel) or git is missing."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None for a package that is not installed), and ``python``."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    """The CPU's model string (``/proc/cpuinfo``'s ``model name`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_description(device: torch.device) -> str:
    """The compute device's name: the GPU's (asked of :mod:`msp.device`) or the CPU's model string."""
    from msp.device import device_name, is_gpu

    return device_name(device) if is_gpu(device) else cpu_name()


def tensors_sha256(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over named tensors in the order given: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return tensors_sha256([("", t)])


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's weights when no file holds them (tiny random models), in ``state_dict`` order."""
    return tensors_sha256(model.state_dict().items())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cached_file_sha256(path: str | Path, memo: str | Path | None) -> str:
    """:func:`file_sha256`, remembered in the JSON file ``memo`` under (resolved path, size, mtime): a file that
    changes gets a new key, so a stale hash is never returned. ``memo=None``: always hash."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    table: dict = {}
    if memo is not None:
        try:
            table = json.loads(Path(memo).read_text())
        except (OSError, ValueError):
            table = {}
        if isinstance(table.get(key), str):
            return table[key]
    start = time.perf_counter()
    digest = file_sha256(path)
    log.info("sha256 of %s (%.1f MB): %.1fs", path.name, st.st_size / 1e6, time.perf_counter() - start)
    if memo is not None:
        table[key] = digest
        try:
            write_json_atomic(Path(memo), table)  # concurrent writers: the last rename wins; a lost entry is re-hashed
        except OSError as exc:
            log.warning("could not remember the hash of %s in %s (%s)", path, memo, exc)
    return digest


def weight_files(name: str, loader: str, revision: str | None = None) -> list[Path]:
    """The files a model's weights were read from: the embedded GGUF, a local folder's ``*.safetensors`` (else
    ``*.bin``), a hub model's files in the local Hugging Face cache; [] for tiny random models or when unknown."""
    from msp.models import BUILTIN_LOADERS, embedded_gguf

    loader = BUILTIN_LOADERS.get(name, "hf") if loader == "auto" else loader
    if loader == "tiny":
        return []
    if loader == "gguf":  # the embedded model of that name (Gemma-3's assembled file, else SmolLM2's)
        folder, gguf, _, _ = embedded_gguf(name)
        return [folder / gguf]
    folder = Path(os.path.expanduser(name))
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.bin", "*.gguf"]))
        except Exception:  # not in the local cache in a findable form: say so in the results rather than fail
            return []
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.gguf"))
    return files


def model_hash(name: str, loader: str, model: torch.nn.Module, revision: str | None, memo: str | Path | None) -> dict:
    """``{"source": "files", "files": {file name: sha256}}`` for weights read from files, else
    ``{"source": "state_dict", "sha256": ...}`` of the freshly loaded (unpruned) model."""
    files = weight_files(name, loader, revision)
    if files:
        return {"source": "files", "files": {f.name: cached_file_sha256(f, memo) for f in files}}
    return {"source": "state_dict", "sha256": state_dict_sha256(model)}


def data_hashes(calibration: torch.Tensor, heldout: torch.Tensor, evaluation: dict[str, torch.Tensor]) -> dict:
    """SHA-256 of the token windows a run used: calibration, held-out tail, and each evaluation set."""
    return {"calibration": tensor_sha256(calibration), "heldout": tensor_sha256(heldout),
            "evaluation": {k: tensor_sha256(v) for k, v in evaluation.items()}}


def seeds_of(seed: int, allocation: dict) -> dict[str, int | None]:
    """The run's seed and any seed the allocation (or its search) sets (None there means: the run's seed)."""
    out: dict[str, int | None] = {"seed": int(seed)}
    for key, value in allocation.items():
        if key == "seed":
            out["allocation.seed"] = value
        elif isinstance(value, Mapping) and "seed" in value:
            out[f"allocation.{key}.seed"] = value["seed"]
    return out


def environment(device: torch.device) -> dict:
    """The code and machine: msp version, git revision, library versions, device name, and torch's CPU thread count
    (it sets the summation order of every CPU matmul: SparseGPT at 70% on Gemma-3-270M gives 229.3 with one thread
    and 210.9 with two, experiments/results/sparsegpt_threads/)."""
    return {"msp_version": msp_version(), "git": git_revision(), "versions": package_versions(),
            "device_name": device_description(device), "cpu_threads": torch.get_num_threads()}


__all__ = ["cached_file_sha256", "cpu_name", "data_hashes", "device_description", "environment", "file_sha256", "git_revision",
           "model_hash", "msp_version", "package_versions", "seeds_of", "state_dict_sha256", "tensor_sha256", "tensors_sha256",
           "weight_files"]
