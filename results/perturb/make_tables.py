"""The tables of results/README.md ("Perturbation effects"), from the runs' metrics.json files (run from the repo root):

    python results/perturb/make_tables.py > results/perturb/tables.md
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ('model', 'no_change', 'mean_shift', 'linear')
METRICS = ('pearson_delta_top20', 'pearson_delta_all', 'r2_top100', 'r2_all', 'mse_top20')


def load(name):
    path = os.path.join(HERE, name, 'metrics.json')
    return json.load(open(path)) if os.path.isfile(path) else None


def mean_table(m, title):
    print(f"\n#### {title}: mean ± sd over {m['n_groups']} held-out groups ({m['seconds'] / 60:.1f} min)\n")
    print('| method | ' + ' | '.join(METRICS) + ' |')
    print('|---|' + '---:|' * len(METRICS))
    for method in METHODS:
        cells = [f"{m['mean'][method][k]:.3f} ± {m['sd'][method][k]:.3f}" for k in METRICS]
        print(f'| {method} | ' + ' | '.join(cells) + ' |')
    beats = ', '.join(f"{k} {v}/{m['n_groups']}" for k, v in m['model_beats_mean_shift'].items())
    print(f'\nThe model beats mean_shift on: {beats} groups.')


def group_table(m, metrics=('pearson_delta_top20', 'r2_top100'), methods=('model', 'mean_shift', 'linear')):
    print(f"\n{' and '.join(metrics)} per held-out group, {', '.join(methods)} (no_change: its Pearson of a zero "
          f"shift is 0)")
    short = {'pearson_delta_top20': 'Pearson Δ top 20', 'r2_top100': 'R² top 100'}
    print('\n| held out | cells (perturbed / control) | ' + ' | '.join(f'{short.get(k, k)}: {method}' for k in metrics
                                                             for method in methods) + ' |')
    print('|---|---:|' + '---:|' * len(metrics) * len(methods))
    for g, r in m['groups'].items():
        cells = [f"{r[method][k]:.3f}" for k in metrics for method in methods]
        print(f"| {g} | {r['n_perturbed']} / {r['n_control']} | " + ' | '.join(cells) + ' |')


def target_table(m):
    print('\n| knockout | true shift of the target | model | mean_shift | linear | model predicts the drop |')
    print('|---|---:|---:|---:|---:|---|')
    for g, r in m['groups'].items():
        if 'target_shift' in r:
            t = r['target_shift']
            print(f"| {g} | {t['true']:.3f} | {t['model']:.3f} | {t['mean_shift']:.3f} | {t['linear']:.3f} | "
                  f"{'yes' if t['model'] < 0 else 'no'} |")


RUNS = (('kang', 'Kang, each cell type held out'), ('papalexi', 'Papalexi, knockouts held out (5 folds)'),
        ('papalexi_unseen_zero', 'Papalexi, a held-out knockout given a zero learned row (--unseen_perturbation=zero)'),
        ('papalexi_pathway', 'Papalexi, pathway_enc with Hallmark + Reactome gene sets'),
        ('papalexi_pretrained', 'Papalexi, the pretrained encoder (4 blocks, 4 experts)'),
        ('papalexi_scratch', 'Papalexi, the same encoder from scratch'),
        ('kang_pretrained', 'Kang, the pretrained encoder (4 blocks, 4 experts)'),
        ('kang_scratch', 'Kang, the same encoder from scratch'))


def brief(names):
    """One line per run: the mean Pearson of the shift on the top 20 DE genes and R² on the top 100, model against
    mean_shift, and the wall time."""
    print('\n| run | Pearson Δ top 20: model | mean_shift | linear | R² top 100: model | mean_shift | model beats '
          'mean_shift (Pearson Δ top 20) | measured targets whose drop the model predicts | minutes |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for name, title in RUNS:
        m = load(name)
        if m is None or name not in names:
            continue
        p, r = ({method: m['mean'][method][k] for method in METHODS} for k in ('pearson_delta_top20', 'r2_top100'))
        targets = [g['target_shift']['model'] < 0 for g in m['groups'].values() if 'target_shift' in g]
        drops = f'{sum(targets)} / {len(targets)}' if targets else ''
        print(f"| {title} | {p['model']:.3f} | {p['mean_shift']:.3f} | {p['linear']:.3f} | {r['model']:.3f} "
              f"| {r['mean_shift']:.3f} | {m['model_beats_mean_shift']['pearson_delta_top20']} / {m['n_groups']} "
              f"| {drops} | {m['seconds'] / 60:.1f} |")


brief([name for name, _ in RUNS])
for name, title in RUNS:
    m = load(name)
    if m is None:
        continue
    mean_table(m, title)
    group_table(m)
    if m['task'] == 'gene':
        target_table(m)
