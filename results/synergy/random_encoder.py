"""A control for the encoder's embedding: the same architecture and vocabulary as a checkpoint, with random
(untrained) weights, saved as a checkpoint synergy.py reads:
    PYTHONPATH=. python results/synergy/random_encoder.py ../main/out-pretrain-human/best.pt /tmp/random_encoder.pt"""
import dataclasses
import sys

import torch

from data import load_checkpoint
from model import ModelConfig, ScBERT

source, target = sys.argv[1], sys.argv[2]
checkpoint = load_checkpoint(source)
known = {f.name for f in dataclasses.fields(ModelConfig)}
args = {k: v for k, v in checkpoint['model_args'].items() if k in known}
torch.manual_seed(0)
model = ScBERT(ModelConfig(**args))          # a fresh initialisation, as training starts from (seed 0)
torch.save({'model': model.state_dict(), 'model_args': args, 'vocab': checkpoint['vocab'], 'label_names': [],
            'log_base': checkpoint['log_base']}, target)
print(f'{target}: {type(model).__name__} with random weights, {len(checkpoint["vocab"])} genes')
