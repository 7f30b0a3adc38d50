"""The masking cost in README "Pretraining": CPU time (one thread) to mask one batch of 32 Baron cells, up to 512
expressed genes each, per strategy (random and dynamic draw as nonzero does). Needs data/baron annotated
(README "Data").
    python results/issue7/masking_cost.py"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from data import Dataset, cell_seeds, expressed_batch, mask_expressed, masking_units  # noqa: E402
from model import ModelConfig  # noqa: E402

torch.set_num_threads(1)
data = Dataset('data/baron')
cfg = ModelConfig(n_genes=data.n_genes, input_genes='expressed', attention='sdpa', value_emb='continuous', n_bins=10,
                  max_genes=512)
indptr, indices, values = data.rows(np.arange(32))
x = expressed_batch(indptr, indices, values, cell_seeds(indptr, indices), cfg, data.log_base)
for masking in ('nonzero', 'pathway', 'multiscale'):
    units = masking_units(data, masking)
    t = time.perf_counter()
    for r in range(10):
        mask_expressed(x, range(r, r + 32), cfg.mask_id, 0.15, 0.9, masking, units)
    print(f'{masking}: {(time.perf_counter() - t) / 10 * 1e3:.1f} ms per batch')
