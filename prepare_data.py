"""
Prepare .h5ad files for nanoscBERT: one prepared dataset directory out (data/<name>/ or --out_dir).

Reads the counts (layer='auto' finds counts in X, .raw or layers['counts'], else takes log-normalized values as they
are, assumed ln(1+x) as scanpy writes them), drops cells with fewer than min_genes expressed genes, normalizes each
cell to 1e4 counts, takes log1p in base log_base, aligns the genes to the vocab, and writes data.h5 (CSR expression,
labels, stratified folds, cell ids, batch), vocab.txt and meta.json. With --genome and/or --gene_sets it also
writes annotation.h5: each gene's chromosome, start and end, and the gene sets (pathways) that hold it; --annotate=<dir>
(re)writes only that, in a dataset prepared before, without reading any .h5ad. Bad input stops with a one-line error
and leaves no output behind.

    python prepare_data.py                                   # the embedded PBMC data -> data/pbmc68k
    python prepare_data.py --input=baron.h5ad --name=baron --label_key=cell_type --batch_key=donor
    python prepare_data.py --input=baron.h5ad --name=baron2k --label_key=cell_type --n_top_genes=2000   # faster model
    python prepare_data.py --input=a.h5ad,b.h5ad --name=corpus --label_key= --vocab=panel.txt   # pretraining data
    python prepare_data.py --annotate=data/baron --genome=mouse_genes.csv.gz --gene_sets=hallmark.gmt,reactome.gmt
"""
import json
import os

import h5py
import numpy as np

from data import (UserError, annotate_genes, atomic_write, file_sha256, process_h5ad, read_gene_list, read_gene_sets,
                  read_genome_table, take_rows, write_annotation)

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
max_set_genes = 500  # ... and at most this many (near-universal ones, e.g. Reactome's Metabolism, say little about a gene)
annotate = ''  # a prepared dataset directory: only (re)write its annotation from --genome/--gene_sets, read no .h5ad
_default_input = input

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

# gene annotations: the gene table and GMT files are read first, so that a bad one stops the run before any .h5ad
gene_set_paths = [p.strip() for p in (gene_sets or '').split(',') if p.strip()]
if not 1 <= min_set_genes <= max_set_genes:
    raise UserError(f"gene sets are kept with min_set_genes..max_set_genes vocab genes, got {min_set_genes}.."
                    f"{max_set_genes} (set --min_set_genes=3 --max_set_genes=500)")
if annotate and not (genome or gene_set_paths):
    raise UserError(f"--annotate={annotate} needs --genome=<gene table .csv[.gz]> and/or --gene_sets=<a.gmt,b.gmt>")
if annotate and input != _default_input:
    raise UserError(f"--annotate={annotate} annotates a prepared dataset and reads no .h5ad; drop --input={input} "
                    f"(or drop --annotate to prepare a new dataset)")
dataset_files = [os.path.join(annotate, f) for f in ('meta.json', 'data.h5', 'vocab.txt')]
if annotate and not all(os.path.isfile(f) for f in dataset_files):
    raise UserError(f"--annotate={annotate} is not a prepared dataset (needs meta.json, data.h5, vocab.txt); set "
                    f"--annotate=<a directory written by prepare_data.py>")
genome_table = read_genome_table(genome) if genome else None
pathway_sets, sets_per_file = read_gene_sets(gene_set_paths) if gene_set_paths else ([], [])


def annotation_of(genes):
    """-> (annotation.h5's arrays, meta.json's 'annotation' entry) of vocab genes; prints the coverage."""
    annotation, coverage = annotate_genes(genes, genome_table, pathway_sets, min_set_genes, max_set_genes)
    entry = {'genome': {'path': genome, 'sha256': file_sha256(genome), 'n_rows': len(genome_table.gene_id)}
             if genome else None,  # None: no gene table given, every gene's chromosome is unknown
             'gene_sets': [{'path': p, 'sha256': file_sha256(p), 'n_sets': n}
                           for p, n in zip(gene_set_paths, sets_per_file)],  # []: no GMT file given, no pathways
             'min_set_genes': min_set_genes, 'max_set_genes': max_set_genes, **coverage}
    c = coverage
    print(f"genome: {c['n_genes'] - c['unknown']} / {c['n_genes']} genes located on {c['n_chrom']} chromosomes (by id "
          f"{c['by_id']}, by symbol {c['by_symbol']}, case-insensitive {c['case_insensitive']}; unknown {c['unknown']})"
          if genome else "genome: no --genome given: every gene's location is unknown")
    print(f"pathways: {c['sets_kept']} of {c['sets_read']} gene sets kept ({min_set_genes}..{max_set_genes} vocab "
          f"genes); {c['genes_in_a_set']} / {c['n_genes']} genes in a kept set, {c['mean_sets_per_gene']:.1f} sets per "
          f"such gene" if gene_set_paths else "pathways: no --gene_sets given: no gene is in a set")
    return annotation, entry


if annotate:  # only the annotation of a prepared dataset: annotation.h5 and meta.json, each written then renamed
    try:
        with open(dataset_files[0]) as fh:
            meta = json.load(fh)
        with open(dataset_files[2]) as fh:
            genes = [line.strip() for line in fh.read().splitlines()]  # as data.read_gene_list reads it
        if not isinstance(meta, dict) or len(genes) != meta['n_genes']:
            raise ValueError(f"{len(genes)} genes in vocab.txt, meta.json says {meta['n_genes']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{annotate} is corrupt ({type(e).__name__}: {e}); prepare it again with python "
                        f"prepare_data.py --input=<file.h5ad> --out_dir={annotate}") from None
    annotation, meta['annotation'] = annotation_of(genes)
    # meta.json is renamed last: it never describes an annotation.h5 that is not there yet
    with atomic_write(dataset_files[0]) as tmp_meta, atomic_write(os.path.join(annotate, 'annotation.h5')) as tmp_h5:
        write_annotation(tmp_h5, annotation)
        with open(tmp_meta, 'w') as fh:
            json.dump(meta, fh, indent=1)
    print(f"wrote {os.path.join(annotate, 'annotation.h5')} and the annotation entry of {dataset_files[0]}")
    raise SystemExit(0)

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
            source_info.append({'path': s.path, 'sha256': file_sha256(s.path), 'matrix': s.matrix, 'kind': s.kind,
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
    if genome or gene_set_paths:
        annotation, meta['annotation'] = annotation_of(genes)
        write_annotation(os.path.join(tmp, 'annotation.h5'), annotation)
    with open(os.path.join(tmp, 'meta.json'), 'w') as fh:
        json.dump(meta, fh, indent=1)

n_missing = int((labels < 0).sum()) if label_key else 0
print(f"wrote {out}: {n_cells} cells x {len(genes)} genes, {nnz} non-zeros, log base {log_base:g}; "
      + (f"{len(label_names)} labels" if label_key else "no labels")
      + (f" ({n_missing} cells with a missing label: fold -1)" if n_missing else "")
      + (f", {len(batch_names)} batches" if batch_key else "") + f", {n_folds} folds")
