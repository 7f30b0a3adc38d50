"""
Pretrain scBERT by masked expression modelling, or fine-tune it to annotate cell types, on a dataset made by prepare_data.py.

    python train.py                                  # the default job: prepare the embedded PBMC data if missing,
                                                     # fine-tune a small scBERT, test it beside logistic regression
    python train.py config/finetune_baron.py --fold=all          # 5-fold cross-validation
    python train.py --mode=pretrain --dataset=data/celltypist --out_dir=out-pretrain
    python train.py --init_from=resume                            # continue out_dir/ckpt.pt on the same schedule
    torchrun --nproc_per_node=8 train.py ...                      # DDP: nccl on CUDA, gloo on CPU

Folds: the test fold is `fold`, the validation fold is the next one, the rest train. The validation fold picks the best
checkpoint (macro-F1); the test fold is only scored, once, at the end. Writes out_dir/ckpt.pt (the latest state, for
resume), out_dir/best.pt (the best model, for predict.py), metrics.json, loss.png and confusion.png. With fold='all'
each fold writes these in out_dir/fold<k>/, and out_dir/metrics.json holds the mean ± sd over folds and every fold.
"""
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Dataset, UserError, atomic_write, mask_tokens, scbert_tokens, split_indices
from metrics import classification_metrics, fit_logistic_regression, format_metrics_line, plot_confusion, plot_loss
from model import Classifier, ModelConfig, ScBERT

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'                # checkpoints, metrics.json, loss.png, confusion.png
dataset = 'data/pbmc68k'       # a directory written by prepare_data.py (the default is made from the embedded PBMC data)
mode = 'finetune'              # 'finetune' (cell-type classifier) | 'pretrain' (masked expression modelling)
init_from = 'scratch'          # 'scratch' | 'resume' (out_dir/ckpt.pt) | a path to our .pt or to an original scBERT .pth
fold = '0'                     # test fold (validation is the next fold), or 'all' for k-fold cross-validation
eval_interval = 50             # iterations between validations and checkpoints
log_interval = 10              # iterations between log lines
eval_cells = 2000              # at most this many validation cells per evaluation (0 = all)
stop_iter = 0                  # stop after this iteration as if killed, to continue later with --init_from=resume (0 = never)
# model
n_embd = 64                    # model width (the original: 200)
n_layer = 2                    # transformer blocks (the original: 6)
n_head = 4                     # attention heads (the original: 10)
dim_head = 32                  # width per head (the original: 64)
ff_mult = 4                    # MLP hidden width = ff_mult * n_embd
n_bins = 5                     # expression bins: min(floor(log2(1 + counts per 10k)), n_bins)
attention = 'performer'        # 'performer' (FAVOR+, as scBERT) | 'sdpa' (exact softmax attention)
nb_features = 0                # FAVOR+ random features (0 = dim_head * ln(dim_head))
feature_redraw_interval = 1000  # redraw FAVOR+ features every this many training forward passes
dropout = 0.0                  # dropout in attention, MLP and classifier
head = 'scbert'                # classifier: 'scbert' (the original's, over all genes) | 'pooled' (mean over genes)
head_hidden = 128              # classifier hidden width
gene2vec = ''                  # .npy gene embedding (n_genes, n_embd) in vocab order, loaded and frozen ('' = learned)
# training
batch_size = 16                # cells per step per process (global batch = batch_size * processes * grad_accum)
grad_accum = 1                 # micro-batches per optimizer step
max_iters = 400                # optimizer steps
optimizer = 'adamw'            # 'adamw' | 'adam' (as scBERT)
learning_rate = 1e-3           # peak learning rate
min_lr = 1e-5                  # learning rate at the end of the decay
lr_schedule = 'linear'         # after warm-up: 'linear' decay | 'cosine' decay | 'constant'
warmup_iters = 40              # linear warm-up steps
weight_decay = 0.01            # AdamW decay on weight matrices
beta1 = 0.9                    # Adam beta1
beta2 = 0.999                  # Adam beta2
grad_clip = 1.0                # clip the gradient norm (0 = off)
finetune_params = 'all'        # what trains: 'all' | 'head' (classifier only) | 'scbert' (the original: head, final norm, block[-2])
class_weights = False          # weight the loss by inverse class frequency in the training folds
mask_prob = 0.15               # pretraining: fraction of each cell's non-zero genes masked (scBERT's)
replace_prob = 0.9             # pretraining: fraction of masked genes replaced by the mask token (scBERT's)
baseline = True                # also fit logistic regression on the same folds and print it beside the model
baseline_max_cells = 20000     # fit the baseline on at most this many training cells (a stratified sample)
lr_C = 1.0                     # inverse L2 strength of the logistic-regression baseline
# system
device = 'auto'                # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'                 # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False                # torch.compile the model
num_threads = 0                # CPU threads per process (0 = PyTorch's default; 1 under DDP on CPU)
seed = 1337                    # seeds initialisation, batches, masks and dropout
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())

choices = dict(mode=('pretrain', 'finetune'), finetune_params=('all', 'head', 'scbert'), optimizer=('adamw', 'adam'),
               lr_schedule=('linear', 'cosine', 'constant'), attention=('performer', 'sdpa'), head=('scbert', 'pooled'),
               dtype=('auto', 'float32', 'bfloat16', 'float16'))
for name, allowed in choices.items():
    if globals()[name] not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, not '{globals()[name]}' (set --{name}=...)")
for name in ('max_iters', 'eval_interval', 'log_interval', 'batch_size', 'grad_accum'):
    if globals()[name] < 1:
        raise UserError(f'{name} must be at least 1, not {globals()[name]} (set --{name}=...)')
if device != 'auto' and 'cuda' in device and not torch.cuda.is_available():
    raise UserError(f"device '{device}' asked for, but CUDA is not available here (set --device=cpu or auto)")

# DDP: torchrun sets RANK; one process per GPU, or per CPU slot with gloo
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    use_cuda = device != 'cpu' and torch.cuda.is_available()
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = f'cuda:{local_rank}' if use_cuda else 'cpu'
    if use_cuda:
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
master = rank == 0
device_type = 'cuda' if 'cuda' in device else 'cpu'
if num_threads or (ddp and device_type == 'cpu'):
    torch.set_num_threads(num_threads or 1)   # two threads per process on 2 cores made a tiny model 100x slower
if dtype == 'auto':
    # fp32 on CPU: bf16 autocast is 2x faster on CPUs with native bf16 matmuls (see README), many times slower without
    dtype = 'bfloat16' if device_type == 'cuda' else 'float32'
if device_type == 'cpu' and dtype == 'float16':
    raise UserError('float16 needs CUDA; use --dtype=float32 on CPU')
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.set_flush_denormal(True)   # exp() of FAVOR+ features underflows; denormal floats slow CPU matmuls many-fold
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def log(*args):
    if master:
        tqdm.write(' '.join(str(a) for a in args))


# -----------------------------------------------------------------------------
# data: the default job prepares the embedded PBMC data on first use (prepare_data.py runs as its own process)
if not os.path.exists(os.path.join(dataset, 'meta.json')) and os.path.normpath(dataset) == os.path.join('data', 'pbmc68k'):
    if master:
        log(f'{dataset} is missing: preparing it from the embedded data/pbmc68k_reduced.h5ad')
        here = os.path.dirname(os.path.abspath(__file__))
        result = subprocess.run([sys.executable, os.path.join(here, 'prepare_data.py'), f'--out_dir={dataset}',
                                 f'--input={os.path.join(here, "data", "pbmc68k_reduced.h5ad")}'])
        if result.returncode != 0:
            sys.exit(result.returncode)
    if ddp:
        dist.barrier()
data = Dataset(dataset)
n_folds = data.n_folds
if mode == 'finetune' and not data.label_names:
    raise UserError(f'{dataset} has no labels; prepare it with --label_key=<obs column> to fine-tune, or use --mode=pretrain')


def load_checkpoint(path):
    """Our checkpoint dict, or an original scBERT state dict (recognised by its keys). Tensors and plain types only."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} not found (check --init_from)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not a PyTorch checkpoint') from None


def clean_state_dict(sd):
    # strip what torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names
    return {k.replace('_orig_mod.', '').removeprefix('module.'): v for k, v in sd.items()}


def make_model(fold_dir):
    """The model for this run, from scratch, from a checkpoint, or from an original scBERT release. Returns (model, ckpt)."""
    n_classes = len(data.label_names) if mode == 'finetune' else 0
    model_args = dict(n_genes=data.n_genes, n_bins=n_bins, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      dim_head=dim_head, ff_mult=ff_mult, attention=attention, nb_features=nb_features,
                      feature_redraw_interval=feature_redraw_interval, dropout=dropout, n_classes=n_classes,
                      head=head, head_hidden=head_hidden, seed=seed)
    path = os.path.join(fold_dir, 'ckpt.pt') if init_from == 'resume' else init_from
    if init_from == 'resume' and fold == 'all' and not os.path.exists(path):
        log(f'{path} not found: this fold starts from scratch')
    elif init_from != 'scratch':
        return load_model(path, model_args)
    model = ScBERT(ModelConfig(**model_args))
    if gene2vec:
        if not os.path.isfile(gene2vec):
            raise UserError(f'gene2vec file {gene2vec} not found')
        weight = np.load(gene2vec, allow_pickle=False)
        if weight.shape != (data.n_genes, n_embd):
            raise UserError(f'gene2vec {gene2vec} has shape {weight.shape}; this dataset and n_embd need '
                            f'({data.n_genes}, {n_embd}), rows in the vocab order of {dataset}/vocab.txt')
        model.set_gene_embedding(weight, freeze=True)
    return model, None


def load_model(path, model_args):
    """The model in a checkpoint (ours, or an original scBERT one), with a fresh classifier when the task differs;
    returns (model, the checkpoint dict when resuming, else None)."""
    n_classes = model_args['n_classes']
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state dict')
    if 'model_args' in ckpt:                                       # ours
        if init_from == 'resume' and ckpt.get('mode') != mode:
            raise UserError(f"{path} is a {ckpt.get('mode')} run; resume it with --mode={ckpt.get('mode')}")
        if ckpt.get('vocab') and list(ckpt['vocab']) != data.vocab:
            raise UserError(f'{path} was trained on another gene vocabulary than {dataset}; prepare the data with '
                            f'--vocab=<that vocab> (train.py writes it to its out_dir/vocab.txt)')
        args = dict(ckpt['model_args'])
        same_task = init_from == 'resume' or (args['n_classes'] == n_classes and ckpt.get('label_names') == data.label_names)
        if not same_task:                                          # e.g. pretrained -> fine-tune: a fresh classifier
            args.update(n_classes=n_classes, head=head, head_hidden=head_hidden, dropout=dropout)
        try:
            model = ScBERT(ModelConfig(**args))
            sd = clean_state_dict(ckpt['model'])
            if not same_task:
                sd = {k: v for k, v in sd.items() if not k.startswith('cls_head.')}
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except (KeyError, TypeError, RuntimeError, AssertionError) as e:
            raise UserError(f'{path} is damaged ({type(e).__name__}: {str(e)[:200]})') from None
        if unexpected or any(not k.startswith('cls_head.') for k in missing):
            raise UserError(f'{path} does not match its model_args (missing {missing[:3]}, unexpected {unexpected[:3]})')
        differ = [k for k, v in model_args.items() if k in args and args[k] != v and k not in ('n_classes', 'dropout')]
        if differ:                                                 # the architecture is the checkpoint's, say so
            log(f'note: the model comes from {path}; its {", ".join(f"{k}={args[k]}" for k in differ)} replace the settings')
    else:                                                          # the original release's
        try:
            model = ScBERT.from_scbert(ckpt, dropout=dropout, seed=seed)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f'{path} is neither a nanoscBERT nor an original scBERT checkpoint ({e})') from None
        if model.config.n_genes != data.n_genes:
            raise UserError(f'{path} expects a {model.config.n_genes}-gene panel but {dataset} has {data.n_genes} genes; '
                            f'prepare the data with --vocab=<the checkpoint gene panel, one symbol per line>')
        if model.config.n_classes != n_classes:                     # pretrained (or other labels): a fresh classifier
            model.config.n_classes = n_classes
            model.cls_head = Classifier(model.config) if n_classes else None
        ckpt = None
    if init_from != 'resume':
        ckpt = None
    return model, ckpt


def set_trainable(model):
    if mode == 'finetune':                                         # the MLM head is unused (DDP errors on unused params)
        model.lm_head.requires_grad_(False)
    if mode != 'finetune' or finetune_params == 'all':
        return
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.cls_head]
    if finetune_params == 'scbert':                                # scBERT's finetune.py: norm, layers[-2] and the head
        trainable += [model.ln_f, model.blocks[-2] if len(model.blocks) > 1 else model.blocks[-1]]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if lr_schedule == 'constant':
        return learning_rate
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    coeff = 1.0 - progress if lr_schedule == 'linear' else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (learning_rate - min_lr)


def batch_indices(train_idx, step):
    """Cells of micro-step `step` for this rank: an epoch-seeded permutation, so any step is known without state
    (resume continues exactly) and the global batch is the same whatever the number of processes."""
    global_batch = batch_size * world_size
    per_epoch = max(1, len(train_idx) // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(train_idx)
    if len(perm) < global_batch:                                   # tiny datasets: wrap around
        perm = np.resize(perm, global_batch)
    start = pos * global_batch + rank * batch_size
    return perm[start:start + batch_size]


def get_batch(idx, cfg, step=None):
    """Tokens (B, n_genes + 1), binned as the model cfg expects, and targets: cell types, or the masked bins (-100
    where not masked). Masks are fresh at every step (fixed for validation, step None), seeded by (step, cell): resume
    repeats them, and they do not depend on how a global batch is split over ranks."""
    tokens = scbert_tokens(torch.from_numpy(data.dense(idx)), data.log_base, cfg.n_bins)
    if mode == 'finetune':
        return tokens.to(device), torch.from_numpy(data.labels[idx].astype(np.int64)).to(device)
    masked = []
    for cell, row in zip(idx, tokens):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0 if step is None else step + 1, int(cell)])
                                              .generate_state(1)[0]))
        masked.append(mask_tokens(row[None], mask_prob, replace_prob, mask_id=cfg.mask_id, generator=g))
    tokens, targets = (torch.cat(t) for t in zip(*masked))
    return tokens.to(device), targets.to(device)


@torch.no_grad()
def evaluate(model, idx):
    """Loss and metrics over cells idx: cell-type metrics for fine-tuning, masked-bin accuracy for pretraining."""
    model.eval()
    losses, probs, correct, bin_counts = [], [], 0, 0
    for start in range(0, len(idx), batch_size * 2):
        chunk = idx[start:start + batch_size * 2]
        tokens, targets = get_batch(chunk, model.config)
        with autocast:
            logits, loss = model(tokens, targets)
        losses.append(loss.item() * len(chunk))
        if mode == 'finetune':
            probs.append(logits.float().softmax(-1).cpu())
        else:
            sel = targets != -100
            correct += (logits.argmax(-1)[sel] == targets[sel]).sum().item()
            bin_counts = bin_counts + torch.bincount(targets[sel].cpu(), minlength=model.config.n_bins + 2)
    model.train()
    out = {'loss': sum(losses) / len(idx)}
    if mode == 'finetune':
        prob = torch.cat(probs).numpy()
        out.update(classification_metrics(data.labels[idx], prob.argmax(1), prob, data.label_names), prob=prob)
    else:
        n_masked = max(1, int(bin_counts.sum()))
        # the floor to beat: always guessing the commonest bin of the masked genes
        out.update(masked_acc=correct / n_masked, majority_acc=int(bin_counts.max()) / n_masked)
    return out


def loss_share(targets, class_weight):
    """world_size * this rank's share of the loss denominator (masked genes, or the summed class weights), so that
    DDP's average of the ranks' gradients equals the gradient of the mean over the global batch."""
    if mode == 'pretrain':
        local = (targets != -100).sum().float()
    else:
        local = class_weight[targets].sum() if class_weight is not None else torch.tensor(float(len(targets)), device=device)
    total = local.clone()
    dist.all_reduce(total)
    return local * world_size / total


def save(path, obj):
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


# -----------------------------------------------------------------------------

def train_fold(k, fold_dir):
    """Train with test fold k (validation fold k+1) into fold_dir; returns the final metrics dict."""
    train_idx, val_idx, test_idx = split_indices(data.folds, k, n_folds)
    if mode == 'pretrain':      # no labels to protect: train on every fold but the validation one
        train_idx, val_idx, test_idx = np.sort(np.concatenate([train_idx, test_idx])), val_idx, None
    if len(train_idx) == 0 or len(val_idx) == 0 or (test_idx is not None and len(test_idx) == 0):
        raise UserError(f'{dataset} has too few cells for fold {k} of {n_folds} (train {len(train_idx)}, val {len(val_idx)}, '
                        f'test {0 if test_idx is None else len(test_idx)}); prepare it with fewer --n_folds')
    eval_idx = val_idx if not eval_cells or len(val_idx) <= eval_cells else \
        np.sort(np.random.default_rng(seed).choice(val_idx, eval_cells, replace=False))
    if master:
        os.makedirs(fold_dir, exist_ok=True)
        with atomic_write(os.path.join(fold_dir, 'vocab.txt')) as tmp, open(tmp, 'w') as f:
            f.write('\n'.join(data.vocab) + '\n')

    torch.manual_seed(seed)
    model, ckpt = make_model(fold_dir)
    set_trainable(model)
    raw_model = model.to(device)
    optim = raw_model.configure_optimizer(optimizer, learning_rate, weight_decay, (beta1, beta2))
    scaler = torch.amp.GradScaler(enabled=ptdtype == torch.float16)   # fp16 only; a no-op otherwise
    iter_num, best, history = 0, {'macro_f1': -1.0, 'loss': float('inf'), 'iter': -1}, {'iter': [], 'train_loss': []}
    if ckpt is not None:                                           # resume: the same schedule from the next step
        try:
            optim.load_state_dict(ckpt['optimizer'])
            scaler.load_state_dict(ckpt['scaler'])
        except (KeyError, ValueError) as e:
            raise UserError(f'cannot resume {fold_dir}/ckpt.pt with these settings ({e}); keep the settings it was started with') from None
        iter_num, best, history = ckpt['iter_num'] + 1, ckpt['best'], ckpt['history']
        if ckpt.get('done'):
            log(f'fold {k}: already finished in {fold_dir}')
            return json.load(open(os.path.join(fold_dir, 'metrics.json')))
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device_type == 'cuda' else None)
    class_weight = None
    if mode == 'finetune' and class_weights:
        counts = np.bincount(data.labels[train_idx], minlength=len(data.label_names)).astype(np.float64)
        class_weight = torch.tensor(np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0),
                                    dtype=torch.float32, device=device)

    if master:
        n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        log(f'fold {k}: {len(train_idx)} train / {len(val_idx)} val / {0 if test_idx is None else len(test_idx)} test cells; '
            f'{raw_model.num_params() / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable); '
            f'{world_size} process(es) on {device}, {dtype}')

    def checkpoint(done=False):
        state = {'model': raw_model.state_dict(), 'optimizer': optim.state_dict(), 'scaler': scaler.state_dict(),
                 'model_args': asdict(raw_model.config),
                 'iter_num': iter_num, 'best': best, 'history': history, 'config': config, 'mode': mode, 'fold': k,
                 'vocab': data.vocab, 'label_names': data.label_names, 'log_base': data.log_base, 'done': done}
        save(os.path.join(fold_dir, 'ckpt.pt'), state)

    model.train()
    pbar = tqdm(total=max_iters, initial=iter_num, disable=not master, desc=f'fold {k}', leave=False)
    t0, cells_since = time.time(), 0
    while iter_num < max_iters:
        lr = get_lr(iter_num)
        for group in optim.param_groups:
            group['lr'] = lr
        torch.manual_seed(seed + iter_num * world_size + rank)     # dropout: the same on resume
        for micro in range(grad_accum):
            step = iter_num * grad_accum + micro
            tokens, targets = get_batch(batch_indices(train_idx, step), raw_model.config, step)
            sync = nullcontext() if (not ddp or micro == grad_accum - 1) else model.no_sync()
            with sync:
                with autocast:
                    _, loss = model(tokens, targets, class_weight=class_weight)
                if ddp:     # a mean over the global batch, not a mean of the ranks' means (their masked counts differ)
                    loss = loss * loss_share(targets, class_weight)
                scaler.scale(loss / grad_accum).backward()
            cells_since += len(tokens) * world_size
        if grad_clip:
            scaler.unscale_(optim)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad(set_to_none=True)
        pbar.update(1)

        if iter_num % log_interval == 0 or iter_num == max_iters - 1:
            dt = time.time() - t0
            history['iter'].append(iter_num)
            history['train_loss'].append(loss.item())
            log(f'iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, {cells_since / dt:.1f} cells/s')
            t0, cells_since = time.time(), 0
        if iter_num % eval_interval == 0 or iter_num == max_iters - 1:
            if master:
                val = evaluate(raw_model, eval_idx)
                history.setdefault('val_iter', []).append(iter_num)
                history.setdefault('val_loss', []).append(val['loss'])
                if mode == 'finetune':
                    history.setdefault('val_macro_f1', []).append(val['macro_f1'])
                    improved = val['macro_f1'] > best['macro_f1']
                    log(f'iter {iter_num}: val loss {val["loss"]:.4f}, {format_metrics_line(val)}')
                else:
                    history.setdefault('val_masked_acc', []).append(val['masked_acc'])
                    improved = val['loss'] < best['loss']
                    log(f'iter {iter_num}: val loss {val["loss"]:.4f}, masked-bin accuracy {val["masked_acc"]:.4f} '
                        f'(always the commonest bin: {val["majority_acc"]:.4f})')
                if improved:
                    best = {'macro_f1': val.get('macro_f1', -1.0), 'loss': val['loss'], 'iter': iter_num}
                    save(os.path.join(fold_dir, 'best.pt'), {
                        'model': raw_model.state_dict(), 'model_args': asdict(raw_model.config), 'iter_num': iter_num,
                        'mode': mode, 'config': config, 'vocab': data.vocab, 'label_names': data.label_names,
                        'log_base': data.log_base, 'val': {m: val[m] for m in val if m != 'prob'}})
                checkpoint()
                t0 = time.time()                                    # leave evaluation out of the cells/s figure
            if ddp:
                dist.barrier()
        if stop_iter and iter_num == stop_iter:
            log(f'stopping after iteration {iter_num} (stop_iter); continue with --init_from=resume')
            pbar.close()
            return None
        iter_num += 1
    pbar.close()

    # the end: score the best checkpoint on the test fold, beside logistic regression on the same folds
    if not master:
        return None
    iter_num = max_iters - 1
    result = {'fold': k, 'mode': mode, 'best_iter': best['iter'], 'n_train': len(train_idx), 'n_val': len(val_idx)}
    if mode == 'finetune':
        best_ckpt = torch.load(os.path.join(fold_dir, 'best.pt'), map_location=device, weights_only=True)
        best_model = ScBERT(ModelConfig(**best_ckpt['model_args'])).to(device)
        best_model.load_state_dict(best_ckpt['model'])
        test = evaluate(best_model, test_idx)
        prob = test.pop('prob')
        result.update(n_test=len(test_idx), val=best_ckpt['val'], test=test)
        log(f'fold {k} test  scBERT               {format_metrics_line(test)}  (best val iter {best["iter"]})')
        plot_confusion(test['confusion'], data.label_names, os.path.join(fold_dir, 'confusion.png'),
                       title=f'scBERT, test fold {k}: {format_metrics_line(test)}')
        np.save(os.path.join(fold_dir, 'test_prob.npy'), prob)
        if baseline:
            fit_idx = train_idx if len(train_idx) <= baseline_max_cells else \
                np.sort(np.random.default_rng(seed).choice(train_idx, baseline_max_cells, replace=False))
            lr_model = fit_logistic_regression(data.dense(fit_idx), data.labels[fit_idx], len(data.label_names), C=lr_C)
            lr_prob = np.concatenate([lr_model.predict_proba(data.dense(test_idx[i:i + 4096]))
                                      for i in range(0, len(test_idx), 4096)])
            result['baseline'] = classification_metrics(data.labels[test_idx], lr_prob.argmax(1), lr_prob, data.label_names)
            log(f'fold {k} test  logistic regression  {format_metrics_line(result["baseline"])}')
    else:
        result['val'] = {'loss': best['loss'], 'iter': best['iter']}
    plot_loss(history, os.path.join(fold_dir, 'loss.png'))
    with atomic_write(os.path.join(fold_dir, 'metrics.json')) as tmp, open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    checkpoint(done=True)
    return result


# -----------------------------------------------------------------------------
if fold == 'all':
    folds = list(range(n_folds))
elif fold.isdigit() and int(fold) < n_folds:
    folds = [int(fold)]
else:
    raise UserError(f"fold must be 0..{n_folds - 1} or 'all', not '{fold}'")
results = [train_fold(k, os.path.join(out_dir, f'fold{k}') if fold == 'all' else out_dir) for k in folds]

if master and len(results) > 1 and all(results) and mode == 'finetune':
    summary = {}
    for who in ('test', 'baseline'):
        if all(who in r for r in results):
            summary[who] = {m: {'mean': float(np.mean([r[who][m] for r in results])),
                                'sd': float(np.std([r[who][m] for r in results], ddof=1))} for m in ('accuracy', 'macro_f1')}
    with atomic_write(os.path.join(out_dir, 'metrics.json')) as tmp, open(tmp, 'w') as f:
        json.dump({'n_folds': len(results), 'summary': summary, 'folds': results}, f, indent=1)
    for who, name in (('test', 'scBERT'), ('baseline', 'logistic regression')):
        if who in summary:
            s = summary[who]
            log(f'{len(results)}-fold CV  {name:20s} accuracy {s["accuracy"]["mean"]:.3f} ± {s["accuracy"]["sd"]:.3f}   '
                f'macro-F1 {s["macro_f1"]["mean"]:.3f} ± {s["macro_f1"]["sd"]:.3f}')
if ddp:
    dist.barrier()                                                 # rank 0 may still be scoring the test fold
    dist.destroy_process_group()
