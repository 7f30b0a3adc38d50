r"""
Predict how cells respond to a perturbation, side by side with the simple baselines that match or beat published
models (Ahlmann-Eltze et al. 2024).

    python perturb.py --input=kang.h5ad --task=celltype --perturbation_key=condition --control_value=ctrl \
        --cell_type_key=cluster_id --holdout=all --out_dir=out-perturb-kang       # each cell type held out in turn
    python perturb.py --input=papalexi.h5ad --task=gene --perturbation_key=target_gene --control_value=control \
        --holdout=all --out_dir=out-perturb-papalexi                              # knockouts held out, in k folds
    python perturb.py ... --task=gene --holdout=STAT1 --pathway_enc=True --gene_sets=hallmark.gmt,reactome.gmt
    python perturb.py ... --init_from=out-pretrain/best.pt        # the encoder pretrained by train.py --mode=pretrain

Two tasks. celltype (scGen, CPA): train on the control and perturbed cells of every cell type but one and the control
cells of that one, predict its perturbed cells. gene (GEARS): the perturbation is a knocked-out gene (the obs value
names it); the knockouts of a fold are never trained on, and their perturbed cells are predicted from control cells
and what is known about the target gene. The cells are read and normalized as prepare_data.py does (log1p of counts
per 10k in log_base), every gene of the file kept.

The model: the project's encoder (any ModelConfig) reads a control cell; a perturbation vector (a learned row per
perturbation, a held-out one given the mean of the trained rows (unseen_perturbation); for a gene, plus the target's
gene embedding and, with pathway_enc, the sum of its gene sets' embeddings) joins the pooled cell; a per-gene
regression head predicts the change of every gene (a term of its own, and a gain on its control value), added to
the control cell. Training pairs every perturbed cell with a random control cell (of its type, when cell_type_key is
given), as GEARS does, and every control cell with another one and no perturbation; the change it learns is the
perturbed cell minus the mean of those control cells. A held-out group's prediction is the mean over its control
cells.

The baselines, on the same split: no_change (the control mean), mean_shift (the control mean plus the mean shift of
the training groups), linear (the control mean plus a ridge regression from the group's features to its shift:
a cell type's control mean profile; a target gene's loadings on the control cells' principal components, zero when
it is not measured, and its gene-set membership when gene_sets are given). Metrics (metrics.py): Pearson of the
predicted and true shift over all genes and the top 20 DE genes, R² of the means over all genes and the top 100 DE
genes, MSE on the top 20. Writes out_dir/metrics.json (each group, and the mean and sd over groups),
out_dir/shift_<group>.png and out_dir/summary.png.
"""
import os
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import training
from data import (UserError, annotate_genes, check_writable, comma_list, load_checkpoint, model_input,
                  process_h5ad, read_gene_sets, take_rows, to_dense)
from metrics import PERTURBATION_METRICS, perturbation_metrics, plot_perturbation_summary, plot_shift, top_de_genes
from model import ModelConfig, ScBERT, clean_state_dict, pool, token_valid

# -----------------------------------------------------------------------------
# the data and the task
input = ''                     # an .h5ad file of counts (or log-normalized values), one perturbation per cell
task = 'celltype'              # 'celltype' (hold a cell type's perturbed cells out) | 'gene' (hold knockouts out)
perturbation_key = 'condition'  # obs column naming each cell's perturbation (task gene: the target gene's symbol)
control_value = 'ctrl'         # the value of perturbation_key that marks control cells
cell_type_key = ''             # obs column of cell types (task celltype: required; task gene: pairs cells by type)
holdout = 'all'                # the group held out (a cell type, or a target), or 'all': each in turn (gene: k folds)
n_folds = 5                    # task gene with holdout=all: the targets in this many folds, a model per fold
out_dir = 'out-perturb'        # metrics.json, shift_<group>.png, summary.png
layer = 'auto'                 # auto | X | raw | <layer name>: which matrix holds the counts (as prepare_data.py)
gene_key = ''                  # var column holding gene symbols ('' = the var index)
log_base = 2.0                 # base of log1p after normalize-to-1e4 (as prepare_data.py)
min_genes = 0                  # drop cells with fewer expressed genes (0: a panel of a few hundred genes is normal)
gene_sets = ''                 # GMT files, comma-separated: the targets' gene sets (pathway_enc, the linear baseline)
min_set_genes = 3              # keep gene sets with at least this many genes of the data (and targets)
max_set_genes = 500            # ... and at most this many
pathway_enc = False            # task gene: add the sum of the target's gene-set embeddings to its perturbation vector
# the model: a small scBERT 2.0 (config/scbert2_small.py's encoder at 2 blocks, dense); any ModelConfig setting works
n_embd = 64
n_layer = 2
n_head = 4
n_kv_head = 2
dim_head = 16
ff_mult = 4
input_genes = 'expressed'      # 'expressed' (scBERT 2.0) | 'all' (scBERT: every gene, binned)
value_emb = 'continuous'
n_bins = 10
max_genes = 256                # at most this many expressed genes per cell (a random subset in training)
n_zero_genes = 0
attention = 'sdpa'
norm = 'rmsnorm'
mlp = 'swiglu'
bias = False
n_expert = 0
n_expert_active = 2
dropout = 0.0
head_hidden = 256              # the regression head's hidden width
unseen_perturbation = 'mean'   # the learned row of a perturbation never trained on: 'mean' (the mean row of those
                               # trained on: with nothing known, it acts like the average one, as mean_shift assumes)
                               # | 'zero' (none: only its gene embedding and gene sets speak for it)
init_from = 'scratch'          # 'scratch' | a checkpoint of train.py (e.g. --mode=pretrain): its encoder, genes mapped
                               # by name (genes it lacks are left out of the input), its architecture
# training and evaluation
max_iters = 800                # optimizer steps per model
batch_size = 32                # cell pairs per step
learning_rate = 1e-3           # peak learning rate (AdamW, linear warm-up then linear decay, as train.py)
min_lr = 1e-5
warmup_iters = 50
weight_decay = 0.01
grad_clip = 1.0
aux_loss_weight = 0.01         # MoE (n_expert > 0): weight of the load-balancing loss
eval_cells = 500               # task gene: the control cells a held-out knockout is predicted from (a random sample)
n_pcs = 10                     # linear baseline, task gene: principal components of the control cells per target
ridge_alpha = 1.0              # linear baseline: the ridge penalty, relative to the features' mean squared norm
log_interval = 100
num_threads = 1                # CPU threads (0 = PyTorch's default)
device = 'cpu'                 # 'cpu' | 'cuda' | 'auto'
seed = 1337
# -----------------------------------------------------------------------------
ARCHITECTURE = [f.name for f in fields(ModelConfig) if f.name in globals()]
METHODS = ('model', 'no_change', 'mean_shift', 'linear')


def main():
    from configurator import configure
    config = configure(globals())
    start = time.time()
    # train.py's learning-rate schedule (training.lr_at), with this script's settings
    training.learning_rate, training.min_lr, training.warmup_iters = learning_rate, min_lr, warmup_iters
    training.lr_schedule = 'linear'
    check_settings()
    if num_threads:
        torch.set_num_threads(num_threads)
    cells = read_cells()
    runs = plan_runs(cells)
    check_writable(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for k, held_out in enumerate(runs):
        print(f"run {k + 1}/{len(runs)}: holding out {', '.join(held_out)}")
        results.update(run_split(cells, held_out, k))
    summary = summarize(results, cells, config, time.time() - start)
    training.write_json(os.path.join(out_dir, 'metrics.json'), summary)
    plot_perturbation_summary({g: {m: r[m] for m in METHODS} for g, r in results.items()},
                              os.path.join(out_dir, 'summary.png'))
    print(f"wrote {out_dir}/metrics.json ({time.time() - start:.0f} s)")


def check_settings():
    if not input:
        raise UserError('no input file (set --input=<file.h5ad>)')
    if not os.path.isfile(input):
        raise UserError(f'{input} is not a file (set --input=<an existing .h5ad file>)')
    if task not in ('celltype', 'gene'):
        raise UserError(f"task must be 'celltype' or 'gene', not '{task}' (set --task=...)")
    if task == 'celltype' and not cell_type_key:
        raise UserError('task celltype holds a cell type out: set --cell_type_key=<obs column of cell types>')
    if pathway_enc and (task != 'gene' or not comma_list(gene_sets)):
        raise UserError('pathway_enc reads the target genes\' gene sets: use it with --task=gene and '
                        '--gene_sets=<a.gmt,b.gmt>')
    if unseen_perturbation not in ('mean', 'zero'):
        raise UserError(f"unseen_perturbation must be 'mean' or 'zero', not '{unseen_perturbation}'")
    for name, low in (('max_iters', 1), ('batch_size', 1), ('eval_cells', 1), ('n_folds', 2), ('n_pcs', 0)):
        if globals()[name] < low:
            raise UserError(f'{name} must be at least {low}, not {globals()[name]} (set --{name}=...)')
    if init_from == 'scratch':
        training.model_config(dict(architecture(), n_genes=1))


def architecture():
    return {name: globals()[name] for name in ARCHITECTURE}


# -----------------------------------------------------------------------------
# the cells: read, normalized, each with its perturbation and type

@dataclass
class Cells:
    """The cells of one .h5ad that have a perturbation (and a type, task celltype), log-normalized."""
    genes: list               # the file's genes (G)
    csr: tuple                # (indptr, indices, values) over the genes
    X: np.ndarray             # (n_cells, G) float32, the same, dense
    perturbation: np.ndarray  # (n_cells,) str, the obs value
    cell_type: np.ndarray     # (n_cells,) str ('' without cell_type_key)
    perturbations: list       # the values other than control_value, sorted
    pert: np.ndarray          # (n_cells,) int: 0 = control, i = perturbations[i - 1]
    groups: list              # what is held out: cell types (celltype) or perturbations (gene)


def read_cells():
    """-> Cells, from the .h5ad, normalized as prepare_data.py does; UserError for a bad key or value."""
    proc = process_h5ad(input, layer=layer, gene_key=gene_key, log_base=log_base, min_genes=min_genes)
    perturbation = proc.h5.obs_column(perturbation_key, 'perturbation_key')
    cell_type = proc.h5.obs_column(cell_type_key, 'cell_type_key') if cell_type_key else None
    if cell_type is None:
        cell_type = np.full(len(perturbation), '', dtype=object)
    chunks = list(proc)
    # a cell without a perturbation (or, for celltype, a type) says nothing here
    keep = (np.concatenate([c.passed_qc for c in chunks]) & np.array([p is not None for p in perturbation])
            & np.array([t is not None for t in cell_type]))
    indptr = np.cumsum(np.concatenate([[0]] + [np.diff(c.indptr) for c in chunks]))
    csr = take_rows(indptr, np.concatenate([c.indices for c in chunks]), np.concatenate([c.values for c in chunks]),
                    np.flatnonzero(keep))
    perturbation, cell_type = perturbation[keep].astype(str), cell_type[keep].astype(str)
    values = sorted(set(perturbation.tolist()))
    if control_value not in values:
        raise UserError(f"no cell has {perturbation_key}='{control_value}' (values: {', '.join(values[:10])}); set "
                        f"--control_value to the value of the control cells")
    perturbations = [v for v in values if v != control_value]
    if not perturbations:
        raise UserError(f"every cell is a control ({perturbation_key}='{control_value}'): nothing to predict")
    if task == 'celltype' and len(perturbations) > 1:
        raise UserError(f"task celltype predicts one perturbation, and {perturbation_key} has {len(perturbations)} "
                        f"besides the control ({', '.join(perturbations[:5])}); keep one in the file, or use "
                        f"--task=gene")
    code = {p: i + 1 for i, p in enumerate(perturbations)}
    c = Cells(genes=list(proc.vocab), csr=csr, X=to_dense(*csr, len(proc.vocab)), perturbation=perturbation,
              cell_type=cell_type, perturbations=perturbations, pert=np.array([code.get(p, 0) for p in perturbation]),
              groups=sorted(set(cell_type.tolist())) if task == 'celltype' else perturbations)
    print(f"{proc.summary()}; {len(c.X)} cells kept, {int((c.pert == 0).sum())} controls, "
          f"{len(c.perturbations)} perturbations, {len(c.groups)} groups")
    return c


def plan_runs(cells):
    """-> a list of runs, each the list of groups it holds out: every group in turn (celltype), k folds of the
    targets (gene), or the one --holdout group."""
    if holdout != 'all':
        if holdout not in cells.groups:
            what = 'cell types' if task == 'celltype' else 'perturbations'
            raise UserError(f"--holdout={holdout} is not one of the {what}: {', '.join(cells.groups[:30])}")
        runs = [[holdout]]
    elif task == 'celltype':
        runs = [[g] for g in cells.groups]
    else:
        order = np.random.default_rng(seed).permutation(len(cells.groups))
        runs = [[cells.groups[i] for i in sorted(order[k::n_folds])] for k in range(min(n_folds, len(order)))]
    for held_out in runs:
        for g in held_out:
            control, perturbed = group_cells(cells, g)
            if not len(control) or not len(perturbed):
                raise UserError(f"held-out group '{g}' has {len(control)} control and {len(perturbed)} perturbed "
                                f"cells; both are needed (check --cell_type_key and --control_value)")
    return runs


def group_cells(cells, group):
    """-> (control cells, perturbed cells) of a held-out group: its type's (celltype), or every control and the
    target's cells (gene)."""
    if task == 'celltype':
        of_type = cells.cell_type == group
        return np.flatnonzero(of_type & (cells.pert == 0)), np.flatnonzero(of_type & (cells.pert > 0))
    return np.flatnonzero(cells.pert == 0), np.flatnonzero(cells.perturbation == group)


def training_cells(cells, held_out):
    """Cells a run may train on: every cell but the held-out groups' perturbed cells."""
    out = np.ones(len(cells.X), dtype=bool)
    for g in held_out:
        out[group_cells(cells, g)[1]] = False
    return np.flatnonzero(out)


# -----------------------------------------------------------------------------
# the baselines

def group_shift(cells, group):
    """The group's perturbed mean minus its control mean (G,)."""
    control, perturbed = group_cells(cells, group)
    return cells.X[perturbed].mean(0) - cells.X[control].mean(0)


def training_groups(cells, held_out):
    """The groups a run learns shifts from: the others with perturbed cells (and, celltype, control cells)."""
    return [g for g in cells.groups if g not in held_out and all(len(s) for s in group_cells(cells, g))]


def group_features(cells, groups, sets):
    """The linear baseline's features (n_groups, F): a cell type's control mean; a target gene's loadings on the
    control cells' first n_pcs principal components (zero when not measured) and its gene-set membership."""
    if task == 'celltype':
        return np.stack([cells.X[group_cells(cells, g)[0]].mean(0) for g in groups])
    control = cells.X[cells.pert == 0]
    _, s, vt = np.linalg.svd(control - control.mean(0), full_matrices=False)
    loadings = (vt[:n_pcs] * s[:n_pcs, None] / np.sqrt(len(control))).T            # (G, n_pcs)
    where = {g: i for i, g in enumerate(cells.genes)}
    pcs = np.stack([loadings[where[g]] if g in where else np.zeros(loadings.shape[1]) for g in groups])
    return np.concatenate([pcs, sets.membership[[cells.perturbations.index(g) + 1 for g in groups]]], axis=1)


def ridge(x_train, y_train, x_test):
    """Ridge regression with an intercept (the mean of y_train), penalty ridge_alpha × the centred features' mean
    squared norm, solved in its kernel form (few groups, many features) -> predictions (n_test, G)."""
    mean_x, mean_y = x_train.mean(0), y_train.mean(0)
    xc = x_train - mean_x
    gram = xc @ xc.T                                                                   # (n, n)
    lam = ridge_alpha * max(float(np.trace(gram)) / len(gram), 1e-12)
    coef = np.linalg.solve(gram + lam * np.eye(len(gram)), y_train - mean_y)           # (n, G)
    return mean_y + (x_test - mean_x) @ xc.T @ coef


def baselines(cells, held_out, sets):
    """-> {group: {method: predicted perturbed mean (G,)}} for no_change, mean_shift and linear."""
    train_groups = training_groups(cells, held_out)
    if not train_groups:
        raise UserError(f"holding out {', '.join(held_out)} leaves no group to learn a shift from")
    shifts = np.stack([group_shift(cells, g) for g in train_groups])                  # (n_train, G)
    linear = ridge(group_features(cells, train_groups, sets), shifts, group_features(cells, held_out, sets))
    out = {}
    for g, lin in zip(held_out, linear):
        control = cells.X[group_cells(cells, g)[0]].mean(0)
        out[g] = {'no_change': control, 'mean_shift': control + shifts.mean(0), 'linear': control + lin}
    return out


# -----------------------------------------------------------------------------
# the model

@dataclass
class GeneSets:
    """Each perturbation's gene sets (row 0, the control, is in none)."""
    names: list               # the sets kept
    membership: np.ndarray    # (n_perturbations + 1, n_sets) 0/1
    ptr: np.ndarray           # the same as CSR, for the embedding bag: perturbation i's sets are idx[ptr[i]:ptr[i + 1]]
    idx: np.ndarray


def perturbation_sets(cells):
    """-> GeneSets of the targets (task gene and gene_sets), else an empty one. The sets kept are those with
    min_set_genes..max_set_genes genes among the data's genes and the targets, as prepare_data.py --annotate keeps
    them over a vocab."""
    names = [control_value] + cells.perturbations
    set_names, membership = [], np.zeros((len(names), 0), np.float64)
    if task == 'gene' and comma_list(gene_sets):
        vocab = cells.genes + [p for p in cells.perturbations if p not in set(cells.genes)]
        annotation, _ = annotate_genes(vocab, None, read_gene_sets(comma_list(gene_sets))[0], min_set_genes,
                                       max_set_genes)
        ptr, idx = annotation['pathway_ptr'], annotation['pathway_idx']
        set_names = annotation['pathway_names']
        membership = np.zeros((len(names), len(set_names)))
        for i, p in enumerate(names[1:], 1):
            g = vocab.index(p)
            membership[i, idx[ptr[g]:ptr[g + 1]]] = 1
        print(f"gene sets: {len(set_names)} kept; {int((membership.sum(1) > 0).sum())} of {len(names) - 1} targets "
              f"in at least one")
    rows, cols = np.nonzero(membership)
    return GeneSets(set_names, membership, np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(names)))]),
                    cols)


class PerturbModel(nn.Module):
    """encoder(control cell) -> pooled cell (B, C); perturbation vector (B, C); both -> a hidden layer -> a change per
    gene (B, G), added to the control cell's expression."""

    def __init__(self, encoder, n_genes, perturbations, target_rows, sets):
        super().__init__()
        C = encoder.config.n_embd
        self.encoder = encoder
        self.pert_emb = nn.Embedding(len(perturbations) + 1, C)          # row 0: no perturbation (a control)
        nn.init.zeros_(self.pert_emb.weight)                              # a never-trained row stays zero
        self.register_buffer('target_row', torch.as_tensor(target_rows, dtype=torch.long))   # -1: not a known gene
        self.set_emb = nn.Embedding(max(1, sets.membership.shape[1]), C) if pathway_enc else None
        if self.set_emb is not None:
            nn.init.normal_(self.set_emb.weight, std=0.1)
            self.register_buffer('set_ptr', torch.as_tensor(sets.ptr, dtype=torch.long))
            self.register_buffer('set_idx', torch.as_tensor(sets.idx, dtype=torch.long))
        self.hidden = nn.Sequential(nn.Linear(2 * C, head_hidden), nn.GELU())
        # per-gene regression: gene g's change is out_g(hidden) + gain_g(hidden) × its control value, so a response
        # can depend on where the gene starts (an induced gene reaches a level, whatever it was before)
        self.out = nn.Linear(head_hidden, n_genes)
        self.gain = nn.Linear(head_hidden, n_genes)
        for layer in (self.out, self.gain):                               # starts at no change
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def perturbation(self, pert):
        """pert (B,) long -> (B, C): the learned row, the target's gene embedding (when the encoder knows the gene)
        and its gene sets' embeddings (pathway_enc)."""
        p = self.pert_emb(pert)
        row = self.target_row[pert]
        p = p + self.encoder.gene_embedding(row.clamp(min=0)) * (row >= 0).unsqueeze(-1)
        if self.set_emb is not None:
            table = F.embedding_bag(self.set_idx, self.set_emb.weight, self.set_ptr, mode='sum',
                                    include_last_offset=True)
            p = p + table[pert]
        return p

    def cell(self, x):
        """The pooled encoder output of control cells x -> (B, C)."""
        return pool(self.encoder.encode(x), token_valid(x))

    def change(self, cell, control, pert):
        """(B, C) pooled cells, (B, G) their expression, (B,) perturbations -> the predicted change of every gene
        (B, G)."""
        h = self.hidden(torch.cat([cell, self.perturbation(pert)], dim=-1))
        return self.out(h) + self.gain(h) * control


def make_encoder(cells):
    """-> (encoder, row of each data gene in the encoder's vocabulary, -1 = absent; the encoder's vocabulary)."""
    if init_from == 'scratch':
        return ScBERT(training.model_config(dict(architecture(), n_genes=len(cells.genes), seed=seed))), \
            np.arange(len(cells.genes)), cells.genes
    ckpt = load_checkpoint(init_from, 'init_from')
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or not ckpt.get('vocab'):
        raise UserError(f'{init_from} is not a checkpoint of train.py (no model_args or vocab); pretrain one with '
                        f'python train.py --mode=pretrain')
    if ckpt.get('log_base', log_base) != log_base:                    # its value embedding read other numbers
        raise UserError(f"{init_from} was trained on log1p values in base {ckpt['log_base']}, and --log_base is "
                        f"{log_base}; set --log_base={ckpt['log_base']}")
    known = {f.name for f in fields(ModelConfig)}
    args = {k: v for k, v in ckpt['model_args'].items() if k in known}
    args.update(n_classes=0, max_genes=max_genes, n_zero_genes=0, dropout=dropout)   # unmeasured genes are not zeros
    encoder = ScBERT(training.model_config(args))
    state = {k: v for k, v in clean_state_dict(ckpt['model']).items() if not k.startswith('cls_head.')}
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f'{init_from} does not match its model_args ({str(e)[:200]})') from None
    vocab = list(ckpt['vocab'])
    where = {g: i for i, g in enumerate(vocab)}
    rows = np.array([where.get(g, -1) for g in cells.genes])
    if not (rows >= 0).any():
        raise UserError(f'no gene of {input} is in the vocabulary of {init_from}; is it of another species?')
    print(f'encoder from {init_from}: {int((rows >= 0).sum())} of {len(rows)} genes in its vocabulary')
    return encoder, rows, vocab


def make_model(cells, sets):
    encoder, rows, vocab = make_encoder(cells)
    where = {g: i for i, g in enumerate(vocab)}
    target_rows = [-1] + [where.get(p, -1) if task == 'gene' else -1 for p in cells.perturbations]
    return PerturbModel(encoder, len(cells.genes), cells.perturbations, target_rows, sets), rows


def encoder_input(cells, idx, rows, cfg, seeds=None):
    """Cells idx -> the encoder's input, their genes moved to the encoder's rows (those it lacks left out)."""
    indptr, indices, values = take_rows(*cells.csr, idx)
    mapped = rows[indices]
    keep = mapped >= 0
    cell = np.repeat(np.arange(len(idx)), np.diff(indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cell[keep], minlength=len(idx)))])
    return model_input((indptr, mapped[keep], values[keep]), cfg, log_base, seeds=seeds)


def control_pools(cells):
    """The control cells each cell is paired with: those of its type, or every control cell when its type has none
    (or without cell_type_key). -> {type: control indices}."""
    control = cells.pert == 0
    everyone = np.flatnonzero(control)
    return {t: np.flatnonzero(control & (cells.cell_type == t)) if (control & (cells.cell_type == t)).any()
            else everyone for t in set(cells.cell_type.tolist())}


def train_model(model, cells, train_idx, rows, k, dev):
    """max_iters AdamW steps on pairs (a random control cell -> a training cell): MSE of the predicted change of every
    gene against the training cell minus the mean of the control cells it could have been paired with. (Minus the
    paired cell itself, the best guess of a random partner's change is the partner's mean minus the input, which
    teaches the model to forget its input rather than the perturbation.) A control cell as the target teaches 'no
    perturbation'."""
    cfg = model.encoder.config
    pools = control_pools(cells)
    pool_mean = {t: cells.X[idx].mean(0) for t, idx in pools.items()}
    optimizer = ScBERT.configure_optimizer(model, 'adamw', learning_rate, weight_decay)   # nanoGPT's decay groups
    rng = np.random.default_rng([seed, k])
    model.train()
    clock, running = time.time(), []
    for it in range(max_iters):
        target = rng.choice(train_idx, batch_size)
        control = np.array([rng.choice(pools[cells.cell_type[t]]) for t in target])
        x = encoder_input(cells, control, rows, cfg, seeds=[[seed, k, it, i] for i in range(batch_size)])
        x = {key: v.to(dev) for key, v in x.items()} if isinstance(x, dict) else x.to(dev)
        change = torch.from_numpy(cells.X[target] - np.stack([pool_mean[cells.cell_type[t]] for t in target]))
        change = change.to(dev)                                                                 # (B, G)
        pert = torch.from_numpy(cells.pert[target]).to(dev)
        before = torch.from_numpy(cells.X[control]).to(dev)
        loss = F.mse_loss(model.change(model.cell(x), before, pert), change)
        loss = loss + aux_loss_weight * model.encoder.aux_losses()[0]
        for group in optimizer.param_groups:
            group['lr'] = training.lr_at(it, max_iters)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        running.append(loss.item())
        if (it + 1) % log_interval == 0 or it + 1 == max_iters:
            print(f"  iter {it + 1}/{max_iters}: loss {np.mean(running):.4f} ({(time.time() - clock) / (it + 1):.3f} "
                  f"s/step)")
            running = []


@torch.no_grad()
def predict_group(model, cells, group, rows, dev, cache):
    """The model's predicted perturbed mean (G,) of a held-out group: the mean over its control cells (task gene: a
    fixed sample of eval_cells) of control + predicted change. cache keeps the pooled cells of a set of controls."""
    model.eval()
    control = group_cells(cells, group)[0]
    inputs = control if task == 'celltype' or len(control) <= eval_cells else \
        np.sort(np.random.default_rng(seed).choice(control, eval_cells, replace=False))
    key = inputs.tobytes()
    if key not in cache:
        cfg = model.encoder.config
        parts = []
        for i in range(0, len(inputs), 256):
            x = encoder_input(cells, inputs[i:i + 256], rows, cfg)
            parts.append(model.cell({key: v.to(dev) for key, v in x.items()} if isinstance(x, dict) else x.to(dev)))
        cache[key] = torch.cat(parts)
    cell = cache[key]
    pert = 1 if task == 'celltype' else cells.perturbations.index(group) + 1
    before = torch.from_numpy(cells.X[inputs]).to(dev)
    change = model.change(cell, before, torch.full((len(cell),), pert, dtype=torch.long, device=dev)).mean(0)
    return cells.X[control].mean(0) + change.cpu().numpy()


@torch.no_grad()
def fill_unseen(model, cells, train_idx):
    """The learned row of every perturbation without training cells := the mean row of those with some."""
    trained = np.setdiff1d(np.unique(cells.pert[train_idx]), [0])
    unseen = np.setdiff1d(np.arange(1, len(cells.perturbations) + 1), trained)
    if len(unseen) and len(trained):
        model.pert_emb.weight[torch.as_tensor(unseen)] = model.pert_emb.weight[torch.as_tensor(trained)].mean(0)


def run_split(cells, held_out, k):
    """Train a model without the held-out groups' perturbed cells, then score it and the baselines on each
    -> {group: its result}."""
    torch.manual_seed(seed + k)
    dev = 'cuda' if device == 'auto' and torch.cuda.is_available() else 'cpu' if device == 'auto' else device
    train_idx = training_cells(cells, held_out)
    sets = perturbation_sets(cells)
    predictions = baselines(cells, held_out, sets)
    model, rows = make_model(cells, sets)
    model.to(dev)
    print(f"  {len(train_idx)} training cells; model: {sum(p.numel() for p in model.parameters()):,} parameters")
    start = time.time()
    train_model(model, cells, train_idx, rows, k, dev)
    if unseen_perturbation == 'mean':
        fill_unseen(model, cells, train_idx)
    cache, results = {}, {}
    for g in held_out:
        predictions[g]['model'] = predict_group(model, cells, g, rows, dev, cache)
        results[g] = score_group(cells, g, predictions[g], k, time.time() - start)
    return results


def score_group(cells, group, predicted, k, seconds):
    """Every method's metrics on one held-out group, its plot, and (task gene, a measured target) the target's own
    change -> dict."""
    control, perturbed = group_cells(cells, group)
    true_mean, control_mean = cells.X[perturbed].mean(0), cells.X[control].mean(0)
    de_order = top_de_genes(cells.X[perturbed], cells.X[control], 100)
    result = {m: perturbation_metrics(predicted[m], true_mean, control_mean, de_order) for m in METHODS}
    result.update(run=k, n_control=len(control), n_perturbed=len(perturbed), train_seconds=round(seconds, 1),
                  top20_de_genes=[cells.genes[i] for i in de_order[:20]])
    if task == 'gene' and group in cells.genes:
        g = cells.genes.index(group)
        result['target_shift'] = {'true': float(true_mean[g] - control_mean[g]),
                                  **{m: float(predicted[m][g] - control_mean[g]) for m in METHODS}}
    name = ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in group)
    plot_shift({m: predicted[m] - control_mean for m in ('model', 'mean_shift', 'linear')}, true_mean - control_mean,
               cells.genes, de_order, os.path.join(out_dir, f'shift_{name}.png'),
               title=f"{group}: {len(perturbed)} perturbed, {len(control)} control cells")
    line = ', '.join(f"{m} {result[m]['pearson_delta_top20']:.3f}" for m in METHODS)
    print(f"  {group}: pearson_delta_top20 {line}")
    return result


def summarize(results, cells, config, seconds):
    """metrics.json: every group's result, the mean and sd over groups of each method's metrics, and on how many
    groups the model beats mean_shift (higher Pearson and R², lower MSE). Prints the table."""
    groups = list(results)
    stat = {s: {m: {name: float(f(np.array([results[g][m][name] for g in groups])))
                    for name in PERTURBATION_METRICS} for m in METHODS}
            for s, f in (('mean', np.mean), ('sd', lambda a: a.std(ddof=1) if len(a) > 1 else 0.0))}
    beats = {name: sum((results[g]['model'][name] < results[g]['mean_shift'][name]) == (name.startswith('mse'))
                       for g in groups) for name in PERTURBATION_METRICS}
    print(f"\n{'method':<12}" + ''.join(f"{name:>22}" for name in PERTURBATION_METRICS))
    for m in METHODS:
        print(f"{m:<12}" + ''.join(f"{stat['mean'][m][n]:>14.3f} ± {stat['sd'][m][n]:.3f}"
                                   for n in PERTURBATION_METRICS))
    print('model beats mean_shift on ' + ', '.join(f"{n} {beats[n]}/{len(groups)}" for n in PERTURBATION_METRICS))
    return {'task': task, 'input': input, 'n_cells': len(cells.X), 'n_genes': len(cells.genes), 'groups': results,
            'mean': stat['mean'], 'sd': stat['sd'], 'model_beats_mean_shift': beats, 'n_groups': len(groups),
            'seconds': round(seconds, 1), 'settings': config}


if __name__ == '__main__':
    main()
