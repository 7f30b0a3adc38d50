"""Ranks of the known Baron markers among each type's genes, from predict.py --importance=<dir> --importance_top=0.

    python results/issue8/marker_ranks.py "<label>"=<importance dir>[,<another dir of the same model>] [...]

Rank 1 = the gene with the highest mean score over the cells predicted as that type, out of every gene of the model
(genes a type's cells never show score 0); "(< 0)" marks a negative mean score (the gene speaks against the type)."""
import csv
import os
import sys

MARKERS = {'Ins1': 'beta', 'Gcg': 'alpha', 'Sst': 'delta', 'Ppy': 'gamma', 'Krt19': 'ductal', 'Pecam1': 'endothelial'}
METHODS = ('attention', 'gradient_x_input', 'integrated_gradients')

print('| model (genes) | marker | type | cells | attention rank | gradient × input rank | integrated gradients rank |')
print('|---|---|---|---:|---:|---:|---:|')
for arg in sys.argv[1:]:
    label, folders = arg.split('=', 1)
    found, n_cells, genes = {}, {}, set()
    for folder in folders.split(','):
        for r in csv.DictReader(open(os.path.join(folder, 'top_genes.csv'))):
            found[r['cell_type'], r['method'], r['gene']] = (int(r['rank']), float(r['score']))
            n_cells[r['cell_type']] = int(r['n_cells'])
            genes.add(r['gene'])
    for gene, cell_type in MARKERS.items():
        text = []
        for method in METHODS:
            if not any(key[:2] == (cell_type, method) for key in found):
                text.append('')                          # this method did not run for this model
            elif (cell_type, method, gene) not in found:
                text.append('not in the model')
            else:
                rank, score = found[cell_type, method, gene]
                text.append(f'{rank}' + (' (< 0)' if score < 0 else ''))
        print(f'| {label} ({len(genes):,}) | {gene} | {cell_type} | {n_cells.get(cell_type, 0)} | '
              + ' | '.join(text) + ' |')
