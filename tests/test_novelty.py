"""Novel cell types: metrics.py's novelty scores (maxprob, entropy, energy from the logits; Mahalanobis and kNN from
the cell embedding, with fit_novelty's statistics) against brute-force numpy references on constructed inputs,
novelty_report against scikit-learn, and data.py's leave-one-type-out split on real Baron cells."""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn import metrics as skm

from data import Dataset, fold_split, leave_out_type
from metrics import NOVELTY_SCORES, fit_novelty, novelty_report, novelty_scores

torch.set_num_threads(1)
LOGIT_SCORES = ('maxprob', 'entropy', 'energy')


# ----------------------------------------------------------------------------------------------------------------
# scores from the logits

def test_logit_scores_match_their_definitions():
    """maxprob = 1 - max softmax, entropy = -sum p log p, energy = -logsumexp(logits), on random logits (numpy or
    torch input alike), as float64 arrays [n]."""
    logits = np.random.default_rng(0).normal(0, 3, (50, 7))
    s = novelty_scores(logits)
    p = softmax(logits, axis=1)
    assert set(s) == set(LOGIT_SCORES)
    for name in LOGIT_SCORES:
        assert isinstance(s[name], np.ndarray) and s[name].dtype == np.float64 and s[name].shape == (50,)
    np.testing.assert_allclose(s['maxprob'], 1 - p.max(1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s['entropy'], -(p * np.log(p)).sum(1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s['energy'], -logsumexp(logits, axis=1), rtol=1e-12)
    s_torch = novelty_scores(torch.from_numpy(logits).float())
    for name in LOGIT_SCORES:
        np.testing.assert_allclose(s_torch[name], s[name], rtol=1e-5, atol=1e-5)


def test_logit_scores_extremes_and_ordering():
    """Uniform logits: maxprob = 1 - 1/K and entropy = log K (the maximum); one-hot-like logits: maxprob and entropy
    ~0. A confident cell scores lower (less novel) than a flat one on all three scores."""
    K = 5
    flat, confident = np.zeros(K), np.r_[40.0, np.zeros(K - 1)]
    s = novelty_scores(np.stack([flat, confident]))
    assert s['maxprob'][0] == pytest.approx(1 - 1 / K, abs=1e-12)
    assert s['entropy'][0] == pytest.approx(np.log(K), abs=1e-12)
    assert s['energy'][0] == pytest.approx(-np.log(K), abs=1e-12)
    assert s['maxprob'][1] == pytest.approx(0, abs=1e-15)
    assert s['entropy'][1] == pytest.approx(0, abs=1e-12)
    assert s['energy'][1] == pytest.approx(-40, abs=1e-12)
    # a moderately confident cell vs a flat one at the same logit scale
    s = novelty_scores(np.array([[4.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    for name in LOGIT_SCORES:
        assert s[name][0] < s[name][1], name


def test_energy_sees_the_logit_scale_the_softmax_removes():
    """[10, 0, 0] and [20, 10, 10] have the same softmax, so maxprob and entropy tie on them; energy (-logsumexp)
    differs by exactly 10 and calls the larger-logit cell less novel."""
    s = novelty_scores(np.array([[10.0, 0.0, 0.0], [20.0, 10.0, 10.0]]))
    assert s['maxprob'][0] == pytest.approx(s['maxprob'][1], rel=1e-9, abs=1e-15)
    assert s['entropy'][0] == pytest.approx(s['entropy'][1], rel=1e-9, abs=1e-15)
    assert s['energy'][0] - s['energy'][1] == pytest.approx(10, abs=1e-9)
    assert s['energy'][1] < s['energy'][0]


def test_without_stats_only_logit_scores():
    """Without fit_novelty's stats, or without features, only the logit scores come back (no Mahalanobis, no kNN)."""
    rng = np.random.default_rng(1)
    logits, feats = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))
    stats = fit_novelty(feats, rng.integers(0, 3, 10), 3, k=2)
    for s in (novelty_scores(logits), novelty_scores(logits, feats), novelty_scores(logits, None, stats)):
        assert set(s) == set(LOGIT_SCORES)
    assert set(novelty_scores(logits, feats, stats)) == set(NOVELTY_SCORES)


# ----------------------------------------------------------------------------------------------------------------
# Mahalanobis distance to the nearest class mean

def _gaussian_classes(rng, n_per_class=2000, d=3):
    """Three Gaussian classes with distinct means and one shared anisotropic, rotated covariance: std 3, 1, 0.3 along
    the columns of a random rotation Q. -> features [n, d] float64, labels [n], means [3, d], Q."""
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    std = np.array([3.0, 1.0, 0.3])
    means = np.array([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 8.0]])
    labels = np.repeat(np.arange(3), n_per_class)
    features = means[labels] + (rng.normal(size=(len(labels), d)) * std) @ Q.T
    return features, labels, means, Q


def _mahalanobis_reference(train_f, train_y, query, ridge=1e-3):
    """Brute force: min over the classes with training cells of (f - mu_c)^T inv(S) (f - mu_c), S = the pooled
    within-class covariance (divided by n) + ridge * mean(diag S) * I."""
    present = np.unique(train_y)
    mu = {c: train_f[train_y == c].mean(0) for c in present}
    centered = train_f - np.stack([mu[c] for c in train_y])
    S = centered.T @ centered / len(train_f)
    S = S + ridge * np.mean(np.diag(S)) * np.eye(len(S))
    P = np.linalg.inv(S)
    d2 = np.stack([np.einsum('nd,de,ne->n', query - mu[c], P, query - mu[c]) for c in present], axis=1)
    return d2.min(1)


def test_mahalanobis_matches_brute_force():
    """novelty_scores' Mahalanobis (expanded as f'Pf - 2f'Pmu + mu'Pmu, stats stored in float32) equals the direct
    min over classes of (f - mu_c)' inv(S) (f - mu_c), with S the pooled covariance plus fit_novelty's ridge."""
    rng = np.random.default_rng(0)
    f, y, means, Q = _gaussian_classes(rng)
    stats = fit_novelty(f, y, n_classes=3)
    np.testing.assert_allclose(stats['class_means'].numpy(), [f[y == c].mean(0) for c in range(3)], rtol=1e-5,
                               atol=1e-5)
    assert stats['class_present'].tolist() == [True, True, True]
    query = np.concatenate([rng.normal(0, 6, (200, 3)), f[::97]])
    got = novelty_scores(np.zeros((len(query), 3)), query, stats)['mahalanobis']
    want = _mahalanobis_reference(f, y, query)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the ridge is part of the definition: without it the scores are measurably different (percent level)
    no_ridge = _mahalanobis_reference(f, y, query, ridge=0)
    assert np.max(np.abs(got - no_ridge) / no_ridge) > 0.01


def test_mahalanobis_geometry():
    """A point at a class mean scores ~0; a displacement along the high-variance axis scores lower than the same
    Euclidean displacement along the low-variance axis (by about the variance ratio, 100)."""
    rng = np.random.default_rng(1)
    f, y, means, Q = _gaussian_classes(rng)
    stats = fit_novelty(f, y, n_classes=3)
    mu0 = f[y == 0].mean(0)
    query = np.stack([mu0, mu0 + 2 * Q[:, 0], mu0 + 2 * Q[:, 2]])
    d2 = novelty_scores(np.zeros((3, 3)), query, stats)['mahalanobis']
    assert d2[0] == pytest.approx(0, abs=1e-5)
    assert d2[1] == pytest.approx(4 / 9, rel=0.1)          # 2^2 / 3^2
    assert d2[2] == pytest.approx(4 / (0.09 + 1e-3 * (9 + 1 + 0.09) / 3), rel=0.1)   # 2^2 / (0.3^2 + ridge)
    assert d2[1] * 50 < d2[2]


def test_mahalanobis_ignores_classes_without_cells():
    """n_classes = 5 but the training cells use classes 0..2 (3 and 4 absent): class_present marks them, and their
    zero mean never becomes the nearest, even for a query right at the origin."""
    rng = np.random.default_rng(2)
    f, y, means, Q = _gaussian_classes(rng, n_per_class=500)
    stats = fit_novelty(f, y, n_classes=5)
    assert stats['class_present'].tolist() == [True, True, True, False, False]
    assert stats['class_means'].shape == (5, 3)
    query = np.stack([np.zeros(3), 1e-3 * np.ones(3), f[0]])
    got = novelty_scores(np.zeros((3, 5)), query, stats)['mahalanobis']
    np.testing.assert_allclose(got, _mahalanobis_reference(f, y, query), rtol=1e-4, atol=1e-4)
    assert got[0] > 1                                      # the origin is far from every real class mean
    # a class in the middle of the index range without cells: classes 0 and 2 present, 1 absent
    keep = y != 1
    stats = fit_novelty(f[keep], y[keep], n_classes=3)
    assert stats['class_present'].tolist() == [True, False, True]
    got = novelty_scores(np.zeros((3, 3)), query, stats)['mahalanobis']
    np.testing.assert_allclose(got, _mahalanobis_reference(f[keep], y[keep], query), rtol=1e-4, atol=1e-4)
    assert got[0] > 1


# ----------------------------------------------------------------------------------------------------------------
# cosine distance to the k-th nearest training cell

def _knn_reference(bank, query, k):
    """1 - the k-th largest cosine similarity of each query to the bank rows."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.sort(unit(query) @ unit(bank).T, axis=1)[:, ::-1]
    return 1 - sims[:, k - 1]


def test_knn_matches_brute_force():
    """k=1: a training cell scores ~0 (its own nearest neighbour); any k: 1 - the k-th largest cosine similarity to
    the training cells, by numpy sort; invariant to scaling the query features."""
    rng = np.random.default_rng(3)
    train, query = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
    y = rng.integers(0, 4, 300)
    stats = fit_novelty(train, y, 4, k=1)
    assert stats['k'] == 1 and stats['bank'].shape == (300, 16)
    got = novelty_scores(np.zeros((50, 4)), train[:50], stats)['knn']
    np.testing.assert_allclose(got, 0, atol=1e-6)
    for k in (1, 5, 17):
        stats = fit_novelty(train, y, 4, k=k)
        got = novelty_scores(np.zeros((40, 4)), query, stats)['knn']
        np.testing.assert_allclose(got, _knn_reference(train, query, k), rtol=0, atol=1e-6)
        scaled = novelty_scores(np.zeros((40, 4)), 7.5 * query, stats)['knn']
        np.testing.assert_allclose(scaled, got, rtol=0, atol=1e-9)
    # in chunks: the same scores whatever the chunk size
    chunked = novelty_scores(np.zeros((40, 4)), query, stats, chunk=7)['knn']
    np.testing.assert_allclose(chunked, got, rtol=0, atol=1e-12)
    assert novelty_scores(np.zeros((0, 4)), np.zeros((0, 16)), stats)['knn'].shape == (0,)


def test_knn_bank_is_capped_and_k_clipped():
    """max_bank < n: the bank holds max_bank distinct training cells (L2-normalized), a seeded random sample, and the
    score uses that bank; k larger than the bank is clipped to its size (the k-th = the least similar)."""
    rng = np.random.default_rng(4)
    train, query = rng.normal(size=(200, 8)), rng.normal(size=(30, 8))
    y = np.zeros(200, dtype=int)
    stats = fit_novelty(train, y, 1, k=50, max_bank=20, seed=3)
    bank = stats['bank'].numpy()
    assert bank.shape == (20, 8) and stats['k'] == 20
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1, atol=1e-6)
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    match = np.abs(bank[:, None, :] - unit_train[None]).max(2) < 1e-6   # [20, 200]: which training cell each row is
    assert (match.sum(1) == 1).all()
    rows = match.argmax(1)
    assert len(set(rows)) == 20 and not np.array_equal(rows, np.arange(20))   # distinct, not simply the first 20
    got = novelty_scores(np.zeros((30, 1)), query, stats)['knn']
    np.testing.assert_allclose(got, _knn_reference(train[rows], query, 20), atol=1e-6)
    # the same seed gives the same sample; the bank is not capped when n <= max_bank, and k is clipped to n
    assert torch.equal(fit_novelty(train, y, 1, k=50, max_bank=20, seed=3)['bank'], stats['bank'])
    small = fit_novelty(train[:12], y[:12], 1, k=50)
    assert small['k'] == 12 and small['bank'].shape == (12, 8)
    np.testing.assert_allclose(novelty_scores(np.zeros((30, 1)), query, small)['knn'],
                               _knn_reference(train[:12], query, 12), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# novelty_report

def test_novelty_report_on_constructed_scores():
    """A hand-checked case: AUROC, and at threshold 0.5 known_acc = mean(correct & score <= t) and novel_acc =
    mean(novel score > t) (a score equal to the threshold is not novel)."""
    known = {'maxprob': np.array([0.1, 0.2, 0.5, 0.9])}
    novel = {'maxprob': np.array([0.5, 0.8, 0.95])}
    correct = np.array([True, False, True, True])
    r = novelty_report(known, correct, novel, {'maxprob': 0.5})['maxprob']
    # pairs (novel > known): 0.5 beats 0.1, 0.2 and ties 0.5; 0.8 beats three; 0.95 beats all four
    assert r['auroc'] == pytest.approx((2.5 + 3 + 4) / 12)
    assert r['threshold'] == 0.5
    assert r['known_acc'] == pytest.approx(2 / 4)           # cells 0 and 2: right and not Unassigned
    assert r['novel_acc'] == pytest.approx(2 / 3)           # 0.8 and 0.95; 0.5 is not > 0.5


def test_novelty_report_matches_sklearn():
    """AUROC equals scikit-learn's roc_auc_score with many ties (integer scores); the accuracies equal their numpy
    definitions; a threshold of None (or none given) gives None accuracies; a score only the known cells have is
    left out."""
    rng = np.random.default_rng(5)
    known = {name: rng.integers(0, 6, 300).astype(float) for name in NOVELTY_SCORES}
    novel = {name: rng.integers(2, 9, 80).astype(float) for name in LOGIT_SCORES}
    correct = rng.random(300) < 0.7
    thresholds = {'maxprob': 3.0, 'entropy': None}
    r = novelty_report(known, correct, novel, thresholds)
    assert set(r) == set(LOGIT_SCORES)
    for name in LOGIT_SCORES:
        want = skm.roc_auc_score(np.r_[np.zeros(300), np.ones(80)], np.r_[known[name], novel[name]])
        assert r[name]['auroc'] == pytest.approx(want, abs=1e-12)
        assert r[name]['threshold'] == thresholds.get(name)
    assert r['maxprob']['known_acc'] == pytest.approx(np.mean(correct & (known['maxprob'] <= 3)))
    assert r['maxprob']['novel_acc'] == pytest.approx(np.mean(novel['maxprob'] > 3))
    for name in ('entropy', 'energy'):
        assert r[name]['known_acc'] is None and r[name]['novel_acc'] is None


# ----------------------------------------------------------------------------------------------------------------
# the leave-one-type-out split

def _check_leave_out(ds, orig, t, split):
    """leave_out_type(t) then `split` (-> train, val, test): the held-out type is in none of them, the known cells
    keep their names under the new labels, nothing known is lost."""
    labels, names, novel = leave_out_type(orig, ds.label_names, t)
    c = ds.label_names.index(t)
    assert t not in names and len(names) == len(ds.label_names) - 1
    assert np.array_equal(novel, np.flatnonzero(orig == c))
    assert len(novel) > 0 and (labels[novel] == -1).all()
    known = np.flatnonzero((orig >= 0) & (orig != c))
    assert [names[i] for i in labels[known]] == [ds.label_names[i] for i in orig[known]]
    assert (labels[orig < 0] == -1).all()                  # unlabelled cells stay unlabelled (and not novel)
    ds.labels = labels
    try:
        parts = split(ds)
    finally:
        ds.labels = orig
    for part in parts:
        assert not np.isin(novel, part).any(), t
        assert ((labels[part] >= 0) & (labels[part] < len(names))).all()
    return known, np.concatenate(parts)


def test_leave_one_type_out_never_trains_on_the_held_out_type(baron):
    """For every cell type and every fold: the held-out type's cells are in none of train/val/test, the remaining
    labels are 0..len(names)-1 and keep their names, and train+val+test = every known labelled cell of a fold.
    The same with some cells made unlabelled (-1) and some outside every fold (-1)."""
    ds = Dataset(baron)
    orig_labels, orig_folds = ds.labels.copy(), ds.folds.copy()
    assert len(ds.label_names) > 2 and ds.n_folds == 5
    for variant in ('as prepared', 'with unlabelled cells'):
        if variant == 'with unlabelled cells':
            ds.labels = orig_labels.copy()
            ds.labels[::7] = -1
            ds.folds = orig_folds.copy()
            ds.folds[3::11] = -1
        orig = ds.labels.copy()
        for t in ds.label_names:
            for k in range(ds.n_folds):
                known, union = _check_leave_out(ds, orig, t, lambda d: fold_split(d, k, labelled_only=True))
                assert len(union) == len(np.unique(union))  # the parts are disjoint
                assert np.array_equal(np.sort(union), known[ds.folds[known] >= 0]), (t, k)
                assert np.array_equal(ds.labels, orig)       # restored
    ds.labels, ds.folds = orig_labels, orig_folds


def test_leave_one_type_out_with_a_test_batch(baron):
    """With test_batch='mouse2' (test = that donor's labelled cells, train/val = the other donor's): the held-out
    type appears nowhere, and the test set is every known mouse2 cell."""
    ds = Dataset(baron)
    orig = ds.labels.copy()
    mouse2 = ds.batch == ds.meta['batch_names'].index('mouse2')
    for t in ds.label_names:
        known, union = _check_leave_out(ds, orig, t, lambda d: fold_split(d, 0, 'mouse2', labelled_only=True))
        assert len(union) == len(np.unique(union))
        ds.labels = leave_out_type(orig, ds.label_names, t)[0]
        train, val, test = fold_split(ds, 0, 'mouse2', labelled_only=True)
        ds.labels = orig
        assert np.array_equal(test, known[mouse2[known]])
        assert not mouse2[train].any() and not mouse2[val].any()
        assert np.array_equal(np.sort(union), known[(ds.folds[known] >= 0) | mouse2[known]])


def test_leave_out_unknown_type():
    """An unknown type name raises ValueError (list.index); train.py checks --leave_out against the names first and
    raises a readable error. The inputs are not modified; a numpy label array or a list both work."""
    labels, names = np.array([0, 1, 2, 1, -1]), ['a', 'b', 'c']
    with pytest.raises(ValueError):
        leave_out_type(labels, names, 'd')
    new, new_names, novel = leave_out_type(labels.tolist(), names, 'a')
    assert new.tolist() == [-1, 0, 1, 0, -1] and new_names == ['b', 'c'] and novel.tolist() == [0]
    assert labels.tolist() == [0, 1, 2, 1, -1] and names == ['a', 'b', 'c']
