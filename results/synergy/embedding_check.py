"""How much of the cell lines' expression the encoder's embedding keeps (results/README.md, synergy):
    PYTHONPATH=. python results/synergy/embedding_check.py > results/synergy/embedding_check.txt
    PYTHONPATH=. python results/synergy/embedding_check.py /tmp/random_encoder.pt \
        > results/synergy/embedding_check_random_encoder.txt        # made by random_encoder.py
Runs synergy.py's feature step (cell_features=both, one fold, one epoch) in this process and compares the 35 lines'
expression (2,401 genes) with their embeddings (64 numbers), each standardised per feature."""
import contextlib
import io
import runpy
import sys

import numpy as np

encoder = sys.argv[1] if len(sys.argv) > 1 else '../main/out-pretrain-human/best.pt'
sys.argv = ['synergy.py', '--cell_features=both', f'--encoder_ckpt={encoder}', '--fold=0', '--max_epochs=1',
            '--out_dir=/tmp/synergy-embedding-check']
with contextlib.redirect_stdout(io.StringIO()):
    g = runpy.run_path('synergy.py', run_name='__main__')
features, lines = g['features'], g['data']['cell_lines']
expression, embedding = features[:, :2401], features[:, 2401:]


def distances(x):
    z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return d


upper = np.triu_indices(len(lines), 1)
d_expr, d_emb = distances(expression), distances(embedding)
print(f'correlation of the lines\' pairwise distances, expression vs embedding: '
      f'{np.corrcoef(d_expr[upper], d_emb[upper])[0, 1]:.3f}')
n_expressed = (expression > 0).sum(1)
z = (embedding - embedding.mean(0)) / embedding.std(0)
pc1 = np.linalg.svd(z - z.mean(0), full_matrices=False)[0][:, 0]
r_length = abs(np.corrcoef(pc1, n_expressed)[0, 1])
print(f'|correlation| of the embedding\'s first principal component with the number of genes above average '
      f'(the encoder\'s input length, {n_expressed.min()}-{n_expressed.max()}): {r_length:.3f}')
same = np.mean(d_expr.argmin(1) == d_emb.argmin(1))
print(f'nearest neighbour the same by expression and by embedding: {same:.3f} of the lines')
print('line: nearest by expression | nearest by embedding')
for i in range(len(lines)):
    print(f'  {lines[i]}: {lines[d_expr[i].argmin()]} | {lines[d_emb[i].argmin()]}')
