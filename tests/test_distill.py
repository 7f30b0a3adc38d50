"""Distillation (DistilBERT): each loss term on toy tensors, the student's initialisation from the teacher's blocks, and
distill.py end to end on the 78 real Baron cells: distillation raises the student's agreement with its teacher, for
fine-tuning and for pretraining, and its checkpoint annotates with predict.py."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, V2, run_distill, state, torchrun, user_error
from conftest import V2_SMALL as SMALL
from conftest import run_script as run
from distill import MODEL_SETTINGS, cosine_loss, cut_student, kd_loss
from model import ModelConfig, ScBERT


def test_kd_loss_is_the_kl_of_softened_distributions_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    for T in (1.0, 2.0, 4.0):
        p_t, log_p_s = (teacher / T).softmax(-1), (student / T).log_softmax(-1)
        by_hand = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * T ** 2
        assert kd_loss(student, teacher, T).item() == pytest.approx(by_hand.item(), rel=1e-5)
        # the gradient is T (p_s - p_t) / rows: the T² factor keeps it the size of a T = 1 loss
        grad, = torch.autograd.grad(kd_loss(student, teacher, T), student)
        assert torch.allclose(grad, T * ((student / T).softmax(-1) - p_t).detach() / 6, atol=1e-6)
    assert kd_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # any leading shape: (B, T, n_bins) logits of the masked genes are rows too
    assert kd_loss(student.view(2, 3, 5), teacher.view(2, 3, 5), 2.0).item() == pytest.approx(
        kd_loss(student, teacher, 2.0).item())


def test_cosine_loss_on_known_directions():
    h = torch.randn(2, 3, 8)
    assert cosine_loss(h, 3 * h).item() == pytest.approx(0.0, abs=1e-6)       # same direction, any length
    assert cosine_loss(h, -h).item() == pytest.approx(2.0)
    e0, e1 = torch.eye(8)[0].expand(2, 3, 8), torch.eye(8)[1].expand(2, 3, 8)
    assert cosine_loss(e0, e1).item() == pytest.approx(1.0)                   # orthogonal
    valid = torch.tensor([[True, True, False], [True, False, False]])
    junk = h.clone()
    junk[~valid] = -junk[~valid]                                              # padding disagrees completely
    assert cosine_loss(h, junk, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_the_students_own_mlm_loss_is_cross_entropy_on_the_masked_genes_only():
    torch.manual_seed(0)
    model = ScBERT(ModelConfig(n_genes=12, n_embd=16, n_layer=1, n_head=2, dim_head=8))
    tokens = torch.randint(0, 6, (2, 13))
    targets = torch.full((2, 13), -100)
    targets[0, 3], targets[1, 7] = 2, 4
    logits, loss = model(tokens, targets)
    by_hand = (F.cross_entropy(logits[0, 3], torch.tensor(2)) + F.cross_entropy(logits[1, 7], torch.tensor(4))) / 2
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize('expressed', [False, True])
def test_student_is_made_of_the_chosen_teacher_blocks(expressed):
    args = dict(n_genes=30, n_embd=16, n_layer=4, n_head=2, dim_head=8, n_classes=3, head='pooled')
    if expressed:
        args.update(input_genes='expressed', attention='sdpa', value_emb='continuous', n_expert=2, n_kv_head=1)
    torch.manual_seed(0)
    teacher = ScBERT(ModelConfig(**args))
    student = cut_student(teacher, [0, 2])                       # DistilBERT: every other block
    assert student.config.n_layer == 2 and student.num_params() < teacher.num_params()
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in s.items():
        if name.startswith('blocks.'):
            j, rest = name.split('.', 2)[1:]
            assert torch.equal(value, t[f'blocks.{[0, 2][int(j)]}.{rest}']), name
        else:                                                       # embeddings, final norm, heads
            assert torch.equal(value, t[name]), name
    # a "student" of every block is the teacher itself
    x = (torch.randint(0, 6, (2, 31)) if not expressed else
         {'genes': torch.tensor([[3, 7, 9], [1, 2, -1]]), 'values': torch.rand(2, 3),
          'bins': torch.randint(1, 5, (2, 3))})
    whole = cut_student(teacher, [0, 1, 2, 3]).eval()
    assert torch.equal(whole(x)[0], teacher.eval()(x)[0])
    # blocks 1 and 3 instead; a narrower student starts at random with the teacher's other settings
    assert torch.equal(cut_student(teacher, [1, 3]).state_dict()['blocks.1.ln_1.weight'], t['blocks.3.ln_1.weight'])
    narrow = cut_student(teacher, [0, 2], n_embd=8)
    assert narrow.config.n_embd == 8 and narrow.config.n_layer == 2 and narrow.config.n_head == 2
    assert narrow.gene_emb.weight.shape == (31, 8)
    frozen = ScBERT(ModelConfig(**args, freeze_gene_emb=True))                  # a gene2vec teacher
    assert cut_student(frozen, [0, 2], n_embd=8).gene_emb.weight.requires_grad
    assert not cut_student(frozen, [0, 2]).gene_emb.weight.requires_grad


@pytest.fixture
def teacher(scbert2_model):
    """A small scBERT 2.0 (2 blocks, MoE) fine-tuned on the Baron cells (conftest's scbert2_model: read only)."""
    return scbert2_model


def test_distillation_raises_agreement_with_the_teacher(baron, teacher, tmp_path):
    """A narrower student starts at random; distilling makes it predict what its teacher predicts. No labels
    (alpha_mlm = 0): what it learns, it learns from the teacher."""
    out = tmp_path / 'student'
    result = run_distill(f'--dataset={baron}', f'--teacher={teacher}', f'--out_dir={out}', '--num_threads=1',
                 '--batch_size=8', '--baseline=False', '--student_n_embd=8', '--max_iters=60', '--eval_interval=10',
                 '--learning_rate=1e-2', '--warmup_iters=2', '--alpha_mlm=0', '--patience=0')   # all 60 steps
    assert 'distilling' in result.stdout and 'agrees with the teacher' in result.stdout
    assert 'test  distilled scBERT 2.0 ' in result.stdout                 # the log names the model
    assert json.loads((out / 'metrics.json').read_text())['model'] == 'distilled scBERT 2.0'
    ckpt = state(out / 'ckpt.pt')
    agreement = ckpt['history']['val_teacher_agreement']
    assert len(agreement) == 7 and agreement[-1] >= 0.6 and agreement[-1] >= agreement[0] + 0.3   # 16 cells
    assert ckpt['projection']['weight'].shape == (16, 8)              # student width 8 -> teacher width 16
    assert ckpt['model_args']['n_layer'] == 1 and ckpt['model_args']['n_embd'] == 8   # half of 2 blocks
    metrics = json.loads((out / 'metrics.json').read_text())
    assert 0 <= metrics['test']['teacher_agreement'] <= 1
    # the student is an ordinary checkpoint: predict.py annotates with it
    run('predict.py', f'--ckpt={out / "best.pt"}', f'--input={FIXTURES / "counts_csr.h5ad"}',
        f'--output={tmp_path / "p.csv"}')
    assert len((tmp_path / 'p.csv').read_text().splitlines()) == 79


def test_half_depth_student_starts_from_the_teacher(baron, teacher, tmp_path):
    """The default student (block 0 of the teacher's 2) keeps the teacher's embeddings and head, and resumes."""
    out = tmp_path / 'student'
    common = [f'--dataset={baron}', f'--teacher={teacher}', f'--out_dir={out}', '--num_threads=1', '--batch_size=8',
              '--baseline=False', '--max_iters=6', '--eval_interval=3', '--learning_rate=1e-4', '--warmup_iters=1']
    run_distill(*common, '--stop_iter=3')
    t, s = state(teacher)['model'], state(out / 'ckpt.pt')['model']
    assert s['blocks.0.attn.to_q.weight'].shape == t['blocks.0.attn.to_q.weight'].shape
    assert 'blocks.1.ln_1.weight' not in s
    assert torch.allclose(s['gene_emb.weight'], t['gene_emb.weight'], atol=0.05)     # 4 small steps from the teacher's
    run_distill(*common, '--init_from=resume')
    straight = tmp_path / 'straight'
    run_distill(*[c if not c.startswith('--out_dir') else f'--out_dir={straight}' for c in common])
    a, b = state(out / 'ckpt.pt')['model'], state(straight / 'ckpt.pt')['model']
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)                      # resume = one run


def test_pretraining_distillation_with_values(baron, tmp_path):
    teacher_dir, out = tmp_path / 'teacher', tmp_path / 'student'
    run('train.py', '--mode=pretrain', f'--dataset={baron}', f'--out_dir={teacher_dir}', *SMALL, *V2, '--n_layer=2',
        '--max_iters=20', '--eval_interval=10', '--learning_rate=3e-3', '--warmup_iters=2')
    result = run_distill('--mode=pretrain', f'--dataset={baron}', f'--teacher={teacher_dir / "best.pt"}',
                 f'--out_dir={out}', '--num_threads=1', '--batch_size=8', '--max_iters=20', '--eval_interval=10',
                 '--learning_rate=3e-3', '--warmup_iters=2')
    assert 'value MSE' in result.stdout and 'masked-bin accuracy' in result.stdout
    history = state(out / 'ckpt.pt')['history']
    assert len(history['val_teacher_agreement']) == 3 and all(np.isfinite(history['train_loss']))
    assert state(out / 'best.pt')['model_args']['n_classes'] == 0


def test_bad_distillation_input(baron, teacher, tmp_path):
    out = f'--out_dir={tmp_path / "o"}'
    for args, pattern in (([], 'needs a teacher'),
                          ([f'--teacher={tmp_path / "none.pt"}'], r'not found \(check --teacher'),
                          ([f'--teacher={teacher}', '--student_layers=1,0'], 'student_layers'),
                          ([f'--teacher={teacher}', '--temperature=0'], 'temperature'),
                          ([f'--teacher={teacher}', '--student_layers=0,1'], 'smaller than the teacher'),
                          ([f'--teacher={teacher}', '--student_n_embd=16'], 'smaller than the teacher'),
                          ([f'--teacher={teacher}', '--student_n_embd=8', '--student_layers=1'], 'no teacher blocks'),
                          ([f'--teacher={teacher}', '--fold=1'], 'test fold 0'),          # it saw fold 1's test cells
                          ([f'--teacher={teacher}', '--fold=all'], '{fold}'),
                          ([f'--teacher={teacher}', '--mode=pretrain'], 'is fine-tuned'),
                          ([f'--teacher={teacher}', f'--out_dir={teacher.parent}'], 'overwrite its teacher'),
                          ([f'--teacher={teacher}', '--n_layer=1'], "architecture is the teacher's")):
        result = run_distill(f'--dataset={baron}', out, *args, check=False)
        user_error(result, pattern)
        assert not (tmp_path / 'o').exists()                      # nothing written
    assert 'alpha_ce' in run_distill('--help').stdout


@pytest.mark.parametrize('kind', ['scbert', 'expressed', 'expressed_pretrain'])
def test_ddp_distillation_matches_one_process(baron, tmp_path, kind):
    """Two gloo processes of 4 cells = one of 8: each loss term is a mean over the global batch (cells, masked genes or
    tokens, which differ between the ranks for expressed input), and the narrower student's projection, outside DDP's
    model, is averaged too."""
    tiny = [f'--dataset={baron}', '--n_embd=16', '--n_layer=2', '--n_head=2', '--dim_head=8', '--head_hidden=16',
            '--baseline=False', '--eval_interval=100', f'--mode={"pretrain" if "pretrain" in kind else "finetune"}']
    if kind != 'scbert':                                  # no MoE: its balancing loss is per rank, as in Switch
        tiny += [a for a in V2 if not a.startswith('--n_expert')] + ['--max_genes=64']
    run('train.py', *tiny, f'--out_dir={tmp_path / "teacher"}', '--max_iters=10', '--batch_size=8', '--num_threads=1')
    args = [a for a in tiny if a[2:].partition('=')[0] not in MODEL_SETTINGS]     # the student's are the teacher's
    args += [f'--teacher={tmp_path / "teacher" / "best.pt"}', '--student_n_embd=8', '--max_iters=5']
    run_distill(*args, f'--out_dir={tmp_path / "one"}', '--batch_size=8', '--num_threads=1')
    torchrun('distill.py', *args, f'--out_dir={tmp_path / "two"}', '--batch_size=4')      # DDP: real processes
    one, two = state(tmp_path / 'one' / 'ckpt.pt'), state(tmp_path / 'two' / 'ckpt.pt')
    for k in one['model']:
        assert torch.allclose(one['model'][k].float(), two['model'][k].float(), atol=1e-5), k
    assert torch.allclose(one['projection']['weight'], two['projection']['weight'], atol=1e-5)
