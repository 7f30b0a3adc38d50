# Pretrain the CPU-sized scBERT 2.0 (config/scbert2_small.py) on the unlabelled cells of all the shared datasets, then
# fine-tune it on Baron in the same vocabulary (see README, "Does pretraining help?"):
#   python prepare_data.py --input=<pbmc68k>,<baron>,<celltypist> --name=corpus --label_key=
#   python train.py config/scbert2_small.py config/pretrain_corpus.py
#   python prepare_data.py --input=<baron> --name=baron_corpus --label_key=cell_type --batch_key=donor \
#       --vocab=data/corpus/vocab.txt
#   python train.py config/scbert2_small.py --dataset=data/baron_corpus --fold=all \
#       --init_from=out-pretrain-corpus/best.pt
dataset = 'data/corpus'
out_dir = 'out-pretrain-corpus'
mode = 'pretrain'
n_zero_genes = 32              # also learn what an unexpressed gene looks like
masking = 'random'             # mask the zero genes too, as the README's run did (nonzero never does)
max_iters = 600
epochs = 0                     # the budget is max_iters steps, whatever the corpus's size
eval_interval = 100
learning_rate = 2e-3
