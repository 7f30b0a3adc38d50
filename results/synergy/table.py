"""The tables of results/README.md ("Drug-combination synergy") from the runs' metrics.json and .time files:
    python results/synergy/table.py > results/synergy/tables.md"""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ('pearson', 'spearman', 'rmse', 'auroc', 'auprc')
FEATURES = ('expression', 'encoder', 'both', 'random_encoder')


def load(name):
    path = os.path.join(HERE, name, 'metrics.json')
    if not os.path.isfile(path):
        return None, None
    with open(os.path.join(HERE, f'{name}.time')) as f:
        real = re.search(r'real\s+(\d+)m([\d.]+)s', f.read())
    return json.load(open(path)), int(real[1]) * 60 + float(real[2]) if real else None


def cell(entry):
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}" if entry['mean'] is not None else '-'


def split_table(split):
    print(f'\n`--split={split}`: mean ± sd over the 5 test folds\n')
    print('| cell features | method | ' + ' | '.join(METRICS) + ' | run time |')
    print('|---|---|' + '---|' * (len(METRICS) + 1))
    baselines_done = False
    for features in FEATURES:
        m, seconds = load(f'{split}_{features}')
        if m is None:
            continue
        for method in ('model', 'ridge') + (() if baselines_done else ('pair_mean',)):
            label = 'any' if method == 'pair_mean' else features
            time_text = f'{seconds / 60:.1f} min' if method == 'model' and seconds else ''
            print(f'| {label} | {method} | ' + ' | '.join(cell(m[method][k]) for k in METRICS) + f' | {time_text} |')
        baselines_done = True


def seeds_table(split):
    print(f'\n`--split={split}`: Pearson r (mean over the 5 folds) for each seed\n')
    print('| method | cell features | seed 0 | seed 1 | seed 2 | mean |')
    print('|---|---|---|---|---|---|')
    rows = [('model', f) for f in FEATURES[:3]] + [('ridge', 'expression'), ('pair_mean', 'expression')]
    for method, features in rows:
        runs = [load(f'{split}_{features}' + (f'_seed{s}' if s else ''))[0] for s in range(3)]
        r = [m[method]['pearson']['mean'] if m else None for m in runs]
        done = [v for v in r if v is not None]
        mean = f'{sum(done) / len(done):.3f}' if done else '-'
        print(f'| {method} | {"any" if method == "pair_mean" else features} | '
              + ' | '.join(f'{v:.3f}' if v is not None else '-' for v in r) + f' | {mean} |')


def one_fold_table(split, fold, what):
    print(f'\n`--split={split}`, test fold {fold} only ({what}): Pearson r / RMSE\n')
    print('| cell features | model | ridge | pair_mean |')
    print('|---|---|---|---|')
    for features in FEATURES:
        m = load(f'{split}_{features}')[0]
        if m is not None:
            r = next(r for r in m['folds'] if r['fold'] == fold)
            print(f'| {features} | ' + ' | '.join(f"{r[k]['pearson']:.3f} / {r[k]['rmse']:.2f}"
                                                 for k in ('model', 'ridge', 'pair_mean')) + ' |')


def control_table():
    print('\nThe encoder against the same architecture with random weights (`random_encoder`), and with a budget\nof '
          '200 epochs: the model\'s Pearson r, mean ± sd over the 5 folds (epochs run per fold; seed 0)\n')
    print('| run | fold | by_cell_line |')
    print('|---|---|---|')
    for label, suffix in (('pretrained encoder', 'encoder'), ('random encoder', 'random_encoder'),
                          ('pretrained encoder, max_epochs=200', 'encoder_max_epochs200')):
        cells = []
        for split in ('fold', 'by_cell_line'):
            m = load(f'{split}_{suffix}')[0]
            cells.append(cell(m['model']['pearson']) + f" (epochs {'/'.join(str(r['epochs']) for r in m['folds'])})"
                         if m else 'not run')
        print(f'| {label} | ' + ' | '.join(cells) + ' |')


for split in ('fold', 'by_cell_line', 'cl_fold'):
    split_table(split)
one_fold_table('cl_fold', 1, 'its 7 held-out cell lines')
control_table()
for split in ('fold', 'by_cell_line'):
    seeds_table(split)
