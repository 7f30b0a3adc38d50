"""Doubtful input to prepare_data.py and predict.py, on the 78 real Baron cells (counts_csr.h5ad, obs cell_type and
donor) with obs/var edited in a copy: empty labels, one cell type, fewer cells than folds, duplicated cell ids,
duplicated gene symbols."""
import re
import shutil
from dataclasses import asdict

import h5py
import numpy as np
import pytest
import torch

import data
from conftest import FIXTURES, run_script, user_error

SOURCE = FIXTURES / 'counts_csr.h5ad'
pytestmark = pytest.mark.skipif(not SOURCE.exists(), reason='shared data not available')


def prepare(*args, check=True):
    return run_script('prepare_data.py', *args, check=check)


def copy(tmp_path, name='cells.h5ad'):
    path = tmp_path / name
    shutil.copyfile(SOURCE, path)
    return path


def set_labels(path, labels, key='cell_type'):
    """Rewrite obs[key] as a categorical holding `labels` (str per cell)."""
    text = h5py.string_dtype('utf-8')
    categories = sorted(set(labels))
    with h5py.File(path, 'r+') as f:
        column = f['obs'][key]
        del column['codes'], column['categories']
        column['codes'] = np.array([categories.index(v) for v in labels], dtype=np.int8)
        column.create_dataset('categories', data=np.array(categories, dtype=object), dtype=text)


def set_index(path, which, names):
    """Rewrite the index of obs or var."""
    with h5py.File(path, 'r+') as f:
        frame = f[which]
        index = frame.attrs['_index']
        del frame[index]
        frame.create_dataset(index, data=np.array(names, dtype=object), dtype=h5py.string_dtype('utf-8'))


def no_output(result, out):
    assert not out.exists() and not list(out.parent.glob(f'{out.name}.*')), result.stdout


def warnings_of(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith('warning:')]


# ------------------------------------------------------------------------------------------------ 1. empty labels
def test_empty_label_is_missing(tmp_path):
    path = copy(tmp_path)
    labels = data.read_h5ad(SOURCE).obs_column('cell_type').tolist()
    for i in (0, 7, 40):
        labels[i] = ''
    labels[41] = '  '  # blank too
    set_labels(path, labels)
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0')
    ds = data.Dataset(tmp_path / 'out')
    empty = np.array([not v.strip() for v in labels])
    assert '' not in ds.label_names and '  ' not in ds.label_names and len(ds.label_names) == 13
    np.testing.assert_array_equal(ds.labels < 0, empty)
    np.testing.assert_array_equal(ds.folds < 0, empty)
    assert '13 labels (4 cells with a missing label: fold -1)' in result.stdout


def test_empty_batch_is_missing(tmp_path):
    path = copy(tmp_path)
    donors = data.read_h5ad(SOURCE).obs_column('donor').tolist()
    donors[3] = ''
    set_labels(path, donors, key='donor')
    prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--batch_key=donor',
            '--min_genes=0')
    ds = data.Dataset(tmp_path / 'out')
    assert '' not in ds.meta['batch_names'] and ds.batch[3] == -1 and (np.delete(ds.batch, 3) >= 0).all()


def test_every_label_empty(tmp_path):
    path = copy(tmp_path)
    set_labels(path, [''] * 78)
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0',
                     check=False)
    user_error(result, r"no cell left after QC has a label in obs 'cell_type'.*missing or empty.*--label_key=")
    no_output(result, tmp_path / 'out')


# ------------------------------------------------------------------------------------------------ 2. one cell type
def test_single_cell_type_warns(tmp_path):
    path = copy(tmp_path)
    set_labels(path, ['beta'] * 78)
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0')
    assert data.Dataset(tmp_path / 'out').label_names == ['beta']
    assert warnings_of(result) == [
        "warning: every labelled cell is of one cell type ('beta' in obs 'cell_type'): a single cell type cannot be "
        "fine-tuned on (train.py --mode=finetune needs 2 or more); the dataset is fine for pretraining"]
    # two types: no warning
    result = prepare(f'--input={SOURCE}', f'--out_dir={tmp_path / "two"}', '--label_key=cell_type', '--min_genes=0')
    assert warnings_of(result) == []


# ------------------------------------------------------------------------------------------------ 3. too few cells
def test_fewer_labelled_cells_than_folds(tmp_path):
    path = copy(tmp_path)
    labels = [''] * 78
    labels[0], labels[10], labels[20] = 'alpha', 'beta', 'alpha'
    set_labels(path, labels)
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0',
                     '--n_folds=5', check=False)
    user_error(result, re.escape('only 3 labelled cells after QC (75 more with a missing label) for n_folds=5: every '
                                 'fold needs at least one; set --n_folds=3 or fewer, or give more cells'))
    no_output(result, tmp_path / 'out')
    # the fix works: 3 folds of one cell each
    prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0',
            '--n_folds=3')
    ds = data.Dataset(tmp_path / 'out')
    assert sorted(ds.folds[ds.folds >= 0].tolist()) == [0, 1, 2]


def test_one_labelled_cell_after_qc(tmp_path):
    # QC leaves few cells: the fix also names --min_genes; one cell cannot fill the 2 folds n_folds allows at least
    counts = data.read_h5ad(SOURCE)
    n_expressed = np.diff(counts.file['X/indptr'][:])
    threshold = int(np.sort(n_expressed)[-1])  # only the richest cell(s) pass
    n_pass = int((n_expressed >= threshold).sum())
    assert n_pass == 1
    result = prepare(f'--input={SOURCE}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type',
                     f'--min_genes={threshold}', '--n_folds=2', check=False)
    user_error(result, re.escape(f'only 1 labelled cells after QC (77 dropped by QC) for n_folds=2: every fold needs '
                                 f'at least one; give more cells (or lower --min_genes={threshold})'))
    no_output(result, tmp_path / 'out')


def test_unlabelled_needs_n_folds_cells(tmp_path):
    # 5 cells of an unlabelled dataset fill 5 folds; 4 do not
    with h5py.File(SOURCE) as f:  # keep the first 5 or 4 cells: cut the CSR matrix and obs
        indptr, indices, values = f['X/indptr'][:], f['X/indices'][:], f['X/data'][:]
    for n, ok in ((5, True), (4, False)):
        small = tmp_path / f'small{n}.h5ad'
        shutil.copyfile(SOURCE, small)
        with h5py.File(small, 'r+') as f:
            x = f['X']
            del x['indptr'], x['indices'], x['data']
            x['indptr'], x['indices'], x['data'] = indptr[:n + 1], indices[:indptr[n]], values[:indptr[n]]
            x.attrs['shape'] = np.array([n, x.attrs['shape'][1]])
            obs = f['obs']
            names = obs['_index'][:n]
            for key in list(obs):
                del obs[key]
            obs.attrs.create('column-order', [], dtype=h5py.string_dtype('utf-8'))
            obs.create_dataset('_index', data=names, dtype=h5py.string_dtype('utf-8'))
        out = tmp_path / f'out{n}'
        result = prepare(f'--input={small}', f'--out_dir={out}', '--label_key=', '--min_genes=0', '--n_folds=5',
                         check=ok)
        if ok:
            assert sorted(data.Dataset(out).folds.tolist()) == [0, 1, 2, 3, 4]
        else:
            user_error(result, re.escape('only 4 cells after QC for n_folds=5: every fold needs at least one; set '
                                         '--n_folds=4 or fewer, or give more cells'))
            no_output(result, out)


# ------------------------------------------------------------------------------------------------ 4. duplicate cells
@pytest.fixture(scope='module')
def duplicated_cells(tmp_path_factory):
    """counts_csr with cells 1 and 2 both named like cell 0, and cell 5 like cell 4: 3 duplicated ids."""
    tmp = tmp_path_factory.mktemp('dup_cells')
    path = copy(tmp)
    names = data.read_h5ad(SOURCE).obs_names.tolist()
    names[1] = names[2] = names[0]
    names[5] = names[4]
    set_index(path, 'obs', names)
    return path, names


def test_duplicated_cell_ids_warn(tmp_path, duplicated_cells):
    path, names = duplicated_cells
    out = tmp_path / 'out'
    result = prepare(f'--input={path}', f'--out_dir={out}', '--label_key=cell_type', '--min_genes=0')
    examples = ', '.join(sorted({names[0], names[4]}))
    assert warnings_of(result) == [
        f"warning: 3 cell ids in {out} repeat an earlier one (e.g. {examples}): every cell is kept, by position; make "
        f"them unique (anndata: adata.obs_names_make_unique()) to tell those cells apart"]
    ds = data.Dataset(out)
    assert ds.n_cells == 78 and ds.cell_ids.tolist() == names
    result = prepare(f'--input={SOURCE}', f'--out_dir={tmp_path / "unique"}', '--label_key=cell_type',
                     '--min_genes=0')
    assert warnings_of(result) == []


def tiny_checkpoint(path, genes):
    """A random 2-class tiny scBERT over the given genes, saved as train.py saves one (no novelty calibration)."""
    from model import ModelConfig, ScBERT
    torch.manual_seed(0)
    config = ModelConfig(n_genes=len(genes), n_embd=16, n_layer=1, n_head=2, dim_head=8, head_hidden=16,
                         n_classes=2)
    model = ScBERT(config)
    torch.save({'model': model.state_dict(), 'model_args': asdict(config), 'vocab': list(genes),
                'label_names': ['alpha', 'beta'], 'log_base': 2.0}, path)


def test_predict_duplicated_cell_ids_one_row_per_cell(tmp_path, duplicated_cells):
    path, names = duplicated_cells
    genes = data.read_h5ad(SOURCE).var_names().tolist()
    tiny_checkpoint(tmp_path / 'tiny.pt', genes)
    common = [f'--ckpt={tmp_path / "tiny.pt"}', '--num_threads=1', '--device=cpu', '--batch_size=40']
    result = run_script('predict.py', *common, f'--input={path}', f'--output={tmp_path / "dup.csv"}')
    examples = ', '.join(sorted({names[0], names[4]}))
    assert warnings_of(result) == [
        f"warning: 3 cell ids in {path} repeat an earlier one (e.g. {examples}): {tmp_path / 'dup.csv'} still has one "
        f"row per cell, in file order; make them unique (anndata: adata.obs_names_make_unique()) to tell those cells "
        f"apart"]
    run_script('predict.py', *common, f'--input={SOURCE}', f'--output={tmp_path / "unique.csv"}')
    dup = (tmp_path / 'dup.csv').read_text().splitlines()
    unique = (tmp_path / 'unique.csv').read_text().splitlines()
    assert len(dup) == len(unique) == 79  # the header and one row per input cell
    assert [line.split(',')[0] for line in dup[1:]] == names
    # the same predictions, row by row: only the ids differ
    assert [line.split(',', 1)[1] for line in dup] == [line.split(',', 1)[1] for line in unique]


# ------------------------------------------------------------------------------------------------ 5. duplicate genes
@pytest.fixture(scope='module')
def duplicated_genes(tmp_path_factory):
    """counts_csr with gene 1 renamed like gene 0: 385 columns, 384 symbols."""
    tmp = tmp_path_factory.mktemp('dup_genes')
    path = copy(tmp)
    genes = data.read_h5ad(SOURCE).var_names().tolist()
    genes[1] = genes[0]
    set_index(path, 'var', genes)
    return path, genes


def test_duplicated_genes_reported(tmp_path, duplicated_genes):
    path, genes = duplicated_genes
    result = prepare(f'--input={path}', f'--out_dir={tmp_path / "out"}', '--label_key=cell_type', '--min_genes=0')
    assert (f"genes: matched 384 / vocab 384 / data 384; 1 duplicated gene symbols summed into one gene each (e.g. "
            f"{genes[0]})") in result.stdout
    ds = data.Dataset(tmp_path / 'out')
    assert ds.n_genes == 384 and ds.vocab == genes[:1] + genes[2:]
    # summed: the first gene's counts are those of the two columns together
    with h5py.File(path) as f:
        indptr, indices, values = f['X/indptr'][:], f['X/indices'][:], f['X/data'][:]
    counts = np.zeros((78, 385))
    counts[np.repeat(np.arange(78), np.diff(indptr)), indices] = values
    expected = np.log2(1 + (counts[:, 0] + counts[:, 1]) / counts.sum(1) * 1e4)
    np.testing.assert_allclose(ds.dense(np.arange(78))[:, 0], expected, rtol=1e-5)


def test_duplicated_genes_log_values_first_kept(tmp_path):
    path = FIXTURES / 'lognorm_with_raw.h5ad'
    genes = data.read_h5ad(path).var_names().tolist()
    copy_path = tmp_path / 'lognorm.h5ad'
    shutil.copyfile(path, copy_path)
    genes[3] = genes[2]
    set_index(copy_path, 'var', genes)
    result = prepare(f'--input={copy_path}', f'--out_dir={tmp_path / "out"}', '--label_key=', '--layer=X',
                     '--min_genes=0')
    assert (f"1 duplicated gene symbols dropped, the first column of each kept (log values cannot be summed; e.g. "
            f"{genes[2]})") in result.stdout


def test_predict_reports_duplicated_genes(tmp_path, duplicated_genes):
    path, genes = duplicated_genes
    tiny_checkpoint(tmp_path / 'tiny.pt', genes[:1] + genes[2:])
    result = run_script('predict.py', f'--ckpt={tmp_path / "tiny.pt"}', '--num_threads=1', '--device=cpu',
                        f'--input={path}', f'--output={tmp_path / "p.csv"}')
    assert f"1 duplicated gene symbols summed into one gene each (e.g. {genes[0]})" in result.stdout
    assert len((tmp_path / 'p.csv').read_text().splitlines()) == 79
