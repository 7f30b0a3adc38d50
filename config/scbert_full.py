# The original scBERT's architecture and fine-tuning recipe (Yang et al. 2022; finetune.py of the release):
# dim 200, depth 6, 10 heads of 64, FAVOR+ with 266 features, the per-gene classifier head, Adam at 1e-4.
# With a 16,906-gene panel this is the 8.39M-parameter model of the paper. On a CPU it is slow: see bench numbers.
n_embd = 200
n_layer = 6
n_head = 10
dim_head = 64
head = 'scbert'
optimizer = 'adam'
learning_rate = 1e-4
weight_decay = 0.0
batch_size = 3
grad_accum = 20
