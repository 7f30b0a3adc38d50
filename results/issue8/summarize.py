"""The README's novelty tables from train.py --holdout=all runs (their out_dir/novelty.json, copied here).

    python results/issue8/summarize.py "Baron, scBERT 2.0"=results/issue8/novelty_baron.json ... \
        > results/issue8/novelty.md

Per run: each held-out type's AUROC per score, and the known / novel accuracy of the default score and of scBERT's
rule; then, over the held-out types, the mean AUROC and the mean known /
novel accuracy at the calibrated threshold (the validation cells' 95% quantile) of every score, and at scBERT's fixed
rule (Unassigned when the top probability < 0.5). Last: the mean over the runs, which picks predict.py's default."""
import json
import sys

SCORES = ('maxprob', 'entropy', 'energy', 'mahalanobis', 'knn')
DEFAULT = 'knn'                                  # train.py's novelty_score, chosen from these tables
runs = [(label, json.load(open(path))) for label, path in (a.split('=', 1) for a in sys.argv[1:])]

for label, run in runs:
    print(f"### {label}: AUROC of each score, per held-out type ({run['dataset']}, test fold {run['fold']})\n")
    print('| held-out type | cells | ' + ' | '.join(SCORES) + f' | {DEFAULT}: known / novel acc | '
          'scBERT rule: known / novel acc |')
    print('|---|---:|' + '---:|' * (len(SCORES) + 2))
    for t, row in run['types'].items():
        best = max(row[s]['auroc'] for s in SCORES)
        print(f"| {t} | {row['n_novel']} | " + ' | '.join(
            (f"**{row[s]['auroc']:.3f}**" if row[s]['auroc'] == best else f"{row[s]['auroc']:.3f}") for s in SCORES)
            + ''.join(f" | {row[s]['known_acc']:.3f} / {row[s]['novel_acc']:.3f}" for s in (DEFAULT, 'scbert_rule'))
            + ' |')
    print()

print('### Over the held-out types: mean AUROC, and known / novel accuracy at the threshold\n')
print('| run | rule | AUROC | known acc | novel acc |')
print('|---|---|---:|---:|---:|')
overall = {s: [] for s in (*SCORES, 'scbert_rule')}
for label, run in runs:
    for s in (*SCORES, 'scbert_rule'):
        m = run['mean'][s]
        overall[s].append(m)
        name = "scBERT's rule (top probability < 0.5)" if s == 'scbert_rule' else f'{s} > calibrated threshold'
        print(f"| {label} | {name} | {m['auroc']:.3f} | {m['known_acc']:.3f} | {m['novel_acc']:.3f} |")
print()
print('### Mean over the runs\n')
print('| rule | AUROC | known acc | novel acc |')
print('|---|---:|---:|---:|')
for s, ms in overall.items():
    name = "scBERT's rule (top probability < 0.5)" if s == 'scbert_rule' else f'{s} > calibrated threshold'
    print(f"| {name} | "
          + ' | '.join(f"{sum(m[k] for m in ms) / len(ms):.3f}" for k in ('auroc', 'known_acc', 'novel_acc'))
          + ' |')
