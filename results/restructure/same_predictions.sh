#!/usr/bin/env bash
# The restructure of train.py, distill.py and model.py kept the results: the default job and config/scbert2_small.py
# give the same test-fold probabilities (test_prob.npy) before it (commit 6993180) and after it, for the same seed;
# so do short runs (12 steps) of distill.py and of pretraining with dynamic masking (their weights, bit for bit).
#   bash results/restructure/same_predictions.sh > results/restructure/same_predictions.txt
set -euo pipefail
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
git clone -q "$root" "$work/before" && git -C "$work/before" checkout -q 6993180
git clone -q "$root" "$work/after"
short="--max_iters=12 --eval_interval=4 --log_interval=4 --batch_size=4 --num_threads=1"
for tree in before after; do
    cd "$work/$tree"
    python train.py --out_dir=out-default > default.log 2>&1
    python train.py config/scbert2_small.py --out_dir=out-s2small > s2small.log 2>&1
    python distill.py $short --teacher=out-default/best.pt --out_dir=out-distill > distill.log 2>&1
    python train.py $short --mode=pretrain --masking=dynamic --out_dir=out-dynamic > dynamic.log 2>&1
done
cd "$work"
for job in default s2small distill; do
    grep -h "fold 0 test" "before/$job.log" "after/$job.log" | sed 's/.*fold 0 test/fold 0 test/'
    python -c "import numpy as np; a, b = (np.load(f'{t}/out-$job/test_prob.npy') for t in ('before', 'after'))
print('$job: test_prob.npy', a.shape, 'identical' if np.array_equal(a, b) else f'differs by {abs(a - b).max():.3g}')"
done
python -c "import torch; a, b = (torch.load(f'{t}/out-dynamic/ckpt.pt', weights_only=True)['model'] for t in ('before', 'after'))
print('dynamic-masking pretraining: weights after 12 steps', 'identical' if all(torch.equal(a[k], b[k]) for k in a) else 'differ')"
