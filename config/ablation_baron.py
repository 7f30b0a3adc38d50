# The baseline of the ablations and sensitivity runs (README "ALBERT, DeBERTa and biology on Baron"): a dense 2-layer
# scBERT 2.0, sized so that one Baron fold trains in about two minutes (400 steps of 32 cells) on one CPU core and
# each extension can be measured on the same 5 folds. Every extension is this file plus one flag, e.g.
#   python train.py config/ablation_baron.py --share_layers=all --out_dir=out-abl/share_all
input_genes = 'expressed'      # CLS + (gene, value) tokens of the expressed genes only
value_emb = 'continuous'       # xTrimoGene's auto-discretization of the log-normalized value
n_bins = 10
max_genes = 256                # a random 256 of a cell's expressed genes in training (a fixed subset at evaluation)
attention = 'sdpa'
n_embd = 64
n_layer = 2
n_head = 4
n_kv_head = 2
dim_head = 16
norm = 'rmsnorm'
mlp = 'swiglu'
bias = False
n_expert = 0                   # dense: ALBERT's feed-forward sharing cannot share a mixture of experts
head = 'scbert'
dataset = 'data/baron1k'
fold = 'all'
batch_size = 32
max_iters = 400
epochs = 0                     # the fixed budget the ablation table was measured with
patience = 0
eval_interval = 100
learning_rate = 2e-3
warmup_iters = 20
