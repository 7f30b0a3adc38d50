"""The sensitivity figure (the seed's Figures 1 and 2): test accuracy and macro-F1 on Baron's folds 0-2 (mean, and sd as
error bars) against the number
of bins, layers, heads and the embedding width, without and with ALBERT's factorized gene embedding (E = 16).
    python results/issue7/plot_sensitivity.py      # after sensitivity.sh -> results/issue7/sensitivity.{png,json,md}"""
import json
import os

import matplotlib
import numpy as np
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
centre = {'bins': 10, 'layers': 2, 'heads': 4, 'embd': 64}
axes = {'bins': [5, 10, 20], 'layers': [1, 2, 4], 'heads': [1, 2, 4, 8], 'embd': [32, 64, 128]}
labels = {'bins': 'value bins (n_bins)', 'layers': 'encoder layers (n_layer)', 'heads': 'attention heads (n_head)',
          'embd': 'embedding width (n_embd)'}


NAMES = [f'{s}{v}_f{f}' for s in axes for v in axes[s] if v != centre[s] for f in (0, 16)]
# every point over the same folds: those that every run of the grid has finished (sensitivity.sh does 0, 1, 2 in turn)
FOLDS = [k for k in (0, 1, 2) if all(os.path.exists(f'out-sens/{n}/fold{k}/metrics.json') for n in NAMES)] or [0]


def score(setting, value, factor):
    """[(accuracy, macro-F1) per fold that has finished]"""
    out = []
    for k in FOLDS:
        if value == centre[setting]:                 # the centre point: the 5-fold runs' folds
            path = f"out-abl/{'baseline' if factor == 0 else f'factor{factor}'}/fold{k}/metrics.json"
        else:
            path = f'out-sens/{setting}{value}_f{factor}/fold{k}/metrics.json'
        if os.path.exists(path):
            test = json.load(open(path))['test']
            out.append((test['accuracy'], test['macro_f1']))
    return out


def mean_sd(runs, i):
    v = np.array([r[i] for r in runs])
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)


table = {s: {f: {v: score(s, v, f) for v in axes[s]} for f in (0, 16)} for s in axes}
fig, ax = plt.subplots(1, 4, figsize=(16, 4.2), sharey=True)
for a, s in zip(ax, axes):
    for f, style in ((0, '-'), (16, '--')):
        pts = [(v, r) for v, r in table[s][f].items() if r]
        name = 'E = n_embd' if f == 0 else 'factorized, E = 16'
        for i, (color, marker, what) in enumerate((('C0', 'o', 'accuracy'), ('C1', 's', 'macro-F1'))):
            stats = [mean_sd(r, i) for _, r in pts]
            a.errorbar([v * (1.04 if f else 0.96) for v, _ in pts], [m for m, _ in stats], yerr=[sd for _, sd in stats],
                       fmt=marker + style, color=color, capsize=3, label=f'{what}, {name}')
    a.set_xscale('log', base=2)
    a.set_xticks(axes[s], [str(v) for v in axes[s]])
    a.set_xlabel(labels[s])
    a.grid(alpha=0.3)
ax[0].set_ylabel(f"Baron test fold{'s' if len(FOLDS) > 1 else ''} {', '.join(map(str, FOLDS))}, mean ± sd")
fig.legend(*ax[0].get_legend_handles_labels(), loc='lower center', ncol=4, fontsize=8)
fig.suptitle('Sensitivity of a 2-layer scBERT 2.0 (config/ablation_baron.py) on Baron, one setting at a time')
fig.tight_layout(rect=(0, 0.08, 1, 1))
fig.savefig(os.path.join(here, 'sensitivity.png'), dpi=110)
json.dump({s: {str(f): {str(v): r for v, r in t.items()} for f, t in table[s].items()} for s in table},
          open(os.path.join(here, 'sensitivity.json'), 'w'), indent=1)
with open(os.path.join(here, 'sensitivity.md'), 'w') as fh:
    fh.write('| setting | value | folds | accuracy | macro-F1 | folds, factorized | accuracy, factorized | macro-F1, '
             'factorized |\n|---|---:|---:|---:|---:|---:|---:|---:|\n')
    for s in axes:
        for v in axes[s]:
            def cell(runs):
                if not runs:
                    return '0 | - | -'
                (a, asd), (f1, fsd) = mean_sd(runs, 0), mean_sd(runs, 1)
                if len(runs) == 1:
                    return f'1 | {a:.3f} | {f1:.3f}'
                return f'{len(runs)} | {a:.3f} ± {asd:.3f} | {f1:.3f} ± {fsd:.3f}'
            fh.write(f'| {s} | {v}{" (centre)" if v == centre[s] else ""} | {cell(table[s][0][v])} | '
                     f'{cell(table[s][16][v])} |\n')
print(open(os.path.join(here, 'sensitivity.md')).read())
