"""bench.py end to end on a tiny model, as a subprocess: every field of its JSON is there and sane, the FLOPs per cell are
the analytic count (written out again here, by hand), that count agrees with torch.utils.flop_counter, and a run that
would not fit in memory is skipped with a note. No times are asserted."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, ScBERT

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
TINY = dict(n_genes=64, n_embd=16, n_layer=1, n_head=2, dim_head=8)
TINY_ARGS = [f'--{k}={v}' for k, v in TINY.items()] + ['--num_threads=1', '--peak_flops=1e11']


def bench(*args):
    return subprocess.run([sys.executable, str(ROOT / 'bench.py'), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    # batch 4000 would need ~0.5 GB by bench.py's estimate: over the 0.02 GB limit, so it is skipped with a note
    result = bench(*TINY_ARGS, '--batch_sizes=1,2,4000', '--mem_limit_gb=0.02', '--repeats=1', f'--out={out}', '--profile')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


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
    return 1 * layer + head


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
    rep, stdout = report
    assert rep['settings']['n_genes'] == 64 and rep['settings']['batch_sizes'] == '1,2,4000'
    machine = rep['machine']
    assert machine['device'] == 'cpu' and machine['dtype'] == 'float32' and machine['threads'] == 1
    assert machine['cpu'] and machine['cpu_cores'] >= 1 and machine['torch'] == torch.__version__
    assert rep['peak_flops'] == 1e11 and 'setting' in rep['peak_flops_source'] and rep['memory_kind']
    assert [v['variant'] for v in rep['variants']] == ['scbert', 'scbert_exact']
    for v in rep['variants']:
        attention = v['attention']
        assert attention == ('performer' if v['variant'] == 'scbert' else 'sdpa')
        assert v['params'] == v['params_active'] == tiny_model(attention).num_params()
        fwd = hand_forward_flops(attention)
        assert v['flops_per_cell']['forward'] == fwd and v['flops_per_cell']['train'] == 3 * fwd
        assert sum(v['flops_per_cell']['by_module'].values()) == fwd
        assert [r['batch_size'] for r in v['inference']] == [1, 2, 4000]
        for run in v['inference'][:2]:
            check_run(run, run['batch_size'], fwd)
        check_run(v['train'], 1, 3 * fwd)
        assert v['inference'][2]['skipped'] == v['notes'][0] and len(v['notes']) == 1   # too big for memory
        assert 'inference at batch 4000 skipped' in v['notes'][0]
    assert rep['variants'][1]['sdpa_backend'] in [b.name for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION,
                                                                     SDPBackend.EFFICIENT_ATTENTION)]
    assert '| variant | run | batch |' in stdout and 'profile: scbert inference' in stdout and 'Self CPU' in stdout
    assert 'skipped' in stdout


@pytest.mark.parametrize('attention', ['performer', 'sdpa'])
def test_analytic_flops_agree_with_flop_counter(report, attention):
    rep, _ = report
    analytic = next(v for v in rep['variants'] if v['attention'] == attention)['flops_per_cell']['forward']
    model = tiny_model(attention).eval()
    tokens = torch.randint(0, 6, (2, 65))
    # flop_counter counts no FLOPs for the CPU flash-attention kernel (torch 2.13); the math kernel is plain bmm's
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    assert counter.get_total_flops() / 2 == pytest.approx(analytic, rel=0.1)


def test_help_and_bad_settings():
    result = bench('--help')
    assert result.returncode == 0 and 'scbert_exact' in result.stdout and 'peak_flops = 0.0' in result.stdout
    result = bench('--variants=scbert,nope')
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert len(lines) == 1 and "'nope'" in lines[0] and 'scbert_exact' in lines[0]


def test_scbert2_on_real_cells_flops_and_mask_cost(baron, tmp_path):
    """scBERT 2.0 (config/scbert2_small.py's architecture) on real cells: the FLOPs per cell count each cell's own
    tokens, agree with torch's flop counter, and the padding mask's cost is measured at the same shape."""
    from data import Dataset, cell_seeds, expressed_batch
    out = tmp_path / 'bench.json'
    result = bench('--variants=scbert2_small', f'--dataset={baron}', '--batch_sizes=1,3', '--repeats=1',
                   '--warmup=0', '--num_threads=1', '--peak_flops=1e11', f'--out={out}')
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
