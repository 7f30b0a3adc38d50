# scBERT 2.0, CPU-sized: fine-tunes on the embedded PBMC data or on Baron's 1,000 most variable genes in minutes.
#   python train.py config/scbert2_small.py                                   # PBMC, test fold 0
#   python train.py config/scbert2_small.py --dataset=data/baron1k --fold=all   # Baron 5-fold CV (see README)
input_genes = 'expressed'      # CLS + (gene, value) tokens of the expressed genes only
value_emb = 'continuous'       # xTrimoGene's auto-discretization of the log-normalized value
n_bins = 10                    # its learned bin embeddings (and the bins of the MLM target)
max_genes = 512                # a random 512 of a cell's expressed genes in training (a fixed subset at evaluation)
attention = 'sdpa'
n_embd = 64
n_layer = 4
n_head = 4
n_kv_head = 2                  # grouped-query attention: 2 key/value heads shared by 4 query heads
dim_head = 16
norm = 'rmsnorm'
mlp = 'swiglu'
bias = False
n_expert = 4                   # sparse MoE: 4 experts, 2 per token
n_expert_active = 2
head = 'scbert'                # scBERT's head: a number per gene, at its panel position, then an MLP over the panel
dropout = 0.0
batch_size = 32
eval_interval = 50
learning_rate = 1e-3
warmup_iters = 40
