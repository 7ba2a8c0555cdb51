#!/usr/bin/env bash
# Why does the search lose to the Fisher allocation at 50-60% (issue 3: "investigate fitness tokens, population,
# initialisation")? Two changes to the comparison grid's msp runs (experiment=smollm2_allocations, 20 generations),
# each in its own sweep folder, kept out of the main comparison table:
#   tokens: 4x the fitness tokens — 1024 per offspring, 2048 for survivors (default 256 / 512); Wanda and SparseGPT.
#   grid:   SparseGPT's level store at the ranking pruners' step 0.025 (allocation.max_levels=17) instead of the
#           default 6 levels, which coarsens its grid to steps of 0.08 (the Fisher start is snapped onto it).
#   bash experiments/search_ablation.sh   → outputs/multirun/search_ablation/ + experiments/results/search_ablation_{grid,tokens}/
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=outputs/multirun/search_ablation
tokens="allocation.stages=[{tokens:1024,survivors:2},{tokens:2048}]"
msp --multirun experiment=smollm2_allocations allocation=msp pruner=sparsegpt sparsity=0.5,0.6 allocation.max_levels=17 hydra.sweep.dir=$out/grid
msp --multirun experiment=smollm2_allocations allocation=msp pruner=wanda,sparsegpt sparsity=0.5,0.6 "$tokens" hydra.sweep.dir=$out/tokens
for part in grid tokens; do python3 experiments/build_tables.py $out/$part --name search_ablation_$part; done
