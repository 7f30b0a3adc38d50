#!/bin/bash
# After the scBERT integrated-gradients run: leave-one-type-out with scBERT 2.0 small on PBMC.
cd "$(dirname "$0")/../.."
while pgrep -f "importance=out-importance/scbert_ig" > /dev/null; do sleep 20; done
python train.py config/scbert2_small.py --holdout=all --out_dir=out-novel-pbmc-s2 --num_threads=1 \
    > results/issue8/novelty_pbmc_s2.log 2>&1
