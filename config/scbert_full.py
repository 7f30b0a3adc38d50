# The original scBERT's architecture (Yang et al. 2022): dim 200, depth 6, 10 heads of 64, FAVOR+ with 266 features,
# the per-gene classifier head. On a 16,906-gene panel this is the paper's 8.39M-parameter encoder.
# Optimisation as the release's finetune.py defaults: Adam at 1e-4, 3 cells x 60 accumulation steps; our
# warm-up + linear decay stands in for its cosine schedule with warm restarts.
n_embd = 200
n_layer = 6
n_head = 10
dim_head = 64
head = 'scbert'
optimizer = 'adam'
learning_rate = 1e-4
weight_decay = 0.0
batch_size = 3
grad_accum = 60
