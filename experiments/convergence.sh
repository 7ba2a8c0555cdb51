#!/usr/bin/env bash
# Does a Fisher start make the search converge faster? The search at 70% (Wanda) from init = uniform, fisher, alpha
# and dlp on one model per call, at msp's defaults (2-core CPU: about 4 x 5 minutes on SmolLM2-135M), then the plot
# of best fitness vs fitness evaluations (experiments/results/convergence/, every model found under $OUT):
#   bash experiments/convergence.sh ; MODEL=gemma3-270m bash experiments/convergence.sh
#   DONE_DIRS=outputs/multirun/allocation_grid bash experiments/convergence.sh   # reuse the grid's init=fisher run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-outputs/multirun/convergence}
PRUNER=${PRUNER:-wanda}
# DONE_DIRS=<folder>: reuse a finished identical run from there (the allocation grid's init=fisher run, say)
msp --multirun experiment=allocation_grid model=$MODEL pruner=$PRUNER sparsity=0.7 allocation=msp \
  allocation.init=uniform,fisher,alpha,dlp hydra.sweep.dir=$OUT/$MODEL/$PRUNER skip_done=true \
  ${DONE_DIRS:+done_dirs=[$DONE_DIRS]}
python3 experiments/plot_convergence.py "$OUT" --name convergence
