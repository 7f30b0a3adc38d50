#!/bin/bash
# The random-encoder control, then repeats of results/synergy/run.sh with other seeds (the net's initialisation and
# batches; for by_cell_line also the partition of the cell lines), from the repository root:
#   bash results/synergy/run_repeats.sh
ENCODER=${ENCODER:-out-pretrain-human/best.pt}
run() {   # name, then synergy.py's settings
  name=$1; shift
  { time python synergy.py "$@" --out_dir=results/synergy/$name --num_threads=1 \
      > results/synergy/$name.log 2>&1 ; } 2> results/synergy/$name.time
  rm -f results/synergy/$name/predictions.csv
}
PYTHONPATH=. python results/synergy/random_encoder.py $ENCODER /tmp/random_encoder.pt
for split in fold by_cell_line; do
  run ${split}_random_encoder --split=$split --cell_features=encoder --encoder_ckpt=/tmp/random_encoder.pt
done
# the encoder run on held-out pairs stopped at max_epochs (100) in most folds: is the budget what holds it back?
run fold_encoder_max_epochs200 --split=fold --cell_features=encoder --encoder_ckpt=$ENCODER --max_epochs=200
for seed in 1 2; do
  for split in fold by_cell_line; do
    for features in expression encoder both; do
      run ${split}_${features}_seed$seed --split=$split --cell_features=$features --encoder_ckpt=$ENCODER --seed=$seed
    done
  done
done
