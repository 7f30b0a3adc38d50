#!/bin/bash
# after queue3.sh: the factorized embedding again (its first run, before commit 4921b88 started the projection at N(0, 1/E),
# began 10x too small: results/issue7/abl_factor16_badinit.log)
cd "$(dirname "$0")/../.."
while pgrep -f queue3.sh > /dev/null; do sleep 20; done
run() { name=$1; shift; [ -f out-abl/$name/metrics.json ] && return; python train.py config/ablation_baron.py --out_dir=out-abl/$name --num_threads=1 "$@" > results/issue7/abl_$name.log 2>&1; }
run factor16 --embd_factor=16
