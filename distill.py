"""
Distil a trained model (the teacher) into a smaller, faster student, as DistilBERT did for BERT (Sanh et al. 2019).

    # fine-tuned teacher -> half-depth student, on the teacher's data, one fold or every fold ({fold} = its number)
    python distill.py config/scbert2_small.py --dataset=data/baron1k --teacher=out-s2-baron1k/fold0/best.pt --fold=0
    python distill.py config/scbert2_small.py --dataset=data/baron1k --fold=all --teacher='out-s2-baron1k/fold{fold}/best.pt'
    # pretrained teacher -> pretrained student (masked modelling), on 8 GPUs
    torchrun --nproc_per_node=8 distill.py config/scbert2.py --teacher=out-scbert2/best.pt --out_dir=out-scbert2-student
    python distill.py --teacher=out/best.pt --student_layers=0,3        # your choice of teacher blocks
    python distill.py --teacher=out/best.pt --student_n_embd=32         # narrower: half the blocks, at random

The student is the teacher's architecture with fewer blocks: by default every other one (0, 2, 4, ...), initialised
from those teacher blocks and from the teacher's embeddings, final norm and heads. A narrower student
(--student_n_embd) starts at random, and a learned projection maps its hidden states to the teacher's width for the
cosine loss. The teacher can be any checkpoint: ours (scBERT or scBERT 2.0, pretrained or fine-tuned) or an original
scBERT .pth. It is frozen; each step runs it on the same cells as the student and trains the student on

    alpha_ce  x KL(softmax(teacher / T) ‖ softmax(student / T)) · T²     soft targets: the masked genes' bins
                                                                          (pretraining), or the cell-type logits
  + alpha_mlm x the student's own loss                                   masked modelling, or cross-entropy to labels
  + alpha_cos x (1 - cos(student hidden state, teacher hidden state))    every real token
  + alpha_mse x MSE(student value, teacher value)                        scBERT 2.0 pretraining: the masked values

with DistilBERT's weights 5 / 2 / 1 and T = 2 (alpha_mse 1). Validation and test also report how often the student
predicts what the teacher does.

The training itself (folds, batches, masking, AdamW/Adafactor, warm-up then decay, AMP, DDP, resume, atomic
checkpoints, metrics, the logistic-regression baseline) is train.py's, shared rather than copied: this script checks
that a teacher is given and runs train.py, which defines these settings (`python distill.py --help` lists them with
the rest of train.py's). Every train.py setting works here; the model's (n_layer, n_embd, ...) are the teacher's.
With fold='all', '{fold}' in --teacher picks each fold's teacher, fine-tuned without that fold's test cells. The student's checkpoints (out_dir/best.pt) are
ordinary ones: predict.py annotates with them, bench.py times them (--variants=out-distill/best.pt).

The honest control is the same student trained from scratch with the same budget, which train.py gives:
    python train.py config/scbert2_small.py --dataset=data/baron1k --fold=all --n_layer=2 --out_dir=out-s2-2layers
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
configs = [arg for arg in sys.argv[1:] if not arg.startswith('-')]
flags = [arg for arg in sys.argv[1:] if arg.startswith('-')]
if '-h' in flags or '--help' in flags:
    print(__doc__ + "\ntrain.py's settings (the distillation ones: teacher, student_layers, student_n_embd, alpha_ce, "
          "alpha_mlm, alpha_cos, alpha_mse, temperature):\n", flush=True)
# Replace this process with train.py's (under torchrun each rank does the same, keeping its RANK and WORLD_SIZE).
# The config files first, then our out_dir, then the command line's settings: a config's out_dir (the teacher's,
# often) must not receive the student. NANOSCBERT_DISTILL makes train.py insist on a teacher.
os.environ['NANOSCBERT_DISTILL'] = '1'
os.execv(sys.executable, [sys.executable, os.path.join(HERE, 'train.py'), *configs, '--out_dir=out-distill', *flags])
