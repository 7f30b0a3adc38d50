"""
Pretrain scBERT by masked expression modelling, or fine-tune it to annotate cell types, on a dataset made by
prepare_data.py.

    python train.py                                  # the default job: prepare the embedded PBMC data if missing,
                                                     # fine-tune a small scBERT, test it beside logistic regression
    python train.py config/finetune_baron.py --fold=all          # 5-fold cross-validation
    python train.py --mode=pretrain --dataset=data/celltypist --out_dir=out-pretrain
    python train.py --init_from=resume                            # continue out_dir/ckpt.pt on the same schedule
    python train.py config/scbert2_small.py                       # scBERT 2.0: expressed genes, GQA, SwiGLU, MoE
    python train.py config/finetune_baron.py --test_batch=mouse2  # train on one donor, test on the other
    python train.py --bitlinear=True --init_from=out/best.pt --out_dir=out-qat   # BitNet b1.58 QAT (then quantize.py)
    torchrun --nproc_per_node=8 train.py config/scbert2.py        # DDP: nccl on CUDA, gloo on CPU
    python train.py config/ablation_baron.py --fold=0 --holdout=all  # novel types: leave each type out in turn
    python distill.py --teacher=out/best.pt --out_dir=out-student   # distillation has its own script

Folds: the test fold is `fold`, the validation fold is the next one, the rest train. The validation fold picks the best
checkpoint (macro-F1); the test fold is only scored, once, at the end. Writes out_dir/ckpt.pt (the latest state, for
resume), out_dir/best.pt (the best model, for predict.py), metrics.json, loss.png and confusion.png. With fold='all'
each fold writes these in out_dir/fold<k>/, and out_dir/metrics.json holds the mean ± sd over folds and every fold.

Novel cell types: after fine-tuning, best.pt also gets what predict.py needs to call a cell 'Unassigned': the novelty
scores' statistics of the training cells and each score's threshold, the novelty_quantile of the validation cells'
scores. With holdout=<type> (or 'all') the type is left out of training and validation, and its cells join the test
fold as novel: the run reports each score's AUROC (novel vs the test fold's known cells) and the known and novel
accuracy at the thresholds, beside scBERT's rule, in out_dir/holdout_<type>/ and out_dir/novelty.{json,md}.

This file holds the model's settings and how a run's model is made; the settings and machinery it shares with
distill.py (data, folds, batches, optimizer, the loop, checkpoints, evaluation, baseline) are in training.py.
"""
import os
from dataclasses import fields

import numpy as np
import torch

import training
from data import UserError, load_checkpoint
from model import Classifier, ModelConfig, ScBERT, as_bitlinear, calibrate_bitlinear, clean_state_dict

# -----------------------------------------------------------------------------
# the model (training.py has the shared settings: data, folds, optimizer, masking, baseline, novelty, system)
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
head = 'scbert'                # classifier: 'scbert' (the original's, over all genes) | 'pooled' (mean over genes) |
                               # 'cls' (expressed input: the CLS token)
head_hidden = 128              # classifier hidden width
gene2vec = ''                  # .npy gene embedding (n_genes, n_embd) in vocab order, loaded and frozen ('' = learned)
# ALBERT, DeBERTa and biology (genomic and pathway options need the dataset's annotation: prepare_data.py --annotate)
embd_factor = 0                # > 0: ALBERT's factorized gene embedding, n_genes×E then E×n_embd (0 = one table)
share_layers = 'none'          # ALBERT's cross-layer sharing: 'none' | 'all' (one block, n_layer times) | 'attention' |
                               # 'ffn'
genomic_pe = False             # add a chromosome embedding + sinusoids of each gene's start coordinate
disentangled = False           # DeBERTa's disentangled attention, relative positions = genomic distance buckets (sdpa)
n_pos_buckets = 16             # disentangled: log-distance levels per direction, 1 kb to 250 Mb (2n + 1 buckets with
                               # 'different chromosome' and 'unknown')
pathway_enc = False            # add the sum of each gene's pathway (gene set) embeddings
# scBERT 2.0 (the defaults are scBERT's; see config/scbert2*.py)
input_genes = 'all'            # 'all' (scBERT: every panel gene) | 'expressed' (CLS + the expressed genes only)
value_emb = 'bins'             # expressed: 'bins' (scBERT's) | 'quantile' (per-cell, scGPT) | 'continuous' (xTrimoGene)
max_genes = 0                  # expressed: at most this many expressed genes per cell (random in training; 0 = all)
n_zero_genes = 0               # expressed: also add this many unexpressed genes per cell (value 0)
n_kv_head = 0                  # key/value heads (grouped-query attention; 0 = n_head, 1 = multi-query)
norm = 'layernorm'             # 'layernorm' | 'rmsnorm'
mlp = 'gelu'                   # 'gelu' | 'swiglu'
bias = True                    # biases in attention/MLP linears and norms
n_expert = 0                   # > 0: sparse mixture of this many expert MLPs in every block
n_expert_active = 2            # experts per token (top-k)
bitlinear = False              # BitNet b1.58 quantization-aware training: attention and feed-forward weights ternary
                               # {-1, 0, +1}·γ, activations int8, through the straight-through estimator; from scratch,
                               # or a float --init_from converted (its norm gains calibrated); quantize.py packs it
calibration_cells = 256        # bitlinear from a float checkpoint: training cells (a random sample) that calibrate
                               # the BitLinear norm gains
# -----------------------------------------------------------------------------
# the settings above that are ModelConfig's (gene2vec and calibration_cells say how a model starts)
ARCHITECTURE = [f.name for f in fields(ModelConfig) if f.name in globals()]


def main():
    training.configure_settings(globals())
    check_settings()
    env = training.setup()
    data = training.load_dataset(env)
    results = [train_run(run, env) for run in training.plan_runs(data, env)]
    training.summarize(results, env)
    training.teardown(env)


def train_run(run, env):
    """Train one run (a test fold, maybe a held-out type) into run.dir -> its metrics (None if stopped early)."""
    torch.manual_seed(training.seed)
    model, ckpt = make_model(run, env)                             # the inputs are checked before any output
    t = training.start(run, model, ckpt, env)
    if t.done:
        return training.already_finished(run, env)
    class_weight = training.class_weight_of(run, env)
    training.log_run(run, t, env)

    def step_loss(model, x, targets):
        """The task's loss: cross-entropy to the cell types, or the masked bins (+ values) when pretraining."""
        logits, loss = model(x, targets, class_weight=class_weight, label_smoothing=training.label_smoothing,
                             mlm_weight=training.mlm_weight, regression_weight=training.regression_weight)
        # DDP: a mean over the global batch, not a mean of the ranks' means (their masked counts differ)
        loss = loss * training.loss_share(targets, class_weight, env)
        return logits, loss, loss

    if not training.train_loop(run, t, step_loss, env):
        return None
    return training.finish(run, t, env)


def check_settings():
    """Every rule of the settings, before anything runs: the shared ones, the model's (ModelConfig's, for a new
    model; a checkpoint brings its own architecture) and this script's."""
    training.check_settings()
    if training.init_from == 'scratch':
        training.model_config(dict({name: globals()[name] for name in ARCHITECTURE}, n_genes=1))
        if gene2vec and embd_factor:
            raise UserError('a gene2vec table replaces the gene embedding: use --embd_factor=0 with --gene2vec')
    if calibration_cells < 1:
        raise UserError(f'calibration_cells must be at least 1, not {calibration_cells} (set --calibration_cells=...)')


def n_classes(run):
    """The classifier's outputs: the run's cell types when fine-tuning, none when pretraining."""
    return len(run.label_names) if training.mode == 'finetune' else 0


def model_args(run):
    """The settings as ModelConfig's arguments, for this run's dataset and task."""
    return dict({name: globals()[name] for name in ARCHITECTURE}, n_genes=run.data.n_genes, n_classes=n_classes(run),
                seed=training.seed)


def make_model(run, env):
    """The run's model -> (model, the checkpoint when resuming, else None): resumed from run.dir/ckpt.pt, loaded from
    init_from (ours or an original scBERT release; with bitlinear a float one is converted), or new."""
    if training.init_from == 'resume':
        model, ckpt = training.resume_checkpoint(run, env)
        if model is not None:
            return model, ckpt
    elif training.init_from != 'scratch':
        model = load_model(training.init_from.replace('{fold}', str(run.k)), run, env)
        if bitlinear and not model.config.bitlinear:               # quantization-aware training from a float model
            model = to_bitlinear(model, run, env)
        return model, None
    return new_model(run), None


def new_model(run):
    """A new model from the settings, with the dataset's gene annotation and a gene2vec table when asked for."""
    args = model_args(run)
    note = None
    if genomic_pe or disentangled or pathway_enc:                  # the annotation: its sizes, then its buffers
        note = run.data.annotation()
        args.update(n_chrom=len(note['chrom_names']), n_pathways=len(note['pathway_names']),
                    n_pathway_links=len(note['pathway_idx']))
        fix = f"python prepare_data.py --annotate={training.dataset} --genome=<gene table> --gene_sets=<GMT files>"
        if (genomic_pe or disentangled) and not note['chrom_names']:
            raise UserError(f'genomic_pe and disentangled read gene coordinates, and no gene of {training.dataset} '
                            f'has any: {fix}')
        if pathway_enc and not len(note['pathway_idx']):
            raise UserError(f'pathway_enc reads gene sets, and no gene of {training.dataset} is in one: {fix}')
    model = ScBERT(training.model_config(args))
    if note is not None:
        model.set_gene_annotation(note['chrom'], note['start'], note['pathway_ptr'], note['pathway_idx'])
    if gene2vec:
        if not os.path.isfile(gene2vec):
            raise UserError(f'gene2vec file {gene2vec} not found')
        try:
            weight = np.load(gene2vec, allow_pickle=False)
        except ValueError:                                         # an object array: refused, as pickles are
            raise UserError(f'gene2vec {gene2vec} holds Python objects (a pickled array), refused for safety; save '
                            f'the table as numbers: np.save(path, table.astype(np.float32))') from None
        if weight.shape != (run.data.n_genes, n_embd):
            raise UserError(f'gene2vec {gene2vec} has shape {weight.shape}; this dataset and n_embd need '
                            f'({run.data.n_genes}, {n_embd}), rows in the vocab order of {training.dataset}/vocab.txt')
        model.set_gene_embedding(weight, freeze=True)
    return model


def load_model(path, run, env):
    """The model in a checkpoint, ours or an original scBERT one, with a fresh classifier when the task differs."""
    ckpt = load_checkpoint(path, 'init_from')
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state dict')
    if 'model_args' not in ckpt:
        return load_original(ckpt, path, run)
    check_loadable(ckpt, path, run)
    settings = model_args(run)
    args = dict(ckpt['model_args'])
    same_task = args['n_classes'] == settings['n_classes'] and ckpt.get('label_names') == run.label_names
    if not same_task:                                              # e.g. pretrained -> fine-tune: a fresh classifier
        args.update({k: settings[k] for k in ('n_classes', 'head', 'head_hidden', 'dropout')})
    args.update({k: settings[k] for k in ('max_genes', 'n_zero_genes') if k in args})   # not in the weights
    try:
        model = ScBERT(training.model_config(args))
        sd = clean_state_dict(ckpt['model'])
        if not same_task:
            sd = {k: v for k, v in sd.items() if not k.startswith('cls_head.')}
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (KeyError, TypeError, RuntimeError, AssertionError) as e:
        raise UserError(f'{path} is damaged ({type(e).__name__}: {str(e)[:200]})') from None
    if unexpected or any(not k.startswith('cls_head.') for k in missing):
        raise UserError(f'{path} does not match its model_args (missing {missing[:3]}, unexpected {unexpected[:3]})')
    if args.get('bitlinear') and not bitlinear:
        env.log(f'note: {path} was trained with bitlinear=True (BitNet QAT), and so is this run')
    differ = [k for k, v in settings.items() if k in args and args[k] != v and k not in ('n_classes', 'dropout',
                                                                                          'bitlinear')]
    if differ:                                                     # the architecture is the checkpoint's, say so
        env.log(f'note: the model comes from {path}; its {", ".join(f"{k}={args[k]}" for k in differ)} replace the '
                f'settings')
    return model


def check_loadable(ckpt, path, run):
    """Refuse a checkpoint of ours that cannot start this run: other genes, quantized, or fine-tuned on its test
    cells (another fold of this dataset, or with holdout any fine-tuned model)."""
    training.check_vocab(ckpt, path, run.data)
    if ckpt.get('quantization'):
        raise UserError(f"{path} is quantized ({ckpt['quantization']}) for inference; train from the float "
                        f"checkpoint it was made from")
    tested = (ckpt.get('fold'), ckpt.get('test_batch', ckpt.get('config', {}).get('test_batch', '')))
    if (training.mode == 'finetune' and ckpt.get('mode') == 'finetune' and 'fold' in ckpt
            and ckpt.get('config', {}).get('dataset') == training.dataset and tested != (run.k, training.test_batch)):
        raise UserError(f"{path} was fine-tuned on this dataset with test fold {ckpt['fold']} "
                        f"{ckpt.get('test_batch') or ''}: it trained on this run's test cells; continue the "
                        f"checkpoint of fold {run.k} ({{fold}} in --init_from)")
    if run.held_out and ckpt['model_args'].get('n_classes'):
        raise UserError(f"{path} is fine-tuned (on {', '.join(ckpt.get('label_names') or ['its cell types'])}): "
                        f"with holdout it may have seen '{run.held_out}'; start from scratch or a pretrained model")


def load_original(ckpt, path, run):
    """An original scBERT release (pretrained panglao_pretrain.pth, or fine-tuned), with a fresh classifier for our
    cell types."""
    if embd_factor or share_layers != 'none' or genomic_pe or disentangled or pathway_enc:
        raise UserError(f'{path} is an original scBERT checkpoint, whose architecture has none of embd_factor, '
                        f'share_layers, genomic_pe, disentangled, pathway_enc: leave them at their defaults')
    try:
        model = ScBERT.from_scbert(ckpt, dropout=dropout, seed=training.seed)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'{path} is neither a nanoscBERT nor an original scBERT checkpoint ({e})') from None
    if run.held_out and model.cls_head is not None:
        raise UserError(f"{path} is a fine-tuned original scBERT: with holdout it may have seen '{run.held_out}'; "
                        f"start from scratch or a pretrained model")
    if model.config.n_genes != run.data.n_genes:
        raise UserError(f'{path} expects a {model.config.n_genes}-gene panel but {training.dataset} has '
                        f'{run.data.n_genes} genes; prepare the data with --vocab=<the checkpoint gene panel, one '
                        f'symbol per line>')
    if model.config.n_classes != n_classes(run):                   # pretrained (or other labels): a fresh classifier
        model.config.n_classes = n_classes(run)
        model.cls_head = Classifier(model.config) if model.config.n_classes else None
    return model


def to_bitlinear(model, run, env):
    """BitNet b1.58 quantization-aware training from a float model: its linears made BitLinear, their norm gains
    calibrated on calibration_cells training cells (a random sample, in batches)."""
    model = as_bitlinear(model)
    cells = training.sample(run.train_idx, calibration_cells)
    size = training.batch_size
    n = calibrate_bitlinear(model, (training.get_batch(run, cells[i:i + size], model.config)[0]
                                    for i in range(0, len(cells), size)))
    env.log(f'bitlinear: {training.init_from} converted to BitNet b1.58 linears; {n} norm gains calibrated on '
            f'{len(cells)} training cells')
    return model


if __name__ == '__main__':
    main()
