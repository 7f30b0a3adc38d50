"""The table of README "ALBERT, DeBERTa and biology on Baron", from the runs' own files:
    python results/issue7/summarize.py [--bench=results/issue7/bench_ablations.json] > results/issue7/ablations.md
Per run directory (out-abl/<name>, out-mask/<strategy>/finetune; 5 folds): test accuracy and macro-F1, mean ± sd over
folds, each fold's macro-F1, the paired difference from out-abl/baseline (mean ± sd of the per-fold differences, and on
how many folds the run is ahead),
parameters (fold 0's best.pt), and inference / training cells/s from a bench.py json when given."""
import glob
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from model import ScBERT  # noqa: E402

bench = {}
for arg in sys.argv[1:]:
    if arg.startswith('--bench=') and os.path.exists(arg[8:]):
        for row in json.load(open(arg[8:]))['variants']:
            bench[os.path.normpath(row['variant'])] = row


def speed(path):
    row = bench.get(os.path.normpath(path))
    if not row:
        return ''
    inf = [r['cells_per_s'] for r in row.get('inference', []) if r.get('batch_size') == 32 and 'cells_per_s' in r]
    tr = (row.get('train') or {}).get('cells_per_s')
    return f"{inf[0]:.0f} / {tr:.0f}" if inf and tr else ''


base_folds = None
if os.path.exists('out-abl/baseline/metrics.json'):     # the paired comparison: each fold against the baseline's
    base_folds = [f['test']['macro_f1'] for f in json.load(open('out-abl/baseline/metrics.json'))['folds']]
rows = []
for run in sorted(glob.glob('out-abl/*/metrics.json')) + sorted(glob.glob('out-mask/*/finetune/metrics.json')):
    m = json.load(open(run))
    d = os.path.dirname(run)
    s = m['summary']['test']
    ckpt = torch.load(os.path.join(d, 'fold0', 'best.pt'), map_location='cpu', weights_only=True)
    params = ScBERT.from_checkpoint(ckpt).num_params()
    folds = [f['test']['macro_f1'] for f in m['folds']]
    per_fold = ' '.join(f'{v:.3f}' for v in folds)
    paired = ''
    if base_folds and len(folds) == len(base_folds) and d != 'out-abl/baseline':
        diff = np.array(folds) - np.array(base_folds)
        paired = f'{diff.mean():+.3f} ± {diff.std(ddof=1):.3f} ({int((diff > 0).sum())}/{len(diff)})'
    rows.append((d, s['macro_f1']['mean'], s['macro_f1']['sd'], s['accuracy']['mean'], s['accuracy']['sd'], params,
                 speed(os.path.join(d, 'fold0', 'best.pt')), per_fold, paired))
    base = m['summary'].get('baseline')
print('| run | macro-F1 | vs baseline, paired (folds ahead) | accuracy | parameters | cells/s inference / training '
      '(batch 32) | macro-F1 per fold |')
print('|---|---:|---:|---:|---:|---:|---|')
for d, f1, f1sd, acc, accsd, params, sp, per_fold, paired in rows:
    print(f'| {d} | {f1:.3f} ± {f1sd:.3f} | {paired} | {acc:.3f} ± {accsd:.3f} | {params / 1e6:.3f}M | {sp} '
          f'| {per_fold} |')
if rows:
    print(f"| logistic regression (same folds) | {base['macro_f1']['mean']:.3f} ± {base['macro_f1']['sd']:.3f} | | "
          f"{base['accuracy']['mean']:.3f} ± {base['accuracy']['sd']:.3f} | | | |")
