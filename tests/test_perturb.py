"""perturb.py: the split, the baselines against hand computation, the metrics against scipy, short end-to-end runs
(a held-out cell type; held-out knockouts with gene sets; a pretrained encoder mapped by gene name) and bad input."""
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import run_script, user_error, write_h5ad

import metrics
import perturb
from model import ModelConfig, ScBERT

TINY = ['--n_embd=16', '--n_layer=1', '--n_head=2', '--n_kv_head=1', '--dim_head=8', '--head_hidden=16',
        '--batch_size=8', '--max_iters=6', '--log_interval=3', '--num_threads=1']
GENES = [f'G{i}' for i in range(28)] + ['STAT1', 'JAK2']


def counts(rng, n, mean):
    return rng.poisson(mean, size=(n, len(mean))).astype(np.float32)


@pytest.fixture(scope='module')
def kang(tmp_path_factory):
    """Three cell types (A has 10 control and 10 stimulated cells, B and C 8 and 8); stimulation raises G0..G4."""
    rng = np.random.default_rng(0)
    X, condition, kind = [], [], []
    for t, n in (('A', 10), ('B', 8), ('C', 8)):
        base = rng.uniform(1, 6, len(GENES))
        stim = base.copy()
        stim[:5] *= 4
        X += [counts(rng, n, base), counts(rng, n, stim)]
        condition += ['ctrl'] * n + ['stim'] * n
        kind += [t] * 2 * n
    path = tmp_path_factory.mktemp('kang') / 'kang.h5ad'
    write_h5ad(path, np.concatenate(X), GENES, {'condition': condition, 'cluster_id': kind})
    return path


@pytest.fixture(scope='module')
def knockouts(tmp_path_factory):
    """12 control cells and 6 cells of each of four knockouts; STAT1 and JAK2 are measured and drop in their own
    knockout; IRF1 and IFNGR1 are not measured. Plus a GMT file where STAT1, JAK2 and IFNGR1 share a set."""
    rng = np.random.default_rng(1)
    base = rng.uniform(1, 6, len(GENES))
    X, target = [counts(rng, 12, base)], ['control'] * 12
    for name in ('STAT1', 'JAK2', 'IRF1', 'IFNGR1'):
        mean = base.copy()
        mean[5:8] *= 3
        if name in GENES:
            mean[GENES.index(name)] = 0.1
        X.append(counts(rng, 6, mean))
        target += [name] * 6
    folder = tmp_path_factory.mktemp('ko')
    write_h5ad(folder / 'ko.h5ad', np.concatenate(X), GENES, {'target_gene': target})
    (folder / 'sets.gmt').write_text('IFNG_SIGNALING\tx\tSTAT1\tJAK2\tIFNGR1\tG1\n'
                                     'OTHER\tx\tG2\tG3\tG4\tIRF1\n')
    return folder


KANG_ARGS = ['--task=celltype', '--perturbation_key=condition', '--control_value=ctrl', '--cell_type_key=cluster_id']
GENE_ARGS = ['--task=gene', '--perturbation_key=target_gene', '--control_value=control']


@pytest.fixture
def settings(monkeypatch):
    """Set perturb's module settings for an in-process call (undone after the test)."""
    def set_(**kw):
        for k, v in kw.items():
            monkeypatch.setattr(perturb, k, v)
    return set_


def test_split_and_baselines_by_hand(kang, settings):
    settings(input=str(kang), task='celltype', perturbation_key='condition', control_value='ctrl',
             cell_type_key='cluster_id', holdout='all')
    cells = perturb.read_cells()
    assert cells.groups == ['A', 'B', 'C'] and perturb.plan_runs(cells) == [['A'], ['B'], ['C']]
    train = perturb.training_cells(cells, ['B'])
    held = np.flatnonzero((cells.cell_type == 'B') & (cells.pert > 0))
    assert not np.intersect1d(train, held).size                     # B's stimulated cells are never trained on
    assert np.isin(np.flatnonzero((cells.cell_type == 'B') & (cells.pert == 0)), train).all()   # its controls are
    pred = perturb.baselines(cells, ['B'], perturb.perturbation_sets(cells))['B']
    X, t, stim = cells.X, cells.cell_type, cells.pert > 0
    control_b = X[(t == 'B') & ~stim].mean(0)
    shift = [X[(t == s) & stim].mean(0) - X[(t == s) & ~stim].mean(0) for s in ('A', 'C')]
    np.testing.assert_allclose(pred['no_change'], control_b, rtol=1e-6)
    np.testing.assert_allclose(pred['mean_shift'], control_b + (shift[0] + shift[1]) / 2, rtol=1e-5, atol=1e-6)
    # linear: ridge (kernel form) from the types' control means to their shifts, with an intercept
    f = np.stack([X[(t == s) & ~stim].mean(0) for s in ('A', 'C')]).astype(np.float64)
    fc, y = f - f.mean(0), np.stack(shift)
    lam = perturb.ridge_alpha * np.trace(fc @ fc.T) / 2
    w = fc.T @ np.linalg.solve(fc @ fc.T + lam * np.eye(2), y - y.mean(0))            # (F, G) = the primal solution
    np.testing.assert_allclose(pred['linear'], control_b + y.mean(0) + (control_b - f.mean(0)) @ w, rtol=1e-4,
                               atol=1e-5)


def test_gene_folds_hold_each_target_out_once(knockouts, settings):
    settings(input=str(knockouts / 'ko.h5ad'), task='gene', perturbation_key='target_gene', control_value='control',
             cell_type_key='', holdout='all', n_folds=3)
    cells = perturb.read_cells()
    runs = perturb.plan_runs(cells)
    assert sorted(g for run in runs for g in run) == sorted(cells.perturbations) and len(runs) == 3
    for run in runs:
        train = perturb.training_cells(cells, run)
        assert not np.isin(cells.perturbation[train], run).any()
        assert (cells.pert[train] == 0).sum() == 12                   # every control cell trains
    pred = perturb.baselines(cells, ['JAK2'], perturb.perturbation_sets(cells))['JAK2']
    control = cells.X[cells.pert == 0].mean(0)
    shifts = [cells.X[cells.perturbation == g].mean(0) - control for g in ('IFNGR1', 'IRF1', 'STAT1')]
    np.testing.assert_allclose(pred['mean_shift'], control + np.mean(shifts, 0), rtol=1e-5, atol=1e-6)


def test_metrics_against_scipy():
    stats = pytest.importorskip('scipy.stats')
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(15, 40)), rng.normal(0.3, 2.0, size=(9, 40))
    np.testing.assert_allclose(metrics.welch_t(b, a), stats.ttest_ind(b, a, equal_var=False).statistic, rtol=1e-10)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.pearson(x, np.ones(50)) == 0.0                    # a constant prediction (no change) scores 0
    control, true, pred = rng.uniform(0, 3, 200), rng.uniform(0, 3, 200), rng.uniform(0, 3, 200)
    order = metrics.top_de_genes(rng.normal(size=(5, 200)) + true, rng.normal(size=(6, 200)) + control, 100)
    m = metrics.perturbation_metrics(pred, true, control, order)
    top20, top100 = order[:20], order[:100]
    assert m['pearson_delta_top20'] == pytest.approx(stats.pearsonr(pred[top20] - control[top20],
                                                                    true[top20] - control[top20])[0])
    assert m['pearson_delta_all'] == pytest.approx(stats.pearsonr(pred - control, true - control)[0])
    assert m['r2_top100'] == pytest.approx(stats.linregress(pred[top100], true[top100]).rvalue ** 2)
    assert m['r2_all'] == pytest.approx(stats.linregress(pred, true).rvalue ** 2)
    assert m['mse_top20'] == pytest.approx(np.mean((pred[top20] - true[top20]) ** 2))
    assert set(m) == set(metrics.PERTURBATION_METRICS)


def check_metrics(out, groups):
    result = json.loads((out / 'metrics.json').read_text())
    assert set(result['groups']) == set(groups)
    for where in [result['mean']] + [result['groups'][g] for g in groups]:
        for method in ('model', 'no_change', 'mean_shift', 'linear'):
            assert set(where[method]) == {'pearson_delta_top20', 'pearson_delta_all', 'r2_top100', 'r2_all',
                                          'mse_top20'}
            assert all(math.isfinite(v) for v in where[method].values())
    assert (out / 'summary.png').is_file()
    return result


def test_celltype_end_to_end(kang, tmp_path):
    out = tmp_path / 'out'
    run_script('perturb.py', f'--input={kang}', *KANG_ARGS, '--holdout=all', f'--out_dir={out}', *TINY)
    result = check_metrics(out, ['A', 'B', 'C'])
    assert {p.name for p in out.glob('shift_*.png')} == {'shift_A.png', 'shift_B.png', 'shift_C.png'}
    assert result['groups']['B']['n_perturbed'] == 8 and result['groups']['B']['n_control'] == 8


def test_gene_end_to_end_with_gene_sets(knockouts, tmp_path):
    out = tmp_path / 'out'
    r = run_script('perturb.py', f'--input={knockouts / "ko.h5ad"}', *GENE_ARGS, '--holdout=all', '--n_folds=2',
                   '--pathway_enc=True', f'--gene_sets={knockouts / "sets.gmt"}', '--min_set_genes=3',
                   f'--out_dir={out}', *TINY)
    assert 'gene sets: 2 kept; 4 of 4 targets in at least one' in r.stdout
    result = check_metrics(out, ['STAT1', 'JAK2', 'IRF1', 'IFNGR1'])
    assert set(result['groups']['STAT1']['target_shift']) == {'true', 'model', 'no_change', 'mean_shift', 'linear'}
    assert result['groups']['STAT1']['target_shift']['true'] < 0          # the knockout's own drop is reported
    assert 'target_shift' not in result['groups']['IRF1']                 # IRF1 is not measured


def test_pretrained_encoder_mapped_by_gene_name(knockouts, tmp_path):
    """A checkpoint over another vocabulary (some of the data's genes, in another order, plus others): its encoder
    is loaded, the data's genes are moved to its rows, and an unmeasured target that it knows gets its embedding."""
    vocab = ['IRF1', 'X1'] + GENES[::-1][:20]
    cfg = ModelConfig(n_genes=len(vocab), n_embd=16, n_layer=1, n_head=2, n_kv_head=1, dim_head=8,
                      attention='sdpa', input_genes='expressed', value_emb='continuous', n_bins=10)
    torch.manual_seed(0)
    encoder = ScBERT(cfg)
    ckpt = tmp_path / 'pre.pt'
    torch.save({'model_args': asdict(cfg), 'model': encoder.state_dict(), 'vocab': vocab, 'mode': 'pretrain'}, ckpt)
    out = tmp_path / 'out'
    r = run_script('perturb.py', f'--input={knockouts / "ko.h5ad"}', *GENE_ARGS, '--holdout=IRF1',
                   f'--init_from={ckpt}', f'--out_dir={out}', '--max_iters=3', '--batch_size=4', '--num_threads=1')
    assert 'encoder from' in r.stdout and '20 of 30 genes in its vocabulary' in r.stdout
    check_metrics(out, ['IRF1'])


@pytest.mark.parametrize('args, pattern', [
    (['--perturbation_key=stim_state'], r"stim_state.*perturbation_key"),
    (['--control_value=untreated'], r"no cell has condition='untreated'.*control_value"),
    (['--holdout=D'], r"--holdout=D is not one of the cell types: A, B, C"),
    (['--cell_type_key='], r"cell_type_key"),
    (['--task=drug'], r"task must be 'celltype' or 'gene'"),
    (['--input=missing.h5ad'], r"missing.h5ad is not a file"),
])
def test_bad_input(kang, tmp_path, args, pattern):
    r = run_script('perturb.py', f'--input={kang}', *KANG_ARGS, f'--out_dir={tmp_path / "o"}', *TINY, *args,
                   check=False)
    user_error(r, pattern)
    assert not (tmp_path / 'o').exists()


def test_held_out_type_without_control_cells(tmp_path):
    rng = np.random.default_rng(2)
    X = counts(rng, 24, rng.uniform(1, 5, len(GENES)))
    obs = {'condition': ['ctrl'] * 4 + ['stim'] * 4 + ['ctrl'] * 4 + ['stim'] * 4 + ['stim'] * 8,
           'cluster_id': ['A'] * 8 + ['B'] * 8 + ['C'] * 8}
    write_h5ad(tmp_path / 'x.h5ad', X, GENES, obs)
    r = run_script('perturb.py', f'--input={tmp_path / "x.h5ad"}', *KANG_ARGS, '--holdout=all',
                   f'--out_dir={tmp_path / "o"}', *TINY, check=False)
    user_error(r, r"held-out group 'C' has 0 control and 8 perturbed cells")


def test_unseen_perturbation_gets_the_mean_trained_row(knockouts, settings):
    settings(input=str(knockouts / 'ko.h5ad'), task='gene', perturbation_key='target_gene', control_value='control',
             cell_type_key='')
    cells = perturb.read_cells()
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.pert_emb = torch.nn.Embedding(len(cells.perturbations) + 1, 3)
    before = model.pert_emb.weight.detach().clone()
    perturb.fill_unseen(model, cells, perturb.training_cells(cells, ['JAK2']))
    after = model.pert_emb.weight.detach()
    jak2 = cells.perturbations.index('JAK2') + 1
    trained = [i for i in range(1, len(cells.perturbations) + 1) if i != jak2]
    torch.testing.assert_close(after[jak2], before[trained].mean(0))
    keep = [i for i in range(len(after)) if i != jak2]
    torch.testing.assert_close(after[keep], before[keep])          # the control row and the trained rows stay
