"""The fine-tuning recipe: a budget in epochs, early stopping (patience), class-balanced sampling, label smoothing."""
import json
import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import training
from data import model_input
from conftest import TINY, run_script, small, state, user_error

# a run whose validation cannot improve: nothing learns (learning rate 0), so the best stays at iteration 0
FROZEN = [*TINY, '--learning_rate=0', '--min_lr=0', '--baseline=False', '--eval_interval=5', '--patience=3',
          '--max_iters=100', '--epochs=0']


def test_early_stopping_stops_after_patience_evaluations(baron, tmp_path):
    out = tmp_path / 'out'
    result = run_script('train.py', f'--dataset={baron}', f'--out_dir={out}', *FROZEN)
    # evaluations at 0 (the best), 5, 10, 15: three without improvement
    assert 'fold 0: stopped at iteration 15: validation macro_f1 has not improved for 3 evaluations (patience)' \
        in result.stdout, result.stdout
    metrics = json.loads((out / 'metrics.json').read_text())
    assert (metrics['best_iter'], metrics['last_iter'], metrics['budget']) == (0, 15, 100)
    assert 'patience' in metrics['stopped'] and 'test' in metrics         # the test fold is still scored
    assert state(out / 'ckpt.pt')['history']['val_iter'] == [0, 5, 10, 15]


def test_resume_in_the_middle_of_a_patience_window_counts_on(baron, tmp_path):
    """Killed after the evaluation at 5 (one without improvement), resumed: it stops at 15 as the whole run does,
    not 3 evaluations after the resume."""
    out = tmp_path / 'out'
    args = [f'--dataset={baron}', f'--out_dir={out}', *FROZEN]
    run_script('train.py', *args, '--stop_iter=7')
    assert state(out / 'ckpt.pt')['iter_num'] == 5
    result = run_script('train.py', *args, '--init_from=resume')
    assert 'iteration 6 of 100 is next' in result.stdout
    assert 'stopped at iteration 15: validation macro_f1 has not improved for 3 evaluations' in result.stdout
    assert state(out / 'ckpt.pt')['history']['val_iter'] == [0, 5, 10, 15]


def test_the_budget_is_in_epochs_capped_by_max_iters(baron, tmp_path):
    out = tmp_path / 'out'
    result = run_script('train.py', f'--dataset={baron}', f'--out_dir={out}', *TINY, '--baseline=False',
                        '--epochs=2', '--eval_interval=100', '--patience=0')
    metrics = json.loads((out / 'metrics.json').read_text())
    steps = math.ceil(2 * metrics['n_train'] / 8)                          # batch_size 8 (TINY), one process
    assert metrics['budget'] == steps and metrics['last_iter'] == steps - 1
    assert f"the budget of {steps} steps (2 epochs of {metrics['n_train']} cells, 8 per step) is spent" in result.stdout
    capped = run_script('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "capped"}', *TINY,
                        '--baseline=False', '--epochs=2', '--max_iters=3', '--patience=0')
    assert 'the budget of 3 steps (max_iters) is spent' in capped.stdout


def draw_classes(monkeypatch, balance, counts, steps):
    """The cell types batch_indices draws over `steps` steps of 10 cells, for a training set of these counts."""
    labels = np.repeat(np.arange(len(counts)), counts)
    monkeypatch.setattr(training, 'class_balance', balance)
    monkeypatch.setattr(training, 'batch_size', 10)
    monkeypatch.setattr(training, 'bucket', False)
    weights = training.sampling_weights(labels) if balance else None
    run = SimpleNamespace(train_idx=np.arange(len(labels)), weights=weights)
    env = SimpleNamespace(world_size=1, rank=0)
    drawn = np.concatenate([training.batch_indices(run, step, None, env) for step in range(steps)])
    return np.bincount(labels[drawn], minlength=len(counts)) / len(drawn)


def test_class_balanced_sampling_draws_types_as_n_to_the_1_minus_alpha(monkeypatch):
    counts = np.array([200, 50, 10])
    # as they come: each epoch is a permutation, so the types come exactly in their proportions
    assert np.allclose(draw_classes(monkeypatch, 0.0, counts, 26 * 40), counts / counts.sum())
    for balance in (0.5, 1.0):
        expected = counts ** (1 - balance) / (counts ** (1 - balance)).sum()
        freq = draw_classes(monkeypatch, balance, counts, 26 * 100)          # 26,000 cells
        assert np.abs(freq - expected).max() < 0.015, (balance, freq, expected)
    # the same cells for the same step, whatever came before (resume draws what the killed run would have)
    labels = np.repeat(np.arange(3), counts)
    run = SimpleNamespace(train_idx=np.arange(len(labels)), weights=training.sampling_weights(labels))
    env = SimpleNamespace(world_size=1, rank=0)
    assert np.array_equal(training.batch_indices(run, 77, None, env), training.batch_indices(run, 77, None, env))


def test_label_smoothing_is_the_classifier_loss():
    torch.manual_seed(0)
    model = small()
    csr = (np.array([0, 3, 7]), np.array([0, 1, 2, 3, 4, 5, 6]), np.random.default_rng(0).random(7, np.float32))
    x = model_input(csr, model.config, 2.0)
    targets = torch.tensor([0, 1])
    logits, loss = model(x, targets, label_smoothing=0.2)
    assert torch.allclose(loss, F.cross_entropy(logits, targets, label_smoothing=0.2))
    assert not torch.allclose(loss, model(x, targets)[1])


def test_bad_recipe_settings(baron, tmp_path):
    args = [f'--dataset={baron}', f'--out_dir={tmp_path}', *TINY]
    user_error(run_script('train.py', *args, '--patience=-1', check=False), r'patience \(-1\) must be 0 \(off\)')
    user_error(run_script('train.py', *args, '--class_balance=2', check=False), r'class_balance \(2.0\) must be in')
    user_error(run_script('train.py', *args, '--mode=pretrain', '--label_smoothing=0.1', check=False),
               'pretraining has none of')
