"""Apply an msp run's allocation with llm-compressor's ``oneshot`` and compare the perplexity with msp's own.

Runs in a separate environment with llm-compressor installed (its pins differ from msp's; it is not an msp
dependency), e.g. a venv that reuses the CPU torch of the msp environment::

    python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor
    python -m msp.export recipe <run dir> --out <run dir>/recipe.yaml
    PYTHONPATH=. /tmp/llmc/bin/python experiments/llmcompressor_roundtrip.py <run dir> [<run dir>/recipe.yaml]

The calibration windows and evaluation windows are rebuilt with msp's own data code from the run's
``results.json`` (same sources, seed, nsamples, seqlen), so both sides see the same tokens. Prints one JSON line
and writes it to ``<run dir>/llmcompressor_roundtrip.json``.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(run_dir: Path, recipe: Path) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot

    from msp import data as D
    from msp.eval.perplexity import perplexity
    from msp.models import load_model, prunable_layers

    results = json.loads((run_dir / "results.json").read_text())
    d = results["data"]
    loaded = load_model(results["model"], dtype=torch.float32, seed=int(results["seed"]))
    calib = D.tokenize(loaded.tokenizer, D.source_text(d["calibration"], "train"))
    split = D.split_calibration(calib, 0.1)  # conf/data heldout_fraction default (results.json does not record it)
    ids = D.random_windows(split.calibration_tokens, int(d["nsamples"]), int(d["seqlen"]), int(results["seed"]))
    windows = {n: D.sequential_windows(D.tokenize(loaded.tokenizer, D.source_text(n, "test")), int(d["seqlen"]), int(d["eval_windows"][n]))
               for n in d["evaluation"]}
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # oneshot re-reads the config from model.config.name_or_path (the GGUF folder for the embedded model, which
    # has no config.json): point it at a saved copy of the in-memory config
    config_dir = Path(tempfile.mkdtemp(prefix="msp-llmc-config-"))
    loaded.model.config.save_pretrained(config_dir)
    loaded.model.config.name_or_path = str(config_dir)
    started = time.perf_counter()
    oneshot(model=loaded.model, processor=loaded.tokenizer, dataset=dataset, recipe=str(recipe), num_calibration_samples=len(ids), max_seq_length=int(d["seqlen"]))
    seconds = time.perf_counter() - started
    layers = prunable_layers(loaded.model)
    params = {n: l.weight.numel() for n, l in layers.items()}
    zeros = {n: int((l.weight == 0).sum()) for n, l in layers.items()}
    allocation = json.loads((run_dir / "allocation.json").read_text())["sparsities"]
    cpu = torch.device("cpu")
    ppl = {n: perplexity(loaded.model, w, cpu, 1, f"llm-compressor ppl {n}") for n, w in windows.items()}
    out = {
        "run": str(run_dir), "recipe": str(recipe), "oneshot_seconds": round(seconds, 1),
        "msp_ppl": results["ppl"], "llmcompressor_ppl": ppl, "dense_ppl": results["dense_ppl"],
        "relative_difference": {n: ppl[n] / results["ppl"][n] - 1 for n in ppl},
        "msp_sparsity": results["sparsity"], "llmcompressor_sparsity": sum(zeros.values()) / sum(params.values()),
        "max_layer_sparsity_difference": max(abs(zeros[n] / params[n] - allocation[n]) for n in layers),
    }
    line = json.dumps(out)
    (run_dir / "llmcompressor_roundtrip.json").write_text(line + "\n")
    print(line)
    return out


if __name__ == "__main__":
    run = Path(sys.argv[1])
    main(run, Path(sys.argv[2]) if len(sys.argv) > 2 else run / "recipe.yaml")
