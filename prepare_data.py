"""
Prepare .h5ad files for nanoscBERT: one prepared dataset directory out (data/<name>/ or --out_dir).

Reads the counts (layer='auto' finds counts in X, .raw or layers['counts'], else takes log-normalized values as they
are, assumed ln(1+x) as scanpy writes them), drops cells with fewer than min_genes expressed genes, normalizes each
cell to 1e4 counts, takes log1p in base log_base, aligns the genes to the vocab, and writes data.h5 (CSR expression,
labels, stratified folds, cell ids, batch), vocab.txt and meta.json. With --genome and/or --gene_sets it also
writes annotation.h5: each gene's chromosome, start and end, and the gene sets (pathways) that hold it; --annotate=<dir>
(re)writes only that, in a dataset prepared before, without reading any .h5ad. Bad input stops with a one-line error
and leaves no output behind (so do fewer labelled cells than folds). An empty label is missing, as NaN is (fold -1);
duplicated gene symbols are summed (log-normalized input: the first kept) and counted in the report; a single cell
type, or duplicated cell ids, are one 'warning:' line each.

    python prepare_data.py                                   # the embedded PBMC data -> data/pbmc68k
    python prepare_data.py --input=baron.h5ad --name=baron --label_key=cell_type --batch_key=donor
    python prepare_data.py --input=baron.h5ad --name=baron2k --label_key=cell_type --n_top_genes=2000   # faster model
    python prepare_data.py --input=a.h5ad,b.h5ad --name=corpus --label_key= --vocab=panel.txt   # pretraining data
    python prepare_data.py --annotate=data/baron --genome=mouse_genes.csv.gz --gene_sets=hallmark.gmt,reactome.gmt
"""
import os

from data import UserError, annotate_dataset, comma_list, prepare_dataset

input = 'data/pbmc68k_reduced.h5ad'  # one or more .h5ad files, comma-separated
name = 'pbmc68k'  # output goes to data/<name>/
out_dir = ''  # explicit output directory (overrides data/<name>)
label_key = 'bulk_labels'  # obs column with cell types ('' = none: pretraining data)
batch_key = ''  # obs column with batch/donor ('' = none)
layer = 'auto'  # auto | X | raw | <layer name>: which matrix holds the counts
gene_key = ''  # var column holding gene symbols ('' = the var index)
vocab = ''  # gene list file, one symbol per line ('' = the genes of the data)
n_top_genes = 0  # keep only the n most variable genes as the vocab (0 = all; ignored when vocab is given)
min_genes = 200  # QC: drop cells with fewer expressed genes
n_folds = 5  # stratified cross-validation folds
log_base = 2.0  # base of log1p after normalize-to-1e4 (scBERT used log2)
seed = 0  # seed of the fold assignment
chunk = 4096  # cells read, processed and written at a time: memory stays bounded whatever the number of cells
genome = ''  # gene table (.csv or .csv.gz: gene_id,gene_name,biotype,chromosome,start,end) -> annotation.h5 coordinates
gene_sets = ''  # GMT files, comma-separated -> annotation.h5 pathways
min_set_genes = 3  # keep gene sets with at least this many vocab genes (1 or 2 genes say nothing about a set)
max_set_genes = 500  # ... and at most this many (near-universal ones, e.g. Reactome's Metabolism, say little
                     # about a gene)
annotate = ''  # a prepared dataset directory: only (re)write its annotation from --genome/--gene_sets, read no .h5ad
_default_input = input

from configurator import configure  # noqa: E402
config = configure(globals())
# ----------------------------------------------------------------------------------------------------------------
paths = comma_list(input or '')
gene_set_paths = comma_list(gene_sets or '')
if not paths:
    raise UserError("no input file (set --input=<file.h5ad>[,<file2.h5ad>...])")
if not 2 <= n_folds <= 127:  # folds are int8; validation and test use two different folds
    raise UserError(f"n_folds must be between 2 and 127, got {n_folds} (set --n_folds=5)")
if chunk < 1:
    raise UserError(f"chunk must be >= 1, got {chunk} (set --chunk=4096)")
if n_top_genes < 0:
    raise UserError(f"n_top_genes must be >= 0, got {n_top_genes} (set --n_top_genes=0 to keep all genes)")
if not log_base > 1:
    raise UserError(f"log_base must be > 1, got {log_base} (set --log_base=2)")
if not 1 <= min_set_genes <= max_set_genes:
    raise UserError(f"gene sets are kept with min_set_genes..max_set_genes vocab genes, got {min_set_genes}.."
                    f"{max_set_genes} (set --min_set_genes=3 --max_set_genes=500)")
if annotate and not (genome or gene_set_paths):
    raise UserError(f"--annotate={annotate} needs --genome=<gene table .csv[.gz]> and/or --gene_sets=<a.gmt,b.gmt>")
if annotate and input != _default_input:
    raise UserError(f"--annotate={annotate} annotates a prepared dataset and reads no .h5ad; drop --input={input} "
                    f"(or drop --annotate to prepare a new dataset)")
if annotate and not all(os.path.isfile(os.path.join(annotate, f)) for f in ('meta.json', 'data.h5', 'vocab.txt')):
    raise UserError(f"--annotate={annotate} is not a prepared dataset (needs meta.json, data.h5, vocab.txt); set "
                    f"--annotate=<a directory written by prepare_data.py>")

# the gene table and GMT files are read first, so that a bad one stops the run before any .h5ad
if annotate:  # only the annotation of a prepared dataset: annotation.h5 and meta.json, each written then renamed
    annotate_dataset(annotate, genome, gene_set_paths, min_set_genes, max_set_genes)
else:
    prepare_dataset(paths, out_dir or os.path.join('data', name), label_key=label_key, batch_key=batch_key,
                    layer=layer, gene_key=gene_key, vocab=vocab, n_top_genes=n_top_genes, min_genes=min_genes,
                    n_folds=n_folds, log_base=log_base, seed=seed, chunk=chunk, genome=genome,
                    gene_sets=gene_set_paths, min_set_genes=min_set_genes, max_set_genes=max_set_genes,
                    settings=config)
