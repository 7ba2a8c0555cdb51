#!/usr/bin/env bash
# true_sequential=true (each Linear pruned inside its block's forward, one block pass) versus the default two-pass
# order, uniform allocation, Wanda and SparseGPT at 50% and 70% on the embedded SmolLM2-135M, the comparison grid's
# data settings. The default-order rows are the grid's own runs (skip_done finds them under outputs/).
#   bash experiments/true_sequential.sh   → outputs/multirun/true_sequential/ + experiments/results/true_sequential/
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=outputs/multirun/true_sequential
msp --multirun experiment=smollm2_allocations allocation=uniform pruner=wanda,sparsegpt sparsity=0.5,0.7 true_sequential=true hydra.sweep.dir=$out
python3 experiments/build_tables.py $out --name true_sequential
