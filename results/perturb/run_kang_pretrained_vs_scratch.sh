#!/bin/bash
# Kang, each cell type held out: the encoder pretrained on human cells (out-pretrain-human/best.pt, made as
# run_pretrained_vs_scratch.sh says) against the same architecture (4 blocks, 4 experts) from scratch
cd "$(dirname "$0")/../.."
common="--input=../shared/data/perturb/kang2018_ifnb_pbmc.h5ad --task=celltype --perturbation_key=condition \
    --control_value=ctrl --cell_type_key=cluster_id --holdout=all"
for run in pretrained scratch; do
    start=$(date +%s)
    if [ $run = pretrained ]; then extra="--init_from=out-pretrain-human/best.pt"; else extra="--n_layer=4 --n_expert=4"; fi
    python perturb.py $common $extra --out_dir=results/perturb/kang_$run > results/perturb/kang_$run.log 2>&1
    echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> results/perturb/kang_$run.log
done
