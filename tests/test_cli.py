"""The `msp` command end to end (subprocess), and its one-line errors for bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HYDRA_FULL = {**__import__("os").environ, "HYDRA_FULL_ERROR": "1"}


def msp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msp", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_tiny_llama_writes_valid_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = msp("model=tiny-llama", "data=tiny", "pruner=sparsegpt", "sparsity=0.6", "save_model=true",
               f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("model", "pruner", "pattern", "target_sparsity", "sparsity", "dense_ppl", "ppl", "layers", "timings", "peak_memory_bytes"):
        assert key in res, key
    assert res["model"] == "tiny-llama" and res["pruner"] == "sparsegpt" and res["pattern"] == "unstructured"
    assert abs(res["sparsity"] - 0.6) < 0.01
    assert math.isfinite(res["ppl"]["wiki"]) and math.isfinite(res["dense_ppl"]["wiki"])
    assert len(res["layers"]) == 14 and all({"name", "params", "target", "measured"} <= set(l) for l in res["layers"])
    assert res["peak_memory_bytes"] > 0 and res["timings"]["prune"] >= 0
    assert (run_dir / "allocation.json").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "model" / "model.safetensors").exists()
    assert "pruned ppl" in proc.stdout and "results:" in proc.stdout
    # the run summary (report: true by default), rendered after results.json
    png, md = (run_dir / "summary.png").read_bytes(), (run_dir / "summary.md").read_text()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "summary.png" in md and "model.layers.0.self_attn.q_proj" in md and f"| wiki | {res['dense_ppl']['wiki']:.3f} | {res['ppl']['wiki']:.3f} |" in md
    # the saved model really holds the zeros
    from safetensors.torch import load_file

    tensors = load_file(run_dir / "model" / "model.safetensors")
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float((q == 0).float().mean()) - 0.6) < 0.02


def test_cli_true_sequential_prunes_in_one_pass_to_the_target(tmp_path):
    run_dir = tmp_path / "run"
    proc = msp("model=tiny-llama", "data=tiny", "pruner=wanda", "sparsity=0.7", "true_sequential=true", "eval=none",
               f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert abs(res["sparsity"] - 0.7) < 0.01 and all(abs(l["measured"] - 0.7) < 0.01 for l in res["layers"])
    assert "true_sequential: true" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_cli_quantized_export_loads_in_transformers_with_msps_logits(tmp_path):
    """pruner=sparsegpt pruner.bits=4 export.quantized=true: <run dir>/model-quantized is a compressed-tensors
    pack-quantized checkpoint that transformers loads; its logits are those of msp's pruned model (saved as it was in
    memory with save_model=true, float32), up to the float16 export's rounding."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is a dependency of msp (pip install -e .)")
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    proc = msp("model=tiny-llama", "data=tiny", "pruner=sparsegpt", "pruner.bits=4", "pruner.blocksize=32", "export.quantized=true",
               "save_model=true", "report=false", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    q = res["quantized_export"]
    assert q["folder"] == str(run_dir / "model-quantized") and (q["bits"], q["strategy"], q["layers"], q["ignored"]) == (4, "channel", 14, ["lm_head"])
    assert 0 < q["weights_bytes"] < 0.6 * q["dense_float16_bytes"] and "quantized_export" in res["timings"]
    assert not (run_dir / "summary.png").exists()  # report=false
    config = json.loads((run_dir / "model-quantized" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["dtype"] == "float16"

    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "model-quantized").eval()
    in_memory = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert reloaded.dtype == torch.float16 and in_memory.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits.float() - in_memory(input_ids=ids).logits).abs().max().item()
    assert diff <= 2e-2, f"logits moved by {diff}"  # tests/test_quantized_export.py's FP16_LOGITS_ATOL
    w_q = reloaded.model.layers[1].mlp.down_proj.weight
    w = in_memory.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w_q == 0, w == 0)  # the pruned zeros come back as exact zeros


@pytest.mark.parametrize(
    "args, message",
    [
        (["sparsity=1.2"], "outside [0, 1)"),
        (["sparsity=1.5", "pattern=2:4"], "sparsity=1.5 is outside [0, 1)"),  # a fixed pattern does not hide a bad sparsity
        (["pattern=4:4"], "need 0 < N < M"),
        (["pattern=2:5"], "not a multiple of M=5"),
        (["data.seqlen=4096"], "longer than the model's context"),
        (["data.nsamples=0"], "at least 1 calibration window"),
        (["model=hf", "model.name=/no/such/model"], "does not exist"),
        (["device=cuda"], "no CUDA GPU"),
        (["pruner.saliency=foo", "pruner=sparsegpt"], "valid: obs, isc"),
        (["allocation=msp", "allocation.init=random"], "allocation.init='random' is unknown; valid: alpha, atp, best, dlp"),
        (["allocation=atp", "allocation.beta_grid=[0.0,0.03]"], "must be [start, stop, step]"),
        (["allocation=atp", "sparsity=0.7", "allocation.beta_grid=[0.0,0.5,0.1]", "allocation.max=0.9"], "outside the bounds [0.0, 0.9]"),
        (["export.quantized=true", "pruner=sparsegpt"], "export.quantized=true needs pruner=sparsegpt pruner.bits=<2|3|4|8>"),
        (["export.quantized=true", "pruner=wanda"], "got pruner=wanda pruner.bits=None"),
    ],
)
def test_bad_input_fails_with_one_clear_line_and_no_results(tmp_path, args, message):
    import torch

    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    run_dir = tmp_path / "run"
    proc = msp("model=tiny-llama", "data=tiny", *args, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("msp: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (run_dir / "results.json").exists()


def test_a_bug_shows_its_traceback_not_a_one_line_error(tmp_path):
    """Only msp's own errors (MspError) become `msp: error:`; anything else is a bug and keeps its traceback."""
    code = ("import sys, msp.run\n"
            "def broken(*a, **k): raise RuntimeError('a bug in a stage')\n"
            "msp.run.run = broken\n"
            "from msp.cli import main\n"
            "sys.argv = ['msp', 'model=tiny-llama', 'data=tiny', 'hydra.run.dir=run', 'cache_dir=c']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_HYDRA_FULL)
    assert proc.returncode != 0
    assert "RuntimeError: a bug in a stage" in proc.stderr and "Traceback" in proc.stderr
    assert "msp: error:" not in proc.stderr


def test_unknown_group_option_lists_valid_choices(tmp_path):
    proc = msp("pruner=foo", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'pruner/foo'" in proc.stderr and "sparsegpt" in proc.stderr and "wanda" in proc.stderr


@pytest.mark.slow
def test_embedded_smollm2_short_run_has_sane_perplexity(tmp_path):
    run_dir = tmp_path / "run"
    proc = msp("data.nsamples=2", "data.seqlen=256", "data.eval_windows=3", "pruner=wanda",
               f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert len(res["layers"]) == 30 * 7
    assert 5 < res["dense_ppl"]["wiki"] < 60, res["dense_ppl"]
    assert math.isfinite(res["ppl"]["wiki"]) and res["ppl"]["wiki"] > res["dense_ppl"]["wiki"]
    assert abs(res["sparsity"] - 0.5) < 1e-3
