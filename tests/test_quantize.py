"""Quantization: int8 and BitNet b1.58 ternary. The quantizers' error bounds and values, the packing round trip, the
straight-through gradients, PyTorch's int8 kernel against the reference arithmetic, and quantize.py / train.py
--bitlinear / predict.py end to end on the 78 real Baron cells: logits stay close to the float model's, and the
quantized files load with weights_only=True."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, SHARED, run_distill, state, user_error
from conftest import run_script as run
from data import Dataset, dataset_input, fold_split
from lowbit import QuantLinear, int8_gemm_available, pack_ternary, packed_state_dict, quantize, unpack_ternary
from model import (BitLinear, ModelConfig, ScBERT, absmax_int8, absmean_ternary, as_bitlinear, calibrate_bitlinear,
                   fake_quant)


@pytest.fixture
def teacher(scbert2_model):
    """A small scBERT 2.0 (2 blocks, MoE) fine-tuned on the Baron cells (conftest's scbert2_model: read only)."""
    return scbert2_model


SCBERT_CFG = dict(n_genes=30, n_embd=32, n_layer=2, n_head=4, dim_head=8, n_classes=3)
V2_CFG = dict(SCBERT_CFG, input_genes='expressed', attention='sdpa', n_kv_head=2, norm='rmsnorm', mlp='swiglu',
              bias=False, n_expert=4, head='cls', value_emb='continuous', n_bins=7)


def inputs(cfg, n=6):
    g = torch.Generator().manual_seed(1)
    if cfg.get('input_genes') != 'expressed':
        return torch.randint(0, 6, (n, cfg['n_genes'] + 1), generator=g)
    genes = torch.stack([torch.randperm(cfg['n_genes'], generator=g)[:12] for _ in range(n)])
    genes[0, 8:] = -1                                                  # padding
    return {'genes': genes, 'values': torch.rand(n, 12, generator=g) * 3,
            'bins': torch.randint(1, 7, (n, 12), generator=g)}


def clone(model):
    copy = ScBERT(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_absmax_int8_error_is_at_most_half_a_step():
    x = torch.randn(50, 64) * torch.logspace(-3, 2, 50)[:, None]        # rows of very different scales
    q, scale = absmax_int8(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (50, 1)
    assert torch.equal(q.abs().amax(1), torch.full((50,), 127, dtype=torch.int8))   # each row uses the whole grid
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6 * x.abs()).all()
    assert torch.equal(absmax_int8(torch.zeros(3, 4))[0], torch.zeros(3, 4, dtype=torch.int8))


def test_absmean_ternary_values_and_scale():
    w = torch.randn(3, 16, 8)                                          # stacked experts: one γ each
    q, gamma = absmean_ternary(w)
    assert q.dtype == torch.int8 and set(q.unique().tolist()) == {-1, 0, 1}
    assert torch.allclose(gamma.flatten(), w.abs().mean((1, 2)))
    assert torch.equal(q, torch.round(w / gamma).clamp(-1, 1).to(torch.int8))
    # RoundClip: |w| below γ/2 -> 0, above 3γ/2 -> ±1
    w2 = torch.tensor([[0.1, -0.4, 0.6, -2.0, 5.0, 0.0]])
    q2, g2 = absmean_ternary(w2)
    assert torch.equal(q2, torch.round(w2 / g2).clamp(-1, 1).to(torch.int8)) and g2.item() == pytest.approx(8.1 / 6)
    assert q2.tolist() == [[0, 0, 0, -1, 1, 0]]


@pytest.mark.parametrize('n', [0, 1, 4, 5, 6, 999, 1000])
def test_pack_unpack_round_trip_is_exact(n):
    q = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 5) and (packed < 243).all()
    assert torch.equal(unpack_ternary(packed, (n,)), q)
    w = torch.randint(-1, 2, (7, 13), dtype=torch.int8)                # any shape; 91 weights -> 19 bytes
    assert torch.equal(unpack_ternary(pack_ternary(w), w.shape), w) and pack_ternary(w).numel() == 19
    assert pack_ternary(torch.tensor([1, 0, -1, 1, 1], dtype=torch.int8)).item() == 2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81


def test_straight_through_gradients_flow():
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    (fake_quant(x, absmax_int8) * g).sum().backward()
    assert torch.equal(x.grad, g)                                      # the rounding is the identity backwards
    layer = BitLinear(8, 5)
    w_q = absmean_ternary(layer.weight.detach())
    out = layer(x.detach())
    assert torch.allclose(out, F.linear(fake_quant(layer.norm(x.detach()), absmax_int8), w_q[0] * w_q[1], layer.bias))
    out.pow(2).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    assert layer.norm.weight.grad.abs().sum() > 0
    # a bitlinear model trains: every latent weight gets a gradient, MoE experts included
    torch.manual_seed(0)
    model = ScBERT(ModelConfig(**V2_CFG, bitlinear=True))
    _, loss = model(inputs(V2_CFG), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    for name in ('blocks.0.attn.to_q.weight', 'blocks.1.mlp.w1', 'blocks.1.mlp.w2', 'blocks.0.mlp.norm_hidden.weight'):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.skipif(not int8_gemm_available(), reason="PyTorch's x86/fbgemm int8 engine is not available")
@pytest.mark.parametrize('ternary', [False, True])
def test_int8_kernel_matches_the_reference_arithmetic(ternary):
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64) * torch.logspace(-2, 1, 40)[None, :, None]  # tokens of very different scales
    w = torch.randn(48, 64) * 0.05
    bias = torch.randn(48) * 0.1
    layer = QuantLinear.from_float(w, bias, ternary=ternary)
    assert set(layer.weight_int8.unique().tolist()) <= ({-1, 0, 1} if ternary else set(range(-127, 128)))
    fast = layer(x)
    layer.kernel = 'reference'
    ref = layer(x)
    w_deq = layer.weight_int8.float() * layer.weight_scale[:, None]
    exact = F.linear(x, w_deq, bias)                                   # the quantized weights, float activations
    # per token the activation error is ~1/2 step of the token's own absmax: every token is close, small or large
    # the kernel: 7-bit (int8) / 8-bit activations
    for a, tol in ((ref, 0.01), (fast, 0.03 if not ternary else 0.015)):
        per_token = ((a - exact).norm(dim=-1) / exact.norm(dim=-1))
        assert per_token.max() < tol, per_token.max()
    if not ternary:
        assert rel_err(ref, F.linear(x, w, bias)) < 0.01               # int8 weights are near the float ones


@pytest.mark.parametrize('cfg', [SCBERT_CFG, V2_CFG], ids=['scbert', 'scbert2_moe'])
def test_quantize_replaces_every_attention_and_feed_forward_matrix(cfg):
    torch.manual_seed(0)
    model = ScBERT(ModelConfig(**cfg)).eval()
    x = inputs(cfg)
    ref = model(x)[0]
    q = quantize(clone(model), 'int8')
    experts = cfg.get('n_expert', 0)
    per_block = 4 + (3 * experts if experts else 2)                    # to_q/k/v/out + w1, w2 (+ w3, per expert)
    assert len(q.quantized_linears()) == cfg['n_layer'] * per_block
    assert not any(isinstance(m, torch.nn.Linear) for b in q.blocks for m in (b.attn.to_q, b.attn.to_out))
    assert isinstance(q.lm_head, torch.nn.Linear) and isinstance(q.cls_head.fc3, torch.nn.Linear)   # heads stay float
    assert q.num_params() == model.num_params() and q.num_active_params() == model.num_active_params()
    assert rel_err(q(x)[0], ref) < 0.02
    with pytest.raises(ValueError, match='bitlinear'):
        quantize(clone(model), 'ternary')
    # post-training ternary: calibrated norms start near the float model; the packed model is the fake-quantized one
    bit = as_bitlinear(model)
    assert calibrate_bitlinear(bit, [x]) == cfg['n_layer'] * 6        # 4 attention + w1, w2 (MoE: norm_in, norm_hidden)
    fake = bit.eval()(x)[0]
    tern = quantize(clone(bit), 'ternary')
    for layer in tern.quantized_linears():
        assert set(layer.weight_int8.unique().tolist()) <= {-1, 0, 1} and layer.weight_scale.numel() == 1
        layer.kernel = 'reference'
    assert rel_err(tern(x)[0], fake) < 1e-4


@pytest.mark.parametrize('scheme', ['int8', 'ternary'])
@pytest.mark.parametrize('kernel', ['auto', 'reference'])
def test_quantized_experts_that_get_no_tokens(scheme, kernel):
    """One cell of one gene sends its 2 tokens to at most 4 of 8 experts: the others get 0 rows."""
    torch.manual_seed(0)
    cfg = dict(V2_CFG, n_expert=8)
    model = quantize(ScBERT(ModelConfig(**cfg, bitlinear=scheme == 'ternary')).eval(), scheme)
    for layer in model.quantized_linears():
        layer.kernel = kernel
    x = {'genes': torch.tensor([[5]]), 'values': torch.tensor([[1.5]]), 'bins': torch.tensor([[3]])}
    logits = model(x)[0]
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_weight_only_fallback_is_the_dequantized_linear():
    """On GPU, or where PyTorch's int8 engine is gone, 'auto' runs weight-only int8: the dequantized weights, the
    activations untouched."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(24, 40) * 0.05, torch.randn(24) * 0.1)
    layer._packed = False                                              # as when the int8 kernel cannot run
    x = torch.randn(3, 7, 40)
    w = layer.weight_int8.float() * layer.weight_scale[:, None]
    assert torch.allclose(layer(x), F.linear(x, w, layer.bias), atol=1e-6)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), F.linear(x, w, layer.bias)) < 0.02


def test_reference_path_in_half_precision():
    """The reference arithmetic runs in fp32 whatever the input dtype: integer sums up to 127² · in_features would
    overflow fp16, and an all-zero token must not give 0 · inf."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(16, 3072) * 0.05, torch.zeros(16))
    layer.kernel = 'reference'
    x = torch.randn(4, 3072) * 5
    x[0] = 0
    ref = layer(x)
    for dtype in (torch.float16, torch.bfloat16):
        y = layer(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all() and (y[0] == 0).all()
        assert rel_err(y.float(), ref) < 0.01
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert rel_err(layer(x).float(), ref) < 0.01


def test_a_quantized_state_dict_saves_and_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    for scheme in ('int8', 'ternary'):
        model = ScBERT(ModelConfig(**V2_CFG, bitlinear=scheme == 'ternary')).eval()
        q = quantize(model, scheme)
        sd = packed_state_dict(q)
        assert any(k.endswith('weight_packed') for k in sd) == (scheme == 'ternary')
        path = tmp_path / f'{scheme}.pt'
        torch.save({'model': sd, 'model_args': q.config.__dict__, 'quantization': scheme}, path)
        loaded = ScBERT.from_checkpoint(torch.load(path, weights_only=True)).eval()
        assert loaded.quantization == scheme
        x = inputs(V2_CFG)
        assert torch.equal(loaded(x)[0], q(x)[0])


def test_quantize_py_int8_on_real_cells(baron, teacher, tmp_path):
    """int8: on real cells the logits stay close to fp32's and the predictions agree; the file loads with
    weights_only=True (plain tensors, no pickled objects) and predict.py annotates with it."""
    out, summary = tmp_path / 'int8.pt', tmp_path / 'q.json'
    result = run('quantize.py', f'--ckpt={teacher}', f'--out={out}', f'--summary={summary}', '--num_threads=1')
    assert 'test fold 0' in result.stdout and 'int8' in result.stdout
    report = json.loads(summary.read_text())['folds'][0]
    assert report['method'] == 'post-training' and report['agreement'] >= 0.9
    assert abs(report['float']['macro_f1'] - report['quantized']['macro_f1']) < 0.1
    assert report['linear_ratio'] > 3 and report['file_bytes'] < report['file_bytes_float']
    ckpt = torch.load(out, weights_only=True)
    assert ckpt['quantization'] == 'int8' and ckpt['source'] == str(teacher) and ckpt['fold'] == 0
    float_model = ScBERT.from_checkpoint(state(teacher)).eval()
    int8_model = ScBERT.from_checkpoint(ckpt).eval()
    data = Dataset(baron)
    x = dataset_input(data, fold_split(data, 0)[2], float_model.config)
    with torch.no_grad():
        a, b = float_model(x)[0], int8_model(x)[0]
    assert rel_err(b, a) < 0.05 and (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    # the novelty rule is fitted again on the int8 model: close to the float model's, not the same numbers
    assert report['novelty'] == 'refitted on the quantized model'
    fp, q = state(teacher)['novelty'], ckpt['novelty']
    assert q['default'] == fp['default'] and q['bank'].shape == fp['bank'].shape
    assert not torch.equal(q['class_means'], fp['class_means'])
    assert torch.allclose(q['class_means'], fp['class_means'], rtol=0.1, atol=0.05 * fp['class_means'].abs().max())
    result = run('predict.py', f'--ckpt={out}', f'--input={FIXTURES / "counts_csr.h5ad"}',
                 f'--output={tmp_path / "p.csv"}')
    assert len((tmp_path / 'p.csv').read_text().splitlines()) == 79
    assert f"{fp['default']} score >" in result.stdout


def test_quantize_py_post_training_ternary(baron, teacher, tmp_path):
    """A float model to packed ternary: BitLinear's norms are calibrated on a random sample of the test fold's training
    cells, the weights are packed at 1.6 bits (> 10x smaller than fp32), and the file runs in predict.py."""
    out, summary = tmp_path / 't.pt', tmp_path / 't.json'
    run('quantize.py', f'--ckpt={teacher}', '--scheme=ternary', f'--out={out}', f'--summary={summary}',
        '--num_threads=1', '--calibration_cells=20', '--batch_size=8')
    report = json.loads(summary.read_text())['folds'][0]
    assert report['method'] == 'post-training' and report['calibration_cells'] == 20 and report['linear_ratio'] > 10
    assert 0 <= report['quantized']['macro_f1'] <= 1 and report['params'] > report['params_quantized'] > 0
    packed = torch.load(out, weights_only=True)
    assert packed['model_args']['bitlinear'] and any(k.endswith('.weight_packed') for k in packed['model'])
    model = ScBERT.from_checkpoint(packed)
    norms = [m.norm.weight for m in model.quantized_linears() if m.norm is not None] + \
        [b.mlp.norm_in.weight for b in model.blocks]
    assert all(not torch.allclose(w, torch.ones_like(w)) for w in norms)        # every gain calibrated
    run('predict.py', f'--ckpt={out}', f'--input={FIXTURES / "counts_csr.h5ad"}',
        f'--output={tmp_path / "p.csv"}')
    assert len((tmp_path / 'p.csv').read_text().splitlines()) == 79


def test_bitlinear_training_then_packed_ternary(baron, teacher, tmp_path):
    """train.py --bitlinear=True from a float checkpoint: the norms are calibrated, training runs on ternary weights,
    and quantize.py packs exactly what trained: the packed file's logits are the QAT model's (fake-quantized)."""
    qat, fold0 = tmp_path / 'qat', tmp_path / 'cv' / 'fold0'
    fold0.mkdir(parents=True)
    (fold0 / 'best.pt').write_bytes(teacher.read_bytes())
    common = [f'--dataset={baron}', f'--out_dir={qat}', '--bitlinear=True', '--num_threads=1', '--batch_size=8',
              '--baseline=False', '--max_iters=10', '--eval_interval=5', '--learning_rate=1e-3', '--warmup_iters=2']
    # {fold} in init_from: each CV fold continues its own model; stopped after 5 steps and resumed
    result = run('train.py', *common, f"--init_from={tmp_path / 'cv' / 'fold{fold}' / 'best.pt'}", '--stop_iter=5')
    assert 'norm gains calibrated on 46 training cells' in result.stdout                  # all 46: fewer than 256
    run('train.py', *common, '--init_from=resume')
    assert state(qat / 'ckpt.pt')['iter_num'] == 9
    user_error(run('train.py', *common, f'--init_from={teacher}', '--fold=1', f'--out_dir={tmp_path / "o"}',
                   check=False), 'test fold 0')                    # fold 0's model trained on fold 1's test cells
    ckpt = state(qat / 'best.pt')
    assert ckpt['model_args']['bitlinear'] and 'blocks.0.attn.to_q.norm.weight' in ckpt['model']
    out = tmp_path / 't.pt'
    result = run('quantize.py', f'--ckpt={qat / "best.pt"}', '--scheme=ternary', f'--out={out}', '--num_threads=1',
                 f'--summary={tmp_path / "t.json"}')
    report = json.loads((tmp_path / 't.json').read_text())['folds'][0]
    assert report['method'].startswith('QAT') and report['agreement'] >= 0.9 and report['linear_ratio'] > 10
    packed = torch.load(out, weights_only=True)
    assert packed['quantization'] == 'ternary' and not any(k.endswith('weight_int8') for k in packed['model'])
    bit, tern = ScBERT.from_checkpoint(ckpt).eval(), ScBERT.from_checkpoint(packed).eval()
    for layer in tern.quantized_linears():
        layer.kernel = 'reference'
    data = Dataset(baron)
    x = dataset_input(data, np.arange(data.n_cells), bit.config)
    with torch.no_grad():
        assert rel_err(tern(x)[0], bit(x)[0]) < 1e-3


def test_bad_quantization_input(baron, teacher, tmp_path):
    qat_like = tmp_path / 'bit.pt'
    ckpt = state(teacher)
    bit = as_bitlinear(ScBERT.from_checkpoint(ckpt))
    torch.save(dict(ckpt, model=bit.state_dict(), model_args=bit.config.__dict__), qat_like)
    run('quantize.py', f'--ckpt={teacher}', f'--out={tmp_path / "q.pt"}', '--evaluate=False')
    for args, pattern in (([f'--ckpt={tmp_path / "none.pt"}'], 'not found'),
                          ([f'--ckpt={teacher}', '--scheme=int4'], 'int8 or ternary'),
                          ([f'--ckpt={qat_like}'], 'use --scheme=ternary'),
                          ([f'--ckpt={tmp_path / "q.pt"}', f'--out={tmp_path / "q2.pt"}'], 'already quantized'),
                          ([f'--ckpt={teacher}', f'--out={teacher}'], 'overwrite'),
                          ([f'--ckpt={teacher}', '--fold=all'], '{fold}'),
                          ([f'--ckpt={teacher}', '--fold=2'], 'test fold 0'),
                          ([f'--ckpt={teacher}', f'--out={tmp_path / "no" / "q.pt"}'], 'folder')):
        user_error(run('quantize.py', *args, check=False), pattern)
    # a quantized file is for inference: train.py refuses to start from it
    user_error(run('train.py', f'--dataset={baron}', f'--init_from={tmp_path / "q.pt"}', f'--out_dir={tmp_path / "o"}',
                   check=False), 'quantized')
    user_error(run_distill(f'--dataset={baron}', f'--teacher={teacher}', '--bitlinear=True',
                   f'--out_dir={tmp_path / "o"}', check=False), 'bitlinear with a teacher')
    assert not (tmp_path / 'o').exists()
    assert 'calibration_cells' in run('quantize.py', '--help').stdout


def test_quantize_py_on_the_original_release_checkpoint(tmp_path):
    """An original scBERT fine-tuned checkpoint (the reference run's, 1,023 genes): quantize.py needs its panel and
    class names to write a self-contained file, whose int8 logits stay close to the original code's outputs."""
    ref = SHARED / 'scbert_ref'
    if not ref.exists():
        pytest.skip('shared data not available')
    (tmp_path / 'genes.txt').write_text('\n'.join(f'G{i}' for i in range(1023)) + '\n')
    (tmp_path / 'labels.txt').write_text('\n'.join('abcde') + '\n')
    (tmp_path / 'labels6.txt').write_text('\n'.join('abcdef') + '\n')
    ckpt, out = ref / 'finetune_state_dict.pt', tmp_path / 'q.pt'
    user_error(run('quantize.py', f'--ckpt={ckpt}', f'--out={out}', check=False), '--vocab')
    user_error(run('quantize.py', f'--ckpt={ckpt}', f'--out={out}', f'--vocab={tmp_path / "genes.txt"}',
                   f'--label_names={tmp_path / "labels6.txt"}', check=False), '6 names .* 5 classes')
    result = run('quantize.py', f'--ckpt={ckpt}', f'--out={out}', f'--vocab={tmp_path / "genes.txt"}',
                 f'--label_names={tmp_path / "labels.txt"}', '--num_threads=1')
    assert 'not scored' in result.stdout and '4.99M parameters quantized' in result.stdout
    packed = torch.load(out, weights_only=True)
    assert packed['label_names'] == list('abcde') and len(packed['vocab']) == 1023 and packed['log_base'] == 2.0
    io = torch.load(ref / 'io.pt', weights_only=True)
    with torch.no_grad():
        logits = ScBERT.from_checkpoint(packed).eval()(io['tokens'])[0]
    assert rel_err(logits, io['finetune_logits_single']) < 0.05
    assert torch.equal(logits.argmax(-1), io['finetune_logits_single'].argmax(-1))
