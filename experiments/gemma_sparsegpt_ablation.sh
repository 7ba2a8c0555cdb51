#!/usr/bin/env bash
# Why does the search lose Gemma-3-270M's SparseGPT rows (issue 10)? At 70%, every run also measures perplexity on
# the calibration text's unseen tail (data.evaluation=[wiki,heldout]), so an allocation that fits the search's few
# fitness tokens, one that fits the calibration domain, and one that carries over to Wikipedia can be told apart:
#   fisher, atp          the search's start and the best baseline of the row
#   default              the search at its defaults of the time (no final check: allocation.verify_tokens=null)
#   final=candidate      the same search, delivering the model it scored (its 8-window, dense-input SparseGPT store)
#                        instead of SparseGPT run again on all 32 windows through the sequential pipeline
#   tokens 4x            1024 tokens per offspring, 2048 for the survivors (default 256 / 512)
#   last stage 4x        256 per offspring, 2048 for the survivors
#   seed 1               the default search with another seed (its spread)
#   verify 4096          the default search, its last population and start re-scored on 4,096 held-out tokens
#                        (allocation.verify=rerank; the default since session 8 is the guard: docs/allocations.md)
#   pverify 70           the same search resumed from verify70's checkpoint with the default check (rerank_guard)
# One run at a time per core (OMP_NUM_THREADS=1, JOBS=2 runs two), each skip-done by its folder; then the table:
#   bash experiments/gemma_sparsegpt_ablation.sh   → $OUT/<run>/ and experiments/results/search_ablation_gemma3_sparsegpt70/
# About 35 min per search run and 8-16 min per baseline on one core of the 2-core CPU (the tokens-4x search: 70 min).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-outputs/gemma_sparsegpt_ablation}
JOBS=${JOBS:-2}
MSP=${MSP:-"python -m msp"}
unverified="allocation.verify_tokens=null"   # the search's defaults of the time (session 8 added the final check)
common="experiment=allocation_grid model=gemma3-270m pruner=sparsegpt sparsity=0.7 data.evaluation=[wiki,heldout]"
runs=(
  "fisher70 allocation=fisher"
  "atp70 allocation=atp"
  "default70 allocation=msp $unverified"
  "cand70 allocation=msp allocation.final=candidate $unverified"
  "tok4x_70 allocation=msp allocation.stages=[{tokens:1024,survivors:2},{tokens:2048}] $unverified"
  "last4x_70 allocation=msp allocation.stages=[{tokens:256,survivors:2},{tokens:2048}] $unverified"
  "seed1_70 allocation=msp allocation.seed=1 $unverified"
  "verify70 allocation=msp allocation.verify_tokens=4096 allocation.verify=rerank"
)
one() {  # <name> <overrides...>: one run, skipped when its results.json exists
  local name=$1; shift
  [[ -f $OUT/$name/results.json ]] && return 0
  # shellcheck disable=SC2086  # $MSP and $common are word lists
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $MSP $common "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
for spec in "${runs[@]}"; do
  # shellcheck disable=SC2086  # $spec is "<name> <overrides...>"
  one $spec &
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
done
wait
one pverify70 allocation=msp allocation.resume=true allocation.resume_from="$OUT/verify70"  # today's default check, same search
python3 experiments/ablation_table.py "$OUT" --name search_ablation_gemma3_sparsegpt70 \
  --title "Gemma-3-270M, SparseGPT 70%: the search against its start and the best baseline, on wiki and on the calibration text's unseen tail"
