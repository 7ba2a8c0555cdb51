"""Sizes on disk of the compressed-tensors ``pack-quantized`` export (msp.quantized_export) for the embedded
SmolLM2-135M at 50% unstructured + 4-bit (SparseGPT, pruner.bits=4), against the dense-with-zeros export
(``save_pruned_model``, float32) and a float16 dense copy; and how far the reloaded model's logits move.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/quantized_export_smollm2.py /tmp/qsmol [experiments/results/quantized_export/smollm2_50_int4.json]

About 2.5 minutes on 1-2 CPU cores (pruning ~100 s). Sizes are the ``*.safetensors`` files only (no tokenizer).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from msp.allocation.base import uniform_allocation
from msp.data import random_windows, source_text, tokenize
from msp.models import load_model, prunable_layers, save_pruned_model
from msp.prune import prune_
from msp.pruners import SparseGPTPruner
from msp.quantized_export import qparams_from_dense, safetensors_bytes, save_pack_quantized


def main(out: Path) -> dict:
    t0 = time.time()
    loaded = load_model("smollm2-135m")
    layers = prunable_layers(loaded.model)
    qparams = qparams_from_dense({n: l.weight for n, l in layers.items()}, 4)  # the dense grid, before pruning
    ids = random_windows(tokenize(loaded.tokenizer, source_text("book", "train")), 16, 128, 0)
    alloc = uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, 0.5)
    prune_(loaded.model, SparseGPTPruner(bits=4), alloc, ids, torch.device("cpu"))
    t1 = time.time()
    r32 = save_pack_quantized(loaded.model, loaded.tokenizer, out / "q32", qparams)
    save_pack_quantized(loaded.model, loaded.tokenizer, out / "q16", qparams, dtype=torch.float16)
    t2 = time.time()
    save_pruned_model(loaded, out / "dense")
    copy.deepcopy(loaded.model).half().save_pretrained(out / "fp16")
    sizes = {k: safetensors_bytes(out / k) for k in ("q32", "q16", "dense", "fp16")}
    check = ids[:2, :64]
    loads = {}
    with torch.no_grad():
        ref = loaded.model(input_ids=check, use_cache=False).logits
        half = copy.deepcopy(loaded.model).half()
        loads["fp16_dense_copy"] = {"max_abs_logit_diff": (half(input_ids=check, use_cache=False).logits.float() - ref).abs().max().item()}
        for k in ("q32", "q16"):
            m = AutoModelForCausalLM.from_pretrained(out / k)
            diff = (m(input_ids=check, use_cache=False).logits.float() - ref).abs().max().item()
            zeros = all(torch.equal(l.weight == 0, layers[n].weight == 0) for n, l in prunable_layers(m).items())
            loads[k] = {"max_abs_logit_diff": diff, "zeros_exact": zeros, "dtype": str(m.dtype)}
    zero_fraction = sum(int((l.weight == 0).sum()) for l in layers.values()) / sum(l.weight.numel() for l in layers.values())
    return {
        "model": "smollm2-135m", "sparsity": 0.5, "pruner": "sparsegpt bits=4", "calibration": "book 16x128 seed 0",
        "sizes_bytes": sizes, "sizes_MiB": {k: round(v / 2**20, 2) for k, v in sizes.items()},
        "legend": {"q32": "pack-quantized, floats float32", "q16": "pack-quantized, floats float16",
                   "dense": "dense-with-zeros float32 (save_pruned_model)", "fp16": "dense-with-zeros float16"},
        "loads": loads, "max_abs_logit": ref.abs().max().item(), "zero_fraction_of_linears": zero_fraction,
        "max_grid_offset": r32.max_grid_offset, "prune_s": round(t1 - t0, 1), "export_s": round(t2 - t1, 1),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "compressed_tensors": __import__("compressed_tensors").__version__},
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = main(Path(sys.argv[1]))
    text = json.dumps(result, indent=1)
    print(text)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text + "\n")
