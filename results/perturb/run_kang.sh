#!/bin/bash
# Kang 2018 IFN-beta PBMCs: each of the 5 cell types held out in turn (the Interface command, defaults otherwise)
cd "$(dirname "$0")/../.."
start=$(date +%s)
python perturb.py --input=../shared/data/perturb/kang2018_ifnb_pbmc.h5ad --task=celltype --perturbation_key=condition \
    --control_value=ctrl --cell_type_key=cluster_id --holdout=all --out_dir=results/perturb/kang > results/perturb/kang.log 2>&1
echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> results/perturb/kang.log
