# Masked expression modelling (scBERT's pretraining) on the unlabelled celltypist sample, 2,000 most variable genes.
#   python prepare_data.py --input=../shared/data/celltypist_sample_unlabeled.h5ad --name=celltypist --label_key= \
#       --n_top_genes=2000
# Fine-tune from it on data prepared with the same genes: --vocab=out-pretrain/vocab.txt, then
#   python train.py --dataset=... --init_from=out-pretrain/ckpt.pt
mode = 'pretrain'
dataset = 'data/celltypist'
out_dir = 'out-pretrain'
max_iters = 600
epochs = 0                     # the budget is max_iters steps, whatever the corpus's size
eval_interval = 100
