#!/bin/bash
# Sensitivity (the seed's Figures 1 and 2): config/ablation_baron.py on Baron's folds 0-2, one setting changed at a
# time, without and with ALBERT's factorized gene embedding (E = 16). The centre point (10 bins, 2 layers, 4 heads,
# width 64) is folds 0-2 of out-abl/baseline and out-abl/factor16 (queue1.sh). Then:
#   python results/issue7/plot_sensitivity.py
cd "$(dirname "$0")/../.."
# each run takes a lock (mkdir is atomic), so two copies of this script can share the work
run() { name=$1; k=$2; shift 2; [ -f out-sens/$name/fold$k/metrics.json ] && return; mkdir -p out-sens/$name
        mkdir out-sens/$name/fold$k.lock 2>/dev/null || return
        python train.py config/ablation_baron.py --fold=$k --out_dir=out-sens/$name/fold$k --num_threads=1 "$@" \
            > out-sens/$name/fold$k.log 2>&1; rmdir out-sens/$name/fold$k.lock; }
for k in 0 1 2; do
  for factor in 0 16; do
    f="--embd_factor=$factor"
    for v in 5 20; do run bins${v}_f$factor $k --n_bins=$v $f; done
    for v in 1 4; do run layers${v}_f$factor $k --n_layer=$v $f; done
    run heads1_f$factor $k --n_head=1 --n_kv_head=1 $f
    run heads2_f$factor $k --n_head=2 --n_kv_head=1 $f
    run heads8_f$factor $k --n_head=8 --n_kv_head=4 $f
    for v in 32 128; do run embd${v}_f$factor $k --n_embd=$v $f; done
  done
done
