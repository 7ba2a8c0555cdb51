#!/usr/bin/env bash
# The search's final check at Gemma-3-270M SparseGPT 75% (issue 10; docs/results.md), every run also scored on the
# calibration text's unseen tail (data.evaluation=[wiki,heldout]), one core per run:
#   fisher75, atp75   the search's start allocator and the best baselines, again on one core (float rounding moves them)
#   verify75          the search with session 7's check: its finalists re-ranked on 4,096 held-out tokens
#                     (allocation.verify=rerank)
#   pop0_75           that search's own 512-token best (population[0], experiments/finalist_allocation.py), pruned:
#                     what the search delivers without the check
#   pverify75         the same search resumed from verify75's checkpoint with today's default check
#                     (allocation.verify=rerank_guard: re-rank, then the pick and the start pruned as delivered)
#   bash experiments/gemma_sparsegpt75_check.sh   → $OUT/<run>/ and experiments/results/search_ablation_gemma3_sparsegpt75/
# About 10 min per baseline, 30 min for the search, 20 min for the resumed check on one core of the 2-core CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-outputs/gemma_sparsegpt75_check}
MSP=${MSP:-"python -m msp"}
common="experiment=allocation_grid model=gemma3-270m pruner=sparsegpt sparsity=0.75 data.evaluation=[wiki,heldout]"
one() {  # <name> <overrides...>: one run, skipped when its results.json exists
  local name=$1; shift
  [[ -f $OUT/$name/results.json ]] && return 0
  # shellcheck disable=SC2086  # $MSP and $common are word lists
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $MSP $common "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
one fisher75 allocation=fisher &
one atp75 allocation=atp &
wait
one verify75 allocation=msp allocation.verify_tokens=4096 allocation.verify=rerank
python3 experiments/finalist_allocation.py "$OUT/verify75" --finalist "population[0]" --out "$OUT/pop0_75.json"
one pop0_75 allocation=file allocation.path="$OUT/pop0_75.json" &
one pverify75 allocation=msp allocation.resume=true allocation.resume_from="$OUT/verify75" &
wait
one sinputs75 allocation=msp allocation.store_inputs=start   # the variants calibrated on the start's pruned inputs
python3 experiments/ablation_table.py "$OUT" --name search_ablation_gemma3_sparsegpt75 \
  --title "Gemma-3-270M, SparseGPT 75%: the search's final check (verify75: re-ranked; pverify75: re-ranked, then guarded, the default; sinputs75: the default with allocation.store_inputs=start) against its own pick (pop0_75), its start allocator and ATP, on wiki and on the calibration text's unseen tail"
