# The human scBERT 2.0 small that perturb.py's --init_from and synergy.py's --encoder_ckpt use in results/:
# pretrained on the 559 unlabelled human cells of the CellTypist sample (all 32,786 genes), one thread.
# Output: out-pretrain-human/best.pt, vocabulary data/celltypist_all/vocab.txt; log: results/pretrain_human/pretrain.log
python prepare_data.py --input=../shared/data/celltypist_sample_unlabeled.h5ad --name=celltypist_all --label_key=
time python train.py config/scbert2_small.py config/pretrain_corpus.py --dataset=data/celltypist_all \
    --out_dir=out-pretrain-human --num_threads=1
