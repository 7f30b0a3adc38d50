#!/bin/bash
# The encoder pretrained on human cells against the same architecture (config/scbert2_small.py's scBERT 2.0: 4 blocks,
# 4 experts) from scratch, on Papalexi's knockouts (5 folds) and on Kang's cell types (each held out in turn).
# The checkpoint out-pretrain-human/best.pt is made by results/pretrain_human/run.sh
# (sha256 f8ee110fc55fe0847bd992bbf379af76bba0be1a240c391f32598e0e2e47e5bc).
# Usage: bash results/perturb/run_pretrained_vs_scratch.sh [papalexi] [kang]   (both by default)
cd "$(dirname "$0")/../.."
papalexi="--input=../shared/data/perturb/papalexi2021_thp1_crispr_ko.h5ad --task=gene --perturbation_key=target_gene \
    --control_value=control --holdout=all"
kang="--input=../shared/data/perturb/kang2018_ifnb_pbmc.h5ad --task=celltype --perturbation_key=condition \
    --control_value=ctrl --cell_type_key=cluster_id --holdout=all"
for data in ${@:-papalexi kang}; do
    for run in pretrained scratch; do
        start=$(date +%s)
        extra="--init_from=out-pretrain-human/best.pt"
        if [ $run = scratch ]; then extra="--n_layer=4 --n_expert=4"; fi
        log=results/perturb/${data}_$run.log
        python perturb.py ${!data} $extra --out_dir=results/perturb/${data}_$run > $log 2>&1
        echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> $log
    done
done
