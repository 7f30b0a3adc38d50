#!/bin/bash
# masking strategies: pretrain config/ablation_baron.py on Baron (no labels; 32 unexpressed genes per cell, so that
# 'random' differs from 'nonzero'), then fine-tune it on the same 5 folds as the from-scratch baseline. After queue1.sh.
cd "$(dirname "$0")/../.."
while pgrep -f queue1.sh > /dev/null; do sleep 20; done
for s in nonzero random pathway dynamic multiscale; do
  d=out-mask/$s
  [ -f $d/pretrain/best.pt ] || python train.py config/ablation_baron.py --mode=pretrain --fold=0 --masking=$s \
      --n_zero_genes=32 --out_dir=$d/pretrain --num_threads=1 > results/issue7/mask_${s}_pretrain.log 2>&1
  [ -f $d/finetune/metrics.json ] || python train.py config/ablation_baron.py --init_from=$d/pretrain/best.pt \
      --out_dir=$d/finetune --num_threads=1 > results/issue7/mask_${s}_finetune.log 2>&1
done
