"""
Distil a trained model (the teacher) into a smaller, faster student, as DistilBERT did for BERT (Sanh et al. 2019).

    # fine-tuned teacher -> half-depth student, on the teacher's data, one fold or every fold ({fold} = its number)
    python distill.py config/scbert2_small.py --dataset=data/baron1k --teacher=out-s2-baron1k/fold0/best.pt --fold=0
    python distill.py config/scbert2_small.py --dataset=data/baron1k --fold=all \\
        --teacher='out-s2-baron1k/fold{fold}/best.pt'
    # pretrained teacher -> pretrained student (masked modelling), on 8 GPUs
    torchrun --nproc_per_node=8 distill.py config/scbert2.py --teacher=out-scbert2/best.pt --out_dir=out-scbert2-student
    python distill.py --teacher=out/best.pt --student_layers=0,3        # your choice of teacher blocks
    python distill.py --teacher=out/best.pt --student_n_embd=32         # narrower: half the blocks, at random

The student is the teacher's architecture with fewer blocks: by default every other one (0, 2, 4, ...), initialised
from those teacher blocks and from the teacher's embeddings, final norm and heads (cut_student). A narrower student
(--student_n_embd) starts at random, and a learned projection maps its hidden states to the teacher's width for the
cosine loss. The teacher can be any checkpoint: ours (scBERT or scBERT 2.0, pretrained or fine-tuned) or an original
scBERT .pth. It is frozen; each step runs it on the same cells as the student and trains the student on
distillation_loss:

    alpha_ce  x KL(softmax(teacher / T) ‖ softmax(student / T)) · T²     soft targets: the masked genes' bins
                                                                          (pretraining), or the cell-type logits
  + alpha_mlm x the student's own loss                                   masked modelling, or cross-entropy to labels
  + alpha_cos x (1 - cos(student hidden state, teacher hidden state))    every real token
  + alpha_mse x MSE(student value, teacher value)                        scBERT 2.0 pretraining: the masked values

with DistilBERT's weights 5 / 2 / 1 and T = 2 (alpha_mse 1). Validation and test also report how often the student
predicts what the teacher does.

The training itself (folds, batches, masking, the optimizer and its schedule, AMP, DDP, resume, checkpoints,
metrics, the logistic-regression baseline, the loop) is training.py's, shared with train.py: every setting of
training.py works here (`--help` lists them). The model's settings are the teacher's: config files may set them (so
the teacher's config file can be reused) and they are ignored, with a note; on the command line they are an error.
Checkpoints go to out_dir (default out-distill, even when a config file sets another: the teacher's, often). With
fold='all', '{fold}' in --teacher picks each fold's teacher, fine-tuned without that fold's test cells. The student's
checkpoints (out_dir/best.pt) are ordinary ones: predict.py annotates with them, bench.py times them
(--variants=out-distill/best.pt).

The honest control is the same student trained from scratch with the same budget:
    python train.py config/scbert2_small.py --dataset=data/baron1k --fold=all --n_layer=2 --out_dir=out-s2-2layers
"""
import os
import re
import sys
from dataclasses import fields, replace

import torch
import torch.nn.functional as F

import training
from data import UserError, load_checkpoint
from model import ModelConfig, ScBERT, token_valid

# -----------------------------------------------------------------------------
# distillation (training.py has the shared settings: data, folds, optimizer, masking, baseline, system)
out_dir = 'out-distill'        # the student's checkpoints and metrics (a config file's out_dir, often the teacher's, is
                               # not used: only --out_dir replaces this)
teacher = ''                   # teacher checkpoint (ours, or an original scBERT .pth; '{fold}' becomes the fold number,
                               # for fold='all'). The student is the teacher's architecture and input with fewer blocks
student_layers = ''            # teacher blocks that make the student, e.g. '0,2' ('' = every other one: 0, 2, 4, ...;
                               # a narrower student takes half the blocks, at random)
student_n_embd = 0             # a narrower student: random init, and a learned projection for the cosine loss (0 = as
                               # wide)
alpha_ce = 5.0                 # soft targets: KL(teacher/T ‖ student/T)·T², on the masked genes or on the cell-type
                               # logits
alpha_mlm = 2.0                # the student's own loss: masked modelling (pretraining) or cross-entropy to the labels
alpha_cos = 1.0                # cosine loss between the student's and the teacher's hidden states
alpha_mse = 1.0                # scBERT 2.0 pretraining: MSE between the student's and the teacher's predicted values
temperature = 2.0              # softmax temperature of the soft targets
# -----------------------------------------------------------------------------
# the teacher's: ModelConfig's fields and train.py's gene2vec and calibration_cells (seed is a shared setting)
MODEL_SETTINGS = ({f.name for f in fields(ModelConfig)} | {'gene2vec', 'calibration_cells'}) - set(training.SHARED)


def main():
    # config files first, then out_dir, then the command line: a config's out_dir (the teacher's, often) must not
    # receive the student
    configs = [arg for arg in sys.argv[1:] if not arg.startswith('-')]
    flags = [arg for arg in sys.argv[1:] if arg.startswith('-')]
    check_model_flags(flags)
    training.configure_settings(globals(), [*configs, f'--out_dir={out_dir}', *flags], ignored_in_files=MODEL_SETTINGS)
    check_settings()
    env = training.setup()
    data = training.load_dataset(env)
    results = [distil_run(run, env) for run in training.plan_runs(data, env)]
    training.summarize(results, env)
    training.teardown(env)


def distil_run(run, env):
    """Distil run's teacher into a student in run.dir -> the run's metrics (None if stopped early)."""
    teacher_model, teacher_path = load_teacher(run, env)
    torch.manual_seed(training.seed)
    student, ckpt = training.resume_checkpoint(run, env) if training.init_from == 'resume' else (None, None)
    if student is None:
        student = make_student(teacher_model)
    if training.compile:                                           # (after the student took the teacher's weights)
        teacher_model = torch.compile(teacher_model)
    t = training.start(run, student, ckpt, env, make_projection=projection_maker(student, teacher_model, env))
    if t.done:
        return training.already_finished(run, env)
    class_weight = training.class_weight_of(run, env)
    training.log_run(run, t, env)
    s = t.raw_model
    env.log(f'distilling {teacher_path} ({teacher_model.num_params() / 1e6:.2f}M parameters, '
            f'{teacher_model.config.n_layer} blocks) into a {s.config.n_layer}-block student '
            f'({s.num_params() / 1e6:.2f}M): {alpha_ce} x soft targets (T = {temperature}) + {alpha_mlm} x its own '
            f'loss + {alpha_cos} x cosine' + (f' + {alpha_mse} x value MSE' if training.mode == 'pretrain'
                                              and s.config.input_genes == 'expressed' else ''))

    def step_loss(model, x, targets):
        """DistilBERT's triple loss (and the value MSE)."""
        return distillation_loss(model, teacher_model, t.projection, x, targets, class_weight, env)

    if not training.train_loop(run, t, step_loss, env, teacher=teacher_model):
        return None
    return training.finish(run, t, env, teacher=teacher_model)


def projection_maker(student, teacher_model, env):
    """A narrower student's hidden states -> the teacher's width, for the cosine loss: a function that makes the
    projection (training.start calls it after making the optimizer), or None for a student as wide as its teacher."""
    if student.config.n_embd == teacher_model.config.n_embd:
        return None
    return lambda: torch.nn.Linear(student.config.n_embd, teacher_model.config.n_embd, bias=False).to(env.device)


# -----------------------------------------------------------------------------
# checks

def check_settings():
    training.check_settings()
    if not teacher:
        raise UserError("distill.py needs a teacher: --teacher=<a checkpoint: our best.pt or an original scBERT .pth>")
    if training.mode == 'finetune' and training.fold == 'all' and '{fold}' not in teacher:
        raise UserError("with fold='all' each fold needs the teacher fine-tuned without its test cells: put {fold} in "
                        "the path, e.g. --teacher='out/fold{fold}/best.pt'")
    if training.init_from not in ('scratch', 'resume'):
        raise UserError(f"the student is made from the teacher: use --init_from=scratch (or resume), not "
                        f"'{training.init_from}'")
    if temperature <= 0 or min(alpha_ce, alpha_mlm, alpha_cos, alpha_mse) < 0 or student_n_embd < 0:
        raise UserError('temperature must be > 0, and alpha_ce, alpha_mlm, alpha_cos, alpha_mse and student_n_embd '
                        '>= 0')


def check_model_flags(flags):
    """The student's architecture is the teacher's: a model setting on the command line is an error that says so."""
    given = [f[2:].partition('=')[0] for f in flags if f[2:].partition('=')[0] in MODEL_SETTINGS]
    if 'bitlinear' in given:
        raise UserError('bitlinear with a teacher is not supported: distil first, then train the student with '
                        'train.py --init_from=<its best.pt> --bitlinear=True')
    if given:
        raise UserError(f"{', '.join(given)}: the student's architecture is the teacher's (choose its size with "
                        f"--student_layers or --student_n_embd)")


# -----------------------------------------------------------------------------
# the teacher, and the student cut from it

def load_teacher(run, env):
    """The teacher of run (fold k), frozen, on the device: checked against the dataset's genes and labels, the task,
    and (fine-tuning) the fold, whose test cells the teacher must not have trained on. -> (teacher, its path)"""
    path = teacher.replace('{fold}', str(run.k))
    if os.path.abspath(path) in [os.path.abspath(os.path.join(run.dir, f)) for f in ('best.pt', 'ckpt.pt')]:
        raise UserError(f'the student would overwrite its teacher {path}: set another --out_dir')
    ckpt = load_checkpoint(path, 'teacher')
    if isinstance(ckpt, dict) and ckpt.get('quantization'):
        raise UserError(f"teacher {path} is quantized ({ckpt['quantization']}); distil from the float checkpoint")
    try:
        model = ScBERT.from_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, AssertionError) as e:
        raise UserError(f'teacher {path} is not a usable checkpoint ({type(e).__name__}: {str(e)[:200]})') from None
    check_teacher(model, ckpt, path, run)
    return model.to(env.device).eval().requires_grad_(False), path


def check_teacher(model, ckpt, path, run):
    """The teacher must know the run's genes, classify its cell types (fine-tuning) without having trained on its
    test cells, or (pretraining) still hold its masked-modelling head."""
    data, finetune = run.data, training.mode == 'finetune'
    training.check_vocab(ckpt, path, data)
    if model.config.n_genes != data.n_genes:
        raise UserError(f'teacher {path} was trained on {model.config.n_genes} genes, {training.dataset} has '
                        f'{data.n_genes}; distil on its own dataset, or prepare this one with --vocab=<its genes>')
    if finetune and (model.cls_head is None or model.config.n_classes != len(run.label_names)
                     or ckpt.get('label_names', run.label_names) != run.label_names):
        raise UserError(f"teacher {path} does not classify {training.dataset}'s {len(run.label_names)} cell types; "
                        f"fine-tune it on them first, or distil its pretraining with --mode=pretrain")
    tested = (ckpt.get('fold', run.k), ckpt.get('test_batch', training.test_batch))
    if finetune and tested != (run.k, training.test_batch):
        raise UserError(f"teacher {path} was fine-tuned with test fold {ckpt.get('fold')} "
                        f"{ckpt.get('test_batch') or ''}: it trained on this run's test cells; use the teacher of "
                        f"fold {run.k} ({{fold}} in --teacher)")
    if not finetune and (ckpt.get('mode') == 'finetune' or ('model_args' not in ckpt and model.cls_head is not None)):
        raise UserError(f'teacher {path} is fine-tuned: its masked-modelling head is stale or untrained. Distil it '
                        f'with --mode=finetune, or give its pretrained checkpoint')


def cut_student(teacher_model, layers, n_embd=0):
    """DistilBERT's student: the teacher's architecture with only the teacher blocks `layers` (DistilBERT keeps every
    other one), initialised from those blocks and the teacher's embeddings, final norm and heads. A narrower student
    (n_embd below the teacher's) has no weights to take, so it starts at random (a projection of its hidden states
    is then learned for the cosine loss)."""
    narrow = bool(n_embd) and n_embd != teacher_model.config.n_embd
    config = replace(teacher_model.config, n_layer=len(layers), n_embd=n_embd or teacher_model.config.n_embd,
                     freeze_gene_emb=teacher_model.config.freeze_gene_emb and not narrow)   # a random table must learn
    student = ScBERT(config)
    annotation = ('gene_chrom', 'gene_start', 'pathway_ptr', 'pathway_idx')   # gene facts, not weights: always kept
    student.load_state_dict({k: v for k, v in teacher_model.state_dict().items() if k in annotation}, strict=False)
    if not narrow:
        state = {}
        for name, value in teacher_model.state_dict().items():
            block = re.match(r'blocks\.(\d+)\.(.*)', name)
            if block is None:
                state[name] = value
            elif int(block[1]) in layers:                               # teacher block layers[j] -> student block j
                state[f'blocks.{layers.index(int(block[1]))}.{block[2]}'] = value
        student.load_state_dict(state)
    return student


def make_student(teacher_model):
    """The student of the settings: student_layers of the teacher's blocks (default every other one), or narrower
    (student_n_embd) at random. For pretraining it has no classifier."""
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
    student = cut_student(teacher_model, layers, student_n_embd)
    if training.mode == 'pretrain' and student.cls_head is not None:
        student.config.n_classes, student.cls_head = 0, None
    return student.cpu()


# -----------------------------------------------------------------------------
# the three losses

def kd_loss(student_logits, teacher_logits, temperature):
    """Soft-target loss (Hinton et al. 2015): KL(softmax(teacher / T) ‖ softmax(student / T)) · T², averaged over the
    rows of (..., n_classes) logits. The T² keeps its gradients the same size whatever T (they scale as 1/T²)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction='batchmean') * temperature ** 2


def cosine_loss(student_hidden, teacher_hidden, valid=None):
    """DistilBERT's cosine-embedding loss: 1 - cos(student, teacher) per token of (B, L, C) hidden states, averaged over
    the real tokens (valid (B, L) bool, None = all): it aligns the directions of the two models' hidden states."""
    loss = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)     # (B, L)
    return loss.mean() if valid is None else loss[valid].mean()


def distillation_loss(model, teacher_model, projection, x, targets, class_weight, env):
    """DistilBERT's triple loss: alpha_ce x soft targets (kd_loss) + alpha_mlm x the student's own loss + alpha_cos x
    the cosine between the two models' hidden states over the real tokens; for scBERT 2.0 pretraining also alpha_mse x
    the MSE to the teacher's predicted values. Soft targets and MSE are on the masked genes when pretraining (as
    DistilBERT's), on the cell-type logits when fine-tuning. Each term is scaled by its DDP share (per masked gene,
    per cell or per token). -> (the student's logits, its own loss (weighted, for the log), the total)."""
    finetune = training.mode == 'finetune'
    logits, own, hidden = model(x, targets, class_weight=class_weight, label_smoothing=training.label_smoothing,
                                mlm_weight=training.mlm_weight, regression_weight=training.regression_weight,
                                return_hidden=True)
    with torch.no_grad():
        t_logits, _, t_hidden = teacher_model(x, task='classify' if finetune else 'mlm', return_hidden=True)
    hidden = hidden if projection is None else projection(hidden)
    valid = token_valid(x)                                         # (B, L) real tokens, None = all
    n_tokens = valid.sum().float() if valid is not None else torch.tensor(float(hidden.shape[0] * hidden.shape[1]))
    share = training.loss_share(targets, class_weight, env)
    total = (alpha_mlm * own * share
             + alpha_cos * cosine_loss(hidden, t_hidden, valid) * training.global_share(n_tokens.to(env.device), env))
    if finetune:                                                   # a mean over cells
        cells = torch.tensor(float(len(targets)), device=env.device)
        soft = alpha_ce * kd_loss(logits, t_logits, temperature)
        return logits, own * share, total + soft * training.global_share(cells, env)
    if isinstance(logits, dict):                                   # expressed input: the masked bins and values
        sel = targets['bins'] != -100
        soft = (alpha_ce * kd_loss(logits['bins'][sel], t_logits['bins'][sel], temperature)
                + alpha_mse * F.mse_loss(logits['values'][sel].float(), t_logits['values'][sel].float()))
    else:
        sel = targets != -100
        soft = alpha_ce * kd_loss(logits[sel], t_logits[sel], temperature)
    return logits, own * share, total + soft * share               # means over the masked genes, as the own loss


if __name__ == '__main__':
    main()
