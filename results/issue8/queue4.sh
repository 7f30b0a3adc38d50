#!/bin/bash
# Leave-one-type-out on Baron with scBERT (the Performer, config/finetune_baron.py), in two lanes of four types, then
# --init_from=resume over all types: every run is done, so it only writes out-novel-baron-scbert/novelty.{md,json}.
cd "$(dirname "$0")/../.."
run() { for t in "$@"; do python train.py config/finetune_baron.py --fold=0 --holdout="$t" \
    --out_dir=out-novel-baron-scbert --num_threads=1; done; }
run alpha beta delta ductal > results/issue8/novelty_baron_scbert_a.log 2>&1 &
run endothelial gamma macrophage quiescent_stellate > results/issue8/novelty_baron_scbert_b.log 2>&1 &
wait
python train.py config/finetune_baron.py --fold=0 --holdout=all --init_from=resume --out_dir=out-novel-baron-scbert \
    --num_threads=1 > results/issue8/novelty_baron_scbert.log 2>&1
