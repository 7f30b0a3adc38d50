#!/bin/bash
# after queue4.sh: the baseline again with another seed: how far two runs of the same settings differ (the noise floor)
cd "$(dirname "$0")/../.."
while pgrep -f queue4.sh > /dev/null; do sleep 20; done
run() { name=$1; shift; [ -f out-abl/$name/metrics.json ] && return; python train.py config/ablation_baron.py --out_dir=out-abl/$name --num_threads=1 "$@" > results/issue7/abl_$name.log 2>&1; }
run baseline_seed2 --seed=2
