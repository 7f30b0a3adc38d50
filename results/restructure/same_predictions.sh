#!/usr/bin/env bash
# The restructure of train.py, distill.py and model.py kept the results: the default job and config/scbert2_small.py
# give the same test-fold probabilities (test_prob.npy) before it (commit 6993180) and after it, for the same seed.
#   bash results/restructure/same_predictions.sh > results/restructure/same_predictions.txt
set -euo pipefail
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
git clone -q "$root" "$work/before" && git -C "$work/before" checkout -q 6993180
git clone -q "$root" "$work/after"
for tree in before after; do
    (cd "$work/$tree" && python train.py --out_dir=out-default > default.log 2>&1 \
        && python train.py config/scbert2_small.py --out_dir=out-s2small > s2small.log 2>&1)
done
for job in default s2small; do
    grep -h "fold 0 test" "$work/before/$job.log" "$work/after/$job.log" | sed 's/.*fold 0 test/fold 0 test/'
    python -c "import numpy as np, sys; a, b = (np.load(f'$work/{t}/out-$job/test_prob.npy') for t in ('before', 'after'))
print('$job: test_prob.npy', a.shape, 'identical' if np.array_equal(a, b) else f'differs by {abs(a - b).max():.3g}')"
done
