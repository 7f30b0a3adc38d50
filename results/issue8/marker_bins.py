"""How saturated the Baron markers are: the share of cells with each marker in scBERT's top expression bin (bin 5 =
at least 2^5 - 1 = 31 counts per 10k, log2), in its own type and in the other cells.

    python results/issue8/marker_bins.py > results/issue8/marker_bins.txt
(after prepare_data.py ... --name=baron1k)"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from data import Dataset, expression_to_bins  # noqa: E402

MARKERS = {'Ins1': 'beta', 'Gcg': 'alpha', 'Sst': 'delta', 'Ppy': 'gamma', 'Krt19': 'ductal', 'Pecam1': 'endothelial'}
data = Dataset('data/baron1k')
values = data.dense(np.arange(len(data.labels)))
bins = expression_to_bins(values, data.log_base, 5)
print('marker  type         top bin in its type   top bin in the other cells')
for gene, cell_type in MARKERS.items():
    if gene not in data.vocab:
        print(f'{gene:7s} {cell_type:12s} not in the 1,000-gene panel')
        continue
    top = bins[:, data.vocab.index(gene)] == 5
    own = data.labels == data.label_names.index(cell_type)
    print(f'{gene:7s} {cell_type:12s} {top[own].mean():20.0%}   {top[~own].mean():26.0%}')
