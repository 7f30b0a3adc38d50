"""metrics.py against scikit-learn, the reference (tests only: the project itself does not use scikit-learn)."""
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from metrics import (auroc, classification_metrics, fit_logistic_regression, format_metrics_line, plot_confusion,
                     plot_loss)

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
PBMC = SHARED / 'pbmc68k_reduced.h5ad'


@pytest.fixture
def predictions():
    """Labels of 7 classes: class 5 is never predicted, class 4 is predicted but never true, class 6 is in neither."""
    rng = np.random.default_rng(0)
    n, n_classes = 400, 7
    y_true = rng.choice([0, 1, 2, 3, 5], size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 5, n))  # 60% right, the rest random in 0..4
    y_pred[y_pred == 5] = 4
    return y_true, y_pred, [f'type {k}' for k in range(n_classes)]


def test_classification_metrics_match_sklearn(predictions):
    y_true, y_pred, names = predictions
    m = classification_metrics(y_true, y_pred, label_names=names)
    assert m['n'] == len(y_true)
    assert m['accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sklearn warns about the ill-defined classes; zero_division=0 is the point
        assert m['macro_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, average='macro', zero_division=0), abs=1e-12)
        assert m['weighted_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, average='weighted', zero_division=0),
                                                 abs=1e-12)
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=range(len(names)), zero_division=0)
    assert list(m['per_class']) == names  # every class, present or not
    for k, name in enumerate(names):
        got = m['per_class'][name]
        assert got['precision'] == pytest.approx(precision[k], abs=1e-12)
        assert got['recall'] == pytest.approx(recall[k], abs=1e-12)
        assert got['f1'] == pytest.approx(f1[k], abs=1e-12)
        assert got['support'] == support[k]
    assert m['per_class']['type 5']['precision'] == 0 and m['per_class']['type 5']['recall'] == 0  # never predicted
    assert m['confusion'] == skm.confusion_matrix(y_true, y_pred, labels=range(len(names))).tolist()
    assert m['macro_auroc'] is None  # no probabilities given


def test_metrics_are_plain_json(predictions):
    y_true, y_pred, names = predictions
    prob = np.random.default_rng(1).dirichlet(np.ones(len(names)), size=len(y_true)).astype(np.float32)
    m = classification_metrics(torch.from_numpy(y_true), torch.from_numpy(y_pred), torch.from_numpy(prob), names)
    assert json.loads(json.dumps(m)) == m  # plain floats, ints, lists and dicts only
    assert all(type(m[key]) is float for key in ('accuracy', 'macro_f1', 'weighted_f1', 'macro_auroc'))
    assert m['confusion'] == classification_metrics(y_true, y_pred, prob, names)['confusion']


def test_without_label_names_classes_are_numbered(predictions):
    y_true, y_pred, _ = predictions
    m = classification_metrics(y_true, y_pred)
    assert list(m['per_class']) == ['0', '1', '2', '3', '4', '5']  # 0..max label
    with pytest.raises(ValueError, match='missing label'):
        classification_metrics(np.array([0, -1]), np.array([0, 1]))


def test_binary_auroc_with_ties_matches_sklearn():
    rng = np.random.default_rng(2)
    for n, levels in [(50, 3), (300, 10), (1000, 1000)]:  # few distinct scores: many ties
        positive = rng.random(n) < 0.3
        scores = np.round(rng.random(n) + 0.3 * positive, 1) if levels < 1000 else rng.random(n)
        scores = np.floor(scores * levels) / levels
        assert auroc(scores, positive) == pytest.approx(skm.roc_auc_score(positive, scores), abs=1e-12)
    assert auroc(np.ones(10), np.arange(10) < 4) == 0.5  # all tied


def test_macro_auroc_matches_sklearn_ovr_with_ties():
    rng = np.random.default_rng(3)
    n, n_classes = 500, 4
    y_true = rng.integers(0, n_classes, n)
    # logits from a few integer levels: identical rows give identical probabilities, i.e. ties in every column
    logits = rng.integers(0, 3, (n, n_classes)) + 1.0 * np.eye(n_classes)[y_true] * (rng.random(n) < 0.5)[:, None]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert len(np.unique(prob[:, 0])) < n / 5
    m = classification_metrics(y_true, prob.argmax(1), prob)
    expected = skm.roc_auc_score(y_true, prob, multi_class='ovr', average='macro')
    assert m['macro_auroc'] == pytest.approx(expected, abs=1e-12)


def test_macro_auroc_skips_classes_without_positives():
    rng = np.random.default_rng(4)
    y_true = rng.choice([0, 1, 3], size=200)  # class 2 has no positives
    prob = rng.dirichlet(np.ones(4), size=200)
    m = classification_metrics(y_true, prob.argmax(1), prob)
    expected = np.mean([skm.roc_auc_score(y_true == k, prob[:, k]) for k in (0, 1, 3)])
    assert m['macro_auroc'] == pytest.approx(expected, abs=1e-12)
    assert classification_metrics(np.zeros(5, int), np.zeros(5, int), np.ones((5, 1)))['macro_auroc'] is None


def test_format_metrics_line():
    m = {'accuracy': 0.8421, 'macro_f1': 0.70149, 'macro_auroc': None}
    assert format_metrics_line(m) == 'acc 0.842  macro-F1 0.701'
    assert format_metrics_line({**m, 'macro_auroc': 0.9534}) == 'acc 0.842  macro-F1 0.701  AUROC 0.953'


def sklearn_reference(X, y, C):
    """scikit-learn's LogisticRegression run to convergence, in float64 (on float32 input it computes in float32)."""
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(X.astype(np.float64), y)


def objective(X, y, coef, intercept, C):
    """sum_i cross_entropy_i + ||coef||^2 / (2C): the objective both minimise."""
    logits = X.astype(np.float64) @ coef.T + intercept
    logits -= logits.max(1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_prob[np.arange(len(y)), y].sum() + (coef ** 2).sum() / (2 * C)


@pytest.fixture(scope='module')
def pbmc():
    """The 700 PBMCs, log-normalized (raw.X of the legacy-format file), and their 10 bulk labels."""
    if not PBMC.exists():
        pytest.skip(f'{PBMC} not found')
    with h5py.File(PBMC) as f:
        indptr, indices, values = f['raw.X/indptr'][:], f['raw.X/indices'][:], f['raw.X/data'][:]
        n_cells, n_genes = f['raw.X'].attrs['h5sparse_shape']
        labels = f['obs']['bulk_labels'].astype(np.int64)
    X = np.zeros((n_cells, n_genes), np.float32)
    X[np.repeat(np.arange(n_cells), np.diff(indptr)), indices] = values
    return X, labels


@pytest.mark.parametrize('C', [1.0, 0.1])
def test_logistic_regression_matches_sklearn_on_pbmc(pbmc, C):
    X, y = pbmc
    train = np.random.default_rng(0).permutation(len(y))[:450]  # fewer cells than genes
    ours = fit_logistic_regression(X[train], y[train], n_classes=10, C=C)
    reference = sklearn_reference(X[train], y[train], C)
    assert list(reference.classes_) == list(range(10))
    prob, expected = ours.predict_proba(X), reference.predict_proba(X.astype(np.float64))  # training and held-out cells
    assert prob.shape == (700, 10) and np.allclose(prob.sum(1), 1)
    assert np.abs(prob - expected).max() < 1e-3
    assert (ours.predict(X) == expected.argmax(1)).mean() >= 0.995
    # at least as low an objective as scikit-learn's solution (to rounding)
    ours_objective = objective(X[train], y[train], ours.coef, ours.intercept, C)
    assert ours_objective <= objective(X[train], y[train], reference.coef_, reference.intercept_, C) + 1e-6


def test_logistic_regression_more_cells_than_genes_and_absent_class(pbmc):
    X, y = pbmc
    X = X[:, :200]  # 700 cells > 200 genes: the other branch of the change of variables
    keep = y != 3  # class 3 absent from training: its column must still exist, with probability 0
    ours = fit_logistic_regression(X[keep], y[keep], n_classes=10, C=0.5)
    reference = sklearn_reference(X[keep], y[keep], 0.5)
    prob = ours.predict_proba(X)
    assert prob.shape == (700, 10) and (prob[:, 3] == 0).all()
    expected = reference.predict_proba(X.astype(np.float64))
    assert np.abs(np.delete(prob, 3, axis=1) - expected).max() < 1e-3
    assert (ours.predict(X) == reference.classes_[expected.argmax(1)]).mean() >= 0.995


def test_logistic_regression_on_synthetic_data():
    """Needs no shared data: well-separated blobs, with all-zero genes (as in sparse expression data)."""
    rng = np.random.default_rng(5)
    n, n_genes, n_classes = 300, 40, 3
    y = rng.integers(0, n_classes, n)
    centers = rng.normal(0, 1, (n_classes, n_genes)) * (rng.random(n_genes) < 0.5)
    X = (centers[y] + rng.normal(0, 1, (n, n_genes))).astype(np.float32)
    X[:, :5] = 0
    ours = fit_logistic_regression(torch.from_numpy(X), torch.from_numpy(y), n_classes=n_classes, C=2.0)
    reference = sklearn_reference(X, y, 2.0)
    assert np.abs(ours.predict_proba(X) - reference.predict_proba(X.astype(np.float64))).max() < 1e-3
    assert (ours.coef[:, :5] == 0).all()
    assert np.abs(ours.coef - reference.coef_).max() < 1e-3


def test_plots_write_png(tmp_path):
    confusion = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]
    plot_confusion(confusion, ['B cell', 'CD4+/CD45RA+/CD25- Naive T', 'absent'], tmp_path / 'confusion.png',
                   title='test fold 0')
    plot_loss({'iter': [0, 10, 20], 'train_loss': [2.3, 1.5, 1.1]}, tmp_path / 'loss_train_only.png')
    plot_loss({'iter': list(range(0, 100, 10)), 'train_loss': list(np.linspace(2, 0.5, 10)),
               'val_iter': [0, 50, 99], 'val_loss': [2.1, 1.0, 0.8], 'val_macro_f1': [0.1, 0.5, 0.6]},
              tmp_path / 'loss.png')
    for name in ('confusion.png', 'loss_train_only.png', 'loss.png'):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b'\x89PNG') and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ['confusion.png', 'loss.png', 'loss_train_only.png']
