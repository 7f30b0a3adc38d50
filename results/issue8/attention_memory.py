"""Peak memory and time of scBERT's attention sum at the original's full size (16,906 genes + 1, 200 wide, 6 layers,
10 heads of 64, random weights, one synthetic cell, fp32, one thread), against the original's (L, L) matrices.

    python results/issue8/attention_memory.py > results/issue8/attention_memory.txt

Each measurement runs in a fresh process, so its peak resident memory (ru_maxrss) is its own."""
import os
import subprocess
import sys

CHILD = r'''
import resource, sys, time, torch
from model import ModelConfig, ScBERT
torch.set_num_threads(1)
torch.manual_seed(0)
model = ScBERT(ModelConfig(n_genes=16906, n_embd=200, n_layer=6, n_head=10, dim_head=64, n_classes=5,
                           head='scbert')).eval()
x = torch.randint(0, 6, (1, 16907))
x[:, -1] = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
with torch.no_grad():
    out = model.encode(x) if sys.argv[1] == 'forward' else model.attention_received(x)
dt = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f'{dt:.1f} {before / 1024:.0f} {peak / 1024:.0f}')
'''

L = 16907
print(f'scBERT at full size: L = {L} tokens, 6 layers, 10 heads; one cell, fp32, 1 thread')
for what in ('forward', 'attention_received'):
    out = subprocess.run([sys.executable, '-c', CHILD, what], capture_output=True, text=True, check=True,
                         cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')).stdout.split()
    dt, before, peak = map(float, out)
    print(f'{what:20s} {dt:6.1f} s   peak resident memory {peak:6.0f} MB (model loaded: {before:.0f} MB)')
print(f'one (L, L) attention matrix: {L * L * 2 / 2**30:.2f} GiB in fp16 (the original builds one per head and sums '
      f'them in fp16), {L * L * 4 / 2**30:.2f} GiB in fp32')
