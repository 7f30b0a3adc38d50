#!/usr/bin/env bash
# The fine-tuning recipe's defaults (epochs=20 with max_iters as the cap, patience=10, class_balance=0; chosen by
# results/finetune/sweep.sh), re-run beside logistic regression on the same cells. Two streams side by side, one
# thread each:
#   bash results/finetune/run.sh baron    scBERT 2.0 small, Baron 5-fold
#   bash results/finetune/run.sh others   scBERT 2.0 small on PBMC and both donor directions; scBERT on PBMC and
#                                         across donors (both directions)
# (from the repo root, after `python prepare_data.py --input=../shared/data/baron_mouse_pancreas.h5ad --name=baron1k
#  --label_key=cell_type --batch_key=donor --n_top_genes=1000`; writes results/finetune/<name>.log and .time)
set -uo pipefail
run() {   # name, train.py arguments...
    local name=$1; shift
    { time python train.py "$@" --num_threads=1 --out_dir=out-ft/$name > results/finetune/$name.log 2>&1; } \
        2> results/finetune/$name.time
}
case $1 in
baron)
    run s2_baron_cv config/scbert2_small.py --dataset=data/baron1k --fold=all ;;
others)
    run s2_pbmc config/scbert2_small.py
    run s2_test_mouse2 config/scbert2_small.py --dataset=data/baron1k --test_batch=mouse2
    run s2_test_mouse1 config/scbert2_small.py --dataset=data/baron1k --test_batch=mouse1
    run scbert_pbmc
    run scbert_test_mouse2 config/finetune_baron.py --fold=0 --test_batch=mouse2
    run scbert_test_mouse1 config/finetune_baron.py --fold=0 --test_batch=mouse1 ;;
esac
# Baron's folds 3 and 4 ran beside folds 0-2 in a second process (the same runs: each fold is seeded alone), and the
# 5-fold summary was then printed by resuming the finished folds:
#   python train.py config/scbert2_small.py --dataset=data/baron1k --fold=3 --num_threads=1 --out_dir=out-ft/s2_baron_cv/fold3
#   (the same for fold 4), then, once folds 0-2 are done:
#   python train.py config/scbert2_small.py --dataset=data/baron1k --fold=all --init_from=resume --resume_changes=fold \
#       --out_dir=out-ft/s2_baron_cv > results/finetune/s2_baron_cv_summary.log
