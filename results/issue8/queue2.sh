#!/bin/bash
# After the first PBMC run: integrated gradients of the scBERT 2.0 Baron model.
cd "$(dirname "$0")/../.."
while pgrep -f "out_dir=out-novel-pbmc " > /dev/null; do sleep 20; done
python predict.py --ckpt=out-s2-corpus-pretrained/fold0/best.pt --input=../shared/data/baron_mouse_pancreas.h5ad \
    --output=out-importance/s2corpus_ig_pred.csv --importance=out-importance/s2corpus_ig --importance_top=0 \
    --importance_cell_top=0 --num_threads=1 --novelty=scbert > results/issue8/importance_s2corpus_ig.log 2>&1
