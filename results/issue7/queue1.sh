#!/bin/bash
# the model-only ablations, one after another, one thread each
cd "$(dirname "$0")/../.."
run() { name=$1; shift; [ -f out-abl/$name/metrics.json ] && return; /usr/bin/time -f "%e s" python train.py config/ablation_baron.py --out_dir=out-abl/$name --num_threads=1 "$@" > results/issue7/abl_$name.log 2>&1; }
run baseline
run factor16 --embd_factor=16
run share_all --share_layers=all
run share_attention --share_layers=attention
run share_ffn --share_layers=ffn
