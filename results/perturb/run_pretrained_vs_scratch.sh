#!/bin/bash
# Papalexi knockouts, 5 folds: the encoder pretrained on human cells against the same architecture from scratch.
# The checkpoint (config/scbert2_small.py's scBERT 2.0: 4 blocks, 4 experts) was made in the main checkout by
#   python prepare_data.py --input=../shared/data/celltypist_sample_unlabeled.h5ad --name=celltypist_all --label_key=
#   python train.py config/scbert2_small.py config/pretrain_corpus.py --dataset=data/celltypist_all \
#       --out_dir=out-pretrain-human --num_threads=1
# and copied to out-pretrain-human/best.pt (sha256 f8ee110fc55fe0847bd992bbf379af76bba0be1a240c391f32598e0e2e47e5bc).
cd "$(dirname "$0")/../.."
common="--input=../shared/data/perturb/papalexi2021_thp1_crispr_ko.h5ad --task=gene --perturbation_key=target_gene \
    --control_value=control --holdout=all"
for run in pretrained scratch; do
    start=$(date +%s)
    if [ $run = pretrained ]; then extra="--init_from=out-pretrain-human/best.pt"; else extra="--n_layer=4 --n_expert=4"; fi
    python perturb.py $common $extra --out_dir=results/perturb/papalexi_$run > results/perturb/papalexi_$run.log 2>&1
    echo "exit $? wall $(( $(date +%s) - start )) s on $(nproc) cores, num_threads=1" >> results/perturb/papalexi_$run.log
done
