# scBERT 2.0, the flagship: an "8x10M" sparse mixture-of-experts encoder of the expressed genes, pretrained by masked
# expression modelling (MLM over bins + masked regression of the value) on a corpus made by prepare_data.py:
#   python prepare_data.py --input=a.h5ad,b.h5ad,... --name=corpus --label_key=      # the union of their genes
#   torchrun --nproc_per_node=8 train.py config/scbert2.py                             # one node, 8 GPUs
# About 10M parameters active per token (8 layers x (attention 0.16M + 2 of 8 SwiGLU experts 1.06M)), 35M in all
# without the gene embedding; train.py prints both counts.
dataset = 'data/corpus'
out_dir = 'out-scbert2'
mode = 'pretrain'
input_genes = 'expressed'      # CLS + (gene, value) tokens of the expressed genes only (xTrimoGene, scGPT)
value_emb = 'continuous'       # xTrimoGene's auto-discretization
n_bins = 32                    # learned bin embeddings of the value; MLM targets are scBERT's log2 bins (up to 32)
max_genes = 2048               # expressed genes per cell, a random subset when a cell has more
n_zero_genes = 128             # plus unexpressed genes, so that the model also learns what zero means
masking = 'random'             # mask those zeros too: the model must learn what zero means ('nonzero' never asks)
bucket = True                  # batches of cells of one length: most need no padding mask, so SDPA can use flash
attention = 'sdpa'             # F.scaled_dot_product_attention: flash kernels on GPU when a batch needs no padding mask
n_embd = 256
n_layer = 8
n_head = 8
n_kv_head = 2                  # grouped-query attention
dim_head = 32
norm = 'rmsnorm'
mlp = 'swiglu'
bias = False
n_expert = 8                   # 8 experts, top-2 (Mixtral)
n_expert_active = 2
aux_loss_weight = 0.01         # Switch's load balancing
z_loss_weight = 0.001          # ST-MoE's router z-loss
head = 'cls'                   # fine-tuning pools the CLS token
mlm_weight = 1.0
regression_weight = 1.0
mask_prob = 0.15
batch_size = 64                # per GPU: 8 GPUs x 64 = 512 cells per step
max_iters = 20000
epochs = 0                     # the budget is max_iters steps, whatever the corpus's size
warmup_iters = 1000
eval_interval = 1000
log_interval = 50
optimizer = 'adafactor'        # factored second moments, no momentum; lr is relative to the parameters' scale
learning_rate = 1e-2           # torch's Adafactor default
min_lr = 1e-4
weight_decay = 0.0
grad_clip = 1.0
dtype = 'bfloat16'             # autocast on CUDA (on CPU fp32 is the default: set --dtype=float32)
compile = True
num_workers = 4                # batches built in background processes, pinned, copied non-blocking
preload = True                 # the corpus in memory when it fits, streamed from disk otherwise
