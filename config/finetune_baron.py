# Baron et al. 2016 mouse pancreatic islets (1,886 cells, 13 types): 5-fold cross-validation of a small scBERT,
# printed beside logistic regression on the same folds and genes. Prepare the data first (the 1,000 most variable
# genes, so that five folds fit in about half an hour on 2 CPU cores):
#   python prepare_data.py --input=../shared/data/baron_mouse_pancreas.h5ad --name=baron1k \
#       --label_key=cell_type --batch_key=donor --n_top_genes=1000
dataset = 'data/baron1k'
out_dir = 'out-baron'
fold = 'all'
eval_interval = 100
