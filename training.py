"""
The training machinery that train.py and distill.py share, in the order a run uses it:

    1. the shared settings       out_dir, dataset, folds, batches, optimizer, masking, baseline, novelty, system;
                                 each script adds its own (train.py the model's, distill.py the teacher's)
    2. setup(), load_dataset()   device, dtype and DDP (torchrun sets RANK): an Env; the prepared dataset
    3. plan_runs()               which cells train, validate and test: a Run per test fold (and held-out cell type)
    4. batches                   the cells of each step (resume repeats them), their masks, a background DataLoader
    5. the optimizer             what trains, the learning-rate schedule, how DDP weighs a loss
    6. start(), train_loop()     a Training (the model, its optimizer, the step it is at); nanoGPT's loop, which the
                                 script hands step_loss, the loss of one micro-batch
    7. evaluation, checkpoints   validation metrics, best.pt and ckpt.pt (written atomically), resume
    8. finish(), summarize()     the test fold beside logistic regression, the novelty rule; the summary over runs

A script reads top to bottom: its settings, configure_settings(), checks, setup(), the data, then for each run:
build the model, start(), train_loop(), finish(); then summarize().
"""
import errno
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import metrics
from configurator import SETTING_TYPES, configure
from data import (Dataset, UserError, atomic_write, cell_seeds, check_writable, dynamic_mask_rate, fold_split,
                  leave_out_type, load_checkpoint, mask_expressed, mask_panel, masking_units, model_input,
                  parse_multiscale_weights, prepare_default_dataset, remove_stale_temporaries, write_failure)
from metrics import (classification_metrics, fit_logistic_regression, format_metrics_line, novelty_report,
                     novelty_rule, novelty_scores, plot_confusion, plot_loss)
from model import ModelConfig, ScBERT, clean_state_dict, model_name

# -----------------------------------------------------------------------------
# 1. The shared settings (configure_settings() lets config files and --key=value override them)
# I/O
out_dir = 'out'                # checkpoints, metrics.json, loss.png, confusion.png
dataset = 'data/pbmc68k'       # a directory written by prepare_data.py (the default is made from the embedded data)
mode = 'finetune'              # 'finetune' (cell-type classifier) | 'pretrain' (masked expression modelling)
init_from = 'scratch'          # 'scratch' | 'resume' (out_dir/ckpt.pt) | a path to our .pt or an original scBERT .pth
                               # ('{fold}' becomes the fold number: each CV fold continues its own fine-tuned model)
fold = '0'                     # test fold (validation is the next fold), or 'all' for k-fold cross-validation
test_batch = ''                # test on the cells of this batch (e.g. a donor: --test_batch=mouse2) and train on the
                               # others, validating on their fold `fold` + 1 ('' = test on fold `fold`)
eval_interval = 50             # iterations between validations and checkpoints
log_interval = 10              # iterations between log lines
eval_cells = 2000              # at most this many validation cells per evaluation (0 = all)
stop_iter = 0                  # stop after this iteration as if killed, to continue with --init_from=resume (0 = never)
resume_changes = ''            # resume: settings that may differ from the checkpoint's, comma-separated (e.g.
                               # 'max_iters,learning_rate' changes the schedule); any other difference is refused
# training
batch_size = 16                # cells per step per process (global batch = batch_size * processes * grad_accum)
grad_accum = 1                 # micro-batches per optimizer step
max_iters = 5000               # optimizer steps at most: the cap on the budget that `epochs` sets
epochs = 20.0                  # the budget: this many passes over the run's training cells, i.e. min(max_iters,
                               # epochs x cells / global batch) steps (the schedule decays over them); 0 = max_iters
patience = 10                  # early stopping: stop when validation (macro-F1; pretraining: loss) has not improved
                               # for this many evaluations in a row (0 = train the whole budget); 5 stopped Baron runs
                               # that improved later (results/README.md, "Fine-tuning to convergence")
optimizer = 'adamw'            # 'adamw' | 'adam' (as scBERT) | 'adafactor' (its lr is relative: try 1e-2)
learning_rate = 1e-3           # peak learning rate
min_lr = 1e-5                  # learning rate at the end of the decay
lr_schedule = 'linear'         # after warm-up: 'linear' decay | 'cosine' decay | 'constant'
warmup_iters = 40              # linear warm-up steps
weight_decay = 0.01            # AdamW decay on weight matrices
beta1 = 0.9                    # Adam beta1
beta2 = 0.999                  # Adam beta2
grad_clip = 1.0                # clip the gradient norm (0 = off)
finetune_params = 'all'        # what trains: 'all' | 'head' (classifier only) | 'scbert' (the original: head, final
                               # norm, block[-2])
class_weights = False          # weight the loss by inverse class frequency in the training folds
class_balance = 0.0            # fine-tuning: draw each training cell with weight n_c^-class_balance (n_c: the training
                               # cells of its type), so a type is seen in proportion to n_c^(1 - class_balance):
                               # 0 = as they come, 1 = every type equally often (Kang et al. 2020); 0.5 and 1 did not
                               # beat 0 on Baron's validation fold (results/README.md, "Fine-tuning to convergence")
label_smoothing = 0.0          # fine-tuning: cross-entropy to (1 - e) x the cell type + e spread over all types
bucket = False                 # expressed input: batch cells of similar length together: less padding, and batches
                               # without any need no attention mask, which keeps SDPA's flash kernel usable on GPU
mlm_weight = 1.0               # expressed pretraining: weight of the masked-bin cross-entropy
regression_weight = 1.0        # expressed pretraining: weight of the masked-value MSE
aux_loss_weight = 0.01         # MoE: weight of Switch's load-balancing loss
z_loss_weight = 0.0            # MoE: weight of the router z-loss (ST-MoE uses 1e-3)
# pretraining: masking
mask_prob = 0.15               # fraction of each cell's non-zero genes masked (scBERT's; of all its tokens for
                               # masking=random); validation always masks at this rate, whatever the masking
replace_prob = 0.9             # fraction of masked genes replaced by the mask token (scBERT's)
masking = 'nonzero'            # which genes are masked: 'random' (any token, zeros too) | 'nonzero' (scBERT's:
                               # expressed genes only) | 'dynamic' (nonzero at a rate that falls as the masked accuracy
                               # grows) | 'pathway' (whole gene sets) | 'multiscale' (genes, gene sets and chromosome
                               # regions); pathway and multiscale need prepare_data.py --annotate (see data.py, README)
mask_prob_min = 0.1            # masking=dynamic: rate = clip(max - (max - min) × acc, min, max), acc = EMA (0.9) of the
mask_prob_max = 0.3            # masking=dynamic: training steps' masked-bin accuracy, from 0: the rate starts at max
region_genes = 16              # masking=multiscale: genes per chromosome region (consecutive genes in genomic order)
multiscale_weights = '1,1,1'   # masking=multiscale: how often each scale is drawn: single genes, pathways, regions
# fine-tuning: the baseline and novel cell types
baseline = True                # also fit logistic regression on the same folds and print it beside the model
baseline_max_cells = 20000     # fit the baseline on at most this many training cells (a random sample)
lr_C = 1.0                     # inverse L2 strength of the logistic-regression baseline
novelty_score = 'knn'          # predict.py's default rule: 'maxprob' (scBERT's score) | 'entropy' | 'energy' |
                               # 'mahalanobis' | 'knn' (chosen by the leave-one-type-out runs in the README)
novelty_quantile = 0.95        # each score's threshold: this quantile of the validation cells' scores (so about 5% of
                               # known cells are called Unassigned)
novelty_cells = 20000          # fit the embedding scores on at most this many training cells (a random sample)
holdout = ''                   # leave-one-cell-type-out: this type is never trained on and its cells are tested as
                               # novel; 'all' = every type with at least holdout_min_cells labelled cells, in turn
holdout_min_cells = 30         # holdout=all: the types with at least this many labelled cells
# system
preload = True                 # hold the dataset in memory when it fits (half the free memory), else read it from disk
num_workers = 0                # background processes that build batches (0 = in the training process)
device = 'auto'                # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'                 # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False                # torch.compile the model
num_threads = 0                # CPU threads per process (0 = PyTorch's default; 1 under DDP on CPU)
seed = 1337                    # seeds initialisation, batches, masks and dropout
# -----------------------------------------------------------------------------
# every lower-case global above of a setting's type is a setting (constants are upper case)
SHARED = {k: v for k, v in dict(globals()).items()
          if not k.startswith('_') and not k.isupper() and isinstance(v, SETTING_TYPES)}
config = {}                    # every setting of the running script, as configure_settings() set them (checkpoints)
# what a resumed run may change without resume_changes: where it writes, how it logs, what runs it; not what it learns
FREE_ON_RESUME = ('out_dir', 'init_from', 'stop_iter', 'resume_changes', 'log_interval', 'num_workers', 'num_threads',
                  'device', 'compile', 'preload', 'baseline', 'baseline_max_cells', 'lr_C')


def configure_settings(scope, argv=None, ignored_in_files=()):
    """configure() over a script's own settings (its globals, `scope`) and the shared ones above: config files and
    --key=value set either kind. Shared settings are written here (this module's globals), the script's into scope
    (a script may give a shared setting its own default, as distill.py does out_dir).
    ignored_in_files: settings a config file may set that this script ignores (distill.py: the model's, which are
    the teacher's). Returns {name: value} of all of them, as stored in checkpoints."""
    global config
    merged = {**SHARED, **{k: v for k, v in scope.items() if not k.isupper()}}
    config = configure(merged, argv, sources=[__file__], ignored_in_files=ignored_in_files)
    globals().update({k: config[k] for k in SHARED})
    scope.update({k: v for k, v in config.items() if k not in SHARED or k in scope})   # (distill.py's own out_dir)
    return config


def check_settings():
    """The shared settings' rules, before anything runs (the model's are ModelConfig's)."""
    choices = dict(mode=('pretrain', 'finetune'), finetune_params=('all', 'head', 'scbert'),
                   optimizer=('adamw', 'adam', 'adafactor'), lr_schedule=('linear', 'cosine', 'constant'),
                   dtype=('auto', 'float32', 'bfloat16', 'float16'), novelty_score=metrics.NOVELTY_SCORES)
    for name, allowed in choices.items():
        if globals()[name] not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, not '{globals()[name]}' (set --{name}=...)")
    if not 0 < novelty_quantile < 1:
        raise UserError(f'novelty_quantile must be between 0 and 1 (e.g. 0.95), not {novelty_quantile}')
    if holdout and mode != 'finetune':
        raise UserError('holdout leaves a cell type out of fine-tuning: set --mode=finetune (or --holdout=)')
    if holdout != 'all' and holdout_min_cells != SHARED['holdout_min_cells']:
        raise UserError("holdout_min_cells picks the types of --holdout=all; it does nothing here")
    for name in ('max_iters', 'eval_interval', 'log_interval', 'batch_size', 'grad_accum', 'novelty_cells',
                 'holdout_min_cells'):
        if globals()[name] < 1:
            raise UserError(f'{name} must be at least 1, not {globals()[name]} (set --{name}=...)')
    if epochs < 0 or patience < 0:
        raise UserError(f'epochs ({epochs}) and patience ({patience}) must be 0 (off) or more')
    if not 0 <= class_balance <= 1 or not 0 <= label_smoothing < 1:
        raise UserError(f'class_balance ({class_balance}) must be in [0, 1] and label_smoothing ({label_smoothing}) '
                        f'in [0, 1)')
    if mode == 'pretrain' and (class_balance or label_smoothing):
        raise UserError('class_balance and label_smoothing weigh cell types, which pretraining has none of: set them '
                        'to 0 (or --mode=finetune)')
    if device != 'auto' and 'cuda' in device and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available here (set --device=cpu or auto)")
    masking_units(None, masking)                                     # an unknown strategy: stop here
    if not 0 < mask_prob <= 1 or not 0 < mask_prob_min <= mask_prob_max <= 1 or region_genes < 1:
        raise UserError(f'mask_prob ({mask_prob}) must be in (0, 1], 0 < mask_prob_min ({mask_prob_min}) <= '
                        f'mask_prob_max ({mask_prob_max}) <= 1, and region_genes ({region_genes}) >= 1')
    parse_multiscale_weights(multiscale_weights)
    if fold == 'all' and test_batch:
        raise UserError(f"test_batch='{test_batch}' gives one split; use --fold=0 (the fold that picks the validation "
                        f"cells)")
    check_writable(out_dir)


def model_config(args):
    """ModelConfig(**args), its rule broken as a one-line error."""
    try:
        return ModelConfig(**args)
    except ValueError as e:
        raise UserError(str(e)) from None


# -----------------------------------------------------------------------------
# 2. Device, dtype and DDP

@dataclass
class Env:
    """Where this process trains: its DDP rank among world_size processes, its device and its autocast context."""
    ddp: bool
    rank: int
    world_size: int
    device: str
    dtype: str

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return 'cuda' if 'cuda' in self.device else 'cpu'

    @property
    def autocast(self):
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[self.dtype]
        return nullcontext() if ptdtype == torch.float32 else torch.autocast(self.device_type, dtype=ptdtype)

    def log(self, *args):
        if self.master:
            tqdm.write(' '.join(str(a) for a in args))


def setup():
    """-> Env. DDP when torchrun set RANK: one process per GPU (nccl), or per CPU slot (gloo)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    where = device
    if ddp:
        use_cuda = where != 'cpu' and torch.cuda.is_available()
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
        rank, world_size = dist.get_rank(), dist.get_world_size()
        where = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(where)
    else:
        rank, world_size = 0, 1
        where = ('cuda' if torch.cuda.is_available() else 'cpu') if where == 'auto' else where
    env = Env(ddp, rank, world_size, where, dtype)
    if num_threads or (ddp and env.device_type == 'cpu'):
        torch.set_num_threads(num_threads or 1)   # two threads per process on 2 cores made a tiny model 100x slower
    if dtype == 'auto':
        # fp32 on CPU: bf16 autocast is 2x faster on CPUs with native bf16 matmuls (README), many times slower without
        env.dtype = 'bfloat16' if env.device_type == 'cuda' else 'float32'
    if env.device_type == 'cpu' and env.dtype == 'float16':
        raise UserError('float16 needs CUDA; use --dtype=float32 on CPU')
    torch.set_flush_denormal(True)   # exp() of FAVOR+ features underflows; denormal floats slow CPU matmuls many-fold
    if env.device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return env


def teardown(env):
    if env.ddp:
        dist.barrier()                                             # rank 0 may still be scoring the test fold
        dist.destroy_process_group()


def load_dataset(env):
    """The prepared dataset (the default job prepares the embedded PBMC data on first use), checked for the task."""
    if env.master:
        prepare_default_dataset(dataset)
    if env.ddp:
        dist.barrier()
    data = Dataset(dataset, preload=preload)
    if mode == 'finetune' and not data.label_names:
        raise UserError(f'{dataset} has no labels; prepare it with --label_key=<obs column> to fine-tune, or use '
                        f'--mode=pretrain')
    if mode == 'finetune' and len(data.label_names) < 2:
        raise UserError(f"every labelled cell of {dataset} is '{data.label_names[0]}': one cell type leaves nothing to "
                        f"learn; prepare data with two or more types (--label_key=...), or use --mode=pretrain")
    return data


# -----------------------------------------------------------------------------
# 3. Runs: which cells train, validate and test

@dataclass
class Run:
    """One training run: test fold k (validation fold k + 1), or with holdout one held-out cell type and fold.
    labels/label_names are this run's (the held-out type's cells get -1); the Dataset is never changed."""
    k: int
    dir: str
    data: Dataset
    labels: np.ndarray
    label_names: list
    held_out: str = ''
    novel_idx: np.ndarray = None       # holdout: the held-out type's cells, tested as novel
    units: object = None               # pathway/multiscale masking: the gene units (data.masking_units)
    train_idx: np.ndarray = None
    val_idx: np.ndarray = None
    test_idx: np.ndarray = None        # None for pretraining (it trains on the test fold too)
    eval_idx: np.ndarray = None        # the validation cells of each evaluation (at most eval_cells)
    max_iters: int = 0                 # this run's budget of optimizer steps (budget())
    weights: np.ndarray = None         # class_balance: each training cell's chance to be drawn (sampling_weights())
    n_runs: int = 1                    # runs in this job (fold='all', holdout='all'), for the expected time


def plan_runs(data, env):
    """-> [Run]: one per fold (fold='all': every fold, each in out_dir/fold<k>), times each held-out type."""
    if fold == 'all':
        folds = list(range(data.n_folds))
    elif fold.isdigit() and int(fold) < data.n_folds:
        folds = [int(fold)]
    else:
        raise UserError(f"fold must be 0..{data.n_folds - 1} or 'all', not '{fold}'")
    units = masking_units(data if mode == 'pretrain' else None, masking, region_genes)
    if units is not None:
        in_a_set = int((np.diff(units.gene_ptr) > 0).sum())
        env.log(f'masking={masking}: {units.n_sets} gene sets hold {in_a_set} of the {data.n_genes} genes'
                + (f'; {len(units.order)} genes have coordinates (regions of {region_genes}), weights '
                   f'{multiscale_weights} (single genes, pathways, regions)' if masking == 'multiscale' else ''))
    runs = []
    for held_out in held_out_types(data):
        run_dir = out_dir
        if held_out:
            run_dir = os.path.join(out_dir, 'holdout_' + re.sub(r'[^A-Za-z0-9_.+-]', '_', held_out))
        for k in folds:
            run = Run(k, os.path.join(run_dir, f'fold{k}') if fold == 'all' else run_dir, data, data.labels,
                      data.label_names, held_out, units=units)
            if held_out:
                leave_out(run)
            split(run, env)
            runs.append(run)
    for run in runs:
        run.n_runs = len(runs)
    return runs


def held_out_types(data):
    """holdout's cell types, or [''] (none held out)."""
    if not holdout:
        return ['']
    counts = np.bincount(data.labels[data.labels >= 0], minlength=len(data.label_names))
    if holdout == 'all':
        types = [t for t, c in zip(data.label_names, counts) if c >= holdout_min_cells]
    elif holdout in data.label_names:
        types = [holdout]
    else:
        raise UserError(f"holdout '{holdout}' is not a cell type of {dataset} (its types: "
                        f"{', '.join(data.label_names)}), or 'all'")
    if not types or len(data.label_names) < 3:
        raise UserError(f'holdout needs at least 3 cell types and one with {holdout_min_cells} labelled cells '
                        f'(set --holdout_min_cells=...)')
    return types


def leave_out(run):
    """Leave-one-cell-type-out: the held-out type's cells get label -1, the others close the gap; its cells (from
    the test batch only, with test_batch, as the known test cells are) are tested as novel."""
    run.labels, run.label_names, run.novel_idx = leave_out_type(run.data.labels, run.data.label_names, run.held_out)
    batches = run.data.meta.get('batch_names') or []
    if test_batch in batches:
        run.novel_idx = run.novel_idx[run.data.batch[run.novel_idx] == batches.index(test_batch)]
        if not len(run.novel_idx):
            raise UserError(f"test_batch '{test_batch}' has no '{run.held_out}' cells to test as novel; hold out "
                            f"another type or test on another batch")


def split(run, env):
    """The run's train, validation and test cells (test_batch: test on one batch), and each evaluation's cells."""
    train_idx, val_idx, test_idx = fold_split(run.data, run.k, test_batch)
    if run.held_out:                                               # the known types only
        train_idx, val_idx, test_idx = (i[run.labels[i] >= 0] for i in (train_idx, val_idx, test_idx))
    if mode == 'pretrain':      # no labels to protect: train on every fold but the validation one
        train_idx, test_idx = np.sort(np.concatenate([train_idx, test_idx])), None
    if len(train_idx) == 0 or len(val_idx) == 0 or (test_idx is not None and len(test_idx) == 0):
        raise UserError(f'{dataset} has too few cells for fold {run.k} of {run.data.n_folds} (train {len(train_idx)}, '
                        f'val {len(val_idx)}, test {0 if test_idx is None else len(test_idx)}); prepare it with '
                        f'fewer --n_folds')
    run.train_idx, run.val_idx, run.test_idx = train_idx, val_idx, test_idx
    run.eval_idx = sample(val_idx, eval_cells) if eval_cells else val_idx
    run.max_iters = budget(len(train_idx), env)
    run.weights = sampling_weights(run.labels[train_idx]) if mode == 'finetune' and class_balance else None


def budget(n_train, env):
    """A run's optimizer steps: `epochs` passes over its n_train training cells, at most max_iters (all of them
    when epochs is 0). A 700-cell and a 20,000-cell dataset both train enough; early stopping may end it sooner."""
    if not epochs:
        return max_iters
    return max(1, min(max_iters, math.ceil(epochs * n_train / (batch_size * grad_accum * env.world_size))))


def sampling_weights(labels):
    """class_balance = a: each training cell's probability of being drawn, proportional to n_c^-a for its type c
    (n_c cells), so type c is drawn in proportion to n_c^(1 - a). (n_train,) float64, summing to 1."""
    counts = np.bincount(labels)
    weights = counts[labels].astype(np.float64) ** -class_balance
    return weights / weights.sum()


def sample(idx, n):
    """At most n of cells idx, a seeded random sample, sorted."""
    return idx if len(idx) <= n else np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))


# -----------------------------------------------------------------------------
# 4. Batches

def dynamic_masking():
    """masking=dynamic pretraining: the training loop masks each batch at the live rate."""
    return mode == 'pretrain' and masking == 'dynamic'


def batch_indices(run, step, cfg, env):
    """Cells of micro-step `step` for this rank: an epoch-seeded permutation, so any step is known without state
    (resume continues exactly) and the global batch is the same whatever the number of processes."""
    global_batch = batch_size * env.world_size
    per_epoch = max(1, len(run.train_idx) // global_batch)
    epoch, pos = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    if run.weights is None:
        perm = rng.permutation(run.train_idx)
    else:                                    # class_balance: an epoch's worth of cells, drawn with those weights
        perm = rng.choice(run.train_idx, size=len(run.train_idx), p=run.weights)
    if len(perm) < global_batch:                                   # tiny datasets: wrap around
        perm = np.resize(perm, global_batch)
    if bucket and cfg.input_genes == 'expressed':
        # sort each window of 50 global batches by cell length, cut it into global batches, shuffle those batches:
        # every batch holds cells of about one length (cells longer than max_genes are all max_genes long)
        length = np.diff(run.data.indptr)[perm]
        length = np.minimum(length, cfg.max_genes or length.max())
        window = 50 * global_batch
        perm = np.concatenate([perm[i:i + window][np.argsort(length[i:i + window], kind='stable')]
                               for i in range(0, len(perm), window)])
        batches = perm[:per_epoch * global_batch].reshape(per_epoch, global_batch)
        perm = batches[rng.permutation(per_epoch)].ravel()
    start = pos * global_batch + env.rank * batch_size
    return perm[start:start + batch_size]


def get_batch(run, idx, cfg, step=None, masked=True):
    """The model's input for cells idx (data.model_input), on the CPU, and targets: cell types, or what was masked
    (-100 where not). Masks and gene subsets are fresh at every step, seeded by (step, cell): resume repeats them,
    and they do not depend on how a global batch is split over ranks. For evaluation (step None) they are fixed per
    cell, at mask_prob: with masking=dynamic, evaluation masks as nonzero does, so validation numbers stay comparable
    while the training rate moves. masked=False (dynamic training) returns the input unmasked and the cells idx:
    mask_batch masks it in the training process, the only one that knows the live rate."""
    csr = run.data.rows(idx)
    if cfg.input_genes == 'expressed':     # the seeds pick each cell's genes, then its masks from the same stream
        seeds = cell_seeds(*csr[:2], cfg.seed) if step is None else [[seed, step + 1, int(c)] for c in idx]
    else:                                  # the panel's masks
        seeds = [[seed, 0 if step is None else step + 1, int(c)] for c in idx]
    if mode == 'finetune':
        return model_input(csr, cfg, run.data.log_base, seeds), torch.from_numpy(run.labels[idx].astype(np.int64))
    if not masked:
        return model_input(csr, cfg, run.data.log_base, seeds), torch.from_numpy(np.asarray(idx, np.int64))
    strategy = 'nonzero' if masking == 'dynamic' else masking
    return model_input(csr, cfg, run.data.log_base, seeds, mask_prob, replace_prob, strategy, run.units,
                       parse_multiscale_weights(multiscale_weights))


def mask_batch(x, idx, cfg, step, rate):
    """Dynamic masking of micro-step `step`'s batch, built unmasked (get_batch(masked=False)), at `rate` -> (input,
    targets) as get_batch. scBERT's panel is masked exactly as nonzero masks it at that rate (the same seeds); the
    expressed input from its own stream per (step, cell), apart from the one that drew the cell's gene subset."""
    seeds = [[seed, step + 1, int(c)] for c in idx]
    if isinstance(x, dict):
        x = mask_expressed(x, [[*s, 1] for s in seeds], cfg.mask_id, rate, replace_prob, 'dynamic')
        return x, {'bins': x.pop('target_bins'), 'values': x.pop('target_values')}
    return mask_panel(x, seeds, cfg.mask_id, rate, replace_prob, 'dynamic')


def to_device(x, env):
    """A tensor, or a dict of them, to the training device (non_blocking: overlaps the copy from pinned memory)."""
    if isinstance(x, dict):
        return {k: v.to(env.device, non_blocking=True) for k, v in x.items()}
    return x.to(env.device, non_blocking=True)


class Batches(torch.utils.data.Dataset):
    """Item s is micro-step s's batch, built by get_batch on the CPU. A DataLoader over it with num_workers > 0 builds
    the next batches in background processes while the model trains (pinned memory on CUDA), so the GPU never waits."""
    def __init__(self, run, cfg, env):
        self.run, self.cfg, self.env = run, cfg, env

    def __len__(self):
        return self.run.max_iters * grad_accum

    def __getitem__(self, step):            # dynamic masking: unmasked, with the cells (masked by the training loop)
        idx = batch_indices(self.run, step, self.cfg, self.env)
        return get_batch(self.run, idx, self.cfg, step, masked=not dynamic_masking())


def batches_from(run, cfg, first_step, env):
    """The batches from micro-step first_step on: built in num_workers background processes, or here when 0."""
    loader = torch.utils.data.DataLoader(Batches(run, cfg, env), batch_size=None,
                                         sampler=range(first_step, run.max_iters * grad_accum),
                                         num_workers=num_workers, pin_memory=env.device_type == 'cuda',
                                         prefetch_factor=4 if num_workers else None,
                                         worker_init_fn=partial(apply_settings, config) if num_workers else None)
    return iter(loader)


def apply_settings(settings, worker_id=None):
    """A DataLoader worker started afresh (spawn, not fork) imports this module at its defaults: set them again."""
    globals().update({k: v for k, v in settings.items() if k in SHARED})


# -----------------------------------------------------------------------------
# 5. The optimizer, its schedule, and how DDP weighs a loss

def set_trainable(model, env):
    """Fine-tuning trains finetune_params; the pretraining heads are frozen (DDP errors on unused parameters)."""
    if mode == 'finetune':
        for module in (model.lm_head, model.value_head):
            if module is not None:
                module.requires_grad_(False)
        if hasattr(model, 'mask_emb'):
            model.mask_emb.requires_grad_(False)
    if mode != 'finetune' or finetune_params == 'all':
        return
    model.requires_grad_(False)
    trainable = [model.cls_head]
    if finetune_params == 'scbert' and model.config.share_layers != 'none':
        env.log(f"note: finetune_params='scbert' trains block[-2], which shares its {model.config.share_layers} with "
                f"every block (share_layers={model.config.share_layers})")
    if finetune_params == 'scbert':                                # scBERT's finetune.py: norm, layers[-2] and the head
        trainable += [model.ln_f, model.blocks[-2] if len(model.blocks) > 1 else model.blocks[-1]]
    for module in trainable:
        module.requires_grad_(True)


def lr_at(it, total):
    """Linear warm-up, then linear or cosine decay to min_lr (or constant) at the run's last step, `total`."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == 'constant':
        return learning_rate
    progress = min(1.0, (it - warmup_iters) / max(1, total - warmup_iters))
    coeff = 1.0 - progress if lr_schedule == 'linear' else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (learning_rate - min_lr)


def global_share(local, env):
    """world_size * this rank's share of a count summed over the ranks (1.0 in one process). A rank's mean loss times
    its share makes DDP's average of the ranks' gradients the gradient of the mean over the global batch."""
    if not env.ddp:
        return 1.0
    total = local.clone()
    dist.all_reduce(total)
    return local * env.world_size / total


def loss_share(targets, class_weight, env):
    """global_share of the task loss's denominator: masked genes, or cells (or their summed class weights)."""
    if mode == 'pretrain':
        local = (masked_bins(targets) != -100).sum().float()
    elif class_weight is not None:
        local = class_weight[targets].sum()
    else:
        local = torch.tensor(float(len(targets)), device=env.device)
    return global_share(local, env)


def masked_bins(targets):
    """Pretraining targets -> the masked bins (-100 elsewhere): expressed input's are a dict with the values too."""
    return targets['bins'] if isinstance(targets, dict) else targets


def class_weight_of(run, env):
    """class_weights: inverse class frequency in the training cells (0 for an absent class), else None."""
    if mode != 'finetune' or not class_weights:
        return None
    counts = np.bincount(run.labels[run.train_idx], minlength=len(run.label_names)).astype(np.float64)
    return torch.tensor(np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0),
                        dtype=torch.float32, device=env.device)


# -----------------------------------------------------------------------------
# 6. The training loop

@dataclass
class Training:
    """A run in progress: the model (raw_model; model is it compiled and/or DDP-wrapped), its optimizer, the step
    it is at, the best validation so far and the history for loss.png. projection: a module trained beside the model
    (distill.py's, for a narrower student), saved in ckpt.pt."""
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optim: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    projection: torch.nn.Module = None
    iter_num: int = 0
    best: dict = field(default_factory=lambda: {'macro_f1': -1.0, 'loss': float('inf'), 'iter': -1})
    history: dict = field(default_factory=lambda: {'iter': [], 'train_loss': []})
    stopped: str = ''                  # why the loop stopped: early stopping or the budget
    mask_acc_ema: float = 0.0          # dynamic masking: EMA of the training steps' masked-bin accuracy (sets the rate)
    done: bool = False                 # resumed a finished run

    def parameters(self):
        return [*self.raw_model.parameters(), *(self.projection.parameters() if self.projection is not None else [])]


def start(run, model, ckpt, env, make_projection=None):
    """Model on the device, optimizer (with the parameters of make_projection(), if given), and, resuming, their
    state -> Training."""
    if env.master:
        os.makedirs(run.dir, exist_ok=True)
        stale = remove_stale_temporaries(run.dir)                  # of writes killed mid-way (kill -9)
        if stale:
            env.log(f"removed {len(stale)} temporary file(s) that killed writes left in {run.dir}: {', '.join(stale)}")
        with atomic_write(os.path.join(run.dir, 'vocab.txt')) as tmp, open(tmp, 'w') as f:
            f.write('\n'.join(run.data.vocab) + '\n')
    set_trainable(model, env)
    raw_model = model.to(env.device)
    optim = raw_model.configure_optimizer(optimizer, learning_rate, weight_decay, (beta1, beta2))
    projection = None
    if make_projection is not None:
        projection = make_projection()                             # made after the optimizer: the same random draws
        optim.add_param_group({'params': list(projection.parameters()), 'weight_decay': 0.0})
    t = Training(raw_model, raw_model, optim, torch.amp.GradScaler(enabled=env.dtype == 'float16'), projection)
    if ckpt is not None:
        resume(t, run, ckpt, env)
    if compile:
        t.model = torch.compile(t.model)
    if env.ddp:
        t.model = DDP(t.model, device_ids=[int(env.device.split(':')[1])] if env.device_type == 'cuda' else None)
    return t


def train_loop(run, t, step_loss, env, teacher=None):
    """nanoGPT's loop: set the learning rate, accumulate grad_accum micro-batches' gradients, step the optimizer; log,
    evaluate and checkpoint now and then. step_loss(model, x, targets) -> (logits, the task's loss, the loss to
    backpropagate), both weighted for DDP (loss_share), is the script's. Returns False when stopped by stop_iter."""
    batches = batches_from(run, t.raw_model.config, t.iter_num * grad_accum, env)
    t.model.train()
    t.raw_model.expert_load(reset=True)
    clock = Clock(env)
    last = run.max_iters - 1
    with tqdm(total=run.max_iters, initial=t.iter_num, disable=not env.master, desc=f'fold {run.k}',
              leave=False) as bar:
        while t.iter_num <= last:
            lr = lr_at(t.iter_num, run.max_iters)
            for group in t.optim.param_groups:
                group['lr'] = lr
            torch.manual_seed(seed + t.iter_num * env.world_size + env.rank)     # dropout: the same on resume
            rate = dynamic_mask_rate(t.mask_acc_ema, mask_prob_min, mask_prob_max) if dynamic_masking() else mask_prob
            hits = []                                                  # dynamic: the step's masked-bin accuracy
            for micro in range(grad_accum):
                clock.waiting()
                x, targets = next_batch(batches, t, t.iter_num * grad_accum + micro, rate, env)
                clock.got(x)
                sync = nullcontext() if (not env.ddp or micro == grad_accum - 1) else t.model.no_sync()
                with sync:
                    with env.autocast:
                        logits, loss, total = step_loss(t.model, x, targets)
                    aux, z = t.raw_model.aux_losses()                  # MoE: load balancing and router z-loss
                    total = total + aux_loss_weight * aux + z_loss_weight * z
                    t.scaler.scale(total / grad_accum).backward()
                if dynamic_masking():
                    hits.append(masked_hits(logits, targets))
                clock.computed(cells=len(x['genes'] if isinstance(x, dict) else x) * env.world_size)
            if dynamic_masking():
                update_mask_rate(t, hits, env)
            optimizer_step(t, env)
            clock.computed()
            bar.update(1)
            if t.iter_num % log_interval == 0 or t.iter_num == last:
                log_step(t, global_mean(loss, env), lr, rate, aux, clock, env)
                clock.expect(run, t.iter_num, env)
            if t.iter_num % eval_interval == 0 or t.iter_num == last:
                t_eval = time.time()
                validate(run, t, env, teacher)
                clock.evals.append(time.time() - t_eval)
                clock.t0 = time.time()                                 # leave evaluation out of the cells/s figure
                if patience_spent(t, env):
                    break
            if stop_iter and t.iter_num == stop_iter:
                env.log(f'stopping after iteration {t.iter_num} (stop_iter); continue with --init_from=resume')
                return False
            t.iter_num += 1
    t.stopped = t.stopped or f'the budget of {run.max_iters} steps ({describe_budget(run, env)}) is spent'
    env.log(f'fold {run.k}: stopped at iteration {min(t.iter_num, last)}: {t.stopped}')
    return True


def patience_spent(t, env):
    """Early stopping: True when the last `patience` evaluations have not improved on the best (the history says
    how many came after it, so a resumed run counts on where it stopped). Rank 0 decides; DDP ranks follow it."""
    stop = torch.tensor(0, device=env.device)
    if env.master and patience:
        since_best = sum(it > t.best['iter'] for it in t.history.get('val_iter', []))
        if since_best >= patience:
            stop += 1
            what = 'macro_f1' if mode == 'finetune' else 'loss'
            t.stopped = (f"validation {what} has not improved for {patience} evaluations (patience); the best, "
                         f"{t.best[what]:.4f}, was at iteration {t.best['iter']}")
    if env.ddp:
        dist.broadcast(stop, 0)
    return bool(stop)


def describe_budget(run, env):
    """How the budget was set: epochs of the training cells, or max_iters."""
    if epochs and run.max_iters < max_iters:
        return f'{epochs:g} epochs of {len(run.train_idx)} cells, {batch_size * grad_accum * env.world_size} per step'
    return 'max_iters'


def next_batch(batches, t, step, rate, env):
    """Micro-step `step`'s batch on the device; with dynamic masking, masked here at the live rate."""
    x, targets = next(batches)
    if dynamic_masking():                                          # targets: the cells, to seed their masks
        x, targets = mask_batch(x, targets.numpy(), t.raw_model.config, step, rate)
    return to_device(x, env), to_device(targets, env)


class Clock:
    """Where a step's time goes: waiting for the batch (data) or forward, backward and the optimizer (compute); and
    the share of padding tokens (expressed input)."""
    def __init__(self, env):
        self.env, self.evals, self.started = env, [], None
        self.reset()

    def reset(self):
        self.t0, self.cells, self.data, self.compute, self.padding = time.time(), 0, 0.0, 0.0, []

    def expect(self, run, it, env):
        """Once, at the first log line 10 or more steps into a run: how long it (and the job) should take at this
        pace, evaluations included."""
        if self.started is None:
            self.started, self.first, self.evals = time.time(), it, []
        elif self.started and it - self.first >= 10:
            per_step = (time.time() - self.started - sum(self.evals)) / (it - self.first)
            n_evals = len(range(self.first, run.max_iters, eval_interval)) + 1
            run_min = (per_step * (run.max_iters - self.first) + np.mean(self.evals or [0]) * n_evals) / 60
            env.log(f'expected time: about {run_min:.0f} min for this run at most ({run.max_iters - self.first} '
                    f'steps, {n_evals} evaluations; early stopping may end it sooner)'
                    + (f', {run_min * run.n_runs:.0f} min for its {run.n_runs} runs' if run.n_runs > 1 else ''))
            self.started = 0.0                                     # said once

    def waiting(self):
        self.t_data = time.time()

    def got(self, x):
        self.t_compute = time.time()
        self.data += self.t_compute - self.t_data
        if isinstance(x, dict):
            self.padding.append((x['genes'] < 0).float().mean().item())

    def computed(self, cells=0):
        """Count the compute since the batch came (or since the last call): a micro-step's cells, or 0 after the
        optimizer step."""
        if cells == 0 and self.env.device_type == 'cuda':
            torch.cuda.synchronize()                               # for honest compute times
        self.cells += cells
        self.compute += time.time() - self.t_compute
        self.t_compute = time.time()


def masked_hits(logits, targets):
    """(masked bins predicted right, masked bins) of a pretraining micro-batch."""
    predicted = logits['bins'] if isinstance(logits, dict) else logits
    target = masked_bins(targets)
    sel = target != -100
    return torch.stack([(predicted.detach().argmax(-1)[sel] == target[sel]).sum(), sel.sum()])


def update_mask_rate(t, hits, env):
    """Dynamic masking: the EMA of the masked-bin accuracy over the global batch (every micro-step and rank), so
    every rank gets the same next rate."""
    counts = torch.stack(hits).sum(0)
    if env.ddp:
        dist.all_reduce(counts)
    t.mask_acc_ema = 0.9 * t.mask_acc_ema + 0.1 * counts[0].item() / max(1, counts[1].item())


def optimizer_step(t, env):
    """Clip the gradient norm, step, zero the gradients. The projection is outside DDP's model: average its gradient
    here."""
    if env.ddp and t.projection is not None:
        for p in t.projection.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= env.world_size
    if grad_clip:
        t.scaler.unscale_(t.optim)
        torch.nn.utils.clip_grad_norm_(t.parameters(), grad_clip)
    t.scaler.step(t.optim)
    t.scaler.update()
    t.optim.zero_grad(set_to_none=True)


def global_mean(loss, env):
    """A micro-batch's loss, weighted by its DDP share, -> its mean over the ranks: the loss of the global batch (in
    one process, the loss itself)."""
    loss = loss.detach().float()
    if env.ddp:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= env.world_size
    return loss


def log_step(t, loss, lr, rate, aux, clock, env):
    """One log line: loss, learning rate, speed and where the time went (and the masking rate, padding, experts)."""
    t.history['iter'].append(t.iter_num)
    t.history['train_loss'].append(loss.item())
    if dynamic_masking():                                          # the step's rate, and the EMA that sets the next
        t.history.setdefault('mask_rate', []).append(rate)
        t.history.setdefault('mask_acc_ema', []).append(t.mask_acc_ema)
    load = t.raw_model.expert_load(reset=True)
    env.log(f'iter {t.iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, {clock.cells / (time.time() - clock.t0):.1f} '
            f'cells/s, data {1e3 * clock.data:.0f} ms / compute {1e3 * clock.compute:.0f} ms'
            + (f', mask rate {rate:.3f} (masked-bin accuracy EMA {t.mask_acc_ema:.3f})' if dynamic_masking() else '')
            + (f', padding {np.mean(clock.padding):.0%}' if clock.padding else '')
            + (f', aux {aux.item():.3f}, {describe_load(load)}' if load is not None else ''))
    clock.reset()


def describe_load(load):
    """Expert load (n_layer, n_expert) of shares of uniform -> one line: the least and most used expert per layer."""
    return 'expert load (share of uniform, min-max per layer): ' + ', '.join(f'{min(r):.2f}-{max(r):.2f}' for r in load)


# -----------------------------------------------------------------------------
# 7. Evaluation and checkpoints

@torch.no_grad()
def evaluate(model, run, idx, env, teacher=None):
    """Loss and metrics over cells idx: cell-type metrics for fine-tuning; for pretraining the masked-bin accuracy, and
    for expressed input the masked values' mean squared error. MoE models: how evenly the experts were used. With a
    teacher: how often the model's prediction (cell type, or masked bin) is the teacher's."""
    model.eval()
    model.expert_load(reset=True)
    total = {'loss': 0.0, 'n': 0, 'correct': 0, 'bins': 0, 'sq_err': 0.0, 'agree': 0, 'compared': 0}
    probs, masked_values = [], []
    for start in range(0, len(idx), batch_size * 2):
        chunk = idx[start:start + batch_size * 2]
        x, targets = (to_device(v, env) for v in get_batch(run, chunk, model.config))
        with env.autocast:
            logits, loss = model(x, targets, mlm_weight=mlm_weight, regression_weight=regression_weight)
        # the loss is a mean over the chunk's cells (fine-tuning) or masked genes (pretraining): weigh it by their count
        n = len(chunk) if mode == 'finetune' else int((masked_bins(targets) != -100).sum())
        total['loss'] += loss.item() * n
        total['n'] += n
        if teacher is not None:
            teacher_agreement(teacher, x, logits, targets, total, env)
        if mode == 'finetune':
            probs.append(logits.float().softmax(-1).cpu())
        else:
            masked_accuracy(logits, targets, total, masked_values, model.config.n_bins)
    model.train()
    out = {'loss': total['loss'] / max(1, total['n'])}
    if teacher is not None:
        out['teacher_agreement'] = total['agree'] / max(1, total['compared'])
    load = model.expert_load(reset=True)
    if load is not None:
        out['expert_load'] = load.tolist()                          # (n_layer, n_expert), 1 = the uniform share
    if mode == 'finetune':
        prob = torch.cat(probs).numpy()
        out.update(classification_metrics(run.labels[idx], prob.argmax(1), prob, run.label_names), prob=prob)
    else:
        n_masked = max(1, int(total['bins'].sum()))
        # the floor to beat: always guessing the commonest bin of the masked genes
        out.update(masked_acc=total['correct'] / n_masked, majority_acc=int(total['bins'].max()) / n_masked)
        if masked_values:                                           # and for values: always guessing their mean
            values = torch.cat(masked_values).double()
            out.update(masked_mse=total['sq_err'] / len(values), mean_guess_mse=float(values.var(unbiased=False)))
    return out


def masked_accuracy(logits, targets, total, masked_values, n_bins):
    """Pretraining evaluation: add a chunk's masked-bin hits, bin counts and (expressed input) squared errors."""
    if isinstance(logits, dict):                                    # expressed: bins and values
        sel = targets['bins'] != -100
        total['sq_err'] += (logits['values'][sel].float() - targets['values'][sel]).pow(2).sum().item()
        masked_values.append(targets['values'][sel].cpu())
        logits, targets = logits['bins'], targets['bins']
    sel = targets != -100
    total['correct'] += (logits.argmax(-1)[sel] == targets[sel]).sum().item()
    total['bins'] = total['bins'] + torch.bincount(targets[sel].cpu(), minlength=n_bins + 2)


def teacher_agreement(teacher, x, logits, targets, total, env):
    """Distillation: count how often the student's prediction (cell type, or masked bin) is the teacher's."""
    with env.autocast:
        t_logits = teacher(x, task='classify' if mode == 'finetune' else 'mlm')[0]
    s_pred, t_pred = (v['bins'] if isinstance(v, dict) else v for v in (logits, t_logits))
    same = s_pred.argmax(-1) == t_pred.argmax(-1)                  # (B,) cell types, or (B, L) bins
    if mode == 'pretrain':                                          # the masked genes only
        same = same[masked_bins(targets) != -100]
    total['agree'] += int(same.sum())
    total['compared'] += same.numel()


def validate(run, t, env, teacher=None):
    """Evaluate on the validation cells; on improvement save best.pt; then ckpt.pt (the resume point)."""
    if env.master:
        val = evaluate(t.raw_model, run, run.eval_idx, env, teacher)
        h, it = t.history, t.iter_num
        h.setdefault('val_iter', []).append(it)
        h.setdefault('val_loss', []).append(val['loss'])
        agreement = f', agrees with the teacher on {val["teacher_agreement"]:.1%}' if teacher is not None else ''
        if teacher is not None:
            h.setdefault('val_teacher_agreement', []).append(val['teacher_agreement'])
        if mode == 'finetune':
            h.setdefault('val_macro_f1', []).append(val['macro_f1'])
            improved = val['macro_f1'] > t.best['macro_f1']
            env.log(f'iter {it}: val loss {val["loss"]:.4f}, {format_metrics_line(val)}' + agreement)
        else:
            h.setdefault('val_masked_acc', []).append(val['masked_acc'])
            improved = val['loss'] < t.best['loss']
            env.log(f'iter {it}: val loss {val["loss"]:.4f}, masked-bin accuracy {val["masked_acc"]:.4f} '
                    f'(always the commonest bin: {val["majority_acc"]:.4f})'
                    + (f', masked-value MSE {val["masked_mse"]:.4f} (always the mean: {val["mean_guess_mse"]:.4f})'
                       if 'masked_mse' in val else '') + agreement)
        if 'expert_load' in val:
            env.log(f'iter {it}: validation {describe_load(val["expert_load"])}')
        if improved:
            t.best = {'macro_f1': val.get('macro_f1', -1.0), 'loss': val['loss'], 'iter': it,
                      'val': {m: v for m, v in val.items() if m not in ('prob', 'confusion')}}
            save(os.path.join(run.dir, 'best.pt'), {
                'model': t.raw_model.state_dict(), 'model_args': asdict(t.raw_model.config), 'iter_num': it,
                'mode': mode, 'config': config, 'vocab': run.data.vocab, 'label_names': run.label_names,
                'log_base': run.data.log_base, 'val': {m: val[m] for m in val if m != 'prob'}, 'fold': run.k,
                'test_batch': test_batch})
        checkpoint(run, t, env)
    if env.ddp:
        dist.barrier()


def save(path, obj):
    """torch.save, atomically: a failed write (a full disk) leaves the previous file and no temporary, and is a
    one-line error that says how much space it needed."""
    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:     # torch's zip writer reports a failed write as a RuntimeError, not an OSError
            needed = sum(v.numel() * v.element_size() for v in tensors_in(obj))
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2 * needed + 2 ** 20
            error = OSError(errno.ENOSPC, 'No space') if full else \
                OSError(None, f'torch.save failed ({str(e).splitlines()[0][:80]})')
            raise UserError(write_failure(path, error, needed)) from None


def tensors_in(obj):
    """Every tensor in a checkpoint's nested dicts and lists."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def checkpoint(run, t, env, done=False):
    """ckpt.pt: everything resume needs to continue exactly."""
    save(os.path.join(run.dir, 'ckpt.pt'), {
        'model': t.raw_model.state_dict(), 'optimizer': t.optim.state_dict(), 'scaler': t.scaler.state_dict(),
        'model_args': asdict(t.raw_model.config),
        'projection': t.projection.state_dict() if t.projection is not None else None,
        'iter_num': t.iter_num, 'best': t.best, 'history': t.history, 'config': config, 'mode': mode, 'fold': run.k,
        'test_batch': test_batch, 'vocab': run.data.vocab, 'label_names': run.label_names,
        'log_base': run.data.log_base, 'mask_acc_ema': t.mask_acc_ema, 'done': done, 'world_size': env.world_size})


def resume_checkpoint(run, env):
    """init_from='resume': (the model in run.dir/ckpt.pt, the checkpoint), or (None, None) when a run of a sweep
    (fold='all', holdout='all') has none yet and starts from scratch."""
    path = os.path.join(run.dir, 'ckpt.pt')
    if (fold == 'all' or holdout == 'all') and not os.path.exists(path):
        env.log(f'{path} not found: this run starts from scratch')
        return None, None
    ckpt = load_checkpoint(path, 'init_from')
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt:
        raise UserError(f'{path} is not a nanoscBERT training checkpoint; resume needs the ckpt.pt of a run')
    if ckpt.get('mode') != mode:
        raise UserError(f"{path} is a {ckpt.get('mode')} run; resume it with --mode={ckpt.get('mode')}")
    check_vocab(ckpt, path, run.data)
    try:
        model = ScBERT(model_config(dict(ckpt['model_args'])))
        model.load_state_dict(clean_state_dict(ckpt['model']))
    except (KeyError, TypeError, RuntimeError, AssertionError) as e:
        raise UserError(f'{path} is damaged ({type(e).__name__}: {str(e)[:200]})') from None
    return model, ckpt


def check_vocab(ckpt, path, data):
    """A checkpoint of ours must have been trained on the dataset's genes, in its order."""
    if ckpt.get('vocab') and list(ckpt['vocab']) != data.vocab:
        raise UserError(f'{path} was trained on another gene vocabulary than {data.path}; prepare the data with '
                        f'--vocab=<that vocab> (each run writes it to its out_dir/vocab.txt)')


def resume(t, run, ckpt, env):
    """Continue a run from its ckpt.pt on the same schedule, from the next step, and say so. The settings must be the
    checkpoint's (but FREE_ON_RESUME and those named in resume_changes); a distillation's checkpoint (its config has
    a teacher) is distill.py's to resume."""
    path = os.path.join(run.dir, 'ckpt.pt')
    distilled = bool(ckpt['config'].get('teacher'))
    if distilled != ('teacher' in config):
        raise UserError(f"{path} is a {'distillation' if distilled else 'training'} run: resume it with "
                        f"{'distill.py' if distilled else 'train.py'}")
    check_changes(ckpt, path, env)
    try:
        t.optim.load_state_dict(ckpt['optimizer'])
        t.scaler.load_state_dict(ckpt['scaler'])
    except (KeyError, ValueError) as e:
        raise UserError(f'cannot resume {path} with these settings ({e}); keep the settings it was started '
                        f'with') from None
    t.iter_num, t.best, t.history = ckpt['iter_num'] + 1, ckpt['best'], ckpt['history']
    t.mask_acc_ema = ckpt.get('mask_acc_ema', 0.0)
    if t.projection is not None:
        t.projection.load_state_dict(ckpt['projection'])
    t.done = bool(ckpt.get('done'))
    if not t.done:
        best = t.best
        so_far = ('none yet' if best['iter'] < 0 else f"macro-F1 {best['macro_f1']:.4f} at iteration {best['iter']}"
                  if mode == 'finetune' else f"loss {best['loss']:.4f} at iteration {best['iter']}")
        env.log(f'resumed {path}: iteration {t.iter_num} of {run.max_iters} is next; best validation so far: '
                f'{so_far}')


def check_changes(ckpt, path, env):
    """Refuse a resumed run whose settings differ from the checkpoint's, but those free to change (FREE_ON_RESUME)
    and those named in resume_changes; say which changed either way. The number of processes counts too: it sets the
    global batch."""
    allowed = {name.strip() for name in resume_changes.split(',') if name.strip()}
    unknown = allowed - set(config) - {'processes'}
    if unknown:
        raise UserError(f"resume_changes names {', '.join(sorted(unknown))}, which are not settings")
    before = dict(ckpt['config'], processes=ckpt.get('world_size', env.world_size))
    now = dict(config, processes=env.world_size)
    changed = {k: (before[k], now[k]) for k in now if k in before and before[k] != now[k] and k not in FREE_ON_RESUME}
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        raise UserError(f"{path} was started with other settings: {describe_changes(refused)}; resume with the same, "
                        f"or allow the change with --resume_changes={','.join(refused)}")
    if changed:
        env.log(f'resume changes {describe_changes(changed)} (resume_changes)')


def describe_changes(changed):
    return ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changed.items())


# -----------------------------------------------------------------------------
# 8. The end of a run: the test fold, the baseline, the novelty rule; the summary over runs

def finish(run, t, env, teacher=None):
    """Score the best checkpoint on the test fold beside logistic regression on the same folds, fit the novelty rule
    into best.pt, write metrics.json and loss.png -> the run's metrics (None on other ranks than 0)."""
    if not env.master:
        return None
    t.iter_num = min(t.iter_num, run.max_iters - 1)
    result = {'fold': run.k, 'mode': mode, 'model': name_of(t.raw_model), 'best_iter': t.best['iter'],
              'last_iter': t.iter_num, 'budget': run.max_iters, 'stopped': t.stopped,
              'n_train': len(run.train_idx), 'n_val': len(run.val_idx)}
    if mode == 'finetune':
        score_test_fold(run, t, env, teacher, result)
    else:
        result['val'] = dict(t.best.get('val', {}), loss=t.best['loss'], iter=t.best['iter'])
    plot_loss(t.history, os.path.join(run.dir, 'loss.png'))
    write_json(os.path.join(run.dir, 'metrics.json'), result)
    checkpoint(run, t, env, done=True)
    return result


def log_run(run, t, env):
    """The run's first log line: its cells, the model's size, the processes, device and dtype."""
    raw = t.raw_model
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    moe = ''
    if raw.config.n_expert:
        moe = (f'; {raw.num_active_params() / 1e6:.2f}M active per token, '
               f'{raw.num_active_params(embeddings=False) / 1e6:.2f}M without the embeddings')
    env.log(f'fold {run.k}: {len(run.train_idx)} train / {len(run.val_idx)} val / '
            f'{0 if run.test_idx is None else len(run.test_idx)} test cells; {raw.num_params() / 1e6:.2f}M parameters '
            f'({n_train / 1e6:.2f}M trainable{moe}); {env.world_size} process(es) on {env.device}, {env.dtype}'
            + ('' if run.data.preloaded else f'; streaming {dataset} from disk'))


def name_of(model):
    """The model's name in logs, metrics.json and plots: scBERT, scBERT 2.0, a distilled student, b1.58 (BitNet)."""
    return model_name(model.config, distilled='teacher' in config)


def already_finished(run, env):
    """A resumed run that had already finished: its metrics."""
    env.log(f'fold {run.k}: already finished in {run.dir}')
    with open(os.path.join(run.dir, 'metrics.json')) as f:
        return json.load(f)


def score_test_fold(run, t, env, teacher, result):
    """Fine-tuning's end: the best model on the test fold, the baseline, the novelty rule (and holdout's report)."""
    best_ckpt = torch.load(os.path.join(run.dir, 'best.pt'), map_location=env.device, weights_only=True)
    best_model = ScBERT.from_checkpoint(best_ckpt).to(env.device)
    test = evaluate(best_model, run, run.test_idx, env, teacher)
    prob = test.pop('prob')
    result.update(n_test=len(run.test_idx), val=best_ckpt['val'], test=test)
    env.log(f'fold {run.k} test  {result["model"]:20s} {format_metrics_line(test)}  (best val iter {t.best["iter"]})'
            + (f', agrees with the teacher on {test["teacher_agreement"]:.1%}' if teacher is not None else ''))
    if 'expert_load' in test:
        env.log(f'fold {run.k} test  {describe_load(test["expert_load"])}')
    plot_confusion(test['confusion'], run.label_names, os.path.join(run.dir, 'confusion.png'),
                   title=f'{result["model"]}, test fold {run.k}: {format_metrics_line(test)}')
    np.save(os.path.join(run.dir, 'test_prob.npy'), prob)
    if baseline:
        result['baseline'] = logistic_regression(run)
        env.log(f'fold {run.k} test  logistic regression  {format_metrics_line(result["baseline"])}')
    # novel cell types: the embedding scores' statistics from training cells, each score's threshold from the
    # validation cells (known types only: a quantile of their scores), stored in best.pt for predict.py
    fit_idx = sample(run.train_idx, novelty_cells)
    best_ckpt['novelty'] = rule = novelty_rule(
        cell_outputs(best_model, run, fit_idx, env)[1], run.labels[fit_idx], len(run.label_names),
        *cell_outputs(best_model, run, run.val_idx, env), novelty_quantile, novelty_score, seed=seed)
    best_ckpt['holdout'] = run.held_out
    save(os.path.join(run.dir, 'best.pt'), best_ckpt)
    if run.novel_idx is not None:
        result.update(novelty_of(best_model, run, rule, env))


def logistic_regression(run):
    """The baseline: logistic regression on the same training cells (at most baseline_max_cells), on the test fold."""
    fit_idx = sample(run.train_idx, baseline_max_cells)
    data, test_idx = run.data, run.test_idx
    lr_model = fit_logistic_regression(data.dense(fit_idx), run.labels[fit_idx], len(run.label_names), C=lr_C)
    lr_prob = np.concatenate([lr_model.predict_proba(data.dense(test_idx[i:i + 4096]))
                              for i in range(0, len(test_idx), 4096)])
    return classification_metrics(run.labels[test_idx], lr_prob.argmax(1), lr_prob, run.label_names)


@torch.no_grad()
def cell_outputs(model, run, idx, env):
    """-> (logits (n, n_classes), the classifier's hidden features (n, head_hidden)) of cells idx, fp32, on the CPU."""
    model.eval()
    logits, features = [], []
    for start in range(0, len(idx), batch_size * 2):
        x = to_device(get_batch(run, idx[start:start + batch_size * 2], model.config)[0], env)
        with env.autocast:
            f = model.cls_head.features(model.encode(x), x)
            logits.append(model.cls_head.fc3(f).float().cpu())
        features.append(f.float().cpu())
    return torch.cat(logits), torch.cat(features)


def novelty_of(model, run, rule, env):
    """Holdout: each score's AUROC (the held-out type's cells against the test fold's known cells) and the known and
    novel accuracy at the thresholds, beside scBERT's rule; and the classes the novel cells were given."""
    logits, features = cell_outputs(model, run, run.test_idx, env)
    known = novelty_scores(logits, features, rule)
    novel_logits, novel_features = cell_outputs(model, run, run.novel_idx, env)
    novel = novelty_scores(novel_logits, novel_features, rule)
    correct = logits.argmax(1).numpy() == run.labels[run.test_idx]
    called = np.bincount(novel_logits.argmax(1).numpy(), minlength=len(run.label_names))
    report = novelty_report(known, correct, novel, rule['thresholds'])
    # scBERT's rule, a fixed threshold: Unassigned when the top probability is below 0.5
    report['scbert_rule'] = novelty_report({'maxprob': known['maxprob']}, correct, {'maxprob': novel['maxprob']},
                                           {'maxprob': 0.5})['maxprob']
    out = {'novel_called_as': {c: int(n) for c, n in zip(run.label_names, called) if n},
           'holdout': run.held_out, 'n_novel': len(run.novel_idx), 'novelty': report}
    env.log(f"fold {run.k} novel '{run.held_out}' ({len(run.novel_idx)} cells) vs {len(run.test_idx)} known test "
            f"cells; thresholds: the {novelty_quantile:.0%} quantile of the validation cells' scores; the classifier "
            f"calls the novel cells " + ', '.join(f'{c} ({n})' for c, n in out['novel_called_as'].items()))
    for score, r in report.items():
        env.log(f"fold {run.k} novelty {score:11s} AUROC {r['auroc']:.3f}, known acc {r['known_acc']:.3f}, novel acc "
                f"{r['novel_acc']:.3f} (threshold {r['threshold']:.4g})")
    return out


def summarize(results, env):
    """Over the runs: the novelty table (holdout), or the mean ± sd over folds (fold='all'), in out_dir."""
    if not env.master or not all(results):
        return
    if holdout:
        novelty_summary(results, env)
    elif len(results) > 1 and mode == 'finetune':
        summary = {}
        for who in ('test', 'baseline'):
            if all(who in r for r in results):
                summary[who] = {m: {'mean': float(np.mean([r[who][m] for r in results])),
                                    'sd': float(np.std([r[who][m] for r in results], ddof=1))}
                                for m in ('accuracy', 'macro_f1')}
        write_json(os.path.join(out_dir, 'metrics.json'), {'n_folds': len(results), 'summary': summary,
                                                           'folds': results})
        for who, label in (('test', results[0].get('model', 'scBERT')), ('baseline', 'logistic regression')):
            if who in summary:
                s = summary[who]
                env.log(f'{len(results)}-fold CV  {label:20s} accuracy {s["accuracy"]["mean"]:.3f} ± '
                        f'{s["accuracy"]["sd"]:.3f}   macro-F1 {s["macro_f1"]["mean"]:.3f} ± {s["macro_f1"]["sd"]:.3f}')


def novelty_summary(results, env):
    """holdout: one row per held-out type, the mean over its folds, in out_dir/novelty.{json,md}."""
    rows = {}
    for r in results:
        rows.setdefault(r['holdout'], []).append(r)
    names, measures = [*metrics.NOVELTY_SCORES, 'scbert_rule'], ('auroc', 'known_acc', 'novel_acc')
    table = {t: {'n_novel': rs[0]['n_novel'], 'n_folds': len(rs),
                 **{n: {m: float(np.mean([r['novelty'][n][m] for r in rs])) for m in measures} for n in names}}
             for t, rs in rows.items()}
    mean = {n: {m: float(np.mean([row[n][m] for row in table.values()])) for m in measures} for n in names}
    scores = metrics.NOVELTY_SCORES
    lines = [f'Novelty AUROC, leave one type out ({dataset}, test fold {fold}; novel = the held-out type\'s cells, '
             f'known = the test fold\'s other cells). Accuracies at the threshold (validation {novelty_quantile:.0%} '
             f'quantile) of {novelty_score}, and of scBERT\'s rule (Unassigned when the top probability < 0.5):', '',
             '| held-out type | cells | ' + ' | '.join(scores) + f' | {novelty_score}: known / novel acc | '
             'scBERT rule: known / novel acc |', '|---|---:|' + '---:|' * (len(scores) + 2)]
    for t, row in [*table.items(), ('mean', dict(mean, n_novel=''))]:
        lines.append(f"| {t} | {row['n_novel']} | " + ' | '.join(f"{row[n]['auroc']:.3f}" for n in scores)
                     + f" | {row[novelty_score]['known_acc']:.3f} / {row[novelty_score]['novel_acc']:.3f} | "
                     f"{row['scbert_rule']['known_acc']:.3f} / {row['scbert_rule']['novel_acc']:.3f} |")
    write_json(os.path.join(out_dir, 'novelty.json'),
               {'dataset': dataset, 'fold': fold, 'quantile': novelty_quantile, 'types': table, 'mean': mean})
    with atomic_write(os.path.join(out_dir, 'novelty.md')) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    env.log('\n'.join(lines))


def write_json(path, obj):
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
