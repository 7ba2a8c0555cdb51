#!/usr/bin/env bash
# Does a CPU run's thread count change SparseGPT's result? Gemma-3-270M, uniform 70%, the allocation grid's settings,
# once with 1 and once with 2 torch threads (the summation order of every CPU matmul, XᵀX and the Cholesky factor
# included). Two runs side by side, ~8 min on 2 cores. Writes experiments/results/sparsegpt_threads/<model>_<pruner>_<sparsity>.md
# (the folder's README.md, the reading of the results, is written by hand).
#   bash experiments/sparsegpt_threads.sh              (MODEL=smollm2-135m PRUNER=wanda ... for another row)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-gemma3-270m}; PRUNER=${PRUNER:-sparsegpt}; SPARSITY=${SPARSITY:-0.7}
OUT=${OUT:-outputs/sparsegpt_threads}
mkdir -p "$OUT"
common="experiment=allocation_grid model=$MODEL pruner=$PRUNER sparsity=$SPARSITY allocation=uniform skip_done=false"
for t in 1 2; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t python -m msp $common hydra.run.dir=$OUT/threads$t > "$OUT.threads$t.log" 2>&1 &
done
wait
python3 - "$OUT" "$MODEL" "$PRUNER" "$SPARSITY" <<'PY'
import json, sys
from pathlib import Path
from msp.io import write_text_atomic
out, model, pruner, sparsity = sys.argv[1:]
rows = []
for t in (1, 2):
    r = json.loads((Path(out) / f"threads{t}" / "results.json").read_text())
    rows.append(f"| {r['provenance'].get('cpu_threads', t)} | {r['ppl']['wiki']:.4f} | {r['sparsity']:.6f} |")
text = (f"# {pruner}, uniform {float(sparsity):.0%}, {model}: wiki perplexity against torch's CPU thread count\n\n"
        f"Built by `experiments/sparsegpt_threads.sh` (the allocation grid's settings; only the thread count differs).\n\n"
        "| threads | ppl wiki | measured sparsity |\n|---:|---:|---:|\n" + "\n".join(rows) + "\n")
dest = Path(f"experiments/results/sparsegpt_threads/{model}_{pruner}_{sparsity}.md")
dest.parent.mkdir(parents=True, exist_ok=True)
write_text_atomic(dest, text)
print(text)
PY
