"""Ranks of the known Baron markers among each type's genes, from predict.py --importance=<dir> --importance_top=0.

    python results/issue8/marker_ranks.py <label>=<importance dir>[,<another dir of the same model>] [...]

Rank 1 = the gene with the highest mean score over the cells predicted as that type, among all the model's genes."""
import csv
import os
import sys

MARKERS = {'Ins1': 'beta', 'Gcg': 'alpha', 'Sst': 'delta', 'Ppy': 'gamma', 'Krt19': 'ductal', 'Pecam1': 'endothelial'}
METHODS = ('attention', 'gradient_x_input', 'integrated_gradients')

rows = []
for arg in sys.argv[1:]:
    label, folders = arg.split('=', 1)
    ranks, n_genes, n_cells = {}, {}, {}
    for folder in folders.split(','):
        for r in csv.DictReader(open(os.path.join(folder, 'top_genes.csv'))):
            ranks[r['cell_type'], r['method'], r['gene']] = int(r['rank'])
            n_genes[r['cell_type'], r['method']] = max(n_genes.get((r['cell_type'], r['method']), 0), int(r['rank']))
            n_cells[r['cell_type']] = int(r['n_cells'])
    for gene, cell_type in MARKERS.items():
        cells = [ranks.get((cell_type, m, gene)) for m in METHODS]
        if cell_type not in n_cells:
            text = ['no cell predicted as this type'] * len(METHODS)
        else:
            text = [('' if (cell_type, m) not in n_genes else f'{r} / {n_genes[cell_type, m]}' if r else
                     'not among its genes') for r, m in zip(cells, METHODS)]
        rows.append((label, gene, cell_type, n_cells.get(cell_type, 0), *text))

print('| model | marker | type | cells | attention rank | gradient × input rank | integrated gradients rank |')
print('|---|---|---|---:|---:|---:|---:|')
for row in rows:
    print('| ' + ' | '.join(map(str, row)) + ' |')
