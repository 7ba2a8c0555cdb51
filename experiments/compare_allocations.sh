#!/usr/bin/env bash
# Regenerate the allocation comparison of issue 3 on the embedded SmolLM2-135M (2-core CPU: about two hours):
#   uniform / OWL / rank (Hessian) / Fisher / msp (search) x Wanda and SparseGPT at 50, 60, 70 and 75%,
#   plus mixed N:8 (per-layer N) versus uniform 2:8 at 75%.
# Finished jobs are skipped (skip_done=true), so an interrupted run continues where it stopped.
#   bash experiments/compare_allocations.sh            → experiments/results/smollm2_allocations/
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=outputs/multirun/smollm2_allocations
# the Hutchinson Hessian (rank) costs one double backprop per window and probe (~13 s for 512 tokens on 2 CPU cores,
# ~8x a forward): 8 windows x 2 probes, computed once and cached for every rank job
rank="allocation.nsamples=8 allocation.probes=2"
msp --multirun experiment=smollm2_allocations hydra.sweep.dir=$out/wanda
msp --multirun experiment=smollm2_allocations allocation=rank $rank hydra.sweep.dir=$out/wanda_rank
msp --multirun experiment=smollm2_allocations pruner=sparsegpt sparsity=0.7,0.75,0.5,0.6 hydra.sweep.dir=$out/sparsegpt
msp --multirun experiment=smollm2_allocations pruner=sparsegpt sparsity=0.7,0.75,0.5,0.6 allocation=rank $rank hydra.sweep.dir=$out/sparsegpt_rank
msp --multirun experiment=smollm2_allocations sparsity=0.75 pattern=N:8 allocation=fisher,msp hydra.sweep.dir=$out/mixed_n8
msp --multirun experiment=smollm2_allocations sparsity=0.75 pattern=2:8 allocation=uniform hydra.sweep.dir=$out/uniform_28
python3 experiments/build_tables.py $out --name smollm2_allocations
