from __future__ import annotations

import os

import pytest
import torch

# Keep the suite deterministic and friendly to a 2-core machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); runs in a GPU session")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu() -> torch.device:
    return torch.device("cpu")


@pytest.fixture
def tiny_llama():
    from msp.models import build_tiny_model

    return build_tiny_model("tiny-llama", seed=0)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_tiny_msp(run_dir, *overrides: str):
    """``python -m msp model=tiny-llama data=tiny device=cpu <overrides>`` into ``run_dir`` (asserts it succeeded)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-m", "msp", "model=tiny-llama", "data=tiny", "device=cpu", *overrides,
         f"cache_dir={Path(run_dir) / 'cache'}", f"hydra.run.dir={run_dir}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(run_dir)
