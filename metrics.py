"""
Classification and regression metrics, the logistic-regression baseline, novelty scores (novel cell types),
perturbation metrics, and the plots train.py, predict.py, perturb.py and synergy.py write.

Our own numpy/torch code (no scikit-learn at run time); tests/test_metrics.py checks every number against
scikit-learn. The definitions follow scikit-learn's defaults, so our figures can sit beside published ones:
  - macro/weighted F1 average over the labels present in y_true or y_pred, and a 0/0 precision/recall/F1 is 0;
  - AUROC is one-vs-rest per class, with tied scores counted as half (the trapezoid rule), averaged over classes.
The baseline is multinomial logistic regression with an L2 penalty, the model that matched scBERT on Zheng68k
(Boiarsky et al. 2023, "A deep dive into single-cell RNA sequencing foundation models").
"""
import numpy as np
import torch
import torch.nn.functional as F


def to_numpy(a):
    if torch.is_tensor(a):
        a = a.detach().cpu()
        a = a.double() if a.is_floating_point() else a  # numpy has no bfloat16
        return a.numpy()
    return np.asarray(a)


def auroc(scores, positive):
    """Area under the ROC curve of scores [n] for the boolean labels positive [n].

    It is the Mann-Whitney statistic P(score of a positive > score of a negative), a tie counting 1/2;
    computed from the ranks of the scores, ties getting their average rank. This equals the trapezoid-rule
    area under the ROC curve, as scikit-learn's roc_auc_score computes it.
    """
    n, n_pos = len(scores), int(positive.sum())
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))


def average_ranks(x):
    """1-based ranks of x [n], ties getting their average rank (scipy.stats.rankdata's default) -> float64 [n]."""
    n = len(x)
    order = np.argsort(x, kind='stable')
    starts = np.r_[0, np.flatnonzero(np.diff(x[order])) + 1]  # first index of each run of equal values
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # average of the 1-based ranks starts+1..ends
    return ranks


def average_precision(scores, positive):
    """Area under the precision-recall curve of scores [n] for the boolean labels positive [n], as scikit-learn's
    average_precision_score: sum over the distinct thresholds (descending) of (recall gained) x precision there."""
    order = np.argsort(-scores, kind='stable')
    s, hit = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]     # the last index of each run of equal scores
    true_pos = np.cumsum(hit)[last]
    precision, recall = true_pos / (last + 1), true_pos / max(hit.sum(), 1)
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def pearson(a, b):
    """Pearson correlation of two 1-D arrays (0.0 when either is constant)."""
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def regression_metrics(y_true, y_pred, threshold=30.0):
    """Predictions y_pred [n] of a continuous y_true [n] (drug synergy): Pearson and Spearman correlation, RMSE, and,
    as DeepSynergy (Preuer et al. 2018) reported them, AUROC and AUPRC of y_pred for the class y_true > threshold
    (None when the class or its complement is empty; the correlations are None for a constant). A JSON-serialisable
    dict."""
    y_true, y_pred = to_numpy(y_true).astype(np.float64), to_numpy(y_pred).astype(np.float64)
    positive = y_true > threshold
    both = 0 < positive.sum() < len(y_true)
    varied = np.ptp(y_true) > 0 and np.ptp(y_pred) > 0           # a constant has no correlation
    return {'n': len(y_true),
            'pearson': pearson(y_true, y_pred) if varied else None,
            'spearman': pearson(average_ranks(y_true), average_ranks(y_pred)) if varied else None,
            'rmse': float(np.sqrt(np.mean((y_true - y_pred) ** 2))),
            'auroc': auroc(y_pred, positive) if both else None,
            'auprc': average_precision(y_pred, positive) if both else None}


def classification_metrics(y_true, y_pred, prob=None, label_names=None):
    """Metrics of predictions y_pred [n] against y_true [n] (class indices); prob [n, n_classes] for AUROC.

    Returns a JSON-serialisable dict: n, accuracy, macro_f1, weighted_f1, macro_auroc (None without prob or
    when no class has both positives and negatives), per_class {name: {precision, recall, f1, support}} for
    every class, and confusion [n_classes][n_classes] (rows = true class, columns = predicted class).
    """
    y_true, y_pred = to_numpy(y_true).astype(np.int64), to_numpy(y_pred).astype(np.int64)
    prob = None if prob is None else to_numpy(prob)
    n = len(y_true)
    if n == 0 or y_pred.shape != y_true.shape:
        raise ValueError(f'need as many predictions as labels, and at least one: got {len(y_pred)} and {n}')
    if label_names is None:
        n_classes = max(y_true.max(), y_pred.max(), -1 if prob is None else prob.shape[1] - 1) + 1
        label_names = range(n_classes)
    label_names, n_classes = [str(name) for name in label_names], len(label_names)
    if min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes:
        raise ValueError(f'class indices must lie in 0..{n_classes - 1} (drop cells with a missing label, -1, first)')

    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes ** 2).reshape(n_classes, n_classes)
    true_positives = np.diag(confusion)
    support = confusion.sum(1)    # cells of each true class
    predicted = confusion.sum(0)  # cells predicted as each class
    with np.errstate(divide='ignore', invalid='ignore'):  # 0/0 -> 0, scikit-learn's zero_division=0
        precision = np.nan_to_num(true_positives / predicted)
        recall = np.nan_to_num(true_positives / support)
        f1 = np.nan_to_num(2 * true_positives / (support + predicted))  # = 2PR/(P+R)
    present = (support + predicted) > 0  # labels in y_true or y_pred: the ones scikit-learn averages over

    macro_auroc = None
    if prob is not None:
        if prob.shape != (n, n_classes):
            raise ValueError(f'prob must have shape ({n}, {n_classes}), got {prob.shape}')
        both = [k for k in range(n_classes) if 0 < support[k] < n]  # AUROC needs positives and negatives
        if both:
            macro_auroc = float(np.mean([auroc(prob[:, k], y_true == k) for k in both]))

    return {
        'n': n,
        'accuracy': float(true_positives.sum() / n),
        'macro_f1': float(f1[present].mean()),
        'weighted_f1': float((f1 * support).sum() / n),
        'macro_auroc': macro_auroc,
        'per_class': {name: {'precision': float(precision[k]), 'recall': float(recall[k]), 'f1': float(f1[k]),
                             'support': int(support[k])} for k, name in enumerate(label_names)},
        'confusion': confusion.tolist(),
    }


def format_metrics_line(m):
    """One short line, e.g. 'acc 0.842  macro-F1 0.701  AUROC 0.953' (AUROC only when there is one)."""
    line = f"acc {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
    return line + (f"  AUROC {m['macro_auroc']:.3f}" if m.get('macro_auroc') is not None else '')


class LogisticRegression:
    """A fitted softmax regression: predict_proba(X) = softmax(X @ coef.T + intercept), per cell."""

    def __init__(self, coef, intercept, n_iter):
        self.coef = coef            # float64 [n_classes, n_genes]
        self.intercept = intercept  # float64 [n_classes]; -inf for classes absent from the training labels
        self.n_iter = n_iter        # L-BFGS iterations taken

    def predict_proba(self, X, chunk=4096):
        coef, intercept = torch.from_numpy(self.coef), torch.from_numpy(self.intercept)
        out = [torch.softmax(torch.as_tensor(to_numpy(X[i:i + chunk]), dtype=torch.float64) @ coef.T + intercept, 1)
               for i in range(0, len(X), chunk)]  # in chunks: a float64 copy of all of X may not fit
        return torch.cat(out).numpy()

    def predict(self, X):
        return self.predict_proba(X).argmax(1)


def fit_logistic_regression(X, y, n_classes, C=1.0, max_iter=500):
    """Multinomial logistic regression of labels y [n] on features X [n, n_genes] (log-normalized expression).

    Minimises scikit-learn's LogisticRegression(C=C) objective (multinomial, lbfgs):
        sum_i cross_entropy_i + ||coef||^2 / (2 C)        (the intercept is not penalised)
    with full-batch L-BFGS and a strong-Wolfe line search, in float64. Two exact changes of variables make it
    fast (Baron-size data, 1,500 x 15,000, converges in ~200 iterations where scikit-learn needs ~1,750):
      - coef only matters through X coef^T, and the penalty pushes everything else to 0, so coef lies in the
        row space of X. With an orthonormal basis Q [n_genes, r] of that space (r <= min(n, n_genes)),
        coef = V Q^T has ||coef|| = ||V||: the same problem in r dimensions, with features Z = X Q, Z^T Z = diag(s).
      - V is rescaled per direction by 1 / sqrt(gamma s + 1/C), a diagonal estimate of the Hessian, as L-BFGS
        is slow on badly scaled problems (s spans many orders of magnitude in expression data).
    The eigendecomposition costs ~min(n, n_genes)^2 max(n, n_genes): on one core PBMC (700 x 765) takes ~2 s,
    1,500 x 15,000 ~5 s, 4,500 x 15,000 ~50 s. Memory: X in float64 plus a min(n, n_genes)^2 matrix.
    """
    X = torch.as_tensor(to_numpy(X), dtype=torch.float64)
    y = torch.as_tensor(to_numpy(y), dtype=torch.int64)
    n, n_genes = X.shape
    # Classes absent from y: fitted as if they did not exist (as scikit-learn would), then given probability 0.
    classes = torch.unique(y)
    target = torch.searchsorted(classes, y)  # y as indices into classes

    if n < n_genes:  # from X X^T = U diag(s) U^T: Q = X^T U diag(s)^-1/2, so Z = X Q = U diag(s)^1/2
        s, U = torch.linalg.eigh(X @ X.T)
        keep = s > s.max() * 1e-10  # drop directions the data do not span
        s, U = s[keep], U[:, keep]
        Z = U * s.sqrt()
    else:  # from X^T X = Q diag(s) Q^T
        s, Q = torch.linalg.eigh(X.T @ X)
        keep = s > s.max() * 1e-10
        s, Q = s[keep], Q[:, keep]
        Z = X @ Q
    # Hessian of the objective in V along direction j ~ s_j * mean p(1-p) + 1/C; near the optimum of a
    # well-fitted training set mean p(1-p) is small: gamma = 1e-3 was best on PBMC and Baron (1e-2..1e-4 close).
    scale = 1 / (1e-3 * s + 1 / C).sqrt()
    Z = Z * scale

    V = torch.zeros(len(classes), Z.shape[1], dtype=torch.float64, requires_grad=True)  # coef = (V * scale) Q^T
    # start from the log class frequencies: the optimal intercept when coef = 0
    intercept = torch.log(torch.bincount(target).double() / n).requires_grad_()
    optimizer = torch.optim.LBFGS([V, intercept], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn='strong_wolfe')

    def closure():  # the objective divided by n: same minimum, gradient tolerance independent of n
        optimizer.zero_grad()
        loss = F.cross_entropy(Z @ V.T + intercept, target) + ((V * scale) ** 2).sum() / (2 * C * n)
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = optimizer.state[V]['n_iter']
    V = V.detach() * scale
    coef = np.zeros((n_classes, n_genes))
    coef[classes.numpy()] = ((V / s.sqrt()) @ U.T @ X if n < n_genes else V @ Q.T).numpy()  # V Q^T
    full_intercept = np.full(n_classes, -np.inf)
    full_intercept[classes.numpy()] = intercept.detach().numpy()
    return LogisticRegression(coef, full_intercept, n_iter)


# -----------------------------------------------------------------------------
# Novel cell types: a score per cell, higher = less like any type the classifier was trained on. scBERT's only rule is
# "Unassigned when the top probability < 0.5", i.e. maxprob > 0.5. The others are the standard out-of-distribution
# detectors: from the logits, entropy and the energy score (Liu et al. 2020, "Energy-based out-of-distribution
# detection": -logsumexp(logits), which the softmax normalizes away); from the cell embedding (the classifier's hidden
# layer, Classifier.features), the Mahalanobis distance to the nearest class mean under one shared covariance (Lee et
# al. 2018) and the cosine distance to the k-th nearest training cell (Sun et al. 2022, "Out-of-distribution detection
# with deep nearest neighbors"). The embedding scores need statistics of the training cells: fit_novelty.
NOVELTY_SCORES = ('maxprob', 'entropy', 'energy', 'mahalanobis', 'knn')


def fit_novelty(features, labels, n_classes, k=10, max_bank=10000, seed=0):
    """The embedding scores' statistics from training cells' features [n, D] and labels [n] (0..n_classes-1):
    class means [n_classes, D] (classes without cells are left out of the minimum: class_present), the precision
    (inverse) of the pooled within-class covariance [D, D], and at most max_bank L2-normalized features (a random
    sample) for the kNN score. A dict of tensors and ints, storable in a weights_only checkpoint."""
    f = torch.as_tensor(to_numpy(features), dtype=torch.float64)
    y = torch.as_tensor(to_numpy(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=n_classes)
    means = torch.zeros(n_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f) / counts.clamp(min=1)[:, None]
    centered = f - means[y]
    cov = centered.T @ centered / len(f)
    # a ridge of 0.1% of the mean variance: with few cells, or ReLU features that some cells never use, the
    # covariance is singular
    cov += 1e-3 * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(len(cov), dtype=cov.dtype)
    keep = np.sort(np.random.default_rng(seed).choice(len(f), max_bank, replace=False)) if len(f) > max_bank else None
    bank = f if keep is None else f[torch.from_numpy(keep)]
    return {'class_means': means.float(), 'class_present': counts > 0, 'precision': torch.linalg.inv(cov).float(),
            'bank': F.normalize(bank, dim=1).float(), 'k': int(min(k, len(bank)))}


def novelty_rule(fit_features, fit_labels, n_classes, val_logits, val_features, quantile, default, seed=0, k=10,
                 max_bank=10000):
    """What a checkpoint stores for predict.py: fit_novelty's statistics (from training cells), each score's threshold
    (the `quantile` quantile of the validation cells' scores: all known types, so about 1 - quantile of known cells are
    called novel), the default score, and the seed and fit size (so quantize.py can fit again on the same cells)."""
    stats = fit_novelty(fit_features, fit_labels, n_classes, k=k, max_bank=max_bank, seed=seed)
    thresholds = {name: float(np.quantile(s, quantile))
                  for name, s in novelty_scores(val_logits, val_features, stats).items()}
    return dict(stats, default=default, quantile=quantile, thresholds=thresholds, n_fit=len(fit_labels), seed=seed)


def novelty_scores(logits, features=None, stats=None, chunk=1024):
    """Every novelty score of cells with logits [n, n_classes] (and features [n, D] + fit_novelty's stats for the
    embedding scores) -> {name: float64 array [n]}, higher = more novel."""
    logits = torch.as_tensor(to_numpy(logits), dtype=torch.float64)
    log_p = logits.log_softmax(1)
    out = {'maxprob': 1 - log_p.max(1).values.exp(),                 # scBERT: Unassigned when this is > 0.5
           'entropy': -(log_p.exp() * log_p).sum(1),
           'energy': -logits.logsumexp(1)}
    if stats is not None and features is not None:
        f = torch.as_tensor(to_numpy(features), dtype=torch.float64)
        means = stats['class_means'].double()[stats['class_present']]             # [K, D]
        precision = stats['precision'].double()
        # (f - μ)ᵀ P (f - μ) = fᵀPf - 2 fᵀPμ + μᵀPμ, for every cell and class at once
        fp = f @ precision
        d2 = (fp * f).sum(1, keepdim=True) - 2 * fp @ means.T + ((means @ precision) * means).sum(1)
        out['mahalanobis'] = d2.min(1).values.clamp(min=0)
        bank, k = stats['bank'].double(), stats['k']
        unit = F.normalize(f, dim=1)
        # cosine distance to the k-th most similar training cell, in chunks of cells ([chunk, bank] at a time)
        out['knn'] = torch.cat([1 - (unit[i:i + chunk] @ bank.T).topk(k, dim=1).values[:, -1]
                                for i in range(0, len(f), chunk)]) if len(f) else f.new_zeros(0)
    return {name: score.numpy() for name, score in out.items()}


def novelty_report(scores_known, correct_known, scores_novel, thresholds):
    """How well each score separates held-out known cells from cells of a type never trained on.
    scores_*: novelty_scores() outputs; correct_known [n] bool: the classifier's call was right; thresholds {name: t}
    (novel when score > t). -> {name: {auroc, threshold, known_acc, novel_acc}}: known_acc = the known cells given
    their right type (neither wrong nor Unassigned), novel_acc = the novel cells called Unassigned."""
    report = {}
    for name in scores_known:
        if name not in scores_novel:
            continue
        both = np.concatenate([scores_known[name], scores_novel[name]])
        is_novel = np.r_[np.zeros(len(scores_known[name]), bool), np.ones(len(scores_novel[name]), bool)]
        t = thresholds.get(name)
        report[name] = {'auroc': auroc(both, is_novel), 'threshold': t,
                        'known_acc': None if t is None else float(np.mean(correct_known & (scores_known[name] <= t))),
                        'novel_acc': None if t is None else float(np.mean(scores_novel[name] > t))}
    return report


def plot_confusion(confusion, label_names, path, title=''):
    """Save the confusion matrix as a PNG: colour = fraction of the true class (row), text = cell count."""
    from matplotlib.figure import Figure  # lazy: only train.py plots; Figure needs no pyplot and no display
    from data import atomic_write
    confusion = np.asarray(confusion)
    n_classes = len(confusion)
    fraction = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = 3 + 0.45 * n_classes
    fig = Figure(figsize=(size + 1, size), layout='constrained')
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label='fraction of true class', shrink=0.8)
    for i, j in zip(*np.nonzero(confusion)):
        ax.text(j, i, str(confusion[i, j]), ha='center', va='center', fontsize=7,
                color='white' if fraction[i, j] > 0.5 else 'black')
    ax.set_xticks(range(n_classes), label_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n_classes), label_names, fontsize=7)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)


def plot_loss(history, path):
    """Save the training curves as a PNG. history: 'iter', 'train_loss' lists; optional 'val_iter', 'val_loss',
    'val_macro_f1' (a second panel)."""
    from matplotlib.figure import Figure
    from data import atomic_write
    with_f1 = bool(history.get('val_macro_f1'))
    fig = Figure(figsize=(10 if with_f1 else 5.5, 4), layout='constrained')
    axes = fig.subplots(1, 2 if with_f1 else 1, squeeze=False)[0]
    axes[0].plot(history['iter'], history['train_loss'], label='train', lw=1)
    if history.get('val_loss'):
        axes[0].plot(history['val_iter'], history['val_loss'], 'o-', label='val', ms=3)
    axes[0].set(xlabel='iteration', ylabel='loss', title='loss')
    axes[0].legend()
    if with_f1:
        axes[1].plot(history['val_iter'], history['val_macro_f1'], 'o-', color='C2', ms=3)
        axes[1].set(xlabel='iteration', ylabel='macro-F1', title='validation macro-F1', ylim=(0, 1))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)


def plot_top_genes(ranked, path, title='', n=20):
    """Save one cell type's top genes as a PNG: a horizontal bar panel per method. ranked: {method: [(gene, score),
    ...] best first}."""
    from matplotlib.figure import Figure
    from data import atomic_write
    fig = Figure(figsize=(4.2 * len(ranked), 0.22 * n + 1.2), layout='constrained')
    for ax, (method, rows) in zip(fig.subplots(1, len(ranked), squeeze=False)[0], ranked.items()):
        rows = rows[:n][::-1]                                    # the best at the top
        ax.barh(range(len(rows)), [v for _, v in rows], color='C0' if method == 'attention' else 'C1')
        ax.set_yticks(range(len(rows)), [g for g, _ in rows], fontsize=7)
        ax.set_xlabel('attention received (share per cell)' if method == 'attention' else 'attribution (logit)')
        ax.set_title(method.replace('_', ' '), fontsize=9)
    fig.suptitle(title, fontsize=10)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)


def plot_scatter(y_true, y_pred, path, title='', threshold=30.0):
    """Save predicted against true values as a PNG (drug synergy: every test row of every fold), with the diagonal
    and the threshold of the AUROC / AUPRC class."""
    from matplotlib.figure import Figure
    from data import atomic_write
    fig = Figure(figsize=(4.8, 4.5), layout='constrained')
    ax = fig.add_subplot()
    ax.scatter(y_true, y_pred, s=3, alpha=0.3, lw=0)
    low, high = min(np.min(y_true), np.min(y_pred)), max(np.max(y_true), np.max(y_pred))
    ax.plot([low, high], [low, high], color='grey', lw=0.8)
    ax.axvline(threshold, color='C3', lw=0.6, ls='--')
    ax.axhline(threshold, color='C3', lw=0.6, ls='--')
    ax.set(xlabel='true', ylabel='predicted', title=title)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)


# -----------------------------------------------------------------------------
# Perturbation effects (perturb.py): how well a predicted mean expression after a perturbation matches the truth.
# The shift is the perturbed mean minus the control mean; the top DE genes are those with the largest |Welch t|
# between the perturbed and the control cells (scanpy's default test, which GEARS and scGen rank by).
PERTURBATION_METRICS = ('pearson_delta_top20', 'pearson_delta_all', 'r2_top100', 'r2_all', 'mse_top20')


def welch_t(perturbed, control):
    """Welch's t statistic per gene of perturbed (n1, G) against control (n0, G) cells -> (G,); 0 where both groups
    are constant."""
    m1, m0 = perturbed.mean(0), control.mean(0)
    v1 = perturbed.var(0, ddof=1) if len(perturbed) > 1 else np.zeros_like(m1)
    v0 = control.var(0, ddof=1) if len(control) > 1 else np.zeros_like(m0)
    se = np.sqrt(v1 / len(perturbed) + v0 / len(control))
    return np.divide(m1 - m0, se, out=np.zeros_like(se, dtype=np.float64), where=se > 0)


def top_de_genes(perturbed, control, n):
    """The n genes with the largest |Welch t| (ties by gene order) -> int array, most significant first."""
    t = np.abs(welch_t(np.asarray(perturbed, np.float64), np.asarray(control, np.float64)))
    return np.argsort(-t, kind='stable')[:n]


def perturbation_metrics(pred_mean, true_mean, control_mean, de_order):
    """One method's metrics on one held-out group. pred_mean, true_mean, control_mean: (G,) mean log expression;
    de_order: genes by |t|, most significant first. Pearson of the shifts (GEARS), R² of the means as scGen reports
    it (the squared Pearson correlation, its linregress r²), MSE of the means on the top 20 DE genes."""
    pred_delta, true_delta = pred_mean - control_mean, true_mean - control_mean
    top20, top100 = de_order[:20], de_order[:100]
    return {'pearson_delta_top20': pearson(pred_delta[top20], true_delta[top20]),
            'pearson_delta_all': pearson(pred_delta, true_delta),
            'r2_top100': pearson(pred_mean[top100], true_mean[top100]) ** 2,
            'r2_all': pearson(pred_mean, true_mean) ** 2,
            'mse_top20': float(np.mean((pred_mean[top20] - true_mean[top20]) ** 2))}


def plot_shift(pred_deltas, true_delta, genes, de_order, path, title='', n_labels=10):
    """Predicted against true shift over all genes, a panel per method ({method: (G,) shift}), the top DE genes
    labelled."""
    from matplotlib.figure import Figure
    from data import atomic_write
    fig = Figure(figsize=(3.6 * len(pred_deltas), 3.6), layout='constrained')
    top = de_order[:20]
    for ax, (method, pred) in zip(fig.subplots(1, len(pred_deltas), squeeze=False)[0], pred_deltas.items()):
        ax.scatter(true_delta, pred, s=4, color='0.6', lw=0)
        ax.scatter(true_delta[top], pred[top], s=8, color='C3', lw=0, label='top 20 DE')
        for g in de_order[:n_labels]:
            ax.annotate(genes[g], (true_delta[g], pred[g]), fontsize=6)
        lim = float(max(np.abs(true_delta).max(), np.abs(pred).max(), 1e-3)) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color='0.3', lw=0.5)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel='true shift', ylabel='predicted shift',
               title=f'{method}: r={pearson(pred, true_delta):.2f}')
        ax.title.set_fontsize(9)
    fig.suptitle(title, fontsize=10)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)


def plot_perturbation_summary(per_group, path, metrics=('pearson_delta_top20', 'r2_top100')):
    """Per held-out group, each method's metric as bars, a panel per metric. per_group: {group: {method: {metric:
    value}}}."""
    from matplotlib.figure import Figure
    from data import atomic_write
    groups = list(per_group)
    methods = list(next(iter(per_group.values())))
    fig = Figure(figsize=(max(6.0, 0.45 * len(groups) * len(methods) / 2), 3.4 * len(metrics)), layout='constrained')
    width = 0.8 / len(methods)
    for ax, metric in zip(fig.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics):
        for j, method in enumerate(methods):
            ax.bar(np.arange(len(groups)) + j * width, [per_group[g][method][metric] for g in groups], width,
                   label=method)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=60, ha='right', fontsize=7)
        ax.set_ylabel(metric)
        ax.axhline(0, color='0.3', lw=0.5)
    fig.axes[0].legend(fontsize=7, ncol=len(methods))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
