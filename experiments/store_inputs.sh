#!/usr/bin/env bash
# allocation.store_inputs (session 9): the search's variants calibrated on the dense model's block outputs (dense, the
# default) or on those of the blocks before each pruned at the search's start (start), both with the default final
# check, side by side on one core each; wiki and the calibration text's unseen tail (data.evaluation=[wiki,heldout]).
#   bash experiments/store_inputs.sh      → experiments/results/search_store_inputs/
# Gemma-3 SparseGPT 75% with store_inputs=start is in experiments/gemma_sparsegpt75_check.sh (sinputs75).
# Wall time (2-core CPU, three runs at a time): SmolLM2 SparseGPT about 30 min per run, Wanda about 10, Gemma-3
# SparseGPT about 45.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-outputs/store_inputs}
MSP=${MSP:-"python -m msp"}
mkdir -p "$OUT"
run() {  # <name> <overrides...>: one run, skipped when its results.json exists
  local name=$1; shift
  [[ -f $OUT/$name/results.json ]] && return 0
  # shellcheck disable=SC2086  # $MSP is a word list
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $MSP "$@" data.evaluation=[wiki,heldout] allocation=msp hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
smol="experiment=allocation_grid model=smollm2-135m sparsity=0.7"
( run sg70_dense $smol pruner=sparsegpt; run w70_dense $smol pruner=wanda; run w70_start $smol pruner=wanda allocation.store_inputs=start ) &
( run sg70_start $smol pruner=sparsegpt allocation.store_inputs=start
  run g_sg70_start experiment=allocation_grid model=gemma3-270m pruner=sparsegpt sparsity=0.7 allocation.store_inputs=start ) &
wait
python3 experiments/ablation_table.py "$OUT" --name search_store_inputs \
  --title "The search's variants calibrated on dense inputs (the default) or on the start's pruned inputs (allocation.store_inputs=start), default final check, wiki and the calibration text's unseen tail"
