"""Golden runs: the numbers msp produced before the engine refactor (issue 9), to be reproduced bit for bit.

Each case is one ``msp`` invocation (a Hydra multirun over pruners where the case allows), run as a subprocess
with one intra-op thread so that float reductions happen in the same order on every run. The digest of a run
holds the exact allocation (``repr`` of every float), the dense and pruned perplexities, the measured
sparsity, and the SHA-256 of every saved tensor (pruned weights: masks and values).

Regenerate (only from the commit named in the golden file, i.e. the code before a refactor):
    python tests/golden/harness.py tiny   # writes tests/golden/tiny.json
    python tests/golden/harness.py smollm2
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: the goldens were recorded when SparseGPT's level store defaulted to 6 levels (session 6 made it 17)
LEVELS6 = "allocation.max_levels=6"
#: ... and without the finalists' verification (session 8 made allocation.verify_tokens=4096 the default)
UNVERIFIED = "allocation.verify_tokens=null"
TINY = ["model=tiny-llama", "data=tiny", "device=cpu", "save_model=true"]
#: name → extra overrides; a "{pruners}" case becomes one multirun over the three pruners
TINY_CASES: dict[str, list[str]] = {
    "uniform": ["allocation=uniform", "sparsity=0.6"],
    "owl": ["allocation=owl", "sparsity=0.6"],
    "rank": ["allocation=rank", "sparsity=0.6"],
    "fisher": ["allocation=fisher", "sparsity=0.6"],
    "hessian": ["allocation=hessian", "sparsity=0.6"],
    "msp": ["allocation=msp", "sparsity=0.6", "allocation.generations=3", LEVELS6, UNVERIFIED],
    "msp_layer_nm": ["allocation=msp", "sparsity=0.6", "pattern=N:4", "allocation.granularity=layer",
                     "allocation.generations=3", LEVELS6, UNVERIFIED],
    "uniform_24": ["allocation=uniform", "pattern=2:4"],
    "fisher_true_sequential": ["allocation=fisher", "sparsity=0.7", "true_sequential=true"],
    "msp_streamed": ["allocation=msp", "sparsity=0.6", "streaming=true", "allocation.generations=2", LEVELS6, UNVERIFIED],
}
PRUNERS = "magnitude,wanda,sparsegpt"

SMOL = ["model=smollm2-135m", "data.nsamples=4", "data.seqlen=128", "data.eval_windows=4", "device=cpu",
        "sparsity=0.7", "save_model=true"]
#: SmolLM2: one multirun per case, so the jobs share one dequantised model (msp.models keeps it per process)
SMOL_CASES: dict[str, list[str]] = {
    "allocators": ["pruner=wanda", "allocation=uniform,owl,rank,fisher,hessian"],
    "msp": ["pruner=wanda,sparsegpt", "allocation=msp", "allocation.generations=2", "allocation.offspring=4", LEVELS6, UNVERIFIED],
}


def _sha(t) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()).hexdigest()


def digest(run_dir: Path) -> dict:
    """What must not change: allocation, perplexities, measured sparsity, every saved tensor's bytes."""
    from safetensors.torch import load_file

    res = json.loads((run_dir / "results.json").read_text())
    alloc = json.loads((run_dir / "allocation.json").read_text())
    out = {
        "allocation": {k: repr(v) for k, v in alloc["sparsities"].items()},
        "dense_ppl": {k: repr(v) for k, v in res["dense_ppl"].items()},
        "ppl": {k: repr(v) for k, v in res["ppl"].items()},
        "sparsity": repr(res["sparsity"]),
    }
    model_file = run_dir / "model" / "model.safetensors"
    if model_file.exists():
        tensors = load_file(model_file)
        out["tensors"] = {k: _sha(v) for k, v in sorted(tensors.items())}
    return out


def run_case(base: list[str], extra: list[str], workdir: Path, multirun_pruners: bool) -> dict[str, dict]:
    """Run one case as one multirun; returns {job label: digest}, the label naming the pruner (and allocation)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cache = workdir / "cache"
    sweep = workdir / "sweep"
    pruners = [f"pruner={PRUNERS}"] if multirun_pruners else []
    args = ["-m", *base, *extra, *pruners, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    proc = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1); from msp.cli import main; main()",
                           *args, f"cache_dir={cache}"], cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"msp {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    jobs = sorted(d for d in sweep.iterdir() if (d / "results.json").exists())
    out = {}
    for d in jobs:
        res = json.loads((d / "results.json").read_text())
        out[res["pruner"] if multirun_pruners else f"{res['pruner']}/{res['allocation']}"] = digest(d)
    expected = len(PRUNERS.split(",")) if multirun_pruners else _jobs_in(extra)
    if len(out) != expected:
        raise RuntimeError(f"expected {expected} finished jobs in {sweep}, found {sorted(out)}")
    return out


def _jobs_in(overrides: list[str]) -> int:
    """Jobs of a multirun: the product of the comma-separated choices of its overrides."""
    n = 1
    for o in overrides:
        n *= len(o.split("=", 1)[1].split(",")) if "=" in o else 1
    return n


def run_suite(which: str, workdir: Path) -> dict:
    cases, base, multi = (TINY_CASES, TINY, True) if which == "tiny" else (SMOL_CASES, SMOL, False)
    out = {}
    for name, extra in cases.items():
        case_dir = workdir / name
        case_dir.mkdir(parents=True, exist_ok=True)
        out[name] = run_case(base, extra, case_dir, multi)
    return out


def golden_path(which: str) -> Path:
    return HERE / f"{which}.json"


if __name__ == "__main__":
    import tempfile

    which = sys.argv[1]
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_suite(which, Path(tmp))
    golden_path(which).write_text(json.dumps({"commit": rev, "runs": runs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {golden_path(which)}")
