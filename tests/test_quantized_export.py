"""compressed-tensors ``pack-quantized`` export: msp's joint SparseGPT + 4-bit model, written with the package's
compressor and read back by ``transformers.AutoModelForCausalLM.from_pretrained`` on CPU."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors", reason="compressed-tensors is a dependency of msp (pip install -e .)")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from msp.allocation.base import uniform_allocation  # noqa: E402
from msp.models import build_tiny_model, prunable_layers, save_pruned_model  # noqa: E402
from msp.prune import prune_  # noqa: E402
from msp.pruners import MagnitudePruner, SparseGPTPruner  # noqa: E402
from msp.pruners.sparsegpt import minmax_quant_params, quantize  # noqa: E402
from msp.quantized_export import (  # noqa: E402
    QuantizedExportError,
    check_grid,
    qparams_from_dense,
    safetensors_bytes,
    save_pack_quantized,
)

# float32 end to end: the loaded weight is (q − zp) · scale, the same float32 product msp's quantizer made, so the
# logits agree bit for bit; the tolerance only leaves room for a different matmul order
LOGITS_ATOL = 1e-5
FP16_LOGITS_ATOL = 2e-2  # the float16 export: scales, embeddings and activations rounded to float16
BF16_LOGITS_ATOL = 5e-2  # a bfloat16 model: scales stored in bfloat16 (measured 6e-3 on tiny-llama)
CPU = torch.device("cpu")


def calibration(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def uniform(layers, sparsity: float):
    return uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, sparsity)


@pytest.fixture(scope="module")
def sparsegpt_int4():
    """tiny-llama at 50% with msp's joint SparseGPT + 4-bit, and the grid taken from its dense weights."""
    loaded = build_tiny_model("tiny-llama", seed=0)
    layers = prunable_layers(loaded.model)
    qparams = qparams_from_dense({n: l.weight for n, l in layers.items()}, bits=4)
    prune_(loaded.model, SparseGPTPruner(bits=4, blocksize=32), uniform(layers, 0.5), calibration(), CPU)
    return loaded, qparams


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_qparams_from_dense_is_msp_minmax_golden():
    w = torch.tensor([[-1.0, 0.0, 2.0, 0.5], [0.25, 0.5, 1.0, 0.75]])
    qp = qparams_from_dense({"l": w}, bits=4)["l"]
    # row 0: range [-1, 2] → scale 3/15 = 0.2, zero round(1/0.2) = 5; row 1: min clamps to 0 → scale 1/15, zero 0
    assert torch.allclose(qp.scale, torch.tensor([0.2, 1 / 15])) and torch.equal(qp.zero, torch.tensor([5.0, 0.0]))
    scale, zero, _ = minmax_quant_params(w, 4)
    assert torch.equal(qp.scale, scale) and torch.equal(qp.zero, zero)
    sym = qparams_from_dense({"l": w}, bits=4, symmetric=True)["l"]
    assert torch.allclose(sym.scale, torch.tensor([4 / 15, 2 / 15])) and torch.equal(sym.zero, torch.tensor([8.0, 8.0]))
    # SparseGPT zeroes dead inputs (H_jj = 0) before its min-max: row 0 without column 0 spans [0, 2]
    dead = qparams_from_dense({"l": w}, bits=4, dead_inputs={"l": torch.tensor([True, False, False, False])})["l"]
    assert torch.allclose(dead.scale, torch.tensor([2 / 15, 1 / 15])) and torch.equal(dead.zero, torch.tensor([0.0, 0.0]))
    grouped = qparams_from_dense({"l": w}, bits=4, group_size=2)["l"]
    assert grouped.scale.shape == (2, 2) and torch.equal(grouped.zero[0], torch.tensor([15.0, 0.0]))


def test_check_grid_golden():
    scale, zero = torch.tensor([0.5]), torch.tensor([2.0])
    on = torch.tensor([[-1.0, 0.0, 0.5, 6.5]])  # q = 0, 2, 3, 15
    assert check_grid(on, (scale, zero), 4).max_offset == 0 and check_grid(on, (scale, zero), 4).out_of_range == 0
    off = check_grid(torch.tensor([[0.1, 7.0]]), (scale, zero), 4)  # 0.2 steps off; q = 16 > 15
    assert off.max_offset == pytest.approx(0.2) and off.out_of_range == 1


def test_sparsegpt_int4_round_trip_through_transformers(sparsegpt_int4, tmp_path):
    loaded, qparams = sparsegpt_int4
    layers = prunable_layers(loaded.model)
    result = save_pack_quantized(loaded.model, loaded.tokenizer, tmp_path / "q", qparams, bits=4)
    assert (result.layers, result.symmetric, result.strategy, result.ignored) == (len(layers), False, "channel", ["lm_head"])

    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (qconfig["quant_method"], qconfig["format"], qconfig["quantization_status"]) == ("compressed-tensors", "pack-quantized", "compressed")
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["symmetric"]) == (4, "int", "channel", False)
    assert qconfig["dequantize"] is True  # asymmetric: transformers' dequantize-at-load path (see save_pack_quantized)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32 and f"{name}.weight" not in keys
        assert f.get_tensor(f"{name}.weight_zero_point").shape == (64 * 4 // 32, 1)  # packed, as vLLM reads it

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = calibration(2, 24)
    diff = (logits(reloaded, ids) - logits(loaded.model, ids)).abs().max().item()
    assert diff <= LOGITS_ATOL, f"logits moved by {diff}"
    for name, lin in prunable_layers(reloaded).items():
        zeros = layers[name].weight == 0
        assert zeros.float().mean() >= 0.5 - 1 / 64, name  # 50% pruned, a few kept weights rounded to q = zero
        assert torch.equal(lin.weight == 0, zeros), f"{name}: the pruned zeros did not come back as exact zeros"


def test_sizes_against_dense_exports(sparsegpt_int4, tmp_path):
    loaded, qparams = sparsegpt_int4
    save_pack_quantized(loaded.model, loaded.tokenizer, tmp_path / "q", qparams, bits=4)
    save_pack_quantized(loaded.model, loaded.tokenizer, tmp_path / "q16", qparams, bits=4, dtype=torch.float16)
    save_pruned_model(loaded, tmp_path / "dense")
    copy.deepcopy(loaded.model).half().save_pretrained(tmp_path / "fp16")
    sizes = {k: safetensors_bytes(tmp_path / k) for k in ("q", "q16", "dense", "fp16")}
    print(f"tiny-llama 50% + int4, safetensors bytes: {sizes}")
    # tiny-llama: 73,728 Linear weights (int4: 36,864 bytes + scales, zero points) beside 32,896 float weights
    # (embeddings, lm_head, norms), which dominate at this size: about half of the float16 copy
    assert sizes["q16"] < 0.6 * sizes["fp16"] and sizes["q"] < 0.5 * sizes["dense"] and sizes["fp16"] < 0.51 * sizes["dense"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q16")
    ids = calibration(2, 24)
    assert reloaded.dtype == torch.float16
    diff = (logits(reloaded, ids).float() - logits(loaded.model, ids)).abs().max().item()
    assert diff <= FP16_LOGITS_ATOL, f"float16 export: logits moved by {diff}"


def test_symmetric_group_grid_loads_without_any_hint(tmp_path):
    """Weights on a symmetric per-group grid (msp's ``quantize`` with GPTQ-sym qparams): written ``symmetric: true``,
    no zero points stored, and transformers' default load path takes it as it is."""
    loaded = build_tiny_model("tiny-llama", seed=1)
    layers = prunable_layers(loaded.model)
    qparams = qparams_from_dense({n: l.weight for n, l in layers.items()}, bits=4, group_size=32, symmetric=True)
    prune_(loaded.model, MagnitudePruner(), uniform(layers, 0.5), None, CPU)
    for name, lin in layers.items():
        scale, zero = (t.repeat_interleave(32, dim=1) for t in qparams[name])
        lin.weight.data = quantize(lin.weight.data, scale, zero, 15)
    result = save_pack_quantized(loaded.model, None, tmp_path / "q", qparams, bits=4, group_size=32)
    assert (result.symmetric, result.strategy, result.group_size, result.dequantize_on_load) == (True, "group", 32, False)
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in qconfig and qconfig["config_groups"]["group_0"]["weights"]["group_size"] == 32
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("zero_point")]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = calibration(2, 24)
    assert (logits(reloaded, ids) - logits(loaded.model, ids)).abs().max().item() <= LOGITS_ATOL
    for name, lin in prunable_layers(reloaded).items():
        assert torch.equal(lin.weight == 0, layers[name].weight == 0), name


def test_refuses_a_model_pruned_without_bits(tmp_path):
    loaded = build_tiny_model("tiny-llama", seed=0)
    layers = prunable_layers(loaded.model)
    qparams = qparams_from_dense({n: l.weight for n, l in layers.items()}, bits=4)
    prune_(loaded.model, SparseGPTPruner(blocksize=32), uniform(layers, 0.5), calibration(), CPU)  # no pruner.bits
    with pytest.raises(QuantizedExportError, match=r"14 of 14 layers are not on their quantization grid.*pruner.bits=4"):
        save_pack_quantized(loaded.model, None, tmp_path / "q", qparams, bits=4)
    assert not (tmp_path / "q").exists()


def test_refuses_qparams_that_do_not_fit(sparsegpt_int4, tmp_path):
    loaded, qparams = sparsegpt_int4
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(QuantizedExportError, match="do not fit its weight"):
        save_pack_quantized(loaded.model, None, tmp_path / "a", {name: (qparams[name].scale[:3], qparams[name].zero[:3])})
    with pytest.raises(QuantizedExportError, match="no Linear"):
        save_pack_quantized(loaded.model, None, tmp_path / "b", {"model.nowhere": qparams[name]})
    with pytest.raises(QuantizedExportError, match="bits=5 is not supported"):
        save_pack_quantized(loaded.model, None, tmp_path / "c", qparams, bits=5)
    assert not any(tmp_path.iterdir())


def test_float16_export_keeps_tied_embeddings_one_tensor(tmp_path):
    """lm_head tied to the embeddings (SmolLM2, Gemma): casting to float16 must not store the matrix twice."""
    from msp.models import tiny_config

    config = tiny_config("tiny-llama")
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    layers = prunable_layers(model)
    qparams = qparams_from_dense({n: l.weight for n, l in layers.items()}, bits=4)
    for name, lin in layers.items():
        lin.weight.data = quantize(lin.weight.data, qparams[name].scale[:, None], qparams[name].zero[:, None], 15)
    save_pack_quantized(model, None, tmp_path / "q", qparams, bits=4, dtype=torch.float16)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys()) and f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = calibration(2, 24)
    assert (logits(reloaded, ids).float() - logits(model, ids)).abs().max().item() <= FP16_LOGITS_ATOL


def test_cli_writes_a_saved_pruned_model(sparsegpt_int4, tmp_path, capsys):
    """``python -m msp.export quantized <model dir> <out> --dense tiny-llama``: the grid comes from the dense model."""
    from msp.export import main

    loaded, _ = sparsegpt_int4
    save_pruned_model(loaded, tmp_path / "model")
    assert main(["quantized", str(tmp_path / "model"), str(tmp_path / "q"), "--dense", "tiny-llama", "--bits", "4"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = calibration(2, 24)
    assert (logits(reloaded, ids) - logits(loaded.model, ids)).abs().max().item() <= LOGITS_ATOL
    # a dense model that is not the one it was pruned from: refused in one line, nothing written
    assert main(["quantized", str(tmp_path / "model"), str(tmp_path / "bad"), "--dense", "tiny-opt"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_bfloat16_model_is_on_its_grid_within_rounding(tmp_path):
    """A bfloat16 run: the pruner's float32 grid values are rounded to bfloat16 (up to ~0.03 grid steps here), which
    :func:`grid_tolerance` allows; the scales are stored in bfloat16 as compressed-tensors does, so the weights move
    by at most maxq · |Δscale| and the logits by little."""
    loaded = build_tiny_model("tiny-llama", seed=0, dtype=torch.bfloat16)
    layers = prunable_layers(loaded.model)
    qparams = qparams_from_dense({n: l.weight for n, l in layers.items()}, bits=4)
    prune_(loaded.model, SparseGPTPruner(bits=4, blocksize=32), uniform(layers, 0.5), calibration(), CPU)
    result = save_pack_quantized(loaded.model, None, tmp_path / "q", qparams, bits=4)
    assert 0 < result.max_grid_offset < 0.1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.dtype == torch.bfloat16
    ids = calibration(2, 24)
    assert (logits(reloaded, ids).float() - logits(loaded.model, ids).float()).abs().max().item() <= BF16_LOGITS_ATOL
    for name, lin in prunable_layers(reloaded).items():
        assert torch.equal(lin.weight == 0, layers[name].weight == 0), name


def test_import_is_lean():
    """compressed-tensors (and what it pulls in) is imported only when a quantized export is written."""
    import subprocess
    import sys

    code = "import sys, msp.quantized_export; print('compressed_tensors' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
