"""synergy.py on a small synthetic screen built here (6 drugs, 6 cell lines, 20 genes): the folds never leak, the drug
order does not matter, the metrics match scipy / scikit-learn, an end-to-end run with expression and with an encoder,
and bad input."""
import contextlib
import csv
import io
import itertools
import json
import runpy
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, user_error

TINY = ['--max_epochs=3', '--patience=2', '--hidden=(16,)', '--drug_dim=4', '--batch_size=32', '--num_threads=1']
DRUGS = [f'D{i}' for i in range(6)]
LINES = [f'L{i}' for i in range(6)]
GENES = [f'G{i}' for i in range(20)]


def write_screen(folder, rows=None, expression_lines=LINES):
    """synergy.csv (every pair of DRUGS on every line; `fold` by pair, `cl_fold` by cell line) and expression.csv;
    -> (synergy path, expression path). rows: replaces the synergy rows (lists of strings)."""
    rng = np.random.default_rng(0)
    profiles = rng.normal(size=(len(LINES), len(GENES))).clip(-1, 1)
    pairs = list(itertools.combinations(DRUGS, 2))                  # 15 pairs: 3 per fold
    if rows is None:
        rows = [[a, b, line, f'{10 * ((i % 4) - 1) + 5 * profiles[j, 0] + rng.normal():.4f}', str(i % 5), str(j % 5)]
                for i, (a, b) in enumerate(pairs) for j, line in enumerate(LINES)]
    synergy, expression = folder / 'synergy.csv', folder / 'expression.csv'
    with open(synergy, 'w', newline='') as f:
        csv.writer(f).writerows([['drug_a_name', 'drug_b_name', 'cell_line', 'synergy', 'fold', 'cl_fold'], *rows])
    with open(expression, 'w', newline='') as f:
        csv.writer(f).writerows([['cell_line', *GENES], *[[line, *profiles[LINES.index(line)]]
                                                          for line in expression_lines]])
    return synergy, expression


def run_module(*args):
    """synergy.py run in this process -> its module globals (its functions and data), stdout discarded."""
    saved = sys.argv, torch.get_num_threads()
    try:
        sys.argv = [str(ROOT / 'synergy.py'), *map(str, args)]
        with contextlib.redirect_stdout(io.StringIO()):
            return runpy.run_path(str(ROOT / 'synergy.py'), run_name='__main__')
    finally:
        sys.argv = saved[0]
        torch.set_num_threads(saved[1])


@pytest.fixture(scope='module')
def screen(tmp_path_factory):
    return write_screen(tmp_path_factory.mktemp('screen'))


def read_predictions(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('split,unit', [('fold', 'pairs'), ('cl_fold', 'cell_lines'), ('by_cell_line', 'cell_lines')])
def test_end_to_end_and_no_leak(screen, tmp_path, split, unit):
    synergy, expression = screen
    result = run_script('synergy.py', f'--synergy={synergy}', f'--expression={expression}', f'--split={split}',
                        f'--out_dir={tmp_path}', *TINY)
    assert 'mean ± sd over 5 folds' in result.stdout
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    for method in ('model', 'pair_mean', 'ridge'):
        for name in ('pearson', 'spearman', 'rmse', 'auroc', 'auprc'):
            entry = metrics[method][name]
            assert len(entry['folds']) == 5 and set(entry) == {'mean', 'sd', 'folds'}
        assert metrics[method]['rmse']['mean'] > 0
    # the held-out pairs (fold) or cell lines (cl_fold) are never trained on, and each fold tests its own rows
    assert all(r['held_out'][f'{unit}_in_training'] == 0 and r['held_out'][unit] > 0 for r in metrics['folds'])
    predictions = read_predictions(tmp_path / 'predictions.csv')
    assert len(predictions) == 15 * 6 and (tmp_path / 'scatter.png').stat().st_size > 0
    with open(synergy) as f:
        rows = list(csv.DictReader(f))
    if split == 'by_cell_line':                                     # folds made by synergy.py: a line in one fold
        fold_of = {p['cell_line']: p[split] for p in predictions}
        assert len(fold_of) == 6 and all(fold_of[p['cell_line']] == p[split] for p in predictions)
        rows = [dict(r, by_cell_line=fold_of[r['cell_line']]) for r in rows]
    columns = ('drug_a_name', 'drug_b_name', 'cell_line', split)
    assert sorted(tuple(p[c] for c in columns) for p in predictions) == sorted(tuple(r[c] for c in columns)
                                                                              for r in rows)

    def held(r):                                                    # what the split holds out: a pair or a line
        return frozenset((r['drug_a_name'], r['drug_b_name'])) if unit == 'pairs' else r['cell_line']
    for fold in range(5):    # training = the folds other than the test fold and the next (validation) one
        test = {held(p) for p in predictions if p[split] == str(fold)}
        assert len(test) == sum(r[split] == str(fold) for r in rows) // (6 if unit == 'pairs' else 15)
        train = {held(r) for r in rows if int(r[split]) not in (fold, (fold + 1) % 5)}
        assert test and not test & train


def test_drug_order_does_not_matter(screen, tmp_path):
    synergy, expression = screen
    g = run_module(f'--synergy={synergy}', f'--expression={expression}', f'--out_dir={tmp_path}', *TINY)
    data, features = g['data'], g['features']
    train, val, test = g['split_indices'](data['folds'], 0, 5)
    coordinates = g['cell_coordinates'](features, np.unique(data['cell'][train]))
    net, *_ = g['train_net'](data, coordinates, train, val, 0)
    a, b, cells = g['tensors'](data, test, coordinates)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.predict(a, b, cells), net.predict(b, a, cells))
        assert not torch.allclose(net(a, b, cells), net(b, a, cells))      # the net alone is not symmetric
    swapped = dict(data, drug_a=data['drug_b'], drug_b=data['drug_a'])
    assert np.allclose(g['pair_mean'](data, train, test), g['pair_mean'](swapped, train, test))
    assert np.allclose(g['ridge'](data, coordinates, train, val, test)[0],
                       g['ridge'](swapped, coordinates, train, val, test)[0])


def test_metrics_match_scipy_and_sklearn():
    stats = pytest.importorskip('scipy.stats')
    sk = pytest.importorskip('sklearn.metrics')
    from metrics import regression_metrics
    rng = np.random.default_rng(1)
    y = np.round(rng.normal(10, 20, 300))                    # rounded: ties in the truth and the predictions
    pred = np.round(y + rng.normal(0, 15, 300) / 2) / 2
    m = regression_metrics(y, pred, threshold=30)
    assert m['pearson'] == pytest.approx(stats.pearsonr(y, pred)[0], abs=1e-12)
    assert m['spearman'] == pytest.approx(stats.spearmanr(y, pred)[0], abs=1e-12)
    assert m['rmse'] == pytest.approx(np.sqrt(sk.mean_squared_error(y, pred)), abs=1e-12)
    assert m['auroc'] == pytest.approx(sk.roc_auc_score(y > 30, pred), abs=1e-12)
    assert m['auprc'] == pytest.approx(sk.average_precision_score(y > 30, pred), abs=1e-12)
    none = regression_metrics(y, np.zeros_like(y), threshold=1e9)     # a constant; no positive class
    assert none['pearson'] is None and none['auroc'] is None and none['auprc'] is None


def tiny_encoder(path, genes):
    """A random scBERT 2.0 checkpoint of ours whose vocabulary holds `genes`, saved as train.py saves one."""
    from model import ModelConfig, ScBERT
    torch.manual_seed(0)
    config = ModelConfig(n_genes=len(genes), n_embd=16, n_layer=1, n_head=2, dim_head=8, attention='sdpa',
                         input_genes='expressed', value_emb='continuous', n_bins=7, head='pooled')
    model = ScBERT(config)
    torch.save({'model': model.state_dict(), 'model_args': asdict(config), 'vocab': genes, 'label_names': [],
                'log_base': 2.0}, path)


def test_encoder_features(screen, tmp_path):
    synergy, expression = screen
    tiny_encoder(tmp_path / 'enc.pt', ['X1', *GENES[:15], 'X2'])            # 15 of the 20 genes known
    result = run_script('synergy.py', f'--synergy={synergy}', f'--expression={expression}', '--cell_features=both',
                        f'--encoder_ckpt={tmp_path / "enc.pt"}', f'--out_dir={tmp_path / "out"}', *TINY)
    assert '15 of the 20 genes' in result.stdout and 'both (36 per line)' in result.stdout
    g = run_module(f'--synergy={synergy}', f'--expression={expression}', '--cell_features=encoder',
                   f'--encoder_ckpt={tmp_path / "enc.pt"}', f'--out_dir={tmp_path / "out2"}', *TINY)
    embeddings = g['features']                                              # (6 lines, 16)
    assert embeddings.shape == (6, 16) and np.isfinite(embeddings).all()
    assert np.abs(embeddings[:, None] - embeddings[None]).sum(-1)[~np.eye(6, dtype=bool)].min() > 1e-4
    values = np.zeros((1, 20))
    values[0, 3] = 0.5                               # only G3 is above its average: the only expressed gene
    negative = values.copy()
    negative[0, 5] = -0.9                            # a gene below its average is not expressed: same embedding
    assert np.allclose(g['encoder_embeddings'](values, GENES, str(tmp_path / 'enc.pt')),
                       g['encoder_embeddings'](negative, GENES, str(tmp_path / 'enc.pt')))


def test_bad_input(screen, tmp_path):
    synergy, expression = screen
    args = [f'--out_dir={tmp_path / "out"}', *TINY]
    user_error(run_script('synergy.py', f'--synergy={synergy}', f'--expression={expression}', '--synergy_key=score',
                          *args, check=False), r"no column 'score' \(set --synergy_key")
    user_error(run_script('synergy.py', f'--synergy={synergy}', f'--expression={expression}', '--split=nope',
                          *args, check=False), r"no column 'nope' \(set --split")
    no_l5 = write_screen(tmp_path, expression_lines=LINES[:5])
    user_error(run_script('synergy.py', f'--synergy={no_l5[0]}', f'--expression={no_l5[1]}', *args, check=False),
               r'no expression profile .*L5 \(15 rows\)')
    nan_row = [['D0', 'D1', 'L0', 'nan', '0', '0'], *[['D0', 'D2', f'L{i}', '1.5', str(i % 5), str(i % 5)]
                                                       for i in range(6)]]
    bad = write_screen(tmp_path, rows=nan_row)
    user_error(run_script('synergy.py', f'--synergy={bad[0]}', f'--expression={bad[1]}', *args, check=False),
               r"1 'synergy' values are missing.*row 1")
    user_error(run_script('synergy.py', f'--synergy={synergy}', f'--expression={tmp_path / "none.csv"}', *args,
                          check=False), r'expression file .*none.csv not found')
    user_error(run_script('synergy.py', f'--synergy={synergy}', f'--expression={expression}', '--cell_features=encoder',
                          *args, check=False), r'needs --encoder_ckpt')
    binary = tmp_path / 'binary.csv'
    binary.write_bytes(bytes(range(256)) * 8)
    user_error(run_script('synergy.py', f'--synergy={synergy}', f'--expression={binary}', *args, check=False),
               r'not a readable CSV file')
    user_error(run_script('synergy.py', f'--synergy={synergy}', f'--expression={expression}', '--cell_features=both',
                          f'--encoder_ckpt={binary}', *args, check=False), r'cannot read checkpoint')
    assert not (tmp_path / 'out').exists()
