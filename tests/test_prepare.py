"""prepare_data.py end to end (run as the user runs it): round trip of values, labels and gene order against numpy,
QC, stratified seeded folds, vocab files, several inputs, the legacy PBMC file, and one test per bad input."""
import hashlib
import math
import re
import shutil

import h5py
import numpy as np
import pytest

import data
from conftest import FIXTURES, SHARED, dense, lognorm_reference, run_script, user_error, write_h5ad


def prepare(*args, check=True):
    return run_script('prepare_data.py', *args, check=check)


def n_expressed(counts):
    return (counts > 0).sum(1)


@pytest.fixture(scope='module')
def counts():
    with h5py.File(FIXTURES / 'counts_dense.h5ad') as f:
        return f['X'][:]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, counts):
    """counts_csr prepared with a QC threshold that drops about half of the cells."""
    out = tmp_path_factory.mktemp('prep') / 'baron_small'
    min_genes = int(np.median(n_expressed(counts)))
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={out}', '--label_key=cell_type',
                     '--batch_key=donor', f'--min_genes={min_genes}', '--n_folds=3', '--seed=1')
    return data.Dataset(out), min_genes, result.stdout


def test_round_trip(prepared, counts):
    ds, min_genes, stdout = prepared
    h5 = data.read_h5ad(FIXTURES / 'counts_csr.h5ad')
    kept = n_expressed(counts) >= min_genes  # the numpy reference of QC
    assert 0 < kept.sum() < len(counts) and ds.meta['n_cells_dropped_qc'] == (~kept).sum()
    assert f"QC kept {kept.sum()} / 78 cells ({(~kept).sum()} with fewer than {min_genes}" in stdout
    assert ds.vocab == list(h5.var_names()) and ds.n_genes == 385
    assert ds.cell_ids.tolist() == h5.obs_names[kept].tolist()
    np.testing.assert_allclose(ds.dense(np.arange(ds.n_cells)), lognorm_reference(counts)[kept], rtol=1e-6, atol=1e-6)
    assert ds.meta['nnz'] == (counts[kept] > 0).sum() and (ds.values > 0).all()
    assert [ds.label_names[i] for i in ds.labels] == h5.obs_column('cell_type')[kept].tolist()
    assert ds.label_names == sorted(ds.label_names)
    assert [ds.meta['batch_names'][i] for i in ds.batch] == h5.obs_column('donor')[kept].tolist()
    source = ds.meta['source'][0]
    assert source['sha256'] == hashlib.sha256((FIXTURES / 'counts_csr.h5ad').read_bytes()).hexdigest()
    assert (source['matrix'], source['kind'], source['n_cells_in']) == ('X', 'counts', 78)
    assert source['n_cells_kept'] == kept.sum()
    assert ds.meta['overlap'] == {'matched': 385, 'vocab': 385, 'data': 385}
    assert ds.meta['settings']['min_genes'] == min_genes and ds.log_base == 2.0
    # rows in any order, from memory and from disk (the path taken for large datasets)
    idx = np.array([4, 0, 4, ds.n_cells - 1, 2])
    in_memory = ds.rows(idx)
    ds.indices = ds.values = None
    for a, b in zip(in_memory, ds.rows(idx)):
        np.testing.assert_array_equal(a, b)
    assert [len(a) for a in ds.rows([])] == [1, 0, 0]


def test_dataset_missing_or_corrupt(prepared, tmp_path):
    with pytest.raises(data.UserError, match='not a prepared dataset.*prepare_data.py'):
        data.Dataset(tmp_path)
    shutil.copytree(prepared[0].path, tmp_path / 'copy')
    (tmp_path / 'copy' / 'vocab.txt').write_text('A\nB\n')
    with pytest.raises(data.UserError, match='is corrupt.*prepare_data.py'):
        data.Dataset(tmp_path / 'copy')


def test_folds_stratified_disjoint_seeded(prepared, tmp_path):
    ds, min_genes, _ = prepared
    assert ds.folds.dtype == np.int8 and set(ds.folds.tolist()) == {0, 1, 2}
    for c in range(len(ds.label_names)):
        per_fold = np.bincount(ds.folds[ds.labels == c], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1, (ds.label_names[c], per_fold)
    sizes = np.bincount(ds.folds)
    assert sizes.max() - sizes.min() <= 1
    test_sets = [data.split_indices(ds.folds, k, 3)[2] for k in range(3)]
    assert sorted(np.concatenate(test_sets).tolist()) == list(range(ds.n_cells))  # disjoint, cover every cell
    common = [f'--input={FIXTURES / "counts_csr.h5ad"}', '--label_key=cell_type', f'--min_genes={min_genes}',
              '--n_folds=3']
    prepare(*common, f'--out_dir={tmp_path / "same"}', '--seed=1')
    prepare(*common, f'--out_dir={tmp_path / "other"}', '--seed=2')
    np.testing.assert_array_equal(data.Dataset(tmp_path / 'same').folds, ds.folds)
    assert not np.array_equal(data.Dataset(tmp_path / 'other').folds, ds.folds)


def test_missing_labels_and_counts_layer(tmp_path):
    path = FIXTURES / 'scaled_with_counts_layer.h5ad'
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=celltype', '--min_genes=0')
    ds = data.Dataset(tmp_path / 'out')
    missing = np.array([v is None for v in data.read_h5ad(path).obs_column('celltype')])
    assert missing.sum() == 3 and ds.n_cells == 78
    np.testing.assert_array_equal(ds.labels < 0, missing)
    np.testing.assert_array_equal(ds.folds < 0, missing)
    assert ds.meta['source'][0]['matrix'] == 'layers/counts' and '3 cells with a missing label' in result.stdout


def test_unlabeled_with_vocab_file(tmp_path, counts):
    genes = list(data.read_h5ad(FIXTURES / 'counts_csr.h5ad').var_names())
    (tmp_path / 'vocab.txt').write_text('\n'.join(['NOT_A_GENE', genes[7], genes[0], genes[300]]) + '\n')
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={tmp_path / "out"}', '--label_key=',
                     f'--vocab={tmp_path / "vocab.txt"}', '--min_genes=0')
    assert 'genes: matched 3 / vocab 4 / data 385' in result.stdout
    ds = data.Dataset(tmp_path / 'out')
    assert ds.vocab == ['NOT_A_GENE', genes[7], genes[0], genes[300]] and ds.label_names == []
    assert (ds.labels == -1).all() and np.bincount(ds.folds).tolist() == [16, 16, 16, 15, 15]  # random, balanced
    reference = lognorm_reference(counts)[:, [7, 0, 300]]  # normalized over all genes, then aligned
    np.testing.assert_allclose(ds.dense(np.arange(78))[:, 1:], reference, rtol=1e-6, atol=1e-6)


def test_several_inputs(tmp_path):
    inputs = f'{FIXTURES / "counts_csr.h5ad"},{FIXTURES / "lognorm_with_raw.h5ad"}'
    prepare(f'--input={inputs}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0')
    ds = data.Dataset(tmp_path / 'out')
    assert ds.n_cells == 156 and ds.n_genes == 385 and len(ds.meta['source']) == 2
    np.testing.assert_allclose(ds.dense(np.arange(78)), ds.dense(np.arange(78, 156)))  # same counts twice
    # a corpus streams: read and written 7 cells at a time, the same dataset comes out
    prepare(f'--input={inputs}', f'--out_dir={tmp_path / "small_chunks"}', '--label_key=cell_type', '--min_genes=0',
            '--chunk=7', '--n_top_genes=100')
    prepare(f'--input={inputs}', f'--out_dir={tmp_path / "one_chunk"}', '--label_key=cell_type', '--min_genes=0',
            '--n_top_genes=100')
    a, b = data.Dataset(tmp_path / 'small_chunks'), data.Dataset(tmp_path / 'one_chunk')
    assert a.vocab == b.vocab and np.array_equal(a.folds, b.folds) and np.array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.dense(np.arange(156)), b.dense(np.arange(156)))


def test_legacy_pbmc(tmp_path):
    path = SHARED / 'pbmc68k_reduced.h5ad'
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}')  # the default settings
    assert 'using log-normalized values' in result.stdout and 'from raw' in result.stdout
    ds = data.Dataset(tmp_path / 'out')
    h5 = data.read_h5ad(path)
    raw = dense(h5, 'raw')
    kept = n_expressed(raw) >= 200
    assert ds.n_cells == kept.sum() == 693 and ds.vocab == list(h5.var_names('raw'))
    np.testing.assert_allclose(ds.dense(np.arange(ds.n_cells)), raw[kept] / math.log(2), rtol=1e-6)
    assert [ds.label_names[i] for i in ds.labels] == h5.obs_column('bulk_labels')[kept].tolist()



def test_n_top_genes(tmp_path, counts):
    min_genes, n_top = int(np.median(n_expressed(counts))), 50
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={tmp_path / "out"}', '--label_key=',
                     f'--min_genes={min_genes}', f'--n_top_genes={n_top}')
    assert f'kept the {n_top} most variable of 385 genes' in result.stdout
    ds = data.Dataset(tmp_path / 'out')
    # numpy reference: variance over the QC-passed cells (zeros included), highest first, ties by vocab order
    kept = n_expressed(counts) >= min_genes
    reference = lognorm_reference(counts)[kept]
    variance = reference.var(0)
    order = np.argsort(-variance, kind='stable')
    assert variance[order[n_top - 1]] > variance[order[n_top]] + 1e-6  # no near-tie at the cut-off in this fixture
    top = np.sort(order[:n_top])  # in vocab order
    genes = list(data.read_h5ad(FIXTURES / 'counts_csr.h5ad').var_names())
    assert ds.vocab == [genes[i] for i in top] and ds.meta['settings']['n_top_genes'] == n_top
    assert ds.meta['overlap'] == {'matched': n_top, 'vocab': n_top, 'data': 385}
    # values are still normalized over all of a cell's genes, then aligned to the smaller vocab
    np.testing.assert_allclose(ds.dense(np.arange(ds.n_cells)), reference[:, top], rtol=1e-6, atol=1e-6)
    # n_top_genes >= the number of genes keeps them all, and says so
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={tmp_path / "all"}', '--label_key=',
                     '--min_genes=0', '--n_top_genes=1000')
    assert 'n_top_genes=1000 >= 385 genes: keeping all of them' in result.stdout
    assert data.Dataset(tmp_path / 'all').vocab == genes

# ------------------------------------------------------------------------------------------------ bad input
def assert_user_error(result, out, *fragments):
    """Non-zero exit, one 'error:' line (the last on stderr) naming every fragment, no traceback, no output left."""
    user_error(result, ''.join(f'(?=.*{re.escape(f)})' for f in fragments))
    assert result.stderr.strip().splitlines()[-1].startswith('error: ') and result.stderr.count('error:') == 1
    assert not out.exists() and not list(out.parent.glob(f'{out.name}.*'))


def random_counts(n_cells=12, n_genes=40, seed=0):
    return np.random.default_rng(seed).poisson(1.0, (n_cells, n_genes)).astype(np.float32)


def genes(n):
    return [f'Gene{i}' for i in range(n)]


def test_not_a_file(tmp_path):
    for path in (tmp_path / 'missing.h5ad', tmp_path):
        result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', check=False)
        assert_user_error(result, tmp_path / 'out', 'is not a file')


def test_not_hdf5(tmp_path):
    (tmp_path / 'cells.h5ad').write_text('cell,gene,count\n')
    result = prepare(f'--input={tmp_path / "cells.h5ad"}', f'--out_dir={tmp_path / "out"}', check=False)
    assert_user_error(result, tmp_path / 'out', 'not an HDF5 file')


def test_missing_label_key(tmp_path):
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={tmp_path / "out"}',
                     '--label_key=celltype', check=False)
    assert_user_error(result, tmp_path / 'out', "label_key 'celltype'", 'available: cell_type, donor, n_counts',
                      '--label_key=')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_nan_or_inf(tmp_path, bad):
    counts = random_counts()
    counts[7, 5] = bad
    write_h5ad(tmp_path / 'bad.h5ad', counts, genes(40), obs={'cell_type': ['a', 'b'] * 6})
    result = prepare(f'--input={tmp_path / "bad.h5ad"}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type',
                     '--min_genes=0', check=False)
    assert_user_error(result, tmp_path / 'out', 'NaN or Inf values in X')


def test_negative_counts(tmp_path):
    counts = random_counts()
    counts[2, 3] = -3
    write_h5ad(tmp_path / 'bad.h5ad', counts, genes(40))
    result = prepare(f'--input={tmp_path / "bad.h5ad"}', f'--out_dir={tmp_path / "out"}', '--label_key=',
                     '--min_genes=0', check=False)
    assert_user_error(result, tmp_path / 'out', 'negative numbers', 'not counts', '--layer=')
    assert re.search(r'X: 1 of [0-9,]+ sampled values negative \(min -3\)', result.stderr), result.stderr


def test_no_cells_after_qc(tmp_path):
    result = prepare(f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={tmp_path / "out"}',
                     '--label_key=cell_type', '--min_genes=1000', check=False)
    assert_user_error(result, tmp_path / 'out', 'no cells left after QC', '--min_genes')


def test_no_gene_overlap(tmp_path):
    # symbols in the vocab, Ensembl ids in the var index: the message points at the var column of symbols
    path = FIXTURES / 'pbmc_ensembl_ids.h5ad'
    symbols = data.read_h5ad(path).var_column('gene_symbols')
    (tmp_path / 'vocab.txt').write_text('\n'.join(symbols) + '\n')
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', f'--vocab={tmp_path / "vocab.txt"}',
                     check=False)
    assert_user_error(result, tmp_path / 'out', 'no gene overlap', '--gene_key=', 'gene_symbols')
    prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', f'--vocab={tmp_path / "vocab.txt"}',
            '--gene_key=gene_symbols', '--min_genes=0')  # the fix works
