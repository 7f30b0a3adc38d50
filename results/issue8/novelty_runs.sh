#!/bin/bash
# Leave-one-cell-type-out runs behind the README's novelty table (two lanes, one thread each).
# Baron: scBERT 2.0 (config/ablation_baron.py, 1,000 genes); PBMC: scBERT (the default job's Performer).
cd "$(dirname "$0")/../.."
python train.py config/ablation_baron.py --fold=0 --holdout=all --out_dir=out-novel-baron --num_threads=1 \
    > results/issue8/novelty_baron.log 2>&1 &
python train.py --holdout=all --out_dir=out-novel-pbmc --num_threads=1 > results/issue8/novelty_pbmc.log 2>&1 &
wait
