#!/usr/bin/env bash
# Issue 10's comparison of allocators, on one model per call (2-core CPU: SmolLM2-135M about 6-8 hours, Gemma-3-270M
# about twice that; every job is skip-done, so an interrupted grid continues where it stopped):
#   Wanda and SparseGPT x 50, 60, 70, 75, 80% x {uniform, owl, rank, alpha, dlp, atp, fisher, msp (init=fisher),
#   msp (init=best)}, mixed N:8 (fisher, msp) vs uniform 2:8 at 75% and vs uniform 4:8 at 50%, and calibration
#   seeds 1 and 2 for the Wanda 50% and 60% rows (run-to-run noise).
#   bash experiments/allocation_grid.sh                       # model=smollm2-135m
#   MODEL=gemma3-270m bash experiments/allocation_grid.sh     # needs bash install.sh --gemma
#   PARTS="baselines" PRUNERS="wanda" bash experiments/allocation_grid.sh   # a part of it
#   SPARSITIES=0.7,0.75 bash experiments/allocation_grid.sh   # some rows first
# Outputs: $OUT/<model>/<part>/<pruner>/<overrides>/ (default OUT=outputs/multirun/allocation_grid; one folder per
#   job named by its overrides, so calls with other SPARSITIES add to a sweep folder); tables and plots:
#   experiments/results/allocation_grid_<model>/ (python3 experiments/build_tables.py $OUT/<model> --name ...).
#   Every finished run's results.json is also kept (and committed) under
#   experiments/results/allocation_grid_<model>_runs/<config hash>/, which the next call reads as done_dirs and the
#   tables read back: a grid that takes several sessions continues from the committed runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-outputs/multirun/allocation_grid}/$MODEL
PRUNERS=${PRUNERS:-"wanda sparsegpt"}
PARTS=${PARTS:-"baselines rank msp best nm seeds"}
# SPARSITIES=0.7,0.75 runs those rows first (the baselines, rank, msp and best parts); default: all five
SP=${SPARSITIES:+sparsity=$SPARSITIES}
KEPT=$PWD/experiments/results/allocation_grid_${MODEL}_runs   # finished runs, committed: the next call skips them
mkdir -p "$KEPT"
# DONE_DIRS=<folder>: reuse finished identical runs from there too (an ablation's run that the defaults now equal)
run() { msp --multirun experiment=allocation_grid model=$MODEL "$@" "done_dirs=[$KEPT${DONE_DIRS:+,$DONE_DIRS}]"; }
# the Hutchinson Hessian (rank): 8 windows x 2 probes, computed once and cached for every rank job
rank="allocation.nsamples=8 allocation.probes=2"
for part in $PARTS; do
  for pruner in $PRUNERS; do
    dir=$OUT/$part/$pruner
    case $part in
      baselines) run pruner=$pruner $SP hydra.sweep.dir=$dir ;;
      rank)      run pruner=$pruner $SP allocation=rank $rank hydra.sweep.dir=$dir ;;
      msp)       run pruner=$pruner $SP allocation=msp hydra.sweep.dir=$dir ;;
      best)      run pruner=$pruner $SP allocation=msp allocation.init=best hydra.sweep.dir=$dir ;;
      nm)        run pruner=$pruner sparsity=0.75 pattern=N:8 allocation=fisher,msp hydra.sweep.dir=$dir/n8_75
                 run pruner=$pruner sparsity=0.5 pattern=N:8 allocation=fisher,msp hydra.sweep.dir=$dir/n8_50
                 run pruner=$pruner sparsity=0.75 pattern=2:8 allocation=uniform hydra.sweep.dir=$dir/uniform_28
                 run pruner=$pruner sparsity=0.5 pattern=4:8 allocation=uniform hydra.sweep.dir=$dir/uniform_48 ;;
      seeds)     [ "$pruner" = wanda ] || continue
                 run pruner=$pruner seed=1,2 sparsity=0.5,0.6 allocation=uniform,owl,alpha,dlp,atp,fisher,msp hydra.sweep.dir=$dir ;;
      *) echo "unknown part $part (baselines rank msp best nm seeds)" >&2; exit 2 ;;
    esac
  done
done
python3 experiments/build_tables.py "$OUT" "$KEPT" --name "allocation_grid_$MODEL" --archive "$KEPT"
