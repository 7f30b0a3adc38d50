#!/usr/bin/env bash
# How the fine-tuning defaults were chosen: scBERT 2.0 small on Baron (1,000 genes), the run of test fold 0, judged
# only by its validation fold (fold 1: the best validation macro-F1 in each log). Two runs at a time, 1 thread each.
#   bash results/finetune/sweep.sh ROUND    (from the repo root; ROUND 1 or 2; writes results/finetune/sweep/*.log)
set -uo pipefail
run() {   # name, settings...
    local name=$1; shift
    { time python train.py config/scbert2_small.py --dataset=data/baron1k --fold=0 --num_threads=1 \
        --out_dir=out-sweep/$name "$@" > results/finetune/sweep/$name.log 2>&1; } 2> results/finetune/sweep/$name.time
}
case $1 in
1) run balance0 --class_balance=0 --label_smoothing=0 & run balance0.5 --class_balance=0.5 --label_smoothing=0 & wait ;;
2) shift; run "$@" ;;
esac
