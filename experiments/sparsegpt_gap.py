"""msp's SparseGPT against other implementations of the same step, layer by layer, on the same Hessians.

For the first ``--blocks`` decoder blocks of a model (calibrated and propagated exactly as ``msp pruner=sparsegpt``
does: statistics from the dense block's inputs, the pruned block's outputs feed the next block), every Linear
layer is pruned by

* ``msp``: :func:`msp.pruners.sparsegpt.sparsegpt_prune` on msp's H = ΣXᵀX (float32);
* ``textbook``: tests/textbook.py's float64 Algorithm 1 on the same H (rescaled to the paper's 2XᵀX/n);
* ``llmc`` (when ``--llmc`` points at llm-compressor's ``sgpt_sparsify.py``): llm-compressor's ``sparsify_weight``
  on H·2/nsamples (its running-mean scale), float32 — loaded from the file, not imported as a package.

and the script prints one JSON line per layer: each result's sparsity, its layer loss ‖(W − Ŵ)X‖² / ‖WX‖²
(= tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), float64) and how many mask entries differ from msp's. Run::

    PYTHONPATH=. python experiments/sparsegpt_gap.py --blocks 2 --cases 0.5,0.7,2:4 \\
        --llmc /tmp/llmc/lib/python3.11/site-packages/llmcompressor/modifiers/pruning/sparsegpt/sgpt_sparsify.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class _Stop(Exception):
    pass


def layer_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """‖(W − Q)X‖²_F / ‖WX‖²_F from H = XᵀX (any scale), in float64."""
    w, q, h = w.double(), q.double(), h.double()
    d = w - q
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


def load_llmc(path: str | None):
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("llmc_sgpt_sparsify", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--cases", default="0.5,0.7,2:4", help="comma-separated sparsities and N:M patterns; the first propagates")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llmc", default=None, help="path of llm-compressor's sgpt_sparsify.py")
    ap.add_argument("--no-textbook", action="store_true")
    args = ap.parse_args()

    from textbook import sparsegpt_reference_hessian

    from msp import data as D
    from msp.masks import Pattern
    from msp.models import load_model
    from msp.pipeline import sequential_pass
    from msp.pruners.sparsegpt import sparsegpt_prune

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, dtype=torch.float32, seed=args.seed)
    split = D.split_calibration(D.tokenize(loaded.tokenizer, D.source_text("book", "train")), 0.1)
    ids = D.random_windows(split.calibration_tokens, args.nsamples, args.seqlen, args.seed)
    cases = []
    for case in args.cases.split(","):
        pattern = Pattern.parse(case if ":" in case else "unstructured")
        sparsity = 1.0 - pattern.n / pattern.m if ":" in case else float(case)
        layer_pattern = pattern.for_layer(sparsity)
        # textbook: n kept of every m; llm-compressor's prune_n counts the pruned ones
        n, m = (layer_pattern.n, layer_pattern.m) if layer_pattern.kind == "nm" else (0, 0)
        cases.append((case, sparsity, layer_pattern, n, m))
    llmc = load_llmc(args.llmc)
    cpu = torch.device("cpu")

    def on_block(index, prefix, block, linears, stats):
        for local, lin in linears.items():
            w, h = lin.weight.data.clone(), stats[local].hessian
            first = None
            for case, sparsity, layer_pattern, n, m in cases:
                row = {"layer": f"{prefix}.{index}.{local}", "case": case, "shape": list(w.shape),
                       "dead_inputs": int((torch.diag(h) == 0).sum())}
                ours = sparsegpt_prune(w, h, sparsity, layer_pattern)
                first = ours if first is None else first
                results = {"msp": ours}
                if not args.no_textbook:
                    results["textbook"] = sparsegpt_reference_hessian(w, 2.0 * h.double() / stats[local].tokens, sparsity, n, m)
                if llmc is not None:
                    module = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                    module.weight.data.copy_(w)
                    hl = h.clone() * (2.0 / args.nsamples)
                    _, q = llmc.sparsify_weight(module, {module: hl}, sparsity, m - n if m else 0, m, 128, 0.01, False)
                    results["llmc"] = q
                for key, q in results.items():
                    row[f"{key}_sparsity"] = round(float((q == 0).double().mean()), 6)
                    row[f"{key}_loss"] = layer_loss(w, q, h)
                    if key != "msp":
                        row[f"{key}_mask_diff"] = int(((q == 0) != (ours == 0)).sum())
                print(json.dumps(row), flush=True)
            lin.weight.data.copy_(first.to(lin.weight.dtype))  # the first case propagates, as in an msp run
        if index + 1 >= args.blocks:
            raise _Stop
        return True

    try:
        sequential_pass(loaded.model, ids, cpu, on_block, collect_stats=True, need_hessian=True, propagate=True,
                        batch_size=4, modifies_blocks=True, desc="sparsegpt gap")
    except _Stop:
        pass


if __name__ == "__main__":
    main()
