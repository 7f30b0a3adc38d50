#!/bin/bash
# The full runs of results/synergy (one thread each, one after another), from the repository root:
#   bash results/synergy/run.sh
# The encoder is scBERT 2.0 small pretrained on the shared human cells (see results/README.md, "Drug-combination synergy"):
#   python prepare_data.py --input=../shared/data/celltypist_sample_unlabeled.h5ad --name=celltypist_all --label_key=
#   python train.py config/scbert2_small.py config/pretrain_corpus.py --dataset=data/celltypist_all \
#       --out_dir=out-pretrain-human --num_threads=1
ENCODER=${ENCODER:-out-pretrain-human/best.pt}
for split in fold by_cell_line cl_fold; do
  for features in expression encoder both; do
    name=${split}_${features}
    out=results/synergy/$name
    { time python synergy.py --split=$split --cell_features=$features --encoder_ckpt=$ENCODER --out_dir=$out \
        --num_threads=1 > results/synergy/$name.log 2>&1 ; } 2> results/synergy/$name.time
    rm -f $out/predictions.csv          # 1.5 MB a run: rerun the command to get it
  done
done
