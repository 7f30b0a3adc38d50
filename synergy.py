"""
Drug-combination synergy on cancer cell lines: how strongly two drugs act together, predicted from the identity of
the drugs and a description of the cell line, against two baselines on the same folds.

    python synergy.py --split=fold --cell_features=expression --out_dir=out-synergy         # held-out drug pairs
    python synergy.py --split=by_cell_line --cell_features=encoder --encoder_ckpt=out-pretrain-human/best.pt

The data are the O'Neil et al. 2016 screen as DeepSynergy (Preuer et al. 2018) scored it (Loewe synergy), with the
fold columns of TranSynergy: `fold` holds out drug pairs (DeepSynergy's protocol); `cl_fold` holds out 7 cell lines
in its fold 1 only (its other folds are random rows), so split=by_cell_line makes folds of whole cell lines here.
Every fold is tested once: the next fold is the validation part, the others train (data.split_indices);
rows without a fold are left out. Every method learns from the training rows only; the validation rows choose the
net's epoch (early stopping) and ridge's penalty.

The cell line's description (cell_features):
  expression  its expression profile (one row of the expression CSV: z-scored per gene over the cell lines)
  encoder     the embedding of that profile by a checkpoint of ours (encoder_ckpt): genes matched by symbol; the
              genes above their average over the cell lines (z > 0) are the expressed genes, with the value
              encoder_value_scale * z (a monotone map onto the range of the log2(1 + counts per 10k) values the
              encoder was trained on); the mean of their output states (as predict.py's embeddings) is the embedding
  both        the two side by side
The features are standardised over the training cell lines (and clipped), then each cell line becomes its coordinates
in the span of the training cell lines (a PCA fitted on them, every component kept): lossless for the training lines,
at most n_lines - 1 numbers per line, and ridge's solution is exactly that on the standardised features.

The methods, written to metrics.json under these names:
  model      DeepSynergy's recipe: a feed-forward net with dropout (input_dropout on the inputs, dropout on the hidden
             layers) reading a learned embedding of each drug and the cell line's features, trained with Adam on the
             MSE of the standardised synergy, stopping early on the validation rows. The drugs' order does not matter:
             it trains on both orders and predicts the mean over both.
  pair_mean  the mean synergy of the drug pair over the training rows (any cell line); a pair never seen there gets
             the mean of its two drugs' means, a drug never seen the overall mean
  ridge      ridge regression on the same inputs: an indicator per drug (1 for each of the two drugs, so the order
             does not matter) and the cell line's coordinates; the penalty chosen on the validation rows
Metrics: Pearson, Spearman, RMSE, and AUROC / AUPRC for synergy > 30 (DeepSynergy's class), per test fold; mean ± sd
over the folds. out_dir gets metrics.json, predictions.csv (every test row with each method's prediction) and
scatter.png (the model's predictions against the truth).
"""
import csv
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, atomic_write, check_writable, load_checkpoint, model_input, split_indices
from metrics import plot_scatter, regression_metrics
from model import ScBERT, pool, token_valid

# -----------------------------------------------------------------------------
synergy = '../shared/data/drugcomb/oneil_synergy_transynergy.csv'    # one row per (drug A, drug B, cell line)
expression = '../shared/data/drugcomb/oneil_cell_expr_transynergy_35x2401_symbol.csv'  # cell lines x genes; the
                               # first column names the cell line, the header the genes (symbols)
drug_a_key = 'drug_a_name'     # columns of the synergy file
drug_b_key = 'drug_b_name'
cell_line_key = 'cell_line'
synergy_key = 'synergy'
split = 'fold'                 # a fold column of the synergy file: fold (held-out drug pairs), cl_fold (its fold 1
                               # holds out 7 cell lines, its other folds are random rows of the other 28), ...; or
                               # 'by_cell_line': folds made here, each cell line's rows all in one of n_folds folds
n_folds = 5                    # by_cell_line: how many folds (the cell lines shuffled with `seed`, dealt in turn)
fold = 'all'                   # the test folds: 'all' (each in turn: mean ± sd), or one fold number (a quick look)
cell_features = 'expression'   # expression | encoder | both (see the docstring)
encoder_ckpt = ''              # encoder, both: a checkpoint of ours (train.py's best.pt, pretrained or fine-tuned)
encoder_value_scale = 5.7      # encoder input value = scale * z for z > 0 (z <= 1 here): 5.7 is the 99th percentile
                               # of the nonzero log2 values of the shared human cells (celltypist sample)
feature_clip = 5.0             # standardised cell features are clipped to ± this (see cell_coordinates)
out_dir = 'out-synergy'
drug_dim = 32                  # the learned embedding of a drug
hidden = (512, 256)            # the net's hidden layers (DeepSynergy's best: 8192, 4096; these train on one core)
input_dropout = 0.2            # DeepSynergy's
dropout = 0.5                  # DeepSynergy's, on the hidden layers
learning_rate = 2e-3
weight_decay = 0.0
batch_size = 512               # rows per step, drawn from the training rows in both drug orders
max_epochs = 100               # passes over the training rows (both orders), at most
patience = 10                  # stop when the validation RMSE has not improved for this many epochs
ridge_alphas = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)   # ridge penalties tried on the validation rows
threshold = 30.0               # AUROC / AUPRC: synergy above this is the positive class (DeepSynergy's)
seed = 0                       # the net's initialisation and batches; by_cell_line's partition
num_threads = 1                # CPU threads (0 = PyTorch's default)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())

if cell_features not in ('expression', 'encoder', 'both'):
    raise UserError(f"cell_features must be expression, encoder or both, not '{cell_features}'")
if cell_features != 'expression' and not encoder_ckpt:
    raise UserError(f'cell_features={cell_features} needs --encoder_ckpt=<a checkpoint of ours, e.g. train.py '
                    f'--mode=pretrain\'s best.pt>')
if len(hidden) < 1 or min(hidden) < 1 or min(batch_size, max_epochs, patience, drug_dim) < 1 or not ridge_alphas:
    raise UserError('hidden (at least one layer), batch_size, max_epochs, patience and drug_dim must be positive, '
                    'and ridge_alphas not empty')
if num_threads:
    torch.set_num_threads(num_threads)


def read_table(path, what):
    """A CSV file -> (header, rows as lists of strings). A missing or empty file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f'{what} file {path} not found (set --{what}=<file.csv>)')
    try:
        with open(path, newline='') as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f'{path} is not a readable CSV file ({type(e).__name__}); give the {what} table as '
                        f'CSV') from None
    if len(rows) < 2:
        raise UserError(f'{path} has no data rows; give the {what} CSV with a header line')
    return rows[0], rows[1:]


def as_numbers(texts, path, what, per_row=1):
    """Strings (per_row per data row) -> float64 array; an empty, non-numeric or NaN value is a UserError naming the
    first bad row."""
    values = np.full(len(texts), np.nan)
    for i, text in enumerate(texts):
        try:
            values[i] = float(text)
        except ValueError:
            pass
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise UserError(f'{path}: {len(bad)} {what} values are missing, non-numeric or not finite (the first on data '
                        f'row {bad[0] // per_row + 1}: {texts[bad[0]]!r}); remove those rows or fill them in')
    return values


def read_synergy(path):
    """The synergy file -> dict: drug_a, drug_b (indices into drugs), cell (index into cell_lines), cell_name, y,
    folds (-1 = none): arrays over the rows; drugs, cell_lines: the names."""
    header, rows = read_table(path, 'synergy')
    columns, made_here = {}, split == 'by_cell_line' and split not in header
    for setting, name in (('drug_a_key', drug_a_key), ('drug_b_key', drug_b_key), ('cell_line_key', cell_line_key),
                          ('synergy_key', synergy_key), *([] if made_here else [('split', split)])):
        if name not in header:
            raise UserError(f"{path} has no column '{name}' (set --{setting}=...; its columns: {', '.join(header)})")
        columns[setting] = [row[header.index(name)] if header.index(name) < len(row) else '' for row in rows]
    drugs = sorted(set(columns['drug_a_key']) | set(columns['drug_b_key']))
    index = {d: i for i, d in enumerate(drugs)}
    cell_lines, cell = np.unique(np.array(columns['cell_line_key'], dtype=object), return_inverse=True)
    folds = cell_line_folds(cell, len(cell_lines)) if made_here else read_folds(columns['split'], path)
    return {'drug_a': np.array([index[d] for d in columns['drug_a_key']]),
            'drug_b': np.array([index[d] for d in columns['drug_b_key']]),
            'cell': cell, 'cell_lines': list(cell_lines), 'cell_name': np.array(columns['cell_line_key'], dtype=object),
            'y': as_numbers(columns['synergy_key'], path, f"'{synergy_key}'"),
            'folds': folds.astype(np.int64), 'drugs': drugs}


def read_folds(texts, path):
    """The split column's text -> fold numbers (-1 where empty)."""
    fold_text = [t.strip() for t in texts]
    folds = as_numbers([t or '-1' for t in fold_text], path, f"'{split}'")
    if np.any((folds != np.round(folds)) | (folds < -1)):
        raise UserError(f"{path}: column '{split}' must hold fold numbers 0, 1, 2, ... (or nothing), not "
                        f"{sorted(set(fold_text))[:5]}")
    return folds


def cell_line_folds(cell, n_lines):
    """split=by_cell_line: each row's fold, that of its cell line (the lines shuffled with seed, dealt in turn)."""
    if not 3 <= n_folds <= n_lines:
        raise UserError(f'n_folds must be between 3 (test, validation, training) and the {n_lines} cell lines, not '
                        f'{n_folds}')
    line_fold = np.empty(n_lines, np.int64)
    line_fold[np.random.default_rng(seed).permutation(n_lines)] = np.arange(n_lines) % n_folds
    return line_fold[cell]


def read_expression(path):
    """The expression file -> (cell line names, gene symbols, float64 [n_lines, n_genes])."""
    header, rows = read_table(path, 'expression')
    names = [row[0] for row in rows]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f'{path} has more than one row for cell line(s) {", ".join(twice[:5])}; keep one each')
    if any(len(row) != len(header) for row in rows):
        raise UserError(f'{path}: every row must have {len(header)} fields, as the header has')
    values = as_numbers([v for row in rows for v in row[1:]], path, 'expression', len(header) - 1)
    return names, header[1:], values.reshape(len(rows), -1)


# -----------------------------------------------------------------------------
# the cell lines' features

def load_encoder(path):
    """Our checkpoint -> (model in eval mode, its gene vocabulary, log base)."""
    checkpoint = load_checkpoint(path, 'encoder_ckpt')
    if not (isinstance(checkpoint, dict) and 'model_args' in checkpoint and 'vocab' in checkpoint):
        raise UserError(f'{path} is not a checkpoint of ours with a gene vocabulary (give train.py\'s best.pt as '
                        f'--encoder_ckpt)')
    try:
        model = ScBERT.from_checkpoint(checkpoint)
        return model.eval(), list(checkpoint['vocab']), float(checkpoint['log_base'])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f'{path} is damaged ({type(e).__name__}: {str(e)[:200]})') from None


@torch.no_grad()
def encoder_embeddings(values, genes, path):
    """Expression [n_lines, n_genes] (z-scores) -> the encoder's embedding of each cell line [n_lines, n_embd]: the
    genes with z > 0 are the expressed ones, value encoder_value_scale * z; all of them are read (no max_genes
    subset) and no unexpressed genes are added (genes outside the file are unknown, not zero)."""
    model, vocab, log_base = load_encoder(path)
    index = {g: i for i, g in enumerate(vocab)}
    matched = [j for j, g in enumerate(genes) if g in index]
    print(f'encoder: {path}, {len(matched)} of the {len(genes)} genes in its vocabulary of {len(vocab)}')
    if not matched:
        raise UserError(f'none of the expression file\'s genes is in the vocabulary of {path}; genes are matched by '
                        f'symbol: give a checkpoint trained on the same species\' symbols')
    columns = np.array(matched)[np.argsort([index[genes[j]] for j in matched])]      # in vocabulary order
    x_all = encoder_value_scale * np.clip(values[:, columns], 0, None)               # (n_lines, n_matched)
    gene_ids = np.array([index[genes[j]] for j in columns])
    cfg = dataclasses.replace(model.config, max_genes=0, n_zero_genes=0)
    out = []
    for start in range(0, len(values), 8):                                          # 8 cell lines per pass
        x = x_all[start:start + 8]
        expressed = x > 0
        indptr = np.r_[0, np.cumsum(expressed.sum(1))]
        inputs = model_input((indptr, np.broadcast_to(gene_ids, x.shape)[expressed], x[expressed].astype(np.float32)),
                             cfg, log_base)
        h = model.encode(inputs)                                                     # (B, L, n_embd)
        how = 'cls' if model.config.head == 'cls' else 'pooled'                      # as predict.py's embeddings
        out.append(pool(h.float(), token_valid(inputs), how).numpy())
    return np.concatenate(out).astype(np.float64)


def cell_line_features(data):
    """The features of the synergy file's cell lines, in the order of data['cell_lines'] -> float64 [n_lines, F]."""
    names, genes, values = read_expression(expression)
    row = {n: i for i, n in enumerate(names)}
    missing = [c for c in data['cell_lines'] if c not in row]
    if missing:
        n_rows = int(np.isin(data['cell_name'], missing).sum())
        raise UserError(f'{len(missing)} cell line(s) of {synergy} have no expression profile in {expression}: '
                        f'{", ".join(missing[:5])} ({n_rows} rows); add their profiles or remove those rows')
    values = values[[row[c] for c in data['cell_lines']]]
    parts = []
    if cell_features in ('expression', 'both'):
        parts.append(values)
    if cell_features in ('encoder', 'both'):
        parts.append(encoder_embeddings(values, genes, encoder_ckpt))
    return np.concatenate(parts, axis=1)


def cell_coordinates(features, train_lines):
    """Features [n_lines, F] -> each line's coordinates in the span of the training lines [n_lines, r]: standardised
    over the training lines (a feature constant over them is left at 0), then projected on every principal axis of the
    training lines (r <= n_train_lines - 1), scaled so the coordinates' mean variance over those lines is 1. The
    standardised values are clipped to ±feature_clip: a held-out line far outside the training lines' range on a gene
    that varies in only a few of them (common in this expression table) would otherwise swamp the rest."""
    train = features[train_lines]
    sd = train.std(0)
    constant = sd <= 1e-6 * max(sd.max(), 1e-300)       # round-off: a gene that varies only in held-out lines
    z = np.where(constant, 0, (features - train.mean(0)) / np.where(constant, 1, sd)).clip(-feature_clip, feature_clip)
    _, s, axes = np.linalg.svd(z[train_lines], full_matrices=False)
    keep = s > s[0] * 1e-6 if s[0] > 0 else np.zeros(len(s), bool)
    coordinates = z @ axes[keep].T                                    # (n_lines, r)
    scale = np.sqrt(np.mean(s[keep] ** 2) / len(train_lines)) if keep.any() else 1.0
    return coordinates / scale


# -----------------------------------------------------------------------------
# the baselines

def pair_mean(data, train, test):
    """The mean synergy of each test row's drug pair over the training rows; else the mean of its drugs' means (a
    drug's mean over the training rows it is in, either position); else the training mean -> [n_test]."""
    n, y = len(data['drugs']), data['y'][train]
    a, b = data['drug_a'], data['drug_b']
    pair = np.minimum(a, b) * n + np.maximum(a, b)                    # the same key in either order
    pair_sum, pair_n = (np.bincount(pair[train], w, minlength=n * n) for w in (y, None))
    drug_sum = np.bincount(a[train], y, minlength=n) + np.bincount(b[train], y, minlength=n)
    drug_n = np.bincount(a[train], minlength=n) + np.bincount(b[train], minlength=n)
    drug_mean = np.where(drug_n > 0, drug_sum / np.maximum(drug_n, 1), y.mean())
    fallback = (drug_mean[a[test]] + drug_mean[b[test]]) / 2
    seen = pair_n[pair[test]] > 0
    return np.where(seen, pair_sum[pair[test]] / np.maximum(pair_n[pair[test]], 1), fallback)


def ridge_design(data, rows, coordinates):
    """Rows -> ridge's inputs [n, n_drugs + r]: 1 for each of the two drugs (order-free), then the cell line's
    coordinates."""
    drugs = np.zeros((len(rows), len(data['drugs'])))
    drugs[np.arange(len(rows)), data['drug_a'][rows]] += 1
    drugs[np.arange(len(rows)), data['drug_b'][rows]] += 1
    return np.concatenate([drugs, coordinates[data['cell'][rows]]], axis=1)


def ridge(data, coordinates, train, val, test):
    """Ridge regression (unpenalised intercept) fitted on the training rows with each of ridge_alphas; the one with
    the lowest validation RMSE predicts the test rows -> (predictions [n_test], alpha)."""
    X, y = ridge_design(data, train, coordinates), data['y'][train]
    x_mean, y_mean = X.mean(0), y.mean()
    Xc = X - x_mean
    gram, xty = Xc.T @ Xc, Xc.T @ (y - y_mean)
    best = None
    for alpha in ridge_alphas:
        w = np.linalg.solve(gram + alpha * np.eye(len(gram)), xty)
        rmse = np.sqrt(np.mean(((ridge_design(data, val, coordinates) - x_mean) @ w + y_mean - data['y'][val]) ** 2))
        if best is None or rmse < best[0]:
            best = rmse, alpha, w
    _, alpha, w = best
    return (ridge_design(data, test, coordinates) - x_mean) @ w + y_mean, alpha


# -----------------------------------------------------------------------------
# the model: DeepSynergy's feed-forward net, with a learned embedding per drug

class SynergyNet(nn.Module):
    """[embedding of drug A, embedding of drug B, cell line coordinates] -> hidden layers (ReLU, dropout) -> synergy
    (standardised). Input dropout on the cell coordinates (the drugs are identities: dropping one hides the drug)."""

    def __init__(self, n_drugs, n_cell_features):
        super().__init__()
        self.drug_emb = nn.Embedding(n_drugs, drug_dim)
        self.input_drop = nn.Dropout(input_dropout)
        widths = [2 * drug_dim + n_cell_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden[-1], 1)

    def forward(self, a, b, cells):                 # a, b (B,) drug indices; cells (B, r) -> (B,)
        x = torch.cat([self.drug_emb(a), self.drug_emb(b), self.input_drop(cells)], dim=1)
        for layer in self.hidden:
            x = self.drop(F.relu(layer(x)))
        return self.out(x).squeeze(-1)

    def predict(self, a, b, cells):                 # the mean over both drug orders: order-free by construction
        return (self(a, b, cells) + self(b, a, cells)) / 2


def tensors(data, rows, coordinates):
    return (torch.from_numpy(data['drug_a'][rows]), torch.from_numpy(data['drug_b'][rows]),
            torch.from_numpy(coordinates[data['cell'][rows]]).float())


@torch.no_grad()
def predict_rows(net, inputs, chunk=8192):
    net.eval()
    return torch.cat([net.predict(*(t[i:i + chunk] for t in inputs)) for i in range(0, len(inputs[0]), chunk)])


def train_net(data, coordinates, train, val, test_fold):
    """The net trained on the training rows in both drug orders, with Adam, keeping the epoch of the lowest validation
    RMSE (stopping after `patience` epochs without a better one) -> (net at its best epoch, y mean, y sd, log)."""
    torch.manual_seed(seed + test_fold)
    y_mean, y_sd = data['y'][train].mean(), data['y'][train].std()
    a, b, cells = tensors(data, train, coordinates)
    a, b, cells = torch.cat([a, b]), torch.cat([b, a]), torch.cat([cells, cells])    # both orders
    target = torch.from_numpy((data['y'][train] - y_mean) / y_sd).float().repeat(2)
    val_inputs, val_y = tensors(data, val, coordinates), torch.from_numpy(data['y'][val])
    net = SynergyNet(len(data['drugs']), coordinates.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    best = {'rmse': float('inf'), 'epoch': 0, 'state': None}
    for epoch in range(1, max_epochs + 1):
        net.train()
        for idx in torch.randperm(len(target)).split(batch_size):
            loss = F.mse_loss(net(a[idx], b[idx], cells[idx]), target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rmse = float(((predict_rows(net, val_inputs).double() * y_sd + y_mean - val_y) ** 2).mean().sqrt())
        if rmse < best['rmse']:
            best = {'rmse': rmse, 'epoch': epoch, 'state': {k: v.clone() for k, v in net.state_dict().items()}}
        elif epoch - best['epoch'] >= patience:
            break
    net.load_state_dict(best['state'])
    return net, y_mean, y_sd, {'epochs': epoch, 'best_epoch': best['epoch'], 'val_rmse': best['rmse']}


# -----------------------------------------------------------------------------
# the folds

METHODS = ('model', 'pair_mean', 'ridge')
METRICS = ('pearson', 'spearman', 'rmse', 'auroc', 'auprc')


def held_out(data, train, test):
    """What the test rows share with the training rows: their drug pairs and cell lines, and how many of each were
    also trained on (0 pairs for `fold`, 0 cell lines for `cl_fold`)."""
    n = len(data['drugs'])
    pair = np.minimum(data['drug_a'], data['drug_b']) * n + np.maximum(data['drug_a'], data['drug_b'])
    test_pairs, test_lines = np.unique(pair[test]), np.unique(data['cell'][test])
    return {'pairs': len(test_pairs), 'pairs_in_training': int(np.isin(test_pairs, pair[train]).sum()),
            'cell_lines': len(test_lines),
            'cell_lines_in_training': int(np.isin(test_lines, data['cell'][train]).sum())}


def run_fold(data, features, test_fold, n_split_folds):
    """One test fold: every method fitted on its training rows -> (result dict, test rows, {method: predictions})."""
    t0 = time.time()
    train, val, test = split_indices(data['folds'], test_fold, n_split_folds)
    coordinates = cell_coordinates(features, np.unique(data['cell'][train]))
    net, y_mean, y_sd, log = train_net(data, coordinates, train, val, test_fold)
    predictions = {'model': predict_rows(net, tensors(data, test, coordinates)).double().numpy() * y_sd + y_mean,
                   'pair_mean': pair_mean(data, train, test)}
    predictions['ridge'], alpha = ridge(data, coordinates, train, val, test)
    result = {'fold': test_fold, 'n_train': len(train), 'n_val': len(val), 'n_test': len(test),
              'n_cell_coordinates': coordinates.shape[1], **log, 'ridge_alpha': alpha,
              'held_out': held_out(data, train, test)}
    result.update({m: regression_metrics(data['y'][test], predictions[m], threshold) for m in METHODS})
    result['seconds'] = round(time.time() - t0, 1)
    return result, test, predictions


def summary(results):
    """{method: {metric: {mean, sd, folds}}} over the folds (sd with ddof=1; a metric a fold lacks is left out)."""
    out = {}
    for m in METHODS:
        out[m] = {}
        for k in METRICS:
            values = [r[m][k] for r in results]
            present = [v for v in values if v is not None]
            out[m][k] = {'mean': float(np.mean(present)) if present else None,
                         'sd': float(np.std(present, ddof=1)) if len(present) > 1 else None, 'folds': values}
    return out


def fold_line(r):
    scores = '  |  '.join(f"{m} r {r[m]['pearson'] or float('nan'):.3f} rmse {r[m]['rmse']:.2f}" for m in METHODS)
    return (f"fold {r['fold']}: {scores}  (test {r['n_test']} rows, {r['held_out']['pairs_in_training']} of "
            f"{r['held_out']['pairs']} pairs and {r['held_out']['cell_lines_in_training']} of "
            f"{r['held_out']['cell_lines']} cell lines also in training; epochs {r['epochs']}, best {r['best_epoch']}; "
            f"{r['seconds']:.0f} s)")


def write_outputs(data, results, results_summary, tests, predictions):
    """metrics.json, predictions.csv and scatter.png in out_dir."""
    rows, cols = np.concatenate(tests), {m: np.concatenate([p[m] for p in predictions]) for m in METHODS}
    fold_of = np.concatenate([np.full(len(t), r['fold']) for t, r in zip(tests, results)])
    with atomic_write(os.path.join(out_dir, 'predictions.csv')) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([drug_a_key, drug_b_key, cell_line_key, synergy_key, split, *METHODS])
        for i, row in enumerate(rows):
            writer.writerow([data['drugs'][data['drug_a'][row]], data['drugs'][data['drug_b'][row]],
                             data['cell_name'][row], f"{data['y'][row]:.6g}", fold_of[i],
                             *(f'{cols[m][i]:.6g}' for m in METHODS)])
    plot_scatter(data['y'][rows], cols['model'], os.path.join(out_dir, 'scatter.png'), threshold=threshold,
                 title=f"{cell_features}, split {split}: r {results_summary['model']['pearson']['mean']:.3f}")
    metrics_json = {**results_summary, 'split': split, 'cell_features': cell_features, 'n_folds': len(results),
                    'n_rows': len(data['y']), 'n_rows_without_fold': int((data['folds'] < 0).sum()),
                    'seconds': round(time.time() - t_start, 1), 'folds': results, 'config': config}
    with atomic_write(os.path.join(out_dir, 'metrics.json')) as tmp, open(tmp, 'w') as f:
        json.dump(metrics_json, f, indent=1)


t_start = time.time()
data = read_synergy(synergy)
n_split_folds = int(data['folds'].max()) + 1
if n_split_folds < 3 or any(np.sum(data['folds'] == k) == 0 for k in range(n_split_folds)):
    raise UserError(f"column '{split}' needs folds 0, 1, ..., k - 1 (k >= 3: test, validation, training), each with "
                    f"rows; it has {sorted(set(data['folds'][data['folds'] >= 0].tolist()))}")
if fold != 'all' and not (fold.isdigit() and int(fold) < n_split_folds):
    raise UserError(f"fold must be 'all' or a fold number 0..{n_split_folds - 1}, not '{fold}'")
check_writable(out_dir)
features = cell_line_features(data)
print(f"{len(data['y'])} rows ({int((data['folds'] < 0).sum())} without a fold, left out), {len(data['drugs'])} drugs, "
      f"{len(data['cell_lines'])} cell lines; cell features: {cell_features} ({features.shape[1]} per line); "
      f"split '{split}': {n_split_folds} folds")
results, tests, predictions = [], [], []
for test_fold in range(n_split_folds) if fold == 'all' else [int(fold)]:
    result, test, prediction = run_fold(data, features, test_fold, n_split_folds)
    results.append(result)
    tests.append(test)
    predictions.append(prediction)
    print(fold_line(result), flush=True)
results_summary = summary(results)
os.makedirs(out_dir, exist_ok=True)
write_outputs(data, results, results_summary, tests, predictions)
print(f"mean ± sd over {len(results)} folds ({time.time() - t_start:.0f} s):")
for m in METHODS:
    print(f'  {m:<10}' + '  '.join(f"{k} {results_summary[m][k]['mean']:.3f} ± {results_summary[m][k]['sd'] or 0:.3f}"
                                   if results_summary[m][k]['mean'] is not None else f'{k} -' for k in METRICS))
print(f'-> {out_dir}/metrics.json, predictions.csv, scatter.png')
