"""bench.py end to end on a tiny model, in-process: every field of its JSON is there and sane, the FLOPs per cell are
the analytic count (written out again here, by hand), that count agrees with torch.utils.flop_counter, and a run that
would not fit in memory is skipped with a note. No times are asserted."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import SHARED, run_script, user_error
from model import ModelConfig, ScBERT

TINY = dict(n_genes=64, n_embd=16, n_layer=2, n_head=2, dim_head=8)
# synthetic cells; every variant shrunk to TINY (the GQA ones to 1 key/value head for their 2 query heads)
TINY_ARGS = [f'--{k}={v}' for k, v in TINY.items()] + ['--n_kv_head=1', '--dataset=', '--num_threads=1',
                                                      '--peak_flops=1e11']
VARIANTS = ['scbert', 'scbert_exact', 'scbert2_dense', 'scbert2_gqa', 'scbert2_moe', 'scbert2_small',
            'scbert2_gqa+bf16', 'scbert2_distilled', 'scbert2_small+int8', 'scbert2_small+ternary']
MEASURED = VARIANTS[:8]


def bench(*args):
    return run_script('bench.py', *args, check=False)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bench')
    # batch 4000 would need ~0.5 GB by bench.py's estimate: over the 0.02 GB limit, so it is skipped with a note
    result = bench(*TINY_ARGS, f'--variants={",".join(VARIANTS)}', '--batch_sizes=1,2,4000', '--train_batch_size=2',
                   '--mem_limit_gb=0.02', '--repeats=1', f'--out={tmp / "bench.json"}', f'--plot={tmp / "bench.png"}',
                   '--profile')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((tmp / 'bench.json').read_text()), result.stdout, tmp


def tiny_model(attention):
    return ScBERT(ModelConfig(**TINY, n_classes=10, head='scbert', attention=attention))


def hand_forward_flops(attention):
    """One cell's forward FLOPs for the tiny model: matmuls only, 2 per multiply-add."""
    L, E, H, D = 64 + 1, 16, 2, 8                      # 64 genes + the appended token
    m = int(D * math.log(D))                           # FAVOR+ features: 16
    layer = 2 * L * E * (H * D) * 4                    # to_q, to_k, to_v, to_out
    layer += 2 * L * E * (4 * E) * 2                   # MLP in and out
    if attention == 'performer':
        layer += 2 * 2 * H * L * D * m                 # feature maps of queries and keys
        layer += 2 * 2 * H * m * L * (D + 1)           # phi(k)ᵀ [v 1], then phi(q) @ it
    else:
        layer += 2 * 2 * H * L * L * D                 # q kᵀ, then softmax @ v
    head = 2 * (L * E + L * 512 + 512 * 128 + 128 * 10)  # gene_proj, fc1, fc2, fc3
    return 2 * layer + head


def check_run(run, batch, flops_per_cell):
    assert run['batch_size'] == batch and 'skipped' not in run
    assert run['cells_per_s'] > 0
    for spread in (run['time_s'], run['latency_ms_per_cell']):
        assert 0 < spread['min'] <= spread['median'] <= spread['max']
    assert run['cells_per_s'] == pytest.approx(batch / run['time_s']['median'])
    assert run['latency_ms_per_cell']['median'] == pytest.approx(1e3 / run['cells_per_s'])
    assert run['flops_per_s'] == pytest.approx(flops_per_cell * run['cells_per_s'])
    assert 0 < run['mfu'] <= 1 and run['mfu'] == pytest.approx(run['flops_per_s'] / 1e11)
    assert run['peak_mem_mb'] > 0 and run['mem_estimate_mb'] > 0


def test_report_has_every_field_with_sane_values(report):
    rep, stdout, tmp = report
    assert rep['settings']['n_genes'] == 64 and rep['settings']['batch_sizes'] == '1,2,4000'
    machine = rep['machine']
    assert machine['device'] == 'cpu' and machine['dtype'] == 'float32' and machine['threads'] == 1
    assert machine['cpu'] and machine['cpu_cores'] >= 1 and machine['torch'] == torch.__version__
    assert set(rep['peaks']) == {'float32', 'bfloat16'} and rep['memory_kind']
    assert all(p['flops'] == 1e11 and 'setting' in p['source'] for p in rep['peaks'].values())
    assert [v['variant'] for v in rep['variants']] == VARIANTS
    for v in rep['variants'][:2]:                    # scBERT: the FLOPs, written out again by hand
        attention = v['attention']
        assert attention == ('performer' if v['variant'] == 'scbert' else 'sdpa')
        assert v['params'] == v['params_active'] == tiny_model(attention).num_params()
        fwd = hand_forward_flops(attention)
        assert v['flops_per_cell']['forward'] == fwd and v['flops_per_cell']['train'] == 3 * fwd
        assert sum(v['flops_per_cell']['by_module'].values()) == fwd
    for v in rep['variants'][:8]:                    # everything measured, every run sane, batch 4000 skipped
        assert [r['batch_size'] for r in v['inference']] == [1, 2, 4000]
        for run in v['inference'][:2] + [v['train']]:
            check_run(run, run['batch_size'], run['flops_per_cell'])
        assert v['train']['batch_size'] == 2
        assert v['train']['flops_per_cell'] == pytest.approx(3 * v['inference'][1]['flops_per_cell'])
        assert v['inference'][2]['skipped'] == v['notes'][0] and len(v['notes']) == 1   # too big for memory
        assert 'inference at batch 4000 skipped' in v['notes'][0]
    assert rep['variants'][1]['sdpa_backend'] in [b.name for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION,
                                                                     SDPBackend.EFFICIENT_ATTENTION)]
    assert '| variant | run | batch |' in stdout and 'skipped' in stdout
    assert 'profile: scbert inference, batch 2' in stdout and 'Self CPU' in stdout    # the biggest batch that ran
    assert (tmp / 'bench.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_variants_differ_in_the_one_thing_they_name(report):
    rep, _, _ = report
    v = {r['variant']: r for r in rep['variants']}
    configs = {name: ModelConfig(**v[name]['model_config']) for name in MEASURED}
    dense, gqa, moe = configs['scbert2_dense'], configs['scbert2_gqa'], configs['scbert2_moe']
    assert (dense.n_kv_head, gqa.n_kv_head, moe.n_kv_head) == (2, 1, 1)             # multi-head, then grouped
    assert (dense.n_expert, gqa.n_expert, moe.n_expert) == (0, 0, 8)                 # dense, then 8 experts
    for c in (dense, gqa, moe, configs['scbert2_small']):
        assert c.input_genes == 'expressed' and c.n_embd == 16 and c.n_layer == 2    # the TINY overrides apply
    assert configs['scbert2_distilled'].n_layer == 1 and configs['scbert2_distilled'].n_expert == 8   # half the blocks
    assert v['scbert2_gqa']['params'] < v['scbert2_dense']['params']                 # GQA: smaller k and v
    assert v['scbert2_moe']['params_active'] < v['scbert2_moe']['params']
    assert v['scbert2_gqa+bf16']['dtype'] == 'bfloat16' and v['scbert2_gqa']['dtype'] == 'float32'
    assert v['scbert2_gqa+bf16']['params'] == v['scbert2_gqa']['params']
    small, int8, ternary = v['scbert2_small'], v['scbert2_small+int8'], v['scbert2_small+ternary']
    assert (small['quantization'], int8['quantization'], ternary['quantization']) == (None, 'int8', 'ternary')
    assert int8['params'] == small['params'] < ternary['params']                     # + BitLinear's norm gains
    assert int8['flops_per_cell'] == small['flops_per_cell'] and int8['model_config'] == small['model_config']
    assert ternary['model_config']['bitlinear'] and not int8['model_config']['bitlinear']
    assert ternary['weights_mb'] < int8['weights_mb'] < small['weights_mb']           # 1.6 bits < 8 bits < 32 bits
    for q in (int8, ternary):                                   # inference only, timed; no FLOP counter for int8 ops
        assert q['train'] is None and 'flop_check' not in q
        for run in q['inference'][:2]:
            check_run(run, run['batch_size'], run['flops_per_cell'])
        assert any('inference only' in n for n in q['notes']) and any('flop_counter' in n for n in q['notes'])


@pytest.mark.parametrize('name', MEASURED)
def test_analytic_flops_match_the_flop_counter_module_by_module(report, name):
    """bench.py runs one cell under torch.utils.flop_counter for every variant and compares each module group."""
    rep, _, _ = report
    check = next(v for v in rep['variants'] if v['variant'] == name)['flop_check']
    assert check['match'] and check['counted'] == check['analytic'] > 0
    groups = {'attention', 'mlp', 'head'} | ({'value_emb'} if name.startswith('scbert2') else set())
    assert set(check['by_module']) == groups
    for group in check['by_module'].values():
        assert group['counted'] == group['analytic'] > 0


@pytest.mark.parametrize('attention', ['performer', 'sdpa'])
def test_analytic_flops_agree_with_flop_counter(report, attention):
    """The same, counted here independently of bench.py, on two cells."""
    rep, _, _ = report
    analytic = next(v for v in rep['variants'] if v['attention'] == attention)['flops_per_cell']['forward']
    model = tiny_model(attention).eval()
    tokens = torch.randint(0, 6, (2, 65))
    # flop_counter counts no FLOPs for the CPU flash-attention kernel (torch 2.13); the math kernel is plain bmm's
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    assert counter.get_total_flops() / 2 == analytic


def test_scaling_sweep(tmp_path):
    result = bench(*TINY_ARGS, '--variants=scbert,scbert_exact,scbert2_gqa', '--scaling=True',
                   '--scaling_panels=16,32', '--scaling_genes=4,8', '--repeats=1', '--warmup=0',
                   f'--out={tmp_path / "b.json"}', f'--scaling_plot={tmp_path / "s.png"}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rep = json.loads((tmp_path / 'b.json').read_text())
    assert rep['variants'] == []
    rows = [(r['variant'], r['sweep_size'], r['tokens_per_cell']) for r in rep['scaling']]
    # scBERT reads its whole panel (+1 token); scBERT 2.0 CLS + every expressed gene + the flagship's zero genes,
    # capped by the 64 - k unexpressed genes of the panel
    assert rows == [('scbert', 16, 17), ('scbert', 32, 33), ('scbert_exact', 16, 17), ('scbert_exact', 32, 33),
                    ('scbert2_gqa', 4, 1 + 4 + 60), ('scbert2_gqa', 8, 1 + 8 + 56)]
    for r in rep['scaling']:
        assert r['inference'][0]['cells_per_s'] > 0 and r['inference'][0]['mfu'] > 0 and r['train'] is None
    small, big = rep['scaling'][2:4]
    assert big['flops_per_cell']['forward'] > small['flops_per_cell']['forward']
    assert (tmp_path / 's.png').read_bytes()[:4] == b'\x89PNG' and '| variant | axis | size |' in result.stdout


def test_help_and_bad_settings(tmp_path):
    result = bench('--help')
    assert result.returncode == 0 and 'scbert2_gqa' in result.stdout and 'peak_flops = 0.0' in result.stdout
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    for args, expected in ((['--variants=scbert,nope'], "'nope'"), (['--variants=scbert+fast'], "'+fast'"),
                           (['--variants=int8'], 'scbert+int8'), (['--variants=scbert+int8+bf16'], 'fp32'),
                           (['--variants=missing/ckpt.pt'], 'not found'), ([f'--variants={bad}'], 'corrupt'),
                           (['--variants=scbert,scbert'], 'once'), (['--batch_sizes=1,x'], 'batch_sizes'),
                           (['--dataset=nowhere'], 'prepared dataset'), (['--device=gpu'], "'gpu'"),
                           (['--n_layer=-1'], 'n_layer'), (['--n_classes=-1'], 'n_classes'),
                           ([f'--out={tmp_path / "no" / "b.json"}'], 'folder does not exist'),
                           ([f'--plot={tmp_path}'], 'is a directory')):
        user_error(bench(*args, '--peak_flops=1e11'), re.escape(expected))


def test_checkpoint_variant_runs_on_the_cells_mapped_to_its_genes(baron, tmp_path):
    """A checkpoint (as train.py writes it) whose panel is a reordered subset of the dataset's genes: bench.py maps
    the cells onto its genes, so each cell keeps exactly its expressed genes that the panel has."""
    from data import Dataset
    data = Dataset(baron)
    genes = list(reversed(data.vocab[::2]))                        # every other gene, in reverse order
    cfg = ModelConfig(**TINY | {'n_genes': len(genes)}, n_kv_head=1, n_classes=3, input_genes='expressed',
                      attention='sdpa', head='pooled', norm='rmsnorm', mlp='swiglu', bias=False)
    torch.manual_seed(0)
    model = ScBERT(cfg)
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(cfg), 'vocab': genes,
                'label_names': ['a', 'b', 'c'], 'log_base': 2.0}, tmp_path / 'ckpt.pt')
    result = bench(f'--variants={tmp_path / "ckpt.pt"}', f'--dataset={baron}', '--batch_sizes=1,4', '--repeats=1',
                   '--warmup=0', '--num_threads=1', '--peak_flops=1e11', '--train=False',
                   f'--out={tmp_path / "b.json"}', '--plot=')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    v = json.loads((tmp_path / 'b.json').read_text())['variants'][0]
    assert v['checkpoint'] == str(tmp_path / 'ckpt.pt') and v['params'] == model.num_params()
    assert v['flop_check']['match'] and f"the checkpoint's {len(genes)} genes" in v['cells']
    # the same 4 sampled cells, their expressed genes counted on the checkpoint's panel
    sample = np.sort(np.random.default_rng(0).choice(data.n_cells, 4, replace=False))
    indptr, indices, _ = data.rows(sample)
    kept = [int(np.isin(indices[a:b], np.arange(0, data.n_genes, 2)).sum()) for a, b in zip(indptr[:-1], indptr[1:])]
    assert v['tokens_per_cell'] == pytest.approx(1 + np.mean(kept))
    assert not (tmp_path / 'bench.png').exists()


def test_scbert2_on_real_cells_flops_and_mask_cost(baron, tmp_path):
    """scBERT 2.0 (config/scbert2_small.py's architecture) on real cells: the FLOPs per cell count each cell's own
    tokens, agree with torch's flop counter, and the padding mask's cost is measured at the same shape."""
    from data import Dataset, cell_seeds, expressed_batch
    out = tmp_path / 'bench.json'
    result = bench('--variants=scbert2_small', f'--dataset={baron}', '--batch_sizes=1,3', '--train_batch_size=3',
                   '--repeats=1', '--warmup=0', '--num_threads=1', '--peak_flops=1e11', f'--out={out}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    v = json.loads(out.read_text())['variants'][0]
    cfg = ModelConfig(**v['model_config'])
    assert cfg.input_genes == 'expressed' and cfg.n_expert == 4 and v['params_active'] < v['params']
    assert v['mask_cost']['masked_s'] > 0 and v['mask_cost']['unmasked_s'] > 0 and v['mask_cost']['batch_size'] == 3
    assert 'padding mask' in result.stdout
    # the first sampled cell, alone (no padding): analytic FLOPs of batch 1 == torch's count of the model's matmuls
    data = Dataset(baron)
    sample = np.sort(np.random.default_rng(0).choice(data.n_cells, 3, replace=False))
    indptr, indices, values = data.rows(sample[:1])
    x = expressed_batch(indptr, indices, values, cell_seeds(indptr, indices, 0), cfg, data.log_base)
    torch.manual_seed(0)
    model = ScBERT(cfg).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    run = v['inference'][0]
    assert run['batch_size'] == 1
    assert counter.get_total_flops() == pytest.approx(run['flops_per_cell'], rel=0.02)
    check_run(run, 1, run['flops_per_cell'])


def test_pretrained_checkpoints_time_masked_modelling(baron, tmp_path):
    """Models without a classifier (ours pretrained, and an original scBERT release file, which has no gene names and
    so runs on synthetic cells of its panel): inference runs the MLM heads, training is a masked-modelling step, and
    the FLOPs of those heads match torch's counter."""
    from data import Dataset
    vocab = Dataset(baron).vocab
    cfg = ModelConfig(**TINY | {'n_genes': len(vocab)}, n_kv_head=1, n_classes=0, input_genes='expressed',
                      attention='sdpa', value_emb='continuous', n_expert=2, n_expert_active=1)
    torch.manual_seed(0)
    torch.save({'model': ScBERT(cfg).state_dict(), 'model_args': dataclasses.asdict(cfg), 'vocab': vocab},
               tmp_path / 'pretrained.pt')
    variants = [str(tmp_path / 'pretrained.pt')]
    original = SHARED / 'scbert_ref' / 'pretrain_state_dict.pt'
    if original.exists():
        variants.append(str(original))
    result = bench(f'--variants={",".join(variants)}', f'--dataset={baron}', '--batch_sizes=1', '--train_batch_size=2',
                   '--repeats=1', '--warmup=0', '--num_threads=1', '--peak_flops=1e11', f'--out={tmp_path / "b.json"}',
                   '--plot=')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / 'b.json').read_text())['variants']
    for v in rows:
        assert v['model_config']['n_classes'] == 0 and v['flop_check']['match']
        check_run(v['train'], 2, v['train']['flops_per_cell'])
        assert set(v['flop_check']['by_module']) >= {'attention', 'mlp', 'head'}
    assert rows[0]['flops_per_cell']['by_module']['head'] == 2 * (rows[0]['tokens_per_cell'] - 1) * 16 * (5 + 2 + 1)
    if len(rows) > 1:                                   # the original: 1,023 genes, width 200, 6 layers
        v = rows[1]
        assert v['tokens_per_cell'] == 1024 and v['attention'] == 'performer' and v['params'] > 5e6
        assert any('no gene names' in n for n in v['notes']) and 'synthetic' in v['cells']
