"""
Pretrain scBERT by masked expression modelling, or fine-tune it to annotate cell types, on a dataset made by prepare_data.py.

    python train.py                                  # the default job: prepare the embedded PBMC data if missing,
                                                     # fine-tune a small scBERT, test it beside logistic regression
    python train.py config/finetune_baron.py --fold=all          # 5-fold cross-validation
    python train.py --mode=pretrain --dataset=data/celltypist --out_dir=out-pretrain
    python train.py --init_from=resume                            # continue out_dir/ckpt.pt on the same schedule
    python train.py config/scbert2_small.py                       # scBERT 2.0: expressed genes, GQA, SwiGLU, MoE
    python train.py config/finetune_baron.py --test_batch=mouse2  # train on one donor, test on the other
    python train.py --teacher=out/best.pt --out_dir=out-student   # distil into a half-depth student (see distill.py)
    python train.py --bitlinear=True --init_from=out/best.pt --out_dir=out-qat   # BitNet b1.58 QAT (then quantize.py)
    torchrun --nproc_per_node=8 train.py config/scbert2.py        # DDP: nccl on CUDA, gloo on CPU
    python train.py config/ablation_baron.py --fold=0 --holdout=all  # novel types: leave each type out in turn

Folds: the test fold is `fold`, the validation fold is the next one, the rest train. The validation fold picks the best
checkpoint (macro-F1); the test fold is only scored, once, at the end. Writes out_dir/ckpt.pt (the latest state, for
resume), out_dir/best.pt (the best model, for predict.py), metrics.json, loss.png and confusion.png. With fold='all'
each fold writes these in out_dir/fold<k>/, and out_dir/metrics.json holds the mean ± sd over folds and every fold.

Novel cell types: after fine-tuning, best.pt also gets what predict.py needs to call a cell 'Unassigned': the novelty
scores' statistics of the training cells and each score's threshold, the novelty_quantile of the
validation cells' scores. With holdout=<type> (or 'all') the type is left out of training and validation, and its cells
join the test fold as novel: the run reports each score's AUROC (novel vs the test fold's known cells) and the known
and novel accuracy at the thresholds, beside scBERT's rule, in out_dir/holdout_<type>/ and out_dir/novelty.{json,md}.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (Dataset, UserError, atomic_write, cell_seeds, dynamic_mask_rate, expressed_batch, fold_split,
                  leave_out_type, load_checkpoint, mask_expressed, mask_panel, masking_units, parse_multiscale_weights, scbert_tokens)
import metrics  # metrics.NOVELTY_SCORES (a module global here would read as a setting)
from metrics import (classification_metrics, fit_logistic_regression, format_metrics_line, novelty_report,
                     novelty_rule, novelty_scores, plot_confusion, plot_loss)
from model import (Classifier, ModelConfig, ScBERT, as_bitlinear, calibrate_bitlinear, clean_state_dict, cosine_loss,
                   distil_student, kd_loss, token_valid)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'                # checkpoints, metrics.json, loss.png, confusion.png
dataset = 'data/pbmc68k'       # a directory written by prepare_data.py (the default is made from the embedded PBMC data)
mode = 'finetune'              # 'finetune' (cell-type classifier) | 'pretrain' (masked expression modelling)
init_from = 'scratch'          # 'scratch' | 'resume' (out_dir/ckpt.pt) | a path to our .pt or to an original scBERT .pth
                               # ('{fold}' becomes the fold number: each CV fold continues its own fine-tuned model)
fold = '0'                     # test fold (validation is the next fold), or 'all' for k-fold cross-validation
test_batch = ''                # test on the cells of this batch (e.g. a donor: --test_batch=mouse2) and train on the
                               # others, validating on their fold `fold` + 1 ('' = test on fold `fold`)
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
# ALBERT, DeBERTa and biology (genomic and pathway options need the dataset's annotation: prepare_data.py --annotate)
embd_factor = 0                # > 0: ALBERT's factorized gene embedding, n_genes×E then E×n_embd (0 = one n_genes×n_embd table)
share_layers = 'none'          # ALBERT's cross-layer sharing: 'none' | 'all' (one block, n_layer times) | 'attention' | 'ffn'
genomic_pe = False             # add a chromosome embedding + sinusoids of each gene's start coordinate (genomic position)
disentangled = False           # DeBERTa's disentangled attention, relative positions = genomic distance buckets (sdpa)
n_pos_buckets = 16             # disentangled: log-distance levels per direction, 1 kb to 250 Mb (2n + 1 buckets with
                               # 'different chromosome' and 'unknown')
pathway_enc = False            # add the sum of each gene's pathway (gene set) embeddings
# scBERT 2.0 (the defaults are scBERT's; see config/scbert2*.py)
input_genes = 'all'            # 'all' (scBERT: every panel gene) | 'expressed' (CLS + the expressed genes only)
value_emb = 'bins'             # expressed: 'bins' (scBERT's) | 'quantile' (per-cell, scGPT) | 'continuous' (xTrimoGene)
max_genes = 0                  # expressed: keep at most this many expressed genes per cell (random in training; 0 = all)
n_zero_genes = 0               # expressed: also add this many unexpressed genes per cell (value 0)
bucket = False                 # expressed: batch cells of similar length together: less padding, and batches without
                               # any need no attention mask, which keeps SDPA's flash kernel usable on GPU
n_kv_head = 0                  # key/value heads (grouped-query attention; 0 = n_head, 1 = multi-query)
norm = 'layernorm'             # 'layernorm' | 'rmsnorm'
mlp = 'gelu'                   # 'gelu' | 'swiglu'
bias = True                    # biases in attention/MLP linears and norms
n_expert = 0                   # > 0: sparse mixture of this many expert MLPs in every block
n_expert_active = 2            # experts per token (top-k)
aux_loss_weight = 0.01         # MoE: weight of Switch's load-balancing loss
z_loss_weight = 0.0            # MoE: weight of the router z-loss (ST-MoE uses 1e-3)
bitlinear = False              # BitNet b1.58 quantization-aware training: attention and feed-forward weights ternary
                               # {-1, 0, +1}·γ, activations int8, through the straight-through estimator; from scratch,
                               # or a float --init_from converted (its norm gains calibrated). quantize.py packs the result
calibration_cells = 256        # bitlinear from a float checkpoint: training cells (a random sample) that calibrate
                               # the BitLinear norm gains
mlm_weight = 1.0               # expressed pretraining: weight of the masked-bin cross-entropy
regression_weight = 1.0        # expressed pretraining: weight of the masked-value MSE
# training
batch_size = 16                # cells per step per process (global batch = batch_size * processes * grad_accum)
grad_accum = 1                 # micro-batches per optimizer step
max_iters = 400                # optimizer steps
optimizer = 'adamw'            # 'adamw' | 'adam' (as scBERT) | 'adafactor' (its lr is relative: try 1e-2)
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
mask_prob = 0.15               # pretraining: fraction of each cell's non-zero genes masked (scBERT's; of all its tokens
                               # for masking=random); validation always masks at this rate, whatever the masking
replace_prob = 0.9             # pretraining: fraction of masked genes replaced by the mask token (scBERT's)
masking = 'nonzero'            # pretraining: which genes are masked: 'random' (any token, zeros too) | 'nonzero' (scBERT's:
                               # expressed genes only) | 'dynamic' (nonzero at a rate that falls as the masked accuracy
                               # grows) | 'pathway' (whole gene sets) | 'multiscale' (genes, gene sets and chromosome
                               # regions); pathway and multiscale need prepare_data.py --annotate (see data.py, README)
mask_prob_min = 0.1            # masking=dynamic: rate = clip(max - (max - min) × acc, min, max), acc = EMA (0.9) of the
mask_prob_max = 0.3            # masking=dynamic: training steps' masked-bin accuracy, from 0: the rate starts at max
region_genes = 16              # masking=multiscale: genes per chromosome region (consecutive vocab genes in genomic order)
multiscale_weights = '1,1,1'   # masking=multiscale: how often each scale is drawn: single genes, pathways, regions
baseline = True                # also fit logistic regression on the same folds and print it beside the model
baseline_max_cells = 20000     # fit the baseline on at most this many training cells (a stratified sample)
# novel cell types (fine-tuning): best.pt gets the novelty scores' statistics and thresholds; predict.py uses them
novelty_score = 'knn'          # predict.py's default rule: 'maxprob' (scBERT's score) | 'entropy' | 'energy' |
                               # 'mahalanobis' | 'knn' (chosen by the leave-one-type-out runs in the README)
novelty_quantile = 0.95        # each score's threshold: this quantile of the validation cells' scores (so about 5% of
                               # known cells are called Unassigned)
novelty_cells = 20000          # fit the embedding scores on at most this many training cells (a random sample)
holdout = ''                   # leave-one-cell-type-out: this type is never trained on and its cells are tested as
                               # novel; 'all' = every type with at least holdout_min_cells labelled cells, in turn
holdout_min_cells = 30         # holdout=all: the types with at least this many labelled cells
lr_C = 1.0                     # inverse L2 strength of the logistic-regression baseline
# distillation (DistilBERT, Sanh et al. 2019; distill.py runs train.py with a teacher)
teacher = ''                   # teacher checkpoint (ours, or an original scBERT .pth; '{fold}' becomes the fold number,
                               # for fold='all'). The student is the teacher's architecture and input with fewer blocks
                               # (the model settings above are ignored). '' = no teacher
student_layers = ''            # teacher blocks that make the student, e.g. '0,2' ('' = every other one: 0, 2, 4, ...;
                               # a narrower student takes half the blocks, at random)
student_n_embd = 0             # a narrower student: random init, and a learned projection for the cosine loss (0 = as wide)
alpha_ce = 5.0                 # soft targets: KL(teacher/T ‖ student/T)·T², on the masked genes or on the cell-type logits
alpha_mlm = 2.0                # the student's own loss: masked modelling (pretraining) or cross-entropy to the labels
alpha_cos = 1.0                # cosine loss between the student's and the teacher's hidden states
alpha_mse = 1.0                # scBERT 2.0 pretraining: MSE between the student's and the teacher's predicted values
temperature = 2.0              # softmax temperature of the soft targets
# system
preload = True                 # hold the dataset in memory when it fits (half the free memory), else stream it from disk
num_workers = 0                # background processes that build batches (0 = in the training process)
device = 'auto'                # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'                 # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False                # torch.compile the model
num_threads = 0                # CPU threads per process (0 = PyTorch's default; 1 under DDP on CPU)
seed = 1337                    # seeds initialisation, batches, masks and dropout
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())

choices = dict(mode=('pretrain', 'finetune'), finetune_params=('all', 'head', 'scbert'),
               optimizer=('adamw', 'adam', 'adafactor'), lr_schedule=('linear', 'cosine', 'constant'),
               attention=('performer', 'sdpa'), head=('scbert', 'pooled', 'cls'), dtype=('auto', 'float32', 'bfloat16', 'float16'),
               input_genes=('all', 'expressed'), value_emb=('bins', 'quantile', 'continuous'), norm=('layernorm', 'rmsnorm'),
               mlp=('gelu', 'swiglu'), share_layers=('none', 'all', 'attention', 'ffn'))
for name, allowed in choices.items():
    if globals()[name] not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, not '{globals()[name]}' (set --{name}=...)")
if novelty_score not in metrics.NOVELTY_SCORES:
    raise UserError(f"novelty_score must be one of {', '.join(metrics.NOVELTY_SCORES)}, not '{novelty_score}'")
if not 0 < novelty_quantile < 1:
    raise UserError(f'novelty_quantile must be between 0 and 1 (e.g. 0.95), not {novelty_quantile}')
if holdout and mode != 'finetune':
    raise UserError('holdout leaves a cell type out of fine-tuning: set --mode=finetune (or --holdout=)')
if holdout != 'all' and holdout_min_cells != 30:
    raise UserError("holdout_min_cells picks the types of --holdout=all; it does nothing here")
for name in ('max_iters', 'eval_interval', 'log_interval', 'batch_size', 'grad_accum', 'calibration_cells',
             'novelty_cells', 'holdout_min_cells'):
    if globals()[name] < 1:
        raise UserError(f'{name} must be at least 1, not {globals()[name]} (set --{name}=...)')
if device != 'auto' and 'cuda' in device and not torch.cuda.is_available():
    raise UserError(f"device '{device}' asked for, but CUDA is not available here (set --device=cpu or auto)")
if init_from == 'scratch' and input_genes == 'expressed' and attention != 'sdpa':   # (a checkpoint brings its own)
    raise UserError("input_genes='expressed' needs --attention=sdpa")
if init_from == 'scratch' and input_genes == 'all' and head == 'cls':
    raise UserError("head='cls' needs --input_genes=expressed (scBERT's input has no CLS token); use scbert or pooled")
if n_kv_head < 0 or n_head % (n_kv_head or n_head):
    raise UserError(f'n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head}) (set --n_kv_head=1, 2, ... or 0)')
if init_from in ('scratch', 'resume') and disentangled and attention != 'sdpa':    # (resume: a fold may start anew)
    raise UserError('disentangled attention adds position terms to the L×L scores, which FAVOR+ never forms: set '
                    '--attention=sdpa')
if init_from in ('scratch', 'resume') and n_expert and share_layers in ('all', 'ffn'):
    raise UserError(f"share_layers='{share_layers}' shares the feed-forward, which MoE does not support: set "
                    f"--n_expert=0 or --share_layers=attention")
if embd_factor < 0 or n_pos_buckets < 2:
    raise UserError('embd_factor must be >= 0 and n_pos_buckets >= 2')
if n_expert and not 1 <= n_expert_active <= n_expert:
    raise UserError(f'n_expert_active must be between 1 and n_expert ({n_expert}), not {n_expert_active}')
if os.environ.get('NANOSCBERT_DISTILL') and not teacher:   # set by distill.py
    raise UserError("distill.py needs a teacher: --teacher=<a checkpoint: our best.pt or an original scBERT .pth>")
if teacher and mode == 'finetune' and fold == 'all' and '{fold}' not in teacher:
    raise UserError("with fold='all' each fold needs the teacher fine-tuned without its test cells: put {fold} in the "
                    "path, e.g. --teacher='out/fold{fold}/best.pt'")
if teacher and bitlinear:
    raise UserError('bitlinear with a teacher is not supported: distil first, then train the student with '
                    '--init_from=<its best.pt> --bitlinear=True')
if teacher and init_from not in ('scratch', 'resume'):
    raise UserError(f"with a teacher the student is made from it: use --init_from=scratch (or resume), not '{init_from}'")
if temperature <= 0 or min(alpha_ce, alpha_mlm, alpha_cos, alpha_mse) < 0 or student_n_embd < 0:
    raise UserError('temperature must be > 0, and alpha_ce, alpha_mlm, alpha_cos, alpha_mse and student_n_embd >= 0')
masking_units(None, masking)                                     # an unknown strategy: stop here
if not 0 < mask_prob <= 1 or not 0 < mask_prob_min <= mask_prob_max <= 1 or region_genes < 1:
    raise UserError(f'mask_prob ({mask_prob}) must be in (0, 1], 0 < mask_prob_min ({mask_prob_min}) <= mask_prob_max '
                    f'({mask_prob_max}) <= 1, and region_genes ({region_genes}) >= 1')
scale_weights = parse_multiscale_weights(multiscale_weights)     # (single gene, pathway, region)
dynamic = mode == 'pretrain' and masking == 'dynamic'            # the training process masks each batch at the live rate

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
data = Dataset(dataset, preload=preload)
n_folds = data.n_folds
if mode == 'finetune' and not data.label_names:
    raise UserError(f'{dataset} has no labels; prepare it with --label_key=<obs column> to fine-tune, or use --mode=pretrain')
# pathway and multiscale masking: the gene annotation, indexed once (None for the other strategies)
mask_units = masking_units(data if mode == 'pretrain' else None, masking, region_genes)
if mask_units is not None:
    in_a_set = int((np.diff(mask_units.gene_ptr) > 0).sum())
    log(f'masking={masking}: {mask_units.n_sets} gene sets hold {in_a_set} of the {data.n_genes} genes'
        + (f'; {len(mask_units.order)} genes have coordinates (regions of {region_genes}), weights '
           f'{multiscale_weights} (single genes, pathways, regions)' if masking == 'multiscale' else ''))


def make_model(k, fold_dir, train_idx, teacher_model=None):
    """The model for fold k, from scratch, from a checkpoint, from an original scBERT release, or a student made from
    the teacher. Returns (model, ckpt)."""
    n_classes = len(data.label_names) if mode == 'finetune' else 0
    model_args = dict(n_genes=data.n_genes, n_bins=n_bins, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      dim_head=dim_head, ff_mult=ff_mult, attention=attention, nb_features=nb_features,
                      feature_redraw_interval=feature_redraw_interval, dropout=dropout, n_classes=n_classes,
                      head=head, head_hidden=head_hidden, seed=seed, input_genes=input_genes, value_emb=value_emb,
                      max_genes=max_genes, n_zero_genes=n_zero_genes, n_kv_head=n_kv_head, norm=norm, mlp=mlp,
                      bias=bias, n_expert=n_expert, n_expert_active=n_expert_active, bitlinear=bitlinear,
                      embd_factor=embd_factor, share_layers=share_layers, genomic_pe=genomic_pe,
                      disentangled=disentangled, n_pos_buckets=n_pos_buckets, pathway_enc=pathway_enc)
    path = os.path.join(fold_dir, 'ckpt.pt') if init_from == 'resume' else init_from.replace('{fold}', str(k))
    if init_from == 'resume' and (fold == 'all' or holdout == 'all') and not os.path.exists(path):
        log(f'{path} not found: this run starts from scratch')
    elif init_from != 'scratch':
        model, ckpt = load_model(path, model_args, k)
        if bitlinear and not model.config.bitlinear:               # quantization-aware training from a float model
            model = as_bitlinear(model)
            cells = np.sort(np.random.default_rng(seed).choice(train_idx, min(calibration_cells, len(train_idx)),
                                                               replace=False))       # a random sample, in batches
            n = calibrate_bitlinear(model, (get_batch(cells[i:i + batch_size], model.config)[0]
                                            for i in range(0, len(cells), batch_size)))
            log(f'bitlinear: {path} converted to BitNet b1.58 linears; {n} norm gains calibrated on {len(cells)} '
                f'training cells')
        return model, ckpt
    if teacher_model is not None:
        return make_student(teacher_model), None
    if genomic_pe or disentangled or pathway_enc:                  # the annotation: its sizes, then its buffers
        note = data.annotation()
        model_args.update(n_chrom=len(note['chrom_names']), n_pathways=len(note['pathway_names']),
                          n_pathway_links=len(note['pathway_idx']))
        fix = f"python prepare_data.py --annotate={dataset} --genome=<gene table> --gene_sets=<GMT files>"
        if (genomic_pe or disentangled) and not note['chrom_names']:
            raise UserError(f'genomic_pe and disentangled read gene coordinates, and no gene of {dataset} has any: {fix}')
        if pathway_enc and not len(note['pathway_idx']):
            raise UserError(f'pathway_enc reads gene sets, and no gene of {dataset} is in one: {fix}')
    model = ScBERT(ModelConfig(**model_args))
    if genomic_pe or disentangled or pathway_enc:
        model.set_gene_annotation(note['chrom'], note['start'], note['pathway_ptr'], note['pathway_idx'])
    if gene2vec:
        if embd_factor:
            raise UserError('a gene2vec table replaces the gene embedding: use --embd_factor=0 with --gene2vec')
        if not os.path.isfile(gene2vec):
            raise UserError(f'gene2vec file {gene2vec} not found')
        weight = np.load(gene2vec, allow_pickle=False)
        if weight.shape != (data.n_genes, n_embd):
            raise UserError(f'gene2vec {gene2vec} has shape {weight.shape}; this dataset and n_embd need '
                            f'({data.n_genes}, {n_embd}), rows in the vocab order of {dataset}/vocab.txt')
        model.set_gene_embedding(weight, freeze=True)
    return model, None


def load_teacher(k, fold_dir):
    """The distillation teacher for fold k, frozen, on the device: checked against the dataset's genes and labels, the
    task, and (fine-tuning) the fold, whose test cells the teacher must not have trained on."""
    path = teacher.replace('{fold}', str(k))
    if os.path.abspath(path) in [os.path.abspath(os.path.join(fold_dir, f)) for f in ('best.pt', 'ckpt.pt')]:
        raise UserError(f'the student would overwrite its teacher {path}: set another --out_dir')
    ckpt = load_checkpoint(path, 'teacher')
    if isinstance(ckpt, dict) and ckpt.get('quantization'):
        raise UserError(f"teacher {path} is quantized ({ckpt['quantization']}); distil from the float checkpoint")
    try:
        model = ScBERT.from_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, AssertionError) as e:
        raise UserError(f'teacher {path} is not a usable checkpoint ({type(e).__name__}: {str(e)[:200]})') from None
    if (ckpt.get('vocab') and list(ckpt['vocab']) != data.vocab) or model.config.n_genes != data.n_genes:
        raise UserError(f'teacher {path} was trained on other genes than {dataset}; distil on its own dataset, or '
                        f'prepare this one with --vocab=<its out_dir/vocab.txt>')
    if mode == 'finetune' and (model.cls_head is None or model.config.n_classes != len(data.label_names)
                               or ckpt.get('label_names', data.label_names) != data.label_names):
        raise UserError(f"teacher {path} does not classify {dataset}'s {len(data.label_names)} cell types; fine-tune "
                        f"it on them first, or distil its pretraining with --mode=pretrain")
    if mode == 'finetune' and (ckpt.get('fold', k), ckpt.get('test_batch', test_batch)) != (k, test_batch):
        raise UserError(f"teacher {path} was fine-tuned with test fold {ckpt.get('fold')} "
                        f"{ckpt.get('test_batch') or ''}: it trained on this run's test cells; use the teacher of "
                        f"fold {k} ({{fold}} in --teacher)")
    if mode == 'pretrain' and (ckpt.get('mode') == 'finetune' or ('model_args' not in ckpt and model.cls_head is not None)):
        raise UserError(f'teacher {path} is fine-tuned: its masked-modelling head is stale or untrained. Distil it '
                        f'with --mode=finetune, or give its pretrained checkpoint')
    model = model.to(device).eval().requires_grad_(False)
    return (torch.compile(model) if compile else model), path


def make_student(teacher_model):
    """DistilBERT's student: the teacher with only student_layers of its blocks (default every other one), initialised
    from them; narrower (student_n_embd) at random. For pretraining it has no classifier."""
    n = teacher_model.config.n_layer
    try:
        layers = [int(v) for v in student_layers.split(',')] if student_layers else list(range(0, n, 2))
    except ValueError:
        layers = []
    if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < n:
        raise UserError(f"student_layers must be increasing teacher block numbers 0..{n - 1}, like '0,2' "
                        f"(got '{student_layers}')")
    if student_n_embd and student_layers:
        raise UserError('a narrower student starts at random, so it takes no teacher blocks: drop --student_layers '
                        '(it gets half the teacher\'s blocks)')
    if student_n_embd >= teacher_model.config.n_embd or (len(layers) == n and not student_n_embd):
        raise UserError(f'the student must be smaller than the teacher ({n} blocks of width '
                        f'{teacher_model.config.n_embd}): fewer --student_layers, or --student_n_embd below the width')
    student = distil_student(teacher_model, layers, student_n_embd)
    if mode == 'pretrain' and student.cls_head is not None:
        student.config.n_classes, student.cls_head = 0, None
    return student.cpu()


def load_model(path, model_args, k):
    """The model in a checkpoint (ours, or an original scBERT one), with a fresh classifier when the task differs;
    returns (model, the checkpoint dict when resuming, else None)."""
    n_classes = model_args['n_classes']
    ckpt = load_checkpoint(path, 'init_from')
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state dict')
    if 'model_args' in ckpt:                                       # ours
        if init_from == 'resume' and ckpt.get('mode') != mode:
            raise UserError(f"{path} is a {ckpt.get('mode')} run; resume it with --mode={ckpt.get('mode')}")
        if ckpt.get('vocab') and list(ckpt['vocab']) != data.vocab:
            raise UserError(f'{path} was trained on another gene vocabulary than {dataset}; prepare the data with '
                            f'--vocab=<that vocab> (train.py writes it to its out_dir/vocab.txt)')
        if ckpt.get('quantization'):
            raise UserError(f"{path} is quantized ({ckpt['quantization']}) for inference; train from the float "
                            f"checkpoint it was made from")
        if (mode == 'finetune' and ckpt.get('mode') == 'finetune' and init_from != 'resume' and 'fold' in ckpt
                and ckpt.get('config', {}).get('dataset') == dataset
                and (ckpt['fold'], ckpt.get('test_batch', ckpt['config'].get('test_batch', ''))) != (k, test_batch)):
            raise UserError(f"{path} was fine-tuned on this dataset with test fold {ckpt['fold']} "
                            f"{ckpt.get('test_batch') or ''}: it trained on this run's test cells; continue the "
                            f"checkpoint of fold {k} ({{fold}} in --init_from)")
        if held_out and init_from != 'resume' and ckpt['model_args'].get('n_classes'):
            raise UserError(f"{path} is fine-tuned (on {', '.join(ckpt.get('label_names') or ['its cell types'])}): "
                            f"with holdout it may have seen '{held_out}'; start from scratch or a pretrained model")
        args = dict(ckpt['model_args'])
        same_task = init_from == 'resume' or (args['n_classes'] == n_classes and ckpt.get('label_names') == data.label_names)
        if not same_task:                                          # e.g. pretrained -> fine-tune: a fresh classifier
            args.update(n_classes=n_classes, head=head, head_hidden=head_hidden, dropout=dropout)
        if init_from != 'resume':                                  # which genes a cell shows is not in the weights
            args.update({k: model_args[k] for k in ('max_genes', 'n_zero_genes') if k in args})
        if args.get('input_genes', 'all') == 'all' and args['head'] == 'cls':
            raise UserError(f"{path} is a scBERT (all genes) model, whose input has no CLS token: set --head=scbert or pooled")
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
        differ = [k for k, v in model_args.items() if k in args and args[k] != v and k not in ('n_classes', 'dropout', 'bitlinear')]
        if args.get('bitlinear') and not bitlinear:
            log(f'note: {path} was trained with bitlinear=True (BitNet QAT), and so is this run')
        if differ:                                                 # the architecture is the checkpoint's, say so
            log(f'note: the model comes from {path}; its {", ".join(f"{k}={args[k]}" for k in differ)} replace the settings')
    else:                                                          # the original release's
        if embd_factor or share_layers != 'none' or genomic_pe or disentangled or pathway_enc:
            raise UserError(f'{path} is an original scBERT checkpoint, whose architecture has none of embd_factor, '
                            f'share_layers, genomic_pe, disentangled, pathway_enc: leave them at their defaults')
        try:
            model = ScBERT.from_scbert(ckpt, dropout=dropout, seed=seed)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f'{path} is neither a nanoscBERT nor an original scBERT checkpoint ({e})') from None
        if held_out and model.cls_head is not None:
            raise UserError(f"{path} is a fine-tuned original scBERT: with holdout it may have seen '{held_out}'; "
                            f"start from scratch or a pretrained model")
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
    if mode == 'finetune':                # the pretraining heads are unused (DDP errors on unused params)
        for module in (model.lm_head, model.value_head):
            if module is not None:
                module.requires_grad_(False)
        if hasattr(model, 'mask_emb'):
            model.mask_emb.requires_grad_(False)
    if mode != 'finetune' or finetune_params == 'all':
        return
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.cls_head]
    if finetune_params == 'scbert' and model.config.share_layers != 'none':
        log(f"note: finetune_params='scbert' trains block[-2], which shares its {model.config.share_layers} with every "
            f"block (share_layers={model.config.share_layers})")
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
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(train_idx)
    if len(perm) < global_batch:                                   # tiny datasets: wrap around
        perm = np.resize(perm, global_batch)
    if bucket and input_genes == 'expressed':
        # sort each window of 50 global batches by cell length, cut it into global batches, shuffle those batches:
        # every batch holds cells of about one length (cells longer than max_genes are all max_genes long)
        length = np.diff(data.indptr)[perm]
        length = np.minimum(length, max_genes or length.max())
        window = 50 * global_batch
        perm = np.concatenate([perm[i:i + window][np.argsort(length[i:i + window], kind='stable')]
                               for i in range(0, len(perm), window)])
        batches = perm[:per_epoch * global_batch].reshape(per_epoch, global_batch)
        perm = batches[rng.permutation(per_epoch)].ravel()
    start = pos * global_batch + rank * batch_size
    return perm[start:start + batch_size]


def get_batch(idx, cfg, step=None, masked=True):
    """The model's input for cells idx, on the CPU, and targets: cell types, or what was masked (-100 where not).
    scBERT: tokens (B, n_genes + 1), binned as the model cfg expects. Expressed input: a dict (see data.expressed_batch).
    Masks and gene subsets are fresh at every step, seeded by (step, cell): resume repeats them, and they do not depend
    on how a global batch is split over ranks. For evaluation (step None) they are fixed per cell, at mask_prob: with
    masking=dynamic, evaluation masks as nonzero does, so validation numbers stay comparable while the training rate
    moves. masked=False (dynamic training) returns the input unmasked and the cells idx: mask_batch masks it in the
    training process, the only one that knows the live rate."""
    labels = torch.from_numpy(data.labels[idx].astype(np.int64))
    strategy = 'nonzero' if masking == 'dynamic' else masking
    if cfg.input_genes == 'expressed':
        indptr, indices, values = data.rows(idx)
        seeds = cell_seeds(indptr, indices, cfg.seed) if step is None else [[seed, step + 1, int(c)] for c in idx]
        x = expressed_batch(indptr, indices, values, seeds, cfg, data.log_base,
                            mask_prob if mode == 'pretrain' and masked else 0.0, replace_prob, strategy, mask_units,
                            scale_weights)
        if mode == 'finetune':
            return x, labels
        if not masked:
            return x, torch.from_numpy(np.asarray(idx, np.int64))
        return x, {'bins': x.pop('target_bins'), 'values': x.pop('target_values')}
    tokens = scbert_tokens(torch.from_numpy(data.dense(idx)), data.log_base, cfg.n_bins)
    if mode == 'finetune':
        return tokens, labels
    if not masked:
        return tokens, torch.from_numpy(np.asarray(idx, np.int64))
    seeds = [[seed, 0 if step is None else step + 1, int(cell)] for cell in idx]
    return mask_panel(tokens, seeds, cfg.mask_id, mask_prob, replace_prob, strategy, mask_units, scale_weights)


def mask_batch(x, idx, cfg, step, rate):
    """Dynamic masking of micro-step `step`'s batch, built unmasked (get_batch(masked=False)), at `rate` -> (input,
    targets) as get_batch. scBERT's panel is masked exactly as nonzero masks it at that rate (the same seeds); the
    expressed input from its own stream per (step, cell), apart from the one that drew the cell's gene subset."""
    seeds = [[seed, step + 1, int(c)] for c in idx]
    if isinstance(x, dict):
        x = mask_expressed(x, [[*s, 1] for s in seeds], cfg.mask_id, rate, replace_prob, 'dynamic')
        return x, {'bins': x.pop('target_bins'), 'values': x.pop('target_values')}
    return mask_panel(x, seeds, cfg.mask_id, rate, replace_prob, 'dynamic')


def to_device(x):
    """A tensor, or a dict of them, to the training device (non_blocking: overlaps the copy from pinned memory)."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


class Batches(torch.utils.data.Dataset):
    """Item s is micro-step s's batch, built by get_batch on the CPU. A DataLoader over it with num_workers > 0 builds
    the next batches in background processes while the model trains (pinned memory on CUDA), so the GPU never waits."""
    def __init__(self, train_idx, cfg):
        self.train_idx, self.cfg = train_idx, cfg

    def __len__(self):
        return max_iters * grad_accum

    def __getitem__(self, step):            # dynamic masking: unmasked, with the cells (masked by the training loop)
        return get_batch(batch_indices(self.train_idx, step), self.cfg, step, masked=not dynamic)


@torch.no_grad()
def evaluate(model, idx, teacher_model=None):
    """Loss and metrics over cells idx: cell-type metrics for fine-tuning; for pretraining the masked-bin accuracy, and
    for expressed input the masked values' mean squared error. MoE models: how evenly the experts were used. With a
    teacher: how often the model's prediction (cell type, or masked bin) is the teacher's."""
    model.eval()
    model.expert_load(reset=True)
    losses, weights, probs, correct, bin_counts, sq_err, masked_values = [], [], [], 0, 0, 0.0, []
    agree, compared = 0, 0
    for start in range(0, len(idx), batch_size * 2):
        chunk = idx[start:start + batch_size * 2]
        x, targets = (to_device(t) for t in get_batch(chunk, model.config))
        with autocast:
            logits, loss = model(x, targets, mlm_weight=mlm_weight, regression_weight=regression_weight)
        # the loss is a mean over the chunk's cells (fine-tuning) or masked genes (pretraining): weight it by their count
        n = len(chunk) if mode == 'finetune' else int(((targets['bins'] if isinstance(targets, dict) else targets) != -100).sum())
        losses.append(loss.item() * n)
        weights.append(n)
        if teacher_model is not None:
            with autocast:
                t_logits = teacher_model(x, task='classify' if mode == 'finetune' else 'mlm')[0]
            s_pred, t_pred = (l['bins'] if isinstance(l, dict) else l for l in (logits, t_logits))
            same = s_pred.argmax(-1) == t_pred.argmax(-1)              # (B,) cell types, or (B, L) bins
            if mode == 'pretrain':                                      # the masked genes only
                same = same[(targets['bins'] if isinstance(targets, dict) else targets) != -100]
            agree, compared = agree + int(same.sum()), compared + same.numel()
        if mode == 'finetune':
            probs.append(logits.float().softmax(-1).cpu())
            continue
        if isinstance(logits, dict):                                # expressed: bins and values
            sel = targets['bins'] != -100
            sq_err += (logits['values'][sel].float() - targets['values'][sel]).pow(2).sum().item()
            masked_values.append(targets['values'][sel].cpu())
            logits, targets = logits['bins'], targets['bins']
        sel = targets != -100
        correct += (logits.argmax(-1)[sel] == targets[sel]).sum().item()
        bin_counts = bin_counts + torch.bincount(targets[sel].cpu(), minlength=model.config.n_bins + 2)
    model.train()
    out = {'loss': sum(losses) / max(1, sum(weights))}
    if teacher_model is not None:
        out['teacher_agreement'] = agree / max(1, compared)
    load = model.expert_load(reset=True)
    if load is not None:
        out['expert_load'] = load.tolist()                          # (n_layer, n_expert), 1 = the uniform share
    if mode == 'finetune':
        prob = torch.cat(probs).numpy()
        out.update(classification_metrics(data.labels[idx], prob.argmax(1), prob, data.label_names), prob=prob)
    else:
        n_masked = max(1, int(bin_counts.sum()))
        # the floor to beat: always guessing the commonest bin of the masked genes
        out.update(masked_acc=correct / n_masked, majority_acc=int(bin_counts.max()) / n_masked)
        if masked_values:                                              # and for values: always guessing their mean
            values = torch.cat(masked_values).double()
            out.update(masked_mse=sq_err / len(values), mean_guess_mse=float(values.var(unbiased=False)))
    return out


def describe_load(load):
    """Expert load (n_layer, n_expert) of shares of uniform -> one line: the least and most used expert per layer."""
    return 'expert load (share of uniform, min-max per layer): ' + ', '.join(f'{min(r):.2f}-{max(r):.2f}' for r in load)


def global_share(local):
    """world_size * this rank's share of a count summed over the ranks (1.0 in one process). A rank's mean loss times
    its share makes DDP's average of the ranks' gradients the gradient of the mean over the global batch."""
    if not ddp:
        return 1.0
    total = local.clone()
    dist.all_reduce(total)
    return local * world_size / total


def loss_share(targets, class_weight):
    """global_share of the task loss's denominator: masked genes, or cells (or their summed class weights)."""
    if mode == 'pretrain':
        local = ((targets['bins'] if isinstance(targets, dict) else targets) != -100).sum().float()
    else:
        local = class_weight[targets].sum() if class_weight is not None else torch.tensor(float(len(targets)), device=device)
    return global_share(local)


def distillation_loss(model, teacher_model, projection, x, targets, class_weight):
    """DistilBERT's triple loss: alpha_ce x soft targets (kd_loss) + alpha_mlm x the student's own loss + alpha_cos x
    the cosine between the two models' hidden states over the real tokens; for scBERT 2.0 pretraining also alpha_mse x
    the MSE to the teacher's predicted values. Soft targets and MSE are on the masked genes when pretraining (as
    DistilBERT's), on the cell-type logits when fine-tuning. Returns (the student's own loss, for the log, the
    total, each term scaled by its DDP share: per masked gene, per cell or per token, and the student's logits)."""
    logits, own, hidden = model(x, targets, class_weight=class_weight, mlm_weight=mlm_weight,
                                regression_weight=regression_weight, return_hidden=True)
    with torch.no_grad():
        t_logits, _, t_hidden = teacher_model(x, task='classify' if mode == 'finetune' else 'mlm', return_hidden=True)
    hidden = hidden if projection is None else projection(hidden)
    valid = token_valid(x)                                         # (B, L) real tokens, None = all
    n_tokens = valid.sum().float() if valid is not None else torch.tensor(float(hidden.shape[0] * hidden.shape[1]))
    share = loss_share(targets, class_weight)
    total = alpha_mlm * own * share + alpha_cos * cosine_loss(hidden, t_hidden, valid) * global_share(n_tokens.to(device))
    if mode == 'finetune':                                         # a mean over cells
        cells = torch.tensor(float(len(targets)), device=device)
        return own, total + alpha_ce * kd_loss(logits, t_logits, temperature) * global_share(cells), logits
    if isinstance(logits, dict):                                   # expressed input: the masked bins and values
        sel = targets['bins'] != -100
        distil = (alpha_ce * kd_loss(logits['bins'][sel], t_logits['bins'][sel], temperature)
                  + alpha_mse * F.mse_loss(logits['values'][sel].float(), t_logits['values'][sel].float()))
    else:
        sel = targets != -100
        distil = alpha_ce * kd_loss(logits[sel], t_logits[sel], temperature)
    return own, total + distil * share, logits                     # means over the masked genes, as the own loss


def save(path, obj):
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


# -----------------------------------------------------------------------------

@torch.no_grad()
def cell_outputs(model, idx):
    """-> (logits (n, n_classes), the classifier's hidden features (n, head_hidden)) of cells idx, float32 on the CPU."""
    model.eval()
    logits, features = [], []
    for start in range(0, len(idx), batch_size * 2):
        x = to_device(get_batch(idx[start:start + batch_size * 2], model.config)[0])
        with autocast:
            f = model.cls_head.features(model.encode(x), x)
            logits.append(model.cls_head.fc3(f).float().cpu())
        features.append(f.float().cpu())
    return torch.cat(logits), torch.cat(features)


def novelty_line(name, r):
    return (f"{name:11s} AUROC {r['auroc']:.3f}, known acc {r['known_acc']:.3f}, novel acc {r['novel_acc']:.3f} "
            f"(threshold {r['threshold']:.4g})")


def train_fold(k, fold_dir, novel_idx=None):
    """Train with test fold k (validation fold k+1) into fold_dir; returns the final metrics dict. novel_idx: the cells
    of the held-out type (their labels are -1 in data.labels), tested as novel beside the test fold's known cells."""
    # test_batch: test on one batch (donor); holdout: the known types only
    train_idx, val_idx, test_idx = fold_split(data, k, test_batch, labelled_only=novel_idx is not None)
    if mode == 'pretrain':      # no labels to protect: train on every fold but the validation one
        train_idx, val_idx, test_idx = np.sort(np.concatenate([train_idx, test_idx])), val_idx, None
    if len(train_idx) == 0 or len(val_idx) == 0 or (test_idx is not None and len(test_idx) == 0):
        raise UserError(f'{dataset} has too few cells for fold {k} of {n_folds} (train {len(train_idx)}, val {len(val_idx)}, '
                        f'test {0 if test_idx is None else len(test_idx)}); prepare it with fewer --n_folds')
    eval_idx = val_idx if not eval_cells or len(val_idx) <= eval_cells else \
        np.sort(np.random.default_rng(seed).choice(val_idx, eval_cells, replace=False))
    teacher_model, teacher_path = load_teacher(k, fold_dir) if teacher else (None, None)
    torch.manual_seed(seed)
    model, ckpt = make_model(k, fold_dir, train_idx, teacher_model)  # the inputs are checked before any output
    if master:
        os.makedirs(fold_dir, exist_ok=True)
        with atomic_write(os.path.join(fold_dir, 'vocab.txt')) as tmp, open(tmp, 'w') as f:
            f.write('\n'.join(data.vocab) + '\n')
    set_trainable(model)
    raw_model = model.to(device)
    optim = raw_model.configure_optimizer(optimizer, learning_rate, weight_decay, (beta1, beta2))
    projection = None            # a narrower student's hidden states -> the teacher's width, for the cosine loss
    if teacher_model is not None and raw_model.config.n_embd != teacher_model.config.n_embd:
        projection = torch.nn.Linear(raw_model.config.n_embd, teacher_model.config.n_embd, bias=False).to(device)
        optim.add_param_group({'params': list(projection.parameters()), 'weight_decay': 0.0})
    scaler = torch.amp.GradScaler(enabled=ptdtype == torch.float16)   # fp16 only; a no-op otherwise
    iter_num, best, history = 0, {'macro_f1': -1.0, 'loss': float('inf'), 'iter': -1}, {'iter': [], 'train_loss': []}
    mask_acc_ema = 0.0           # dynamic masking: EMA of the training steps' masked-bin accuracy (sets the rate)
    if ckpt is not None:                                           # resume: the same schedule from the next step
        try:
            optim.load_state_dict(ckpt['optimizer'])
            scaler.load_state_dict(ckpt['scaler'])
        except (KeyError, ValueError) as e:
            raise UserError(f'cannot resume {fold_dir}/ckpt.pt with these settings ({e}); keep the settings it was started with') from None
        iter_num, best, history = ckpt['iter_num'] + 1, ckpt['best'], ckpt['history']
        mask_acc_ema = ckpt.get('mask_acc_ema', 0.0)
        started = {'teacher': ckpt['config'].get('teacher', ''), 'student_n_embd': ckpt['config'].get('student_n_embd', 0)}
        if started != {'teacher': teacher, 'student_n_embd': student_n_embd}:
            raise UserError(f'{fold_dir}/ckpt.pt was started with {started}; resume it with the same --teacher and '
                            f'--student_n_embd')
        if projection is not None:
            projection.load_state_dict(ckpt['projection'])
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
            f'{raw_model.num_params() / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable'
            + (f'; {raw_model.num_active_params() / 1e6:.2f}M active per token, '
               f'{raw_model.num_active_params(embeddings=False) / 1e6:.2f}M without the embeddings' if n_expert else '')
            + f'); {world_size} process(es) on {device}, {dtype}'
            + ('' if data.preloaded else f'; streaming {dataset} from disk'))
        if teacher_model is not None:
            log(f'distilling {teacher_path} ({teacher_model.num_params() / 1e6:.2f}M parameters, '
                f'{teacher_model.config.n_layer} blocks) into a {raw_model.config.n_layer}-block student '
                f'({raw_model.num_params() / 1e6:.2f}M): {alpha_ce} x soft targets (T = {temperature}) + {alpha_mlm} x '
                f'its own loss + {alpha_cos} x cosine' + (f' + {alpha_mse} x value MSE' if mode == 'pretrain' and
                                                          raw_model.config.input_genes == 'expressed' else ''))

    def checkpoint(done=False):
        state = {'model': raw_model.state_dict(), 'optimizer': optim.state_dict(), 'scaler': scaler.state_dict(),
                 'model_args': asdict(raw_model.config), 'projection': projection.state_dict() if projection else None,
                 'iter_num': iter_num, 'best': best, 'history': history, 'config': config, 'mode': mode, 'fold': k,
                 'test_batch': test_batch, 'vocab': data.vocab, 'label_names': data.label_names,
                 'log_base': data.log_base, 'mask_acc_ema': mask_acc_ema, 'done': done}
        save(os.path.join(fold_dir, 'ckpt.pt'), state)

    # the batches, from the next micro-step on: built in num_workers background processes, or here when 0
    loader = torch.utils.data.DataLoader(Batches(train_idx, raw_model.config), batch_size=None,
                                         sampler=range(iter_num * grad_accum, max_iters * grad_accum),
                                         num_workers=num_workers, pin_memory=device_type == 'cuda',
                                         prefetch_factor=4 if num_workers else None)
    batches = iter(loader)
    model.train()
    raw_model.expert_load(reset=True)
    pbar = tqdm(total=max_iters, initial=iter_num, disable=not master, desc=f'fold {k}', leave=False)
    t0, cells_since, data_time, compute_time, padding = time.time(), 0, 0.0, 0.0, []
    while iter_num < max_iters:
        lr = get_lr(iter_num)
        for group in optim.param_groups:
            group['lr'] = lr
        torch.manual_seed(seed + iter_num * world_size + rank)     # dropout: the same on resume
        mask_rate = dynamic_mask_rate(mask_acc_ema, mask_prob_min, mask_prob_max) if dynamic else mask_prob
        mask_hits = mask_seen = 0                                  # dynamic: the step's masked-bin accuracy
        for micro in range(grad_accum):
            t_data = time.time()
            x, targets = next(batches)
            if dynamic:                                             # targets: the cells, to seed their masks
                x, targets = mask_batch(x, targets.numpy(), raw_model.config, iter_num * grad_accum + micro, mask_rate)
            x, targets = to_device(x), to_device(targets)
            t_compute = time.time()
            data_time += t_compute - t_data
            if isinstance(x, dict):
                padding.append((x['genes'] < 0).float().mean().item())
            sync = nullcontext() if (not ddp or micro == grad_accum - 1) else model.no_sync()
            with sync:
                with autocast:
                    if teacher_model is None:
                        logits, loss = model(x, targets, class_weight=class_weight, mlm_weight=mlm_weight,
                                             regression_weight=regression_weight)
                        # DDP: a mean over the global batch, not a mean of the ranks' means (their masked counts differ)
                        total = loss * loss_share(targets, class_weight)
                    else:                                           # loss: the student's own, as validation's
                        loss, total, logits = distillation_loss(model, teacher_model, projection, x, targets,
                                                                class_weight)
                aux, z = raw_model.aux_losses()                      # MoE: load balancing and router z-loss
                total = total + aux_loss_weight * aux + z_loss_weight * z
                scaler.scale(total / grad_accum).backward()
            if dynamic:
                predicted, target = (logits['bins'], targets['bins']) if isinstance(logits, dict) else (logits, targets)
                sel = target != -100
                mask_hits = mask_hits + (predicted.detach().argmax(-1)[sel] == target[sel]).sum()
                mask_seen = mask_seen + sel.sum()
            cells_since += len(targets['bins'] if isinstance(targets, dict) else targets) * world_size
            compute_time += time.time() - t_compute
        if dynamic:        # over the global batch (every micro-step and rank), so every rank gets the same next rate
            counts = torch.stack([mask_hits, mask_seen])
            if ddp:
                dist.all_reduce(counts)
            mask_acc_ema = 0.9 * mask_acc_ema + 0.1 * counts[0].item() / max(1, counts[1].item())
        t_compute = time.time()                                     # the optimizer step, below
        if ddp and projection is not None:                            # outside DDP's model: average its gradient here
            for p in projection.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
        if grad_clip:
            scaler.unscale_(optim)
            torch.nn.utils.clip_grad_norm_([*raw_model.parameters(), *(projection.parameters() if projection else [])],
                                           grad_clip)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad(set_to_none=True)
        if device_type == 'cuda':
            torch.cuda.synchronize()                                # for honest compute times
        compute_time += time.time() - t_compute
        pbar.update(1)

        if iter_num % log_interval == 0 or iter_num == max_iters - 1:
            dt = time.time() - t0
            history['iter'].append(iter_num)
            history['train_loss'].append(loss.item())
            if dynamic:                                             # the step's rate, and the EMA that sets the next
                history.setdefault('mask_rate', []).append(mask_rate)
                history.setdefault('mask_acc_ema', []).append(mask_acc_ema)
            # data time: waiting for the next batch; compute: forward, backward and the optimizer step
            load = raw_model.expert_load(reset=True)
            log(f'iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, {cells_since / dt:.1f} cells/s, '
                f'data {1e3 * data_time:.0f} ms / compute {1e3 * compute_time:.0f} ms'
                + (f', mask rate {mask_rate:.3f} (masked-bin accuracy EMA {mask_acc_ema:.3f})' if dynamic else '')
                + (f', padding {np.mean(padding):.0%}' if padding else '')
                + (f', aux {aux.item():.3f}, {describe_load(load)}' if load is not None else ''))
            t0, cells_since, data_time, compute_time, padding = time.time(), 0, 0.0, 0.0, []
        if iter_num % eval_interval == 0 or iter_num == max_iters - 1:
            if master:
                val = evaluate(raw_model, eval_idx, teacher_model)
                history.setdefault('val_iter', []).append(iter_num)
                history.setdefault('val_loss', []).append(val['loss'])
                if teacher_model is not None:
                    history.setdefault('val_teacher_agreement', []).append(val['teacher_agreement'])
                if mode == 'finetune':
                    history.setdefault('val_macro_f1', []).append(val['macro_f1'])
                    improved = val['macro_f1'] > best['macro_f1']
                    log(f'iter {iter_num}: val loss {val["loss"]:.4f}, {format_metrics_line(val)}'
                        + (f', agrees with the teacher on {val["teacher_agreement"]:.1%}' if teacher_model else ''))
                else:
                    history.setdefault('val_masked_acc', []).append(val['masked_acc'])
                    improved = val['loss'] < best['loss']
                    log(f'iter {iter_num}: val loss {val["loss"]:.4f}, masked-bin accuracy {val["masked_acc"]:.4f} '
                        f'(always the commonest bin: {val["majority_acc"]:.4f})'
                        + (f', masked-value MSE {val["masked_mse"]:.4f} (always the mean: {val["mean_guess_mse"]:.4f})'
                           if 'masked_mse' in val else '')
                        + (f', agrees with the teacher on {val["teacher_agreement"]:.1%}' if teacher_model else ''))
                if 'expert_load' in val:
                    log(f'iter {iter_num}: validation {describe_load(val["expert_load"])}')
                if improved:
                    best = {'macro_f1': val.get('macro_f1', -1.0), 'loss': val['loss'], 'iter': iter_num,
                            'val': {m: v for m, v in val.items() if m not in ('prob', 'confusion')}}
                    save(os.path.join(fold_dir, 'best.pt'), {
                        'model': raw_model.state_dict(), 'model_args': asdict(raw_model.config), 'iter_num': iter_num,
                        'mode': mode, 'config': config, 'vocab': data.vocab, 'label_names': data.label_names,
                        'log_base': data.log_base, 'val': {m: val[m] for m in val if m != 'prob'}, 'fold': k,
                        'test_batch': test_batch})
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
        test = evaluate(best_model, test_idx, teacher_model)
        prob = test.pop('prob')
        result.update(n_test=len(test_idx), val=best_ckpt['val'], test=test)
        log(f'fold {k} test  scBERT               {format_metrics_line(test)}  (best val iter {best["iter"]})'
            + (f', agrees with the teacher on {test["teacher_agreement"]:.1%}' if teacher_model else ''))
        if 'expert_load' in test:
            log(f'fold {k} test  {describe_load(test["expert_load"])}')
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
        # novel cell types: the embedding scores' statistics from training cells, each score's threshold from the
        # validation cells (known types only: a quantile of their scores), stored in best.pt for predict.py
        fit_idx = train_idx if len(train_idx) <= novelty_cells else \
            np.sort(np.random.default_rng(seed).choice(train_idx, novelty_cells, replace=False))
        best_ckpt['novelty'] = rule = novelty_rule(
            cell_outputs(best_model, fit_idx)[1], data.labels[fit_idx], len(data.label_names),
            *cell_outputs(best_model, val_idx), novelty_quantile, novelty_score, seed=seed)
        best_ckpt['holdout'] = held_out
        save(os.path.join(fold_dir, 'best.pt'), best_ckpt)
        if novel_idx is not None:
            logits, features = cell_outputs(best_model, test_idx)
            known = novelty_scores(logits, features, rule)
            novel_logits, novel_features = cell_outputs(best_model, novel_idx)
            novel = novelty_scores(novel_logits, novel_features, rule)
            correct = logits.argmax(1).numpy() == data.labels[test_idx]
            called = np.bincount(novel_logits.argmax(1).numpy(), minlength=len(data.label_names))   # the novel cells'
            result['novel_called_as'] = {t: int(n) for t, n in zip(data.label_names, called) if n}  # classes
            report = novelty_report(known, correct, novel, rule['thresholds'])
            # scBERT's rule, a fixed threshold: Unassigned when the top probability is below 0.5
            report['scbert_rule'] = novelty_report({'maxprob': known['maxprob']}, correct, {'maxprob': novel['maxprob']},
                                                   {'maxprob': 0.5})['maxprob']
            result.update(holdout=held_out, n_novel=len(novel_idx), novelty=report)
            log(f"fold {k} novel '{held_out}' ({len(novel_idx)} cells) vs {len(test_idx)} known test cells; "
                f"thresholds: the {novelty_quantile:.0%} quantile of the validation cells' scores; the classifier calls "
                f"the novel cells " + ', '.join(f'{t} ({n})' for t, n in result['novel_called_as'].items()))
            for name, r in report.items():
                log(f'fold {k} novelty {novelty_line(name, r)}')
    else:
        result['val'] = dict(best.get('val', {}), loss=best['loss'], iter=best['iter'])
    plot_loss(history, os.path.join(fold_dir, 'loss.png'))
    with atomic_write(os.path.join(fold_dir, 'metrics.json')) as tmp, open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    checkpoint(done=True)
    return result


# -----------------------------------------------------------------------------
if fold == 'all' and test_batch:
    raise UserError(f"test_batch='{test_batch}' gives one split; use --fold=0 (the fold that picks the validation cells)")
if fold == 'all':
    folds = list(range(n_folds))
elif fold.isdigit() and int(fold) < n_folds:
    folds = [int(fold)]
else:
    raise UserError(f"fold must be 0..{n_folds - 1} or 'all', not '{fold}'")
held_out, runs = '', [('', k) for k in folds]      # held_out: the cell type the current run leaves out
if holdout:                                     # leave-one-cell-type-out: every run remaps the labels from these
    all_names, all_labels = list(data.label_names), data.labels.copy()
    counts = np.bincount(all_labels[all_labels >= 0], minlength=len(all_names))
    if holdout == 'all':
        types = [t for t, c in zip(all_names, counts) if c >= holdout_min_cells]
    elif holdout in all_names:
        types = [holdout]
    else:
        raise UserError(f"holdout '{holdout}' is not a cell type of {dataset} (its types: {', '.join(all_names)}), or "
                        f"'all'")
    if not types or len(all_names) < 3:
        raise UserError(f'holdout needs at least 3 cell types and one with {holdout_min_cells} labelled cells '
                        f'(set --holdout_min_cells=...)')
    runs = [(t, k) for t in types for k in folds]
results = []
for held_out, k in runs:
    run_dir = os.path.join(out_dir, 'holdout_' + re.sub(r'[^A-Za-z0-9_.+-]', '_', held_out)) if held_out else out_dir
    novel_idx = None
    if held_out:                                # the held-out type's cells get label -1; the others close the gap
        data.labels, data.label_names, novel_idx = leave_out_type(all_labels, all_names, held_out)
        batches = data.meta.get('batch_names') or []
        if test_batch in batches:               # novel cells from the test batch only, as the known ones are
            novel_idx = novel_idx[data.batch[novel_idx] == batches.index(test_batch)]
            if not len(novel_idx):
                raise UserError(f"test_batch '{test_batch}' has no '{held_out}' cells to test as novel; hold out another "
                                f"type or test on another batch")
    results.append(train_fold(k, os.path.join(run_dir, f'fold{k}') if fold == 'all' else run_dir, novel_idx))

if master and holdout and all(results):         # one row per held-out type, the mean over its folds
    rows = {}
    for r in results:
        rows.setdefault(r['holdout'], []).append(r)
    names = [*metrics.NOVELTY_SCORES, 'scbert_rule']
    table = {t: {'n_novel': rs[0]['n_novel'], 'n_folds': len(rs),
                 **{name: {m: float(np.mean([r['novelty'][name][m] for r in rs])) for m in ('auroc', 'known_acc', 'novel_acc')}
                    for name in names}} for t, rs in rows.items()}
    mean = {name: {m: float(np.mean([row[name][m] for row in table.values()])) for m in ('auroc', 'known_acc', 'novel_acc')}
            for name in names}
    lines = [f'Novelty AUROC, leave one type out ({dataset}, test fold {fold}; novel = the held-out type\'s cells, '
             f'known = the test fold\'s other cells). Accuracies at the threshold (validation {novelty_quantile:.0%} '
             f'quantile) of {novelty_score}, and of scBERT\'s rule (Unassigned when the top probability < 0.5):', '',
             '| held-out type | cells | ' + ' | '.join(metrics.NOVELTY_SCORES) + f' | {novelty_score}: known / novel acc | '
             'scBERT rule: known / novel acc |', '|---|---:|' + '---:|' * (len(metrics.NOVELTY_SCORES) + 2)]
    for t, row in [*table.items(), ('mean', dict(mean, n_novel=''))]:
        lines.append(f"| {t} | {row['n_novel']} | " + ' | '.join(f"{row[name]['auroc']:.3f}" for name in metrics.NOVELTY_SCORES)
                     + f" | {row[novelty_score]['known_acc']:.3f} / {row[novelty_score]['novel_acc']:.3f} | "
                     f"{row['scbert_rule']['known_acc']:.3f} / {row['scbert_rule']['novel_acc']:.3f} |")
    with atomic_write(os.path.join(out_dir, 'novelty.json')) as tmp, open(tmp, 'w') as f:
        json.dump({'dataset': dataset, 'fold': fold, 'quantile': novelty_quantile, 'types': table, 'mean': mean}, f, indent=1)
    with atomic_write(os.path.join(out_dir, 'novelty.md')) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    log('\n'.join(lines))
elif master and len(results) > 1 and all(results) and mode == 'finetune':
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
