"""What a leave-one-type-out model calls the cells of the type it never saw (runs made before train.py recorded this
as novel_called_as in metrics.json).

    python results/issue8/novel_called_as.py out-novel-pbmc 'CD14+ Monocyte' data/pbmc68k
"""
import collections
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from data import Dataset, dataset_input  # noqa: E402
from model import ScBERT  # noqa: E402

out_dir, held_out, dataset = sys.argv[1:4]
torch.set_num_threads(1)
ckpt = torch.load(os.path.join(out_dir, 'holdout_' + re.sub(r'[^A-Za-z0-9_.+-]', '_', held_out), 'best.pt'),
                  weights_only=True)
model = ScBERT.from_checkpoint(ckpt).eval()
data = Dataset(dataset)
idx = np.flatnonzero(data.labels == data.label_names.index(held_out))
with torch.no_grad():
    called = torch.cat([model(dataset_input(data, idx[i:i + 64], model.config))[0].argmax(1)
                        for i in range(0, len(idx), 64)])
counts = collections.Counter(ckpt['label_names'][c] for c in called.tolist())
print(f"{out_dir}: the {len(idx)} '{held_out}' cells are called "
      + ', '.join(f'{t} ({n})' for t, n in counts.most_common()))
