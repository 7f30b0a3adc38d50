#!/bin/bash
# Papalexi 2021 THP-1 CRISPR knockouts: the 25 targets held out in 5 folds (the Interface command, defaults otherwise)
cd "$(dirname "$0")/../.."
start=$(date +%s)
python perturb.py --input=../shared/data/perturb/papalexi2021_thp1_crispr_ko.h5ad --task=gene \
    --perturbation_key=target_gene --control_value=control --holdout=all --out_dir=results/perturb/papalexi \
    > results/perturb/papalexi.log 2>&1
echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> results/perturb/papalexi.log
