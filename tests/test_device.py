"""Devices and dtypes are decided in msp/device.py only; bad device requests fail in one line before any weights load;
``import msp`` stays lean; per-stage peak memory is really per stage."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msp.device as dev
from msp.device import DeviceError, StageMeter, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent

# torch.cuda.*, x.cuda(...), device="cuda" / device='cuda:1', torch.device("cuda") and any quoted 'cuda' device string
_CUDA_PATTERNS = [
    re.compile(r"torch\.cuda\b"),
    re.compile(r"\.cuda\("),
    re.compile(r"""device\s*=\s*["']cuda"""),
    re.compile(r"""["']cuda(:\d+)?["']"""),
]


def cuda_offenders(paths) -> list[str]:
    """``path:line: text`` for every line of ``paths`` that names CUDA in a way the lint forbids outside msp/device.py."""
    offenders = []
    for path in paths:
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            if any(p.search(line) for p in _CUDA_PATTERNS):
                offenders.append(f"{Path(path).relative_to(ROOT) if ROOT in Path(path).parents else path}:{lineno}: {line.strip()}")
    return offenders


def test_only_device_module_mentions_cuda():
    paths = [p for p in sorted((ROOT / "msp").rglob("*.py")) if p != ROOT / "msp" / "device.py"]
    offenders = cuda_offenders(paths)
    assert not offenders, "CUDA belongs in msp/device.py only (use msp.device.is_gpu / resolve_device):\n" + "\n".join(offenders)


def test_the_lint_finds_the_cuda_code_of_the_real_device_module(tmp_path):
    """Not vacuous: run on msp/device.py, which does talk to CUDA, the lint flags its torch.cuda calls and its "cuda"
    device strings; a real module (msp/prune.py) with one forbidden line planted is flagged at that line and nowhere
    else (its prose about devices is not)."""
    device_py = ROOT / "msp" / "device.py"
    lines = device_py.read_text().splitlines()
    flagged = {int(o.split(":")[1]) for o in cuda_offenders([device_py])}
    expected = {i for i, line in enumerate(lines, 1) if "torch.cuda." in line or '== "cuda"' in line or 'device("cuda"' in line}
    assert len(expected) >= 10 and expected <= flagged
    planted = tmp_path / "prune.py"
    source = (ROOT / "msp" / "prune.py").read_text().splitlines()
    source.insert(10, "    weight = weight.cuda()")
    planted.write_text("\n".join(source))
    assert [o.split(":")[1] for o in cuda_offenders([planted])] == ["11"]


def _modules_after(statement: str) -> dict:
    code = (
        f"import sys, json; {statement}; import torch; "
        "print(json.dumps({'cuda_init': bool(torch.cuda.is_initialized()), 'mods': sorted(sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_msp_is_lean():
    info = _modules_after("import msp, msp.device")
    assert not info["cuda_init"]
    heavy = [m for m in info["mods"] if m.split(".")[0] in ("transformers", "lm_eval", "wandb", "datasets", "hydra", "accelerate")]
    assert heavy == [], heavy


def test_import_run_does_not_initialise_cuda_or_load_lm_eval():
    info = _modules_after("import msp.run")
    assert not info["cuda_init"]
    assert not [m for m in info["mods"] if m.split(".")[0] in ("lm_eval", "wandb")]


def test_device_cuda_without_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(dev, "cuda_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"device={name} was asked for but no CUDA GPU is visible; use device=cpu"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="valid: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")


def test_bf16_on_a_gpu_without_it_is_refused_and_auto_falls_back_to_fp16(monkeypatch):
    """Simulate a V100 (no native bf16) without touching CUDA: only msp.device's own probes are replaced."""
    monkeypatch.setattr(dev, "bf16_supported", lambda device: not dev.is_gpu(device))
    monkeypatch.setattr(dev, "device_name", lambda device: "Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda", 0)  # constructing a device object does not initialise CUDA
    with pytest.raises(DeviceError, match=r"dtype=bfloat16 is not supported natively by Tesla V100.*use dtype=float16"):
        resolve_dtype("bfloat16", gpu)
    assert resolve_dtype("auto", gpu) == torch.float16
    assert resolve_dtype("float16", gpu) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(DeviceError, match="valid: auto, float32, bfloat16, float16"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; this machine has a GPU")
def test_cli_device_cuda_without_gpu_fails_in_one_line_before_loading(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "msp", "+debug=default", "device=cuda", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("msp: error:")]
    assert errors == ["msp: error: device=cuda was asked for but no CUDA GPU is visible; use device=cpu or device=auto"]
    assert "stage load_model" not in proc.stdout + proc.stderr  # failed before any weights were loaded
    assert not (run_dir / "results.json").exists()


def test_stage_peak_memory_is_per_stage_and_nests():
    """A stage that allocates ~400 MB shows it; a later small stage does not inherit it (on Linux, where the
    high-water mark can be reset); an outer stage includes its inner stage's peak; the run peak covers all."""
    meter = StageMeter(torch.device("cpu"))
    big = 400 * 2**20
    with meter.stage("big"):
        x = torch.ones(big // 4, dtype=torch.float32)
        x += 1  # touch every page
        del x
    with meter.stage("outer"):
        with meter.stage("inner"):
            y = torch.ones(big // 8)
            y += 1
            del y
        with meter.stage("small"):
            pass
    pm = meter.peak_memory
    assert pm["big"]["gpu"] == 0 and pm["big"]["cpu_rss"] >= big
    if dev._proc_status_bytes("VmRSS") is not None:  # what the stage added on top of where it started
        assert pm["big"]["cpu_rss"] - pm["big"]["cpu_rss_start"] >= big * 0.9
    assert pm["outer"]["cpu_rss"] >= pm["inner"]["cpu_rss"] >= big // 2
    assert meter.peak_bytes >= pm["big"]["cpu_rss"]
    if dev.reset_peak_rss():  # Linux: stages do not inherit earlier peaks
        assert pm["small"]["cpu_rss"] < pm["big"]["cpu_rss"] - big // 2
        assert pm["inner"]["cpu_rss"] < pm["big"]["cpu_rss"] - big // 4
