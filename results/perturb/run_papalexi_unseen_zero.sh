#!/bin/bash
# Papalexi knockouts, 5 folds, a held-out knockout given no learned row (zero) rather than the mean trained row
cd "$(dirname "$0")/../.."
start=$(date +%s)
python perturb.py --input=../shared/data/perturb/papalexi2021_thp1_crispr_ko.h5ad --task=gene \
    --perturbation_key=target_gene --control_value=control --holdout=all --unseen_perturbation=zero --out_dir=results/perturb/papalexi_unseen_zero \
    > results/perturb/papalexi_unseen_zero.log 2>&1
echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> results/perturb/papalexi_unseen_zero.log
