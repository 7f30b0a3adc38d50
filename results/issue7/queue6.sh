#!/bin/bash
# the best combination of the single extensions (by their paired macro-F1 against the baseline): cross-layer sharing
# of every block (share_layers=all) + pretraining with dynamic masking, then fine-tuning on the same 5 folds
cd "$(dirname "$0")/../.."
[ -f out-combo/pretrain/best.pt ] || python train.py config/ablation_baron.py --mode=pretrain --fold=0 --masking=dynamic \
    --n_zero_genes=32 --share_layers=all --out_dir=out-combo/pretrain --num_threads=1 > results/issue7/combo_pretrain.log 2>&1
[ -f out-abl/combo/metrics.json ] || python train.py config/ablation_baron.py --init_from=out-combo/pretrain/best.pt \
    --out_dir=out-abl/combo --num_threads=1 > results/issue7/abl_combo.log 2>&1
