"""data.py: .h5ad reading (every fixture and the legacy file), normalization and vocab alignment against numpy,
scBERT's tokens against the original code's outputs (scbert_ref/io.pt), and MLM masking statistics."""
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
from conftest import FIXTURES, SHARED, dense, lognorm_reference, write_h5ad
from data import UserError

if not SHARED.is_dir():
    pytest.skip(f'test data not found at {SHARED}', allow_module_level=True)


def aligned_dense(processed):
    """All cells of a ProcessedH5AD -> (float32 [n_cells, n_vocab], n_expressed [n_cells])."""
    out, n_expressed = np.zeros((processed.n_cells, len(processed.vocab)), np.float32), []
    for c in processed:
        rows = c.row_start + np.repeat(np.arange(len(c.indptr) - 1), np.diff(c.indptr))
        out[rows, c.indices] = c.values
        n_expressed.append(c.n_expressed)
        assert all((np.diff(c.indices[a:b]) > 0).all() for a, b in zip(c.indptr[:-1], c.indptr[1:]))
    return out, np.concatenate(n_expressed)


# ---------------------------------------------------------------------------------------------------- reading
def test_dense_csr_csc_identical():
    with h5py.File(FIXTURES / 'counts_dense.h5ad') as f:
        truth = f['X'][:]
    for name in ('counts_dense', 'counts_csr', 'counts_csc'):
        h5 = data.read_h5ad(FIXTURES / f'{name}.h5ad')
        assert (h5.n_obs, h5.n_vars, h5.matrices()) == (78, 385, ['X'])
        assert data.choose_matrix(h5) == ('X', 'counts')
        np.testing.assert_array_equal(dense(h5, 'X'), truth)
        np.testing.assert_array_equal(dense(h5, 'X', chunk=7), truth)  # chunk boundaries
        assert h5.obs_keys() == ['cell_type', 'donor', 'n_counts']
        assert sorted(set(h5.obs_column('cell_type'))) == ['B_cell', 'T_cell', 'activated_stellate', 'alpha', 'beta',
                                                           'delta', 'ductal', 'endothelial', 'gamma', 'immune_other',
                                                           'macrophage', 'quiescent_stellate', 'schwann']


def test_lognorm_with_raw_uses_raw_counts():
    h5 = data.read_h5ad(FIXTURES / 'lognorm_with_raw.h5ad')
    assert h5.matrices() == ['X', 'raw'] and len(h5.var_names()) == 200 and len(h5.var_names('raw')) == 385
    assert data.choose_matrix(h5) == ('raw', 'counts')
    assert data.choose_matrix(h5, 'X') == ('X', 'lognorm')
    with h5py.File(FIXTURES / 'counts_dense.h5ad') as f:
        np.testing.assert_array_equal(dense(h5, 'raw'), f['X'][:])


def test_scaled_with_counts_layer():
    h5 = data.read_h5ad(FIXTURES / 'scaled_with_counts_layer.h5ad')
    assert data.choose_matrix(h5) == ('layers/counts', 'counts')
    assert data.choose_matrix(h5, 'counts') == ('layers/counts', 'counts')
    with pytest.raises(UserError, match='negative values.*layers/counts'):
        data.choose_matrix(h5, 'X')
    labels = h5.obs_column('celltype')
    assert sum(v is None for v in labels) == 3 and labels[1] == 'B_cell'


def test_ensembl_ids_with_gene_key():
    h5 = data.read_h5ad(FIXTURES / 'pbmc_ensembl_ids.h5ad')
    assert data.choose_matrix(h5) == ('X', 'lognorm')
    assert h5.var_names()[0].startswith('ENSG')
    assert list(data.gene_symbols(h5, 'X', 'gene_symbols')[:3]) == ['HES4', 'TNFRSF4', 'SSU72']
    processed = data.process_h5ad(FIXTURES / 'pbmc_ensembl_ids.h5ad', gene_key='gene_symbols', progress=False)
    assert processed.vocab[:3] == ['HES4', 'TNFRSF4', 'SSU72']
    # log-normalized values are used as they are, converted from ln to log2
    values, _ = aligned_dense(processed)
    np.testing.assert_allclose(values, dense(h5, 'X') / math.log(2), rtol=1e-6)
    with pytest.raises(UserError, match="gene_key 'symbol' not in var.*available: gene_symbols"):
        data.gene_symbols(h5, 'X', 'symbol')


def test_legacy_pbmc():
    h5 = data.read_h5ad(SHARED / 'pbmc68k_reduced.h5ad')
    assert isinstance(h5.file['obs'], h5py.Dataset) and (h5.n_obs, h5.n_vars) == (700, 765)
    assert h5.obs_names[0] == 'AAAGCCTGGCTAAC-1'
    assert h5.matrices() == ['X', 'raw'] and data.choose_matrix(h5) == ('raw', 'lognorm')
    assert list(h5.var_names('raw')[:3]) == ['HES4', 'TNFRSF4', 'SSU72']
    labels = h5.obs_column('bulk_labels')
    counts = dict(zip(*np.unique(labels.astype(str), return_counts=True)))
    assert counts['Dendritic'] == 240 and counts['CD14+ Monocyte'] == 129 and len(counts) == 10
    assert set(h5.obs_column('phase', 'batch_key')) == {'G1', 'S', 'G2M'}
    with pytest.raises(UserError, match="label_key 'celltype' not in obs .*available: bulk_labels, n_genes"):
        h5.obs_column('celltype')


def test_every_shared_file_loads():
    for path in [*FIXTURES.glob('*.h5ad'), *SHARED.glob('*.h5ad')]:
        h5 = data.read_h5ad(path)
        assert len(h5.obs_names) == h5.n_obs and h5.n_vars > 0 and data.choose_matrix(h5)


def test_not_a_file_or_not_hdf5(tmp_path):
    with pytest.raises(UserError, match='is not a file'):
        data.read_h5ad(tmp_path / 'missing.h5ad')
    (tmp_path / 'text.h5ad').write_text('cell,gene\n')
    with pytest.raises(UserError, match='not an HDF5 file'):
        data.read_h5ad(tmp_path / 'text.h5ad')
    with h5py.File(tmp_path / 'other.h5', 'w') as f:
        f['x'] = [1]
    with pytest.raises(UserError, match='not AnnData'):
        data.read_h5ad(tmp_path / 'other.h5')


# ------------------------------------------------------------------------------------------- processing
def test_counts_normalized_like_numpy():
    with h5py.File(FIXTURES / 'counts_dense.h5ad') as f:
        counts = f['X'][:]
    for name in ('counts_csr', 'counts_csc', 'lognorm_with_raw'):
        processed = data.process_h5ad(FIXTURES / f'{name}.h5ad', progress=False, chunk=32)
        values, n_expressed = aligned_dense(processed)
        np.testing.assert_allclose(values, lognorm_reference(counts), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(n_expressed, (counts > 0).sum(1))
    # natural log: same numbers divided by ln 2 / ln e
    values, _ = aligned_dense(data.process_h5ad(FIXTURES / 'counts_csr.h5ad', log_base=math.e, progress=False))
    np.testing.assert_allclose(values, lognorm_reference(counts, math.e), rtol=1e-6, atol=1e-6)


def test_vocab_alignment_partial_overlap():
    path = FIXTURES / 'counts_csr.h5ad'
    h5 = data.read_h5ad(path)
    genes = list(h5.var_names())
    with h5py.File(FIXTURES / 'counts_dense.h5ad') as f:
        reference = lognorm_reference(f['X'][:])  # normalized over ALL genes, then aligned
    vocab = ['NOT_A_GENE1', genes[10], genes[3], 'NOT_A_GENE2', genes[200]]
    processed = data.process_h5ad(path, vocab=vocab, min_genes=250, progress=False)
    assert (processed.n_matched, processed.n_data_genes) == (3, 385)
    assert 'matched 3 / vocab 5 / data 385' in processed.summary()
    values, n_expressed = aligned_dense(processed)
    np.testing.assert_allclose(values[:, [1, 2, 4]], reference[:, [10, 3, 200]], rtol=1e-6, atol=1e-6)
    assert (values[:, [0, 3]] == 0).all()
    qc = np.concatenate([c.passed_qc for c in processed])
    np.testing.assert_array_equal(qc, n_expressed >= 250)  # QC counts genes outside the vocab too
    with pytest.raises(UserError, match='no gene overlap'):
        data.process_h5ad(path, vocab=['NOT_A_GENE'], progress=False)


def test_duplicated_symbols(tmp_path):
    counts = np.array([[1, 2, 3, 0], [0, 5, 0, 7], [4, 0, 0, 0]], dtype=np.float32)
    write_h5ad(tmp_path / 'dup.h5ad', counts, ['A', 'B', 'A', 'C'])
    processed = data.process_h5ad(tmp_path / 'dup.h5ad', progress=False)
    assert processed.vocab == ['A', 'B', 'C'] and processed.n_duplicated == 1
    assert '1 duplicated gene symbols summed' in processed.summary()
    summed = np.stack([counts[:, 0] + counts[:, 2], counts[:, 1], counts[:, 3]], axis=1)
    values, _ = aligned_dense(processed)
    np.testing.assert_allclose(values, lognorm_reference(summed), rtol=1e-6)
    # log-normalized duplicates can't be summed: the first column is kept
    write_h5ad(tmp_path / 'dup_log.h5ad', counts * 0.5 + 0.25 * (counts > 0), ['A', 'B', 'A', 'C'])
    values, _ = aligned_dense(data.process_h5ad(tmp_path / 'dup_log.h5ad', progress=False))
    np.testing.assert_allclose(values[:, 0], (counts[:, 0] * 0.5 + 0.25 * (counts[:, 0] > 0)) / math.log(2), rtol=1e-6)


def test_unlogged_normalized_values_count_as_counts(tmp_path):
    # non-integer values above ln(1 + 1e6) can't be log1p of normalized data: normalizing them again is right
    with h5py.File(FIXTURES / 'counts_dense.h5ad') as f:
        counts = f['X'][:]
    cp10k = counts / counts.sum(1, keepdims=True) * 1e4
    assert cp10k.max() > 14
    write_h5ad(tmp_path / 'cp10k.h5ad', cp10k.astype(np.float32), [f'g{i}' for i in range(counts.shape[1])])
    processed = data.process_h5ad(tmp_path / 'cp10k.h5ad', progress=False)
    assert processed.kind == 'counts'
    np.testing.assert_allclose(aligned_dense(processed)[0], lognorm_reference(counts), rtol=1e-5, atol=1e-5)


def test_bad_values_found_while_streaming(tmp_path):
    # past the sample used to choose the matrix (the first 1024 cells here), values are checked chunk by chunk
    counts = np.ones((1100, 1024), np.float32)
    counts[1050, 3] = -2
    write_h5ad(tmp_path / 'neg.h5ad', counts, [f'g{i}' for i in range(1024)])
    with pytest.raises(UserError, match=r'negative values in X .*cells 1024\.\.1099'):
        list(data.process_h5ad(tmp_path / 'neg.h5ad', progress=False, chunk=1024))


def test_read_gene_list(tmp_path):
    (tmp_path / 'genes.txt').write_text('CD3E\nMS4A1\n\nGAPDH\n')
    assert data.read_gene_list(tmp_path / 'genes.txt') == ['CD3E', 'MS4A1', '', 'GAPDH']  # line i = index i
    (tmp_path / 'empty.txt').write_text('\n')
    with pytest.raises(UserError, match='is empty'):
        data.read_gene_list(tmp_path / 'empty.txt')
    with pytest.raises(UserError, match='not found'):
        data.read_gene_list(tmp_path / 'missing.txt')


def test_atomic_write(tmp_path):
    target = tmp_path / 'out'
    with data.atomic_write(target) as tmp:
        Path(tmp).mkdir()
        (Path(tmp) / 'a').write_text('1')
    with pytest.raises(UserError):
        with data.atomic_write(target) as tmp:
            Path(tmp).mkdir()
            (Path(tmp) / 'a').write_text('2')
            raise UserError('boom')
    assert (target / 'a').read_text() == '1' and sorted(p.name for p in tmp_path.iterdir()) == ['out']
    with data.atomic_write(target) as tmp:  # a directory replaces the old one
        Path(tmp).mkdir()
        (Path(tmp) / 'b').write_text('3')
    assert [p.name for p in target.iterdir()] == ['b'] and len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------------------- splits, CSR
def test_split_indices_partition():
    folds = np.array([0, 1, 2, 3, 4, -1, 0, 1, 2, 3, 4, 4], dtype=np.int8)
    for fold in range(5):
        train, val, test = data.split_indices(folds, fold, 5)
        assert (folds[test] == fold).all() and (folds[val] == (fold + 1) % 5).all()
        together = np.concatenate([train, val, test])
        assert len(set(together.tolist())) == len(together)
        assert sorted(together.tolist()) == np.flatnonzero(folds >= 0).tolist()
    with pytest.raises(UserError, match='out of range'):
        data.split_indices(folds, 5, 5)


def test_take_rows():
    rng = np.random.default_rng(0)
    matrix = rng.random((20, 9)) * (rng.random((20, 9)) < 0.4)
    indptr = np.concatenate([[0], np.cumsum((matrix > 0).sum(1))])
    rows, cols = np.nonzero(matrix)
    idx = np.array([5, 0, 19, 5, 3])
    ptr, ind, val = data.take_rows(indptr, cols, matrix[rows, cols], idx)
    out = np.zeros((len(idx), 9))
    out[np.repeat(np.arange(len(idx)), np.diff(ptr)), ind] = val
    np.testing.assert_array_equal(out, matrix[idx])


# ------------------------------------------------------------------------------------- scBERT tokens, masking
@pytest.fixture(scope='module')
def io():
    return torch.load(SHARED / 'scbert_ref' / 'io.pt', weights_only=True)


def test_tokens_match_original(io):
    tokens = data.scbert_tokens(io['expr_log2'], log_base=2, n_bins=5)
    assert tokens.dtype == torch.long and torch.equal(tokens, io['tokens'])
    assert torch.equal(data.expression_to_bins(io['tokenize_edge_in'], 2, 5), io['tokenize_edge_out'])
    assert (data.expression_to_bins(io['tokenize_edge_in'].numpy(), 2, 5) == io['tokenize_edge_out'].numpy()).all()
    # other bases: values = ln(1 + x) give the same bins as log2(1 + x)
    counts = io['counts'].double()
    ln_values = torch.log1p(counts / counts.sum(1, keepdim=True) * 1e4).float()
    assert torch.equal(data.scbert_tokens(ln_values, math.e, 5), io['tokens'])


def test_mask_counts_match_original(io):
    tokens = io['tokens']
    masked, labels = data.mask_tokens(tokens, 0.15, 0.9, mask_id=6, generator=torch.Generator().manual_seed(0))
    assert (tokens != 0).sum(1).tolist() == [301, 253, 285]
    assert (labels != -100).sum(1).tolist() == [46, 38, 43]  # ceil(0.15 * n_nonzero), as the original
    chosen = labels != -100
    assert torch.equal(labels[chosen], tokens[chosen]) and (tokens[chosen] != 0).all()
    assert torch.equal(masked[~chosen], tokens[~chosen])
    assert set(masked[chosen].unique().tolist()) <= set(range(1, 7))


def test_mask_statistics():
    rng = torch.Generator().manual_seed(1)
    n_cells, length = 2000, 300
    tokens = torch.randint(0, 6, (n_cells, length), generator=rng) * (torch.rand(n_cells, length, generator=rng) < 0.5)
    tokens[0] = 0  # a cell with nothing expressed: nothing masked
    tokens[1, :5] = 6  # mask ids are never candidates
    masked, labels = data.mask_tokens(tokens, 0.15, 0.9, mask_id=6, generator=torch.Generator().manual_seed(2))
    n_candidates = ((tokens != 0) & (tokens != 6)).sum(1)
    chosen = labels != -100
    assert torch.equal(chosen.sum(1), torch.ceil(n_candidates * 0.15).long())
    assert not chosen[tokens == 0].any() and not chosen[tokens == 6].any()
    assert (labels[~chosen] == -100).all() and torch.equal(labels[chosen], tokens[chosen])
    replaced = (masked == 6) & chosen
    assert abs(replaced.sum().item() / chosen.sum().item() - 0.9) < 0.01  # ~90k chosen: sd 0.001
    assert torch.equal(masked[chosen & ~replaced], tokens[chosen & ~replaced])
    # chosen positions are uniform over candidates: every position gets about the same share
    per_position = chosen.sum(0).float() / ((tokens != 0) & (tokens != 6)).sum(0)
    assert (per_position - 0.15).abs().max() < 0.05
    # deterministic given the generator
    again = data.mask_tokens(tokens, 0.15, 0.9, mask_id=6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
