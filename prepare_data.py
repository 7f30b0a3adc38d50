"""
Prepare .h5ad files for nanoscBERT: one prepared dataset directory out (data/<name>/ or --out_dir).

Reads the counts (layer='auto' finds counts in X, .raw or layers['counts'], else takes log-normalized values as they
are, assumed ln(1+x) as scanpy writes them), drops cells with fewer than min_genes expressed genes, normalizes each
cell to 1e4 counts, takes log1p in base log_base, aligns the genes to the vocab, and writes data.h5 (CSR expression,
labels, stratified folds, cell ids, batch), vocab.txt and meta.json. Bad input stops with a one-line error and
leaves no output behind.

    python prepare_data.py                                   # the embedded PBMC data -> data/pbmc68k
    python prepare_data.py --input=baron.h5ad --name=baron --label_key=cell_type --batch_key=donor
    python prepare_data.py --input=baron.h5ad --name=baron2k --label_key=cell_type --n_top_genes=2000   # faster model
    python prepare_data.py --input=a.h5ad,b.h5ad --name=corpus --label_key= --vocab=panel.txt   # pretraining data
"""
import hashlib
import json
import os

import h5py
import numpy as np

from data import UserError, atomic_write, process_h5ad, read_gene_list, take_rows

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

from configurator import configure
config = configure(globals())
# ----------------------------------------------------------------------------------------------------------------
paths = [p.strip() for p in (input or '').split(',') if p.strip()]
label_key, batch_key, gene_key, vocab = (v if v not in (None, 'None') else ''  # '' and None both mean "none"
                                         for v in (label_key, batch_key, gene_key, vocab))
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
out = out_dir or os.path.join('data', name)

# the vocab: a gene list file, or the union of the inputs' genes in first-seen order (optionally only the
# n_top_genes most variable: a scBERT forward pass costs time linear in the number of genes)
if vocab:
    genes = read_gene_list(vocab)
    if n_top_genes:
        print(f"n_top_genes={n_top_genes} ignored: the vocab is given by --vocab={vocab}")
else:
    genes = list(dict.fromkeys(g for p in paths for g in process_h5ad(p, layer, gene_key, progress=False).vocab))
    if n_top_genes and n_top_genes >= len(genes):
        print(f"n_top_genes={n_top_genes} >= {len(genes)} genes: keeping all of them")
    elif n_top_genes:
        # one extra streaming pass: per vocab gene, the sum and sum of squares (float64) of the log-normalized values
        # over the cells that pass QC; zeros add nothing to either sum but count in n (the variance includes them)
        total, total_sq, n = np.zeros(len(genes)), np.zeros(len(genes)), 0
        for p in paths:
            for c in process_h5ad(p, layer, gene_key, log_base, genes, min_genes, chunk=chunk):
                passed = np.repeat(c.passed_qc, np.diff(c.indptr))  # bool [nnz]: the entry's cell passes QC
                vals = c.values[passed].astype(np.float64)
                total += np.bincount(c.indices[passed], weights=vals, minlength=len(genes))
                total_sq += np.bincount(c.indices[passed], weights=vals * vals, minlength=len(genes))
                n += int(c.passed_qc.sum())
        mean = total / max(n, 1)  # n == 0: no cells after QC, reported by the main pass below
        variance = total_sq / max(n, 1) - mean * mean  # population variance, as np.var
        # highest variance first; the stable sort breaks ties by vocab order; then back to vocab order
        top = np.sort(np.argsort(-variance, kind='stable')[:n_top_genes])
        print(f"kept the {n_top_genes} most variable of {len(genes)} genes (variance of log-normalized expression "
              f"over {n} cells passing QC)")
        genes = [genes[i] for i in top]
sources = [process_h5ad(p, layer, gene_key, log_base, genes, min_genes, label_key, batch_key, chunk=chunk) for p in paths]
for s in sources:
    print(s.summary())


def codes(columns, kept):
    """Per-file object arrays of str/None (or None: no such column) and kept masks -> (int64 codes of the kept
    cells, -1 = missing; names sorted for determinism)."""
    cells = np.concatenate([c[k] if c is not None else np.full(k.sum(), None, object) for c, k in zip(columns, kept)])
    names = sorted({v for v in cells.tolist() if v is not None})
    lookup = {v: i for i, v in enumerate(names)}
    return np.array([lookup.get(v, -1) for v in cells.tolist()], dtype=np.int64), names


# stream every file's cells in chunks into resizable datasets; nothing is kept in memory but per-cell arrays
with atomic_write(out) as tmp:
    os.makedirs(tmp)
    with h5py.File(os.path.join(tmp, 'data.h5'), 'w') as f:
        indices = f.create_dataset('indices', (0,), np.int32, maxshape=(None,), chunks=(1 << 18,))
        values = f.create_dataset('values', (0,), np.float32, maxshape=(None,), chunks=(1 << 18,))
        row_nnz, kept, source_info = [], [], []  # per kept cell: nnz; per file: kept mask [n_cells]
        for s in sources:
            passed = np.zeros(s.n_cells, dtype=bool)
            for c in s:
                keep = np.flatnonzero(c.passed_qc)
                passed[c.row_start + keep] = True
                ptr, ind, val = take_rows(c.indptr, c.indices, c.values, keep)
                nnz = len(indices)
                indices.resize((nnz + len(ind),))
                values.resize((nnz + len(val),))
                indices[nnz:], values[nnz:] = ind, val
                row_nnz.append(np.diff(ptr))
            kept.append(passed)
            digest = hashlib.sha256()
            with open(s.path, 'rb') as fh:
                for block in iter(lambda: fh.read(1 << 20), b''):
                    digest.update(block)
            source_info.append({'path': s.path, 'sha256': digest.hexdigest(), 'matrix': s.matrix, 'kind': s.kind,
                                'n_cells_in': s.n_cells, 'n_cells_kept': int(passed.sum()), 'n_genes_in': len(s.genes)})
            print(f"{s.path}: QC kept {passed.sum()} / {s.n_cells} cells ({s.n_cells - passed.sum()} with fewer "
                  f"than {min_genes} expressed genes dropped)")
        n_cells = int(sum(k.sum() for k in kept))
        if n_cells == 0:
            raise UserError(f"no cells left after QC: every cell has fewer than min_genes={min_genes} expressed genes "
                            f"(lower --min_genes, or check --layer)")

        labels, label_names = codes([s.labels for s in sources], kept)
        batch, batch_names = codes([s.batch for s in sources], kept)

        # folds: shuffle, group by class (a stable sort keeps the shuffle within a class), then deal 0, 1, .., k-1
        # in that order: each class, and the total, is spread over the folds as evenly as possible (sizes differ <= 1)
        folds = np.full(n_cells, -1, dtype=np.int8)
        eligible = np.flatnonzero(labels >= 0) if label_key else np.arange(n_cells)  # unlabeled data: random folds
        order = eligible[np.random.default_rng(seed).permutation(len(eligible))]
        order = order[np.argsort(labels[order], kind='stable')]
        folds[order] = np.arange(len(order)) % n_folds

        f['indptr'] = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))]).astype(np.int64)
        f['labels'], f['folds'], f['batch'] = labels, folds, batch
        f.create_dataset('cell_ids', data=np.concatenate([s.cell_ids[k] for s, k in zip(sources, kept)]).astype(object),
                         dtype=h5py.string_dtype('utf-8'))
        nnz = len(indices)

    with open(os.path.join(tmp, 'vocab.txt'), 'w') as fh:
        fh.write(''.join(f'{g}\n' for g in genes))
    data_genes = set(g for s in sources for g in s.genes.tolist() if g)
    meta = {'format': 1, 'n_cells': n_cells, 'n_genes': len(genes), 'nnz': nnz, 'log_base': log_base,
            'label_key': label_key, 'label_names': label_names, 'batch_key': batch_key, 'batch_names': batch_names,
            'n_folds': n_folds, 'seed': seed, 'source': source_info, 'settings': config,
            'overlap': {'matched': len(data_genes & set(genes)), 'vocab': len(genes), 'data': len(data_genes)},
            'n_cells_dropped_qc': int(sum(s.n_cells for s in sources)) - n_cells, 'min_genes': min_genes}
    with open(os.path.join(tmp, 'meta.json'), 'w') as fh:
        json.dump(meta, fh, indent=1)

n_missing = int((labels < 0).sum()) if label_key else 0
print(f"wrote {out}: {n_cells} cells x {len(genes)} genes, {nnz} non-zeros, log base {log_base:g}; "
      + (f"{len(label_names)} labels" if label_key else "no labels")
      + (f" ({n_missing} cells with a missing label: fold -1)" if n_missing else "")
      + (f", {len(batch_names)} batches" if batch_key else "") + f", {n_folds} folds")
