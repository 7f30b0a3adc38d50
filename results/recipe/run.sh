#!/usr/bin/env bash
# The README's "Your own data", followed word for word on Baron as if it were new data (mine.h5ad: a copy of it).
#   bash results/recipe/run.sh    (from the repo root; writes results/recipe/*.log and *.time)
set -euo pipefail
cp ../shared/data/baron_mouse_pancreas.h5ad mine.h5ad
python prepare_data.py --input=mine.h5ad --name=mine --label_key=cell_type --batch_key=donor --n_top_genes=1000 \
    > results/recipe/prepare.log 2>&1
{ time python train.py config/scbert2_small.py --dataset=data/mine --fold=all --out_dir=out-mine \
    > results/recipe/train.log 2>&1; } 2> results/recipe/train.time
# predict.py on the same file, with the check against its labels: fold 0's model trained on 60% of these cells, so
# the agreement is optimistic; what it shows is the share the Unassigned rule withholds where nothing is new
python predict.py --ckpt=out-mine/fold0/best.pt --input=mine.h5ad --output=mine.csv --novelty=off \
    --label_key=cell_type > results/recipe/predict_off.log 2>&1
python predict.py --ckpt=out-mine/fold0/best.pt --input=mine.h5ad --output=mine_rule.csv \
    --label_key=cell_type > results/recipe/predict_rule.log 2>&1
