"""Our attention sum against the original scBERT's attn_sum_save.py on its reference cell (../shared/data/scbert_ref:
the original code run with random weights at 1,024 tokens): with as_released=True (the original's second computation
of each layer's matrix), and with the default (each layer's own input).

    python results/issue8/attention_reference.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from model import ScBERT  # noqa: E402

ref = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data', 'scbert_ref')
io = torch.load(os.path.join(ref, 'io.pt'), weights_only=True)
model = ScBERT.from_scbert(torch.load(os.path.join(ref, 'pretrain_state_dict.pt'), weights_only=True)).eval()
want = io['attn_sum_cell0'].float()
for as_released in (True, False):
    got = model.attention_received(io['tokens'][:1], as_released=as_released)[0]
    print(f'as_released={as_released}: max |ours - original| = {(got - want).abs().max():.2g} '
          f'(values {want.min():.3g} to {want.max():.3g})')
