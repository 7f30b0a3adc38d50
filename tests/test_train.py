"""train.py and predict.py end to end, in-process on small real data: loss falls, resume is exact, DDP matches one
process, original scBERT checkpoints fine-tune and predict, bad input fails cleanly, and the README quick start runs."""
import argparse
import csv
import json
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT, SHARED, TINY, state, torchrun, user_error, write_h5ad
from conftest import run_script as run


def test_finetune_loss_falls_and_writes_outputs(scbert_model):
    out, _ = scbert_model                                      # 60 steps, lr 3e-3, eval every 20, with the baseline
    ckpt = state(out / 'ckpt.pt')
    loss = ckpt['history']['train_loss']                       # starts at ln(13 classes) = 2.56
    assert np.mean(loss[-3:]) < 0.85 * np.mean(loss[:2]), loss
    metrics = json.loads((out / 'metrics.json').read_text())
    assert set(metrics['test']) >= {'accuracy', 'macro_f1', 'weighted_f1', 'per_class', 'macro_auroc', 'confusion'}
    assert metrics['n_test'] == sum(metrics['test']['per_class'][c]['support'] for c in metrics['test']['per_class'])
    assert set(metrics['baseline']) >= {'accuracy', 'macro_f1'}
    for name in ('best.pt', 'loss.png', 'confusion.png', 'vocab.txt'):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob('*.tmp*'))


def test_pretrain_loss_falls(baron, scbert_pretrained, tmp_path):
    out, result = scbert_pretrained                            # 60 steps, lr 3e-3, evaluated at 0 and 59
    history = state(out / 'ckpt.pt')['history']
    assert history['val_loss'][-1] < history['val_loss'][0] - 0.2, history['val_loss']
    assert history['val_masked_acc'][-1] > history['val_masked_acc'][0]
    assert 'masked-bin accuracy' in result.stdout and 'always the commonest bin' in result.stdout
    # fine-tune from that pretrained checkpoint: the encoder carries over, the classifier is new
    fine = tmp_path / 'fine'
    run('train.py', f'--dataset={baron}', f'--out_dir={fine}', f'--init_from={out / "ckpt.pt"}', *TINY, '--max_iters=2',
        '--eval_interval=1', '--baseline=False', '--finetune_params=head')
    pretrained, tuned = state(out / 'ckpt.pt'), state(fine / 'ckpt.pt')
    assert tuned['model_args']['n_classes'] == 13 and pretrained['model_args']['n_classes'] == 0
    assert torch.equal(tuned['model']['blocks.0.attn.to_q.weight'], pretrained['model']['blocks.0.attn.to_q.weight'])
    assert 'cls_head.fc3.weight' in tuned['model']


def test_cross_validation_over_all_folds(baron, tmp_path):
    out = tmp_path / 'cv'
    args = [f'--dataset={baron}', f'--out_dir={out}', *TINY, '--max_iters=3', '--eval_interval=2', '--fold=all']
    result = run('train.py', *args)
    summary = json.loads((out / 'metrics.json').read_text())
    assert summary['n_folds'] == 5 and [f['fold'] for f in summary['folds']] == [0, 1, 2, 3, 4]
    accuracies = [f['test']['accuracy'] for f in summary['folds']]
    assert summary['summary']['test']['accuracy']['mean'] == pytest.approx(np.mean(accuracies))
    assert summary['summary']['test']['accuracy']['sd'] == pytest.approx(np.std(accuracies, ddof=1))
    assert re.search(r'5-fold CV +scBERT +accuracy \d\.\d+ ± \d\.\d+ +macro-F1', result.stdout)
    assert re.search(r'5-fold CV +logistic regression', result.stdout)
    # every test cell is scored once: the test folds partition the labelled cells
    assert sum(f['n_test'] for f in summary['folds']) == 78
    # resuming a finished cross-validation redoes nothing and reports the same
    again = run('train.py', *args, '--init_from=resume')
    assert again.stdout.count('already finished') == 5
    assert json.loads((out / 'metrics.json').read_text())['summary'] == summary['summary']


def test_resume_reaches_the_same_result(baron, tmp_path):
    args = [f'--dataset={baron}', *TINY, '--max_iters=24', '--eval_interval=8', '--baseline=False', '--dropout=0.1',
            '--feature_redraw_interval=5']                     # redraws on both sides of the kill
    run('train.py', f'--out_dir={tmp_path / "a"}', *args)
    run('train.py', f'--out_dir={tmp_path / "b"}', *args, '--stop_iter=13')        # "killed" between checkpoints
    assert state(tmp_path / 'b' / 'ckpt.pt')['iter_num'] == 8
    run('train.py', f'--out_dir={tmp_path / "b"}', *args, '--init_from=resume')
    a, b = state(tmp_path / 'a' / 'ckpt.pt'), state(tmp_path / 'b' / 'ckpt.pt')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    ma, mb = (json.loads((tmp_path / d / 'metrics.json').read_text()) for d in 'ab')
    assert ma['test'] == mb['test'] and ma['best_iter'] == mb['best_iter']


def test_resume_says_what_it_did_and_keeps_the_settings(baron, tmp_path):
    """A resumed run says so in one line; a changed learning rate is refused, or allowed by name and reported."""
    out = tmp_path / 'out'
    args = [f'--dataset={baron}', *TINY, f'--out_dir={out}', '--max_iters=12', '--eval_interval=4', '--baseline=False']
    run('train.py', *args, '--stop_iter=5')
    refused = run('train.py', *args, '--init_from=resume', '--learning_rate=2e-3', check=False)
    user_error(refused, r"learning_rate 0\.001 -> 0\.002.*--resume_changes=learning_rate")
    user_error(run('train.py', *args, '--init_from=resume', '--resume_changes=lr', check=False), 'not settings')
    result = run('train.py', *args, '--init_from=resume', '--learning_rate=2e-3', '--resume_changes=learning_rate',
                 '--num_threads=2')                               # num_threads is free to change
    assert re.search(rf'resumed {re.escape(str(out / "ckpt.pt"))}: iteration 5 of 12 is next; best validation so far: '
                     r'macro-F1 [0-9.]+ at iteration 4', result.stdout), result.stdout
    assert "resume changes learning_rate 0.001 -> 0.002" in result.stdout
    assert 'num_threads' not in result.stdout and 'note: the model comes from' not in result.stdout


def test_a_pickled_checkpoint_is_refused_for_safety(baron, tmp_path):
    """A file holding Python objects is not called corrupt: it is refused for safety, with the way out."""
    path = tmp_path / 'pickled.pt'
    torch.save({'model': {}, 'args': argparse.Namespace(lr=1)}, path)
    for script, setting in (('train.py', f'--init_from={path}'), ('predict.py', f'--ckpt={path}'),
                            ('bench.py', f'--variants={path}'), ('quantize.py', f'--ckpt={path}')):
        data = f'--dataset={baron}' if script != 'predict.py' else f'--input={FIXTURES / "counts_csr.h5ad"}'
        other = f'--out_dir={tmp_path / "o"}' if script == 'train.py' else '--num_threads=1'
        user_error(run(script, data, setting, other, check=False),
                   r'holds Python objects besides tensors, and is refused for safety.*weights_only=False')


@pytest.mark.parametrize('mode', ['finetune', 'pretrain'])
def test_ddp_two_processes_match_one(baron, tmp_path, mode):
    # pretraining: the ranks mask different numbers of genes; class weights: different weight sums. Either way the loss
    # must be the mean over the global batch, as in one process.
    args = [f'--dataset={baron}', f'--mode={mode}', '--n_embd=16', '--n_layer=1', '--n_head=2', '--dim_head=8',
            '--head_hidden=16', '--max_iters=6', '--eval_interval=100', '--baseline=False',
            '--feature_redraw_interval=2', f'--class_weights={mode == "finetune"}']
    run('train.py', f'--out_dir={tmp_path / "one"}', *args, '--batch_size=8', '--num_threads=1')
    torchrun('train.py', f'--out_dir={tmp_path / "two"}', *args, '--batch_size=4')        # DDP: real processes
    one, two = state(tmp_path / 'one' / 'ckpt.pt'), state(tmp_path / 'two' / 'ckpt.pt')
    for k in one['model']:
        assert torch.allclose(one['model'][k].float(), two['model'][k].float(), atol=1e-5), k
    assert int(two['model']['n_redraws']) == int(one['model']['n_redraws']) > 0
    # the logged training loss is the global batch's under DDP too, not rank 0's own
    np.testing.assert_allclose(two['history']['train_loss'], one['history']['train_loss'], rtol=1e-5)


def test_predict_end_to_end(scbert_model, tmp_path):
    out, _ = scbert_model                                      # read only: every output goes to tmp_path
    source = FIXTURES / 'counts_csr.h5ad'
    result = run('predict.py', f'--ckpt={out / "best.pt"}', f'--input={source}', f'--output={tmp_path / "p.csv"}',
                 f'--output_h5ad={tmp_path / "p.h5ad"}', f'--embeddings={tmp_path / "e.npy"}',
                 '--novelty=off', '--min_genes=150')
    assert 'matched 385 / vocab 385 / data 385' in result.stdout
    rows = list(csv.reader(open(tmp_path / 'p.csv')))
    assert rows[0] == ['cell_id', 'predicted_label', 'probability', 'second_label', 'second_probability',
                       'novelty_score', 'top_label', 'top_probability']
    assert all(r[1] == r[6] and r[2] == r[7] for r in rows[1:])                # novelty=off: every cell kept
    with h5py.File(source) as f:
        n_cells = f['X/indptr'].shape[0] - 1
    assert len(rows) == n_cells + 1                                          # every cell, none dropped
    labels = state(out / 'best.pt')['label_names']
    for row in rows[1:]:
        assert row[1] in labels and row[3] in labels and 1 >= float(row[2]) >= float(row[4]) >= 0
    assert np.load(tmp_path / 'e.npy').shape == (n_cells, 16)
    import data
    annotated = data.read_h5ad(tmp_path / 'p.h5ad')
    assert list(annotated.obs_column('scbert_prediction')) == [r[1] for r in rows[1:]]
    qc = annotated.obs_column('scbert_qc_pass')
    assert 0 < sum(v in (True, 'True') for v in qc) < n_cells                 # some cells flagged, all still annotated
    # scBERT's novelty rule: a threshold above every probability calls every cell Unassigned
    result = run('predict.py', f'--ckpt={out / "best.pt"}', f'--input={source}', f'--output={tmp_path / "u.csv"}',
                 f'--output_h5ad={tmp_path / "u.h5ad"}', '--novelty=scbert', '--unassigned_threshold=1.01',
                 '--label_key=cell_type')
    withheld = list(csv.reader(open(tmp_path / 'u.csv')))[1:]
    assert all(r[1] == 'Unassigned' and r[2] == '' for r in withheld)          # no probability for an unnamed class
    assert [(r[6], r[7]) for r in withheld] == [(r[1], r[2]) for r in rows[1:]]   # the withheld class, still there
    assert f'{n_cells} Unassigned (100.0% of the cells withheld' in result.stdout
    assert re.search(r"agreement with obs 'cell_type' \(\d+ labelled cells\): 0\.000 with the Unassigned "
                     r"rule, [01]\.\d{3} without it", result.stdout), result.stdout
    assert 'model: scBERT from' in result.stdout
    annotated = data.read_h5ad(tmp_path / 'u.h5ad')
    assert list(annotated.obs_column('scbert_top_label')) == [r[1] for r in rows[1:]]
    assert np.isnan(np.asarray(annotated.obs_column('scbert_probability'), dtype=float)).all()
    assert {r[1] for r in list(csv.reader(open(tmp_path / 'u.csv')))[1:]} == {'Unassigned'}


def test_leave_one_type_out_novelty_and_gene_importance_end_to_end(baron, tmp_path):
    """train.py --holdout: the type is out of the classifier and of training, its cells are scored as novel beside
    the test fold, every score is reported; best.pt carries the calibrated novelty rule that predict.py applies; and
    predict.py --importance writes each predicted type's top genes and a plot."""
    import data
    out = tmp_path / 'out'
    run('train.py', f'--dataset={baron}', f'--out_dir={out}', *TINY, '--max_iters=20', '--eval_interval=10',
        '--baseline=False', '--learning_rate=3e-3', '--holdout=beta')
    ds = data.Dataset(baron)
    beta = ds.label_names.index('beta')
    run_dir = out / 'holdout_beta'
    metrics = json.load(open(run_dir / 'metrics.json'))
    known_train = [i for i in np.flatnonzero(~np.isin(ds.folds, [0, 1])) if ds.labels[i] != beta]
    assert metrics['holdout'] == 'beta' and metrics['n_novel'] == int((ds.labels == beta).sum()) == 6
    assert metrics['n_train'] == len(known_train)
    assert set(metrics['novelty']) == {'maxprob', 'entropy', 'energy', 'mahalanobis', 'knn', 'scbert_rule'}
    for r in metrics['novelty'].values():
        assert 0 <= r['auroc'] <= 1 and 0 <= r['known_acc'] <= 1 and 0 <= r['novel_acc'] <= 1
    assert metrics['novelty']['scbert_rule']['threshold'] == 0.5
    assert sum(metrics['novel_called_as'].values()) == 6
    assert set(metrics['novel_called_as']) <= set(ds.label_names) - {'beta'}
    summary = json.load(open(out / 'novelty.json'))
    assert list(summary['types']) == ['beta'] and (out / 'novelty.md').read_text().count('| beta |') == 1
    best = state(run_dir / 'best.pt')
    assert 'beta' not in best['label_names'] and len(best['label_names']) == 12
    assert best['model_args']['n_classes'] == 12
    assert best['holdout'] == 'beta'
    novelty = best['novelty']
    assert novelty['default'] == 'knn' and novelty['quantile'] == 0.95 and set(novelty['thresholds']) == {
        'maxprob', 'entropy', 'energy', 'mahalanobis', 'knn'}
    assert novelty['class_means'].shape == (12, 16) and novelty['bank'].shape[0] == len(known_train)

    # predict.py: the checkpoint's calibrated rule by default, and gene importance per predicted type
    source = FIXTURES / 'counts_csr.h5ad'
    result = run('predict.py', f'--ckpt={run_dir / "best.pt"}', f'--input={source}', f'--output={tmp_path / "p.csv"}',
                 f'--importance={tmp_path / "genes"}', '--importance_top=5', '--importance_steps=4')
    rows = list(csv.reader(open(tmp_path / 'p.csv')))[1:]
    threshold = novelty['thresholds']['knn']
    assert [r[1] == 'Unassigned' for r in rows] == [float(r[5]) > threshold * (1 + 1e-6) for r in rows]
    assert 'knn score >' in result.stdout
    top = list(csv.DictReader(open(tmp_path / 'genes' / 'top_genes.csv')))
    predicted = {r[1] for r in rows} - {'Unassigned'}
    assert {r['cell_type'] for r in top} == predicted
    for cell_type in predicted:
        for method in ('attention', 'integrated_gradients'):
            ranked = [r for r in top if r['cell_type'] == cell_type and r['method'] == method]
            assert [int(r['rank']) for r in ranked] == [1, 2, 3, 4, 5]
            scores = [float(r['score']) for r in ranked]
            assert scores == sorted(scores, reverse=True) and all(r['gene'] in ds.vocab for r in ranked)
        assert (tmp_path / 'genes' / f'{cell_type}.png').stat().st_size > 1000
    n_cells = {r['cell_type']: int(r['n_cells']) for r in top}
    assert n_cells == {t: sum(r[1] == t for r in rows) for t in predicted}
    per_cell = list(csv.DictReader(open(tmp_path / 'genes' / 'cell_top_genes.csv')))
    assert [r['predicted_label'] for r in per_cell] == [r[1] for r in rows]
    assert all(len(r['attention'].split(';')) == 10 and set(r['attention'].split(';')) <= set(ds.vocab)
               for r in per_cell)
    assert all(len(r['integrated_gradients'].split(';')) == 10 for r in per_cell)
    # another calibrated score, and scBERT's threshold without its rule: a one-line error
    run('predict.py', f'--ckpt={run_dir / "best.pt"}', f'--input={source}', f'--output={tmp_path / "e.csv"}',
        '--novelty=entropy')
    rows = list(csv.reader(open(tmp_path / 'e.csv')))[1:]
    assert [r[1] == 'Unassigned' for r in rows] == [float(r[5]) > novelty['thresholds']['entropy'] * (1 + 1e-6)
                                                    for r in rows]
    user_error(run('predict.py', f'--ckpt={run_dir / "best.pt"}', f'--input={source}', '--unassigned_threshold=0.3',
                   f'--output={tmp_path / "x.csv"}', check=False), 'novelty=scbert')
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "o2"}', '--holdout=pancreas', check=False),
               'not a cell type')
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "o3"}', '--holdout=all', check=False),
               'holdout_min_cells')
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "o4"}', '--holdout=beta',
                   f'--init_from={run_dir / "best.pt"}', check=False), 'fine-tuned')
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "o5"}', '--holdout=beta',
                   '--holdout_min_cells=5', check=False), 'holdout=all')
    user_error(run('predict.py', f'--ckpt={run_dir / "best.pt"}', f'--input={source}', '--importance_steps=4',
                   check=False), '--importance=')
    torch.save(dict(best, novelty={'default': 'knn'}), tmp_path / 'damaged.pt')
    user_error(run('predict.py', f'--ckpt={tmp_path / "damaged.pt"}', f'--input={source}', check=False), 'damaged')
    # int8: the novelty scores are fitted again, on the held-out run's own labels
    result = run('quantize.py', f'--ckpt={run_dir / "best.pt"}', f'--out={tmp_path / "q.pt"}', '--num_threads=1')
    assert 'novelty scores refitted on the quantized model' in result.stdout
    assert state(tmp_path / 'q.pt')['novelty']['class_means'].shape == (12, 16)
    # a held-out donor: the novel cells come from that donor only, as the known test cells do
    run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "donor"}', *TINY, '--max_iters=2',
        '--eval_interval=1', '--baseline=False', '--holdout=beta', '--test_batch=mouse2')
    donor = json.load(open(tmp_path / 'donor' / 'holdout_beta' / 'metrics.json'))
    mouse2 = ds.meta['batch_names'].index('mouse2')
    assert donor['n_novel'] == int(((ds.labels == beta) & (ds.batch == mouse2)).sum()) < 6
    assert donor['n_test'] == int(((ds.labels != beta) & (ds.batch == mouse2)).sum())


def test_original_scbert_checkpoint_predicts_and_finetunes(tmp_path):
    """The reference cells, written to an .h5ad, through predict.py with the original's fine-tuned checkpoint and
    through train.py from the original's pretrained checkpoint."""
    ref = SHARED / 'scbert_ref'
    if not ref.exists():
        pytest.skip('reference artefacts not available')
    io = torch.load(ref / 'io.pt', weights_only=True)
    genes = [f'GENE{i}' for i in range(io['counts'].shape[1])]
    (tmp_path / 'panel.txt').write_text('\n'.join(genes) + '\n')
    (tmp_path / 'labels.txt').write_text('A\nB\nC\nD\nE\n')
    write_h5ad(tmp_path / 'cells.h5ad', io['counts'].numpy(), genes, obs={'cell_type': ['A', 'B', 'A']})
    run('predict.py', f'--ckpt={ref / "finetune_state_dict.pt"}', f'--input={tmp_path / "cells.h5ad"}',
        f'--vocab={tmp_path / "panel.txt"}', f'--label_names={tmp_path / "labels.txt"}',
        f'--output={tmp_path / "p.csv"}')
    rows = list(csv.reader(open(tmp_path / 'p.csv')))[1:]
    assert [r[0] for r in rows] == ['cell0', 'cell1', 'cell2']
    prob = io['finetune_prob_single']
    for row, p in zip(rows, prob):
        assert row[1] == 'Unassigned' and row[2] == ''                # all below 0.5 in the reference: withheld,
        assert row[6] == 'ABCDE'[p.argmax()] and abs(float(row[7]) - p.max().item()) < 1e-5   # the top class kept
        assert row[3] == 'ABCDE'[p.argsort(descending=True)[1]]
    # without the panel and label files, the original checkpoint is refused with a hint
    user_error(run('predict.py', f'--ckpt={ref / "finetune_state_dict.pt"}', f'--input={tmp_path / "cells.h5ad"}',
                   check=False), 'original scBERT checkpoint.*--vocab')
    # fine-tune from the original pretrained weights on data aligned to its panel
    write_h5ad(tmp_path / 'train.h5ad', np.tile(io['counts'].numpy(), (4, 1)), genes,
               obs={'cell_type': ['A', 'B', 'C'] * 4})
    run('prepare_data.py', f'--input={tmp_path / "train.h5ad"}', f'--out_dir={tmp_path / "d"}', '--label_key=cell_type',
        f'--vocab={tmp_path / "panel.txt"}', '--n_folds=3')
    out = tmp_path / 'out'
    run('train.py', f'--dataset={tmp_path / "d"}', f'--out_dir={out}', f'--init_from={ref / "pretrain_state_dict.pt"}',
        '--finetune_params=scbert', '--max_iters=2', '--eval_interval=1', '--num_threads=1', '--batch_size=2')
    ckpt = state(out / 'ckpt.pt')
    pretrained = torch.load(ref / 'pretrain_state_dict.pt', weights_only=True)
    assert ckpt['model_args']['n_embd'] == 200 and ckpt['model_args']['n_classes'] == 3
    # finetune_params=scbert trains the head, the final norm and block[-2] only, as the original's finetune.py
    original = 'performer.net.layers.{}.0.fn.to_q.weight'
    assert torch.equal(ckpt['model']['blocks.0.attn.to_q.weight'], pretrained[original.format(0)])
    assert not torch.equal(ckpt['model']['blocks.4.attn.to_q.weight'], pretrained[original.format(4)])


def test_bad_input(baron, tmp_path):
    user_error(run('train.py', f'--dataset={baron}', '--init_from=nope.pt', f'--out_dir={tmp_path}', check=False),
               'nope.pt not found')
    (tmp_path / 'corrupt.pt').write_bytes(b'not a checkpoint at all')
    user_error(run('train.py', f'--dataset={baron}', f'--init_from={tmp_path / "corrupt.pt"}', f'--out_dir={tmp_path}',
                   check=False), 'corrupt')
    user_error(run('predict.py', f'--ckpt={tmp_path / "corrupt.pt"}', f'--input={FIXTURES / "counts_csr.h5ad"}',
                   check=False), 'corrupt')
    user_error(run('train.py', f'--dataset={tmp_path / "missing"}', check=False), 'prepare_data')
    user_error(run('train.py', '--batchsize=3', check=False), "did you mean 'batch_size'")
    user_error(run('train.py', f'--dataset={baron}', '--fold=7', check=False), 'fold')
    user_error(run('predict.py', '--ckpt=missing.pt', f'--input={FIXTURES / "counts_csr.h5ad"}', check=False),
               'not found')
    user_error(run('train.py', f'--dataset={baron}', '--dtype=fp16', check=False), 'dtype must be one of')
    user_error(run('train.py', f'--dataset={baron}', '--optimizer=sgd', check=False), 'optimizer must be one of')
    user_error(run('train.py', f'--dataset={baron}', '--eval_interval=0', check=False),
               'eval_interval must be at least 1')
    if not torch.cuda.is_available():
        user_error(run('train.py', f'--dataset={baron}', '--device=cuda', check=False), 'CUDA is not available')
    (tmp_path / 'truncated.h5ad').write_bytes((FIXTURES / 'counts_csr.h5ad').read_bytes()[:5000])
    ckpt = tmp_path / 'model.pt'
    torch.save({'model_args': {}, 'model': {}}, ckpt)
    user_error(run('predict.py', f'--ckpt={ckpt}', f'--input={tmp_path / "truncated.h5ad"}', check=False), 'damaged')
    user_error(run('predict.py', f'--ckpt={ckpt}', f'--input={FIXTURES / "counts_csr.h5ad"}',
                   f'--output={tmp_path / "no" / "such" / "dir.csv"}', check=False), 'does not exist')


def test_readme_quick_start(tmp_path):
    """The quick start's train command, run as written but shortened, in a fresh copy of the repo (no prepared data):
    it prepares the embedded PBMC data, fine-tunes, and prints the test scores beside logistic regression."""
    readme = (ROOT / 'README.md').read_text()
    block = readme.split('## Quick start', 1)[1].split('```', 2)[1].split('\n', 1)[1]     # after the fence's language
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith('#')]
    assert len(commands) == 3 and commands[0].endswith('python train.py') and 'pytest' in commands[2]
    assert commands[1].split('#')[0].split() == ['python', 'train.py', 'config/scbert2_small.py']
    repo = tmp_path / 'repo'
    (repo / 'data').mkdir(parents=True)
    for script in ROOT.glob('*.py'):
        shutil.copy(script, repo)
    shutil.copytree(ROOT / 'config', repo / 'config')
    shutil.copy(ROOT / 'data' / 'pbmc68k_reduced.h5ad', repo / 'data')
    result = run(repo / 'train.py', *TINY, '--max_iters=4', '--eval_interval=2', cwd=repo)
    assert re.search(r'fold 0 test +scBERT +acc \d\.\d+ +macro-F1 \d\.\d+', result.stdout), result.stdout[-2000:]
    assert re.search(r'fold 0 test +logistic regression +acc 0\.[6-9]\d+', result.stdout), result.stdout[-2000:]
    assert json.loads((repo / 'data' / 'pbmc68k' / 'meta.json').read_text())['n_cells'] == 693
    assert (repo / 'out' / 'best.pt').exists()
    # the second command, scBERT 2.0 on the same data, shortened
    result = run(repo / 'train.py', 'config/scbert2_small.py', '--max_iters=3', '--eval_interval=2', '--batch_size=8',
                 '--out_dir=out2', '--num_threads=1', cwd=repo)
    assert re.search(r'fold 0 test +scBERT 2\.0 +acc \d\.\d+ +macro-F1 \d\.\d+', result.stdout), result.stdout[-2000:]
    assert torch.load(repo / 'out2' / 'best.pt', weights_only=True)['model_args']['input_genes'] == 'expressed'


def test_output_h5ad_reads_in_anndata(tmp_path):
    """Where anndata is installed (it is not a dependency), the annotated files open in it: modern and legacy input."""
    anndata = pytest.importorskip('anndata')
    out = tmp_path / 'out'
    run('train.py', f'--dataset={ROOT / "data" / "pbmc68k"}', f'--out_dir={out}', *TINY, '--max_iters=2',
        '--eval_interval=1', '--baseline=False')
    for source, extra in ((ROOT / 'data' / 'pbmc68k_reduced.h5ad', []),
                          (FIXTURES / 'pbmc_ensembl_ids.h5ad', ['--gene_key=gene_symbols'])):
        run('predict.py', f'--ckpt={out / "best.pt"}', f'--input={source}', f'--output={tmp_path / "p.csv"}',
            f'--output_h5ad={tmp_path / "p.h5ad"}', *extra)
        adata = anndata.read_h5ad(tmp_path / 'p.h5ad')
        assert {'scbert_prediction', 'scbert_probability', 'scbert_qc_pass'} <= set(adata.obs.columns)


def test_gene2vec_is_loaded_and_frozen(baron, tmp_path):
    weight = np.random.default_rng(0).normal(size=(385, 16)).astype(np.float32)
    np.save(tmp_path / 'g2v.npy', weight)
    run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "out"}', *TINY, '--max_iters=3', '--eval_interval=2',
        '--baseline=False', f'--gene2vec={tmp_path / "g2v.npy"}')
    emb = state(tmp_path / 'out' / 'ckpt.pt')['model']['gene_emb.weight']
    assert torch.equal(emb[:-1], torch.from_numpy(weight)) and not emb[-1].any()  # unchanged by training; 0 last row
    np.save(tmp_path / 'bad.npy', weight[:10])
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "x"}', *TINY,
                   f'--gene2vec={tmp_path / "bad.npy"}', check=False), 'has shape')
    np.save(tmp_path / 'pickled.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    user_error(run('train.py', f'--dataset={baron}', f'--out_dir={tmp_path / "x"}', *TINY,
                   f'--gene2vec={tmp_path / "pickled.npy"}', check=False), 'gene2vec .* holds Python objects')


def test_grad_accum_matches_a_bigger_batch(baron, tmp_path):
    args = [f'--dataset={baron}', *TINY[:-1], '--max_iters=4', '--eval_interval=100', '--baseline=False']
    run('train.py', f'--out_dir={tmp_path / "big"}', *args, '--batch_size=8')
    run('train.py', f'--out_dir={tmp_path / "acc"}', *args, '--batch_size=4', '--grad_accum=2')
    big, acc = state(tmp_path / 'big' / 'ckpt.pt'), state(tmp_path / 'acc' / 'ckpt.pt')
    assert int(acc['model']['calls_since_redraw']) == 2 * int(big['model']['calls_since_redraw'])  # it counts forwards
    for k in big['model']:
        if k != 'calls_since_redraw':
            assert torch.allclose(big['model'][k], acc['model'][k], atol=1e-5), k


def test_expected_time_is_said_once_whatever_the_log_interval(baron, tmp_path):
    result = run('train.py', f'--dataset={baron}', *TINY, f'--out_dir={tmp_path}', '--max_iters=20',
                 '--log_interval=4', '--eval_interval=8', '--baseline=False')
    assert result.stdout.count('expected time: about') == 1, result.stdout
    assert 'this run at most (20 steps, 4 evaluations; early stopping may end it sooner)' in result.stdout
