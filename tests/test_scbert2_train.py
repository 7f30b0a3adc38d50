"""train.py (and predict.py) end to end with scBERT 2.0's options, in-process on the 78 real Baron cells:
an expressed-input MoE fine-tunes and predicts, expressed pretraining logs the masked-value MSE and fine-tunes on,
DDP with MoE matches one process, --test_batch holds out a donor, and Adafactor trains. Every run is a few steps."""
import csv
import json
import re

import numpy as np
import pytest
import torch

from conftest import FIXTURES, state, torchrun, user_error
from conftest import run_script as run

SMALL = ['--n_embd=16', '--n_layer=1', '--n_head=4', '--dim_head=4', '--head_hidden=16', '--num_threads=1',
         '--batch_size=8', '--baseline=False']
# scBERT 2.0 with every option on: expressed genes, GQA, RMSNorm, SwiGLU, a top-2 MoE, the continuous value embedding
V2 = ['--input_genes=expressed', '--attention=sdpa', '--head=cls', '--n_kv_head=2', '--norm=rmsnorm', '--mlp=swiglu',
      '--n_expert=4', '--n_expert_active=2', '--value_emb=continuous', '--n_bins=7']


def check_expert_load(load, n_layer=1, n_expert=4):
    assert isinstance(load, list) and len(load) == n_layer and all(len(row) == n_expert for row in load)
    for row in load:                                       # shares of the uniform share: they sum to n_expert
        assert sum(row) == pytest.approx(n_expert, rel=1e-5) and min(row) >= 0


def test_finetune_expressed_moe_writes_outputs_and_predicts(baron, tmp_path):
    out = tmp_path / 'out'
    result = run('train.py', f'--dataset={baron}', f'--out_dir={out}', *SMALL, *V2, '--max_genes=64', '--max_iters=20',
                 '--eval_interval=10', '--log_interval=5', '--learning_rate=3e-3', '--warmup_iters=2')
    assert 'expert load' in result.stdout and re.search(r'aux \d\.\d+', result.stdout)
    assert 'test  scBERT 2.0 ' in result.stdout and 'expected time: about' in result.stdout   # named by its input
    for name in ('best.pt', 'ckpt.pt', 'metrics.json', 'loss.png', 'confusion.png', 'vocab.txt'):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['n_test'] == 16 and set(metrics['test']) >= {'accuracy', 'macro_f1', 'loss', 'expert_load'}
    assert 0 <= metrics['test']['accuracy'] <= 1
    check_expert_load(metrics['test']['expert_load'])
    check_expert_load(metrics['val']['expert_load'])
    best = state(out / 'best.pt')
    args = best['model_args']
    assert (args['input_genes'], args['value_emb'], args['n_expert'], args['n_expert_active'], args['n_kv_head'],
            args['norm'], args['mlp'], args['max_genes'], args['head']) == \
        ('expressed', 'continuous', 4, 2, 2, 'rmsnorm', 'swiglu', 64, 'cls')
    assert best['model']['blocks.0.mlp.w1'].shape[:2] == (4, 48)    # stacked experts: SwiGLU's hidden 8*ceil(128/3/8)
    assert best['model']['blocks.0.attn.to_k.weight'].shape == (2 * 4, 16)  # 2 key/value heads of width 4
    history = state(out / 'ckpt.pt')['history']
    assert all(np.isfinite(history['train_loss']))
    # the fine-tuned expressed model annotates an .h5ad: every cell, a known label, a probability
    source = FIXTURES / 'counts_csr.h5ad'
    run('predict.py', f'--ckpt={out / "best.pt"}', f'--input={source}', f'--output={tmp_path / "p.csv"}',
        f'--embeddings={tmp_path / "e.npy"}', '--novelty=off')
    rows = list(csv.reader(open(tmp_path / 'p.csv')))[1:]
    assert len(rows) == 78 and all(r[1] in best['label_names'] and 0 <= float(r[2]) <= 1 for r in rows)
    assert np.load(tmp_path / 'e.npy').shape == (78, 16)
    # and its probabilities are train.py's for the test cells: the same values, the same fixed gene subset per cell
    from data import Dataset
    data = Dataset(str(baron))
    by_id = {r[0]: r for r in rows}
    for cell, prob in zip(data.cell_ids[data.folds == 0], np.load(out / 'test_prob.npy')):
        assert by_id[cell][1] == best['label_names'][prob.argmax()]
        assert float(by_id[cell][2]) == pytest.approx(prob.max(), abs=1e-5)


def test_pretrain_expressed_then_finetune(baron, tmp_path):
    pre = tmp_path / 'pre'
    result = run('train.py', '--mode=pretrain', f'--dataset={baron}', f'--out_dir={pre}', *SMALL, *V2, '--max_genes=96',
                 '--n_zero_genes=8', '--max_iters=12', '--eval_interval=11', '--learning_rate=3e-3', '--warmup_iters=2',
                 '--mlm_weight=0.5', '--regression_weight=2.0')
    assert re.search(r'masked-value MSE \d+\.\d+ \(always the mean: \d+\.\d+\)', result.stdout), result.stdout[-2000:]
    assert 'masked-bin accuracy' in result.stdout
    ckpt = state(pre / 'ckpt.pt')
    history = ckpt['history']
    assert len(history['val_loss']) == 2 and all(np.isfinite(history['val_loss']))
    assert ckpt['model_args']['n_classes'] == 0 and 'value_head.weight' in ckpt['model']
    metrics = json.loads((pre / 'metrics.json').read_text())
    assert metrics['mode'] == 'pretrain'
    assert metrics['val']['masked_mse'] >= 0 and metrics['val']['mean_guess_mse'] > 0
    assert 0 <= metrics['val']['masked_acc'] <= 1
    check_expert_load(metrics['val']['expert_load'])
    assert (pre / 'best.pt').exists()
    # fine-tune from the pretrained best.pt: the encoder carries over, the classifier is new. The same flags as the
    # pretraining (as with a config file): train.py checks --head etc. before it reads the checkpoint
    fine = tmp_path / 'fine'
    run('train.py', f'--dataset={baron}', f'--out_dir={fine}', f'--init_from={pre / "best.pt"}', *SMALL, *V2,
        '--max_iters=3', '--eval_interval=2', '--finetune_params=head')
    pretrained, tuned = state(pre / 'best.pt'), state(fine / 'ckpt.pt')
    assert tuned['model_args']['n_classes'] == 13 and tuned['model_args']['input_genes'] == 'expressed'
    assert tuned['model_args']['n_expert'] == 4 and tuned['model_args']['value_emb'] == 'continuous'
    for key in ('blocks.0.attn.to_q.weight', 'blocks.0.mlp.w1', 'blocks.0.mlp.router.weight', 'value_emb.table'):
        assert torch.equal(tuned['model'][key], pretrained['model'][key]), key    # only the head trained
    assert 'cls_head.fc3.weight' in tuned['model']
    assert 'test' in json.loads((fine / 'metrics.json').read_text())


@pytest.mark.parametrize('mode', ['finetune', 'pretrain'])
def test_ddp_moe_two_processes_match_one(baron, tmp_path, mode):
    """Cells of different lengths pad differently on 2 ranks of 4 cells than in 1 batch of 8; the masked counts and
    class weights differ by rank. The loss, and so the trained weights, must still be those of one process.
    The MoE's auxiliary losses are off here: each rank computes load balancing (f_e, P_e) and the z-loss mean over its
    own tokens, as Switch does per device, so with them on the router drifts from one process's by ~2e-5 in 4 steps."""
    args = [f'--dataset={baron}', f'--mode={mode}', '--n_embd=16', '--n_layer=1', '--n_head=4', '--dim_head=4',
            '--head_hidden=16', *V2, '--max_genes=200', '--max_iters=4', '--eval_interval=3', '--baseline=False',
            f'--class_weights={mode == "finetune"}', '--aux_loss_weight=0', '--z_loss_weight=0']
    run('train.py', f'--out_dir={tmp_path / "one"}', *args, '--batch_size=8', '--num_threads=1')
    result = torchrun('train.py', f'--out_dir={tmp_path / "two"}', *args, '--batch_size=4')   # DDP: real processes
    assert 'Traceback' not in result.stderr
    one, two = state(tmp_path / 'one' / 'ckpt.pt'), state(tmp_path / 'two' / 'ckpt.pt')
    for k in one['model']:
        assert torch.allclose(one['model'][k].float(), two['model'][k].float(), atol=1e-5), k
    # the same model gives the same validation scores (the loss itself: see test_pretrain_val_loss_...)
    metric = 'val_macro_f1' if mode == 'finetune' else 'val_masked_acc'
    assert one['history'][metric] == two['history'][metric]
    if mode == 'finetune':
        assert one['history']['val_loss'] == pytest.approx(two['history']['val_loss'], rel=1e-5)
    load = json.loads((tmp_path / 'two' / 'metrics.json').read_text())['val']['expert_load']
    check_expert_load(load)


def test_pretrain_val_loss_does_not_depend_on_batch_size(baron, tmp_path):
    """With lr 0 the model stays at its initialisation, so the validation loss must be the same number whatever the
    batch size (evaluate() reads the validation cells in chunks of 2 * batch_size): the mean over the masked genes, as
    the training loss is. (Fine-tuning's is checked by the DDP test: batch 8 and 4 there, the same val loss.)"""
    args = [f'--dataset={baron}', '--mode=pretrain', *SMALL[:-2], *V2, '--max_genes=200', '--max_iters=1',
            '--eval_interval=1', '--baseline=False', '--learning_rate=0', '--min_lr=0']
    run('train.py', f'--out_dir={tmp_path / "b8"}', *args, '--batch_size=8')
    run('train.py', f'--out_dir={tmp_path / "b3"}', *args, '--batch_size=3')
    b8, b3 = state(tmp_path / 'b8' / 'ckpt.pt'), state(tmp_path / 'b3' / 'ckpt.pt')
    for k in b8['model']:
        assert torch.equal(b8['model'][k], b3['model'][k]), k
    assert b8['history']['val_masked_acc'] == b3['history']['val_masked_acc']          # the same masks, the same model
    assert b8['history']['val_loss'] == pytest.approx(b3['history']['val_loss'], rel=1e-5)


def test_test_batch_holds_out_a_donor(baron, tmp_path):
    out = tmp_path / 'out'
    result = run('train.py', f'--dataset={baron}', f'--out_dir={out}', *SMALL, *V2, '--max_genes=64', '--max_iters=3',
                 '--eval_interval=2', '--test_batch=mouse2')
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['n_test'] == 46                                           # every mouse2 cell, and only those
    assert metrics['n_train'] > 0 and metrics['n_val'] > 0
    assert metrics['n_train'] + metrics['n_val'] == 32                      # every mouse1 cell trains or validates
    assert re.search(r'fold 0: \d+ train / \d+ val / 46 test cells', result.stdout)
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "x"}', *SMALL, *V2, '--max_iters=2',
                   '--test_batch=nope', check=False), r"test_batch 'nope'.*mouse1, mouse2")
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "y"}', *SMALL, '--max_iters=2',
                   '--test_batch=mouse1', '--fold=all', check=False), 'test_batch')


def test_adafactor_trains_an_expressed_model(baron, tmp_path):
    out = tmp_path / 'out'
    run('train.py', f'--dataset={baron}', f'--out_dir={out}', *SMALL, '--input_genes=expressed', '--attention=sdpa',
        '--head=pooled', '--value_emb=quantile', '--max_genes=64', '--bias=False', '--optimizer=adafactor',
        '--learning_rate=1e-2', '--max_iters=6', '--eval_interval=5', '--log_interval=1', '--warmup_iters=0')
    ckpt = state(out / 'ckpt.pt')
    assert ckpt['model_args']['value_emb'] == 'quantile' and ckpt['model_args']['bias'] is False
    opt_state = ckpt['optimizer']['state']
    assert any('row_var' in s and 'col_var' in s for s in opt_state.values())       # Adafactor's factored moments
    assert not any('exp_avg' in s for s in opt_state.values())
    assert len(ckpt['history']['train_loss']) == 6 and all(np.isfinite(ckpt['history']['train_loss']))
    assert 'test' in json.loads((out / 'metrics.json').read_text())


def test_background_workers_and_streaming_give_the_same_run(baron, tmp_path):
    """Batches built by 2 DataLoader workers from a dataset streamed from disk (preload=False) are the batches built
    in the training process from memory: the two runs end with the same weights."""
    common = [f'--dataset={baron}', *SMALL, *V2, '--max_genes=64', '--max_iters=4', '--eval_interval=3']
    run('train.py', *common, f'--out_dir={tmp_path / "a"}')
    result = run('train.py', *common, f'--out_dir={tmp_path / "b"}', '--num_workers=2', '--preload=False')
    assert 'streaming' in result.stdout and re.search(r'data \d+ ms / compute \d+ ms', result.stdout)
    a, b = state(tmp_path / 'a' / 'ckpt.pt')['model'], state(tmp_path / 'b' / 'ckpt.pt')['model']
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_bucketing_by_length_cuts_the_padding(baron, tmp_path):
    """--bucket batches cells of similar length together: the logged padding share drops, and training still runs."""
    shares = {}
    for bucket in (False, True):
        result = run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / str(bucket)}', *SMALL, *V2,
                     f'--bucket={bucket}', '--max_iters=8', '--log_interval=1', '--eval_interval=100')
        shares[bucket] = np.mean([float(s) for s in re.findall(r'padding (\d+)%', result.stdout)])
    assert shares[True] < 0.5 * shares[False], shares
