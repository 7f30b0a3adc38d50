"""Every CUDA path, in one command (`python -m pytest -q tests/test_cuda.py` on a GPU machine; skipped without one):
bf16 autocast training steps of scBERT and scBERT 2.0, torch.compile through train.py, the MoE's grouped matmul against
the CPU loop, flash SDPA (no padding) and masked SDPA against the math backend, pinned non-blocking copies from
DataLoader workers, DDP over nccl in one process, int8 weight-only inference, and a few hundred steps of
config/scbert2.py at a reduced size. No timings are asserted; the bf16 tolerances are generous."""
import csv
import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import FIXTURES, run_script, state, torchrun
from model import ModelConfig, MoE, ScBERT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

SCBERT_CFG = dict(n_genes=30, n_embd=32, n_layer=2, n_head=4, dim_head=8, n_classes=3)
V2_CFG = dict(SCBERT_CFG, input_genes='expressed', attention='sdpa', n_kv_head=2, norm='rmsnorm', mlp='swiglu',
              bias=False, n_expert=4, n_expert_active=2, head='cls', value_emb='continuous', n_bins=7, dim_head=16)
# train.py on the Baron fixture, a tiny scBERT 2.0 with every option (GQA, RMSNorm, SwiGLU top-2 MoE, values)
V2_ARGS = ['--n_embd=32', '--n_layer=2', '--n_head=4', '--dim_head=8', '--head_hidden=16', '--batch_size=8',
           '--baseline=False', '--input_genes=expressed', '--attention=sdpa', '--head=cls', '--n_kv_head=2',
           '--norm=rmsnorm', '--mlp=swiglu', '--n_expert=4', '--n_expert_active=2', '--value_emb=continuous',
           '--n_bins=7', '--max_genes=64']
SCBERT_ARGS = ['--n_embd=16', '--n_layer=1', '--n_head=2', '--dim_head=8', '--head_hidden=16', '--batch_size=8',
               '--baseline=False']


def inputs(cfg, n=6, length=12, padded=True, device='cuda'):
    g = torch.Generator().manual_seed(1)
    if cfg.get('input_genes') != 'expressed':
        return torch.randint(0, 6, (n, cfg['n_genes'] + 1), generator=g).to(device)
    genes = torch.stack([torch.randperm(cfg['n_genes'], generator=g)[:length] for _ in range(n)])
    if padded:
        genes[0, length - 4:] = -1
    x = {'genes': genes, 'values': torch.rand(n, length, generator=g) * 3,
         'bins': torch.randint(1, 7, (n, length), generator=g)}
    return {k: v.to(device) for k, v in x.items()}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------ in this process
@pytest.mark.parametrize('cfg', [SCBERT_CFG, V2_CFG], ids=['scbert', 'scbert2_moe'])
def test_bf16_autocast_training_steps(cfg):
    """Forward + backward under bf16 autocast: the loss and gradients are close to fp32's, and 30 AdamW steps on one
    batch bring the loss down."""
    torch.manual_seed(0)
    model = ScBERT(ModelConfig(**cfg)).cuda().train()
    x, y = inputs(cfg), torch.tensor([0, 1, 2, 0, 1, 2], device='cuda')
    _, loss32 = model(x, y)
    loss32.backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        _, loss16 = model(x, y)
    loss16.backward()
    assert torch.isfinite(loss16), loss16
    assert abs(loss16.item() - loss32.item()) < 0.05 * abs(loss32.item()) + 0.02, (loss16.item(), loss32.item())
    params = dict(model.named_parameters())
    for name in grads32:
        assert params[name].grad is not None and torch.isfinite(params[name].grad).all(), name
    all16 = torch.cat([params[name].grad.flatten().float() for name in grads32])
    all32 = torch.cat([g.flatten() for g in grads32.values()])
    assert rel_err(all16, all32) < 0.1, rel_err(all16, all32)          # the whole gradient, bf16 against fp32
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optim.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def test_moe_grouped_matmul_matches_the_cpu_loop():
    """MoE.expert_matmul: one F.grouped_mm call under CUDA autocast (sm80+) against the per-expert loop on CPU in fp32,
    an expert without tokens included; then a whole MoE layer's output and gradients, CUDA bf16 against CPU fp32."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip('grouped_mm runs on sm80+ GPUs only')
    torch.manual_seed(0)
    E, N, C, H = 4, 50, 64, 96
    counts = torch.tensor([20, 0, 17, 13])                              # expert 1 gets no tokens
    x, w = torch.randn(N, C), torch.randn(E, H, C) * 0.05
    want = MoE.expert_matmul(x, w, counts)                               # CPU: the loop, fp32
    with torch.autocast('cuda', dtype=torch.bfloat16):
        got = MoE.expert_matmul(x.cuda(), w.cuda(), counts.cuda())
    assert got.shape == (N, H) and got.dtype == torch.bfloat16
    assert rel_err(got.cpu(), want) < 0.02, rel_err(got.cpu(), want)
    cfg = ModelConfig(n_genes=10, n_embd=C, n_layer=1, n_head=4, dim_head=16, mlp='swiglu', n_expert=E,
                      n_expert_active=2, attention='sdpa', input_genes='expressed')
    torch.manual_seed(0)
    cpu = MoE(cfg)
    gpu = MoE(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    tokens = torch.randn(200, C)
    out_cpu = cpu(tokens)
    out_cpu.square().sum().backward()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out_gpu = gpu(tokens.cuda())
    out_gpu.float().square().sum().backward()
    assert rel_err(out_gpu.cpu(), out_cpu) < 0.03, rel_err(out_gpu.cpu(), out_cpu)
    for name, p in cpu.named_parameters():
        q = dict(gpu.named_parameters())[name]
        assert q.grad is not None and torch.isfinite(q.grad).all(), name
        assert rel_err(q.grad.cpu(), p.grad) < 0.1, (name, rel_err(q.grad.cpu(), p.grad))


def test_flash_sdpa_without_padding_and_masked_sdpa_with_it():
    """A batch without padding passes no mask, so the flash kernel must run it (sdpa_kernel(FLASH) raises otherwise);
    a padded batch runs masked SDPA. Both against the math backend, and a padded cell's output is its own alone."""
    torch.manual_seed(0)
    cfg = dict(V2_CFG, n_embd=64, n_head=4, dim_head=16)
    model = ScBERT(ModelConfig(**cfg)).cuda().eval()
    full = inputs(cfg, n=4, length=12, padded=False)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = model(full)[0]
        with sdpa_kernel(SDPBackend.MATH):
            math_out = model(full)[0]
    assert torch.isfinite(flash).all()
    assert rel_err(flash, math_out) < 0.03, rel_err(flash, math_out)
    padded = inputs(cfg, n=4, length=12, padded=True)                    # cell 0 has 8 genes, 4 padding slots
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        masked = model(padded)[0]
        with sdpa_kernel(SDPBackend.MATH):
            masked_math = model(padded)[0]
        alone = model({k: v[:1, :8] for k, v in padded.items()})[0]      # cell 0 without its padding
    assert torch.isfinite(masked).all()
    assert rel_err(masked, masked_math) < 0.03, rel_err(masked, masked_math)
    assert rel_err(masked[:1], alone) < 0.03, rel_err(masked[:1], alone)
    with torch.no_grad():                                                # fp32 (TF32 matmuls, maybe): close
        with sdpa_kernel(SDPBackend.MATH):
            exact = model(padded)[0]
        torch.testing.assert_close(model(padded)[0], exact, rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------ the scripts
@pytest.mark.parametrize('arch', ['scbert', 'scbert2'])
def test_train_py_compiled(baron, tmp_path, arch):
    """train.py --compile=True on CUDA (bf16 autocast by default): a few steps run and the losses are finite."""
    out = tmp_path / 'out'
    args = SCBERT_ARGS if arch == 'scbert' else V2_ARGS
    result = run_script('train.py', f'--dataset={baron}', f'--out_dir={out}', *args, '--device=cuda', '--compile=True',
                        '--max_iters=6', '--eval_interval=5', '--log_interval=1', '--warmup_iters=1')
    assert 'Traceback' not in result.stderr
    history = state(out / 'ckpt.pt')['history']
    assert len(history['train_loss']) == 6 and np.isfinite(history['train_loss']).all(), history['train_loss']
    assert np.isfinite(history['val_loss']).all(), history['val_loss']


def test_pinned_non_blocking_copies_from_workers(baron, tmp_path):
    """--num_workers=2 on CUDA: batches built in worker processes, pinned, copied non_blocking. The run matches the
    one that builds its batches in the training process (the same batches; GPU kernels may differ in rounding)."""
    common = [f'--dataset={baron}', *V2_ARGS, '--device=cuda', '--max_iters=6', '--eval_interval=5',
              '--log_interval=1', '--warmup_iters=1']
    run_script('train.py', *common, f'--out_dir={tmp_path / "a"}')
    result = run_script('train.py', *common, f'--out_dir={tmp_path / "b"}', '--num_workers=2')
    assert 'Traceback' not in result.stderr
    a, b = state(tmp_path / 'a' / 'ckpt.pt'), state(tmp_path / 'b' / 'ckpt.pt')
    assert np.isfinite(b['history']['train_loss']).all()
    assert b['history']['train_loss'][0] == pytest.approx(a['history']['train_loss'][0], rel=1e-2), \
        (a['history']['train_loss'], b['history']['train_loss'])
    for k in a['model']:
        assert torch.allclose(a['model'][k].float(), b['model'][k].float(), rtol=0.05, atol=5e-3), k


def test_ddp_nccl_one_process(baron, tmp_path):
    """torchrun --nproc_per_node=1 train.py --device=cuda: DDP over nccl runs, and (fp32, one rank) its weights are a
    plain run's."""
    args = [f'--dataset={baron}', *V2_ARGS, '--device=cuda', '--dtype=float32', '--max_iters=4', '--eval_interval=3',
            '--aux_loss_weight=0', '--z_loss_weight=0']
    run_script('train.py', *args, f'--out_dir={tmp_path / "plain"}')
    result = torchrun('train.py', *args, f'--out_dir={tmp_path / "ddp"}', nproc=1)
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    plain, ddp = state(tmp_path / 'plain' / 'ckpt.pt'), state(tmp_path / 'ddp' / 'ckpt.pt')
    assert np.isfinite(ddp['history']['train_loss']).all()
    for k in plain['model']:
        assert torch.allclose(plain['model'][k].float(), ddp['model'][k].float(), rtol=1e-2, atol=1e-3), k


def test_int8_weight_only_inference_on_cuda(baron, scbert2_model, tmp_path):
    """quantize.py --scheme=int8, then predict.py on CUDA (weight-only int8 under bf16 autocast): the probabilities
    stay close to the float model's on CUDA, and so do the logits computed here in fp32."""
    from data import Dataset, dataset_input
    q = tmp_path / 'int8.pt'
    run_script('quantize.py', f'--ckpt={scbert2_model}', '--scheme=int8', f'--out={q}', '--evaluate=False')
    source = FIXTURES / 'counts_csr.h5ad'
    for name, ckpt in (('fp32', scbert2_model), ('int8', q)):
        run_script('predict.py', f'--ckpt={ckpt}', f'--input={source}', f'--output={tmp_path / f"{name}.csv"}',
                   '--device=cuda', '--novelty=off')
    fp32, int8 = (list(csv.DictReader(open(tmp_path / f'{name}.csv'))) for name in ('fp32', 'int8'))
    assert len(fp32) == len(int8) == 78
    agree = np.mean([a['predicted_label'] == b['predicted_label'] for a, b in zip(fp32, int8)])
    gap = max(abs(float(a['probability']) - float(b['probability'])) for a, b in zip(fp32, int8))
    assert agree >= 0.9 and gap < 0.1, (agree, gap)
    float_model = ScBERT.from_checkpoint(state(scbert2_model)).cuda().eval()
    int8_model = ScBERT.from_checkpoint(torch.load(q, weights_only=True)).cuda().eval()
    assert int8_model.quantized_linears(), 'no QuantLinear in the int8 model'
    data = Dataset(baron)
    x = dataset_input(data, np.arange(data.n_cells), float_model.config)
    x = {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda()
    with torch.no_grad():
        a, b = float_model(x)[0].float(), int8_model(x)[0].float()
    assert rel_err(b, a) < 0.05, rel_err(b, a)
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.1
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9


def test_scbert2_config_pretrains_at_a_reduced_size(baron, tmp_path):
    """config/scbert2.py (Adafactor, bf16, MoE, bucketing, 4 workers) at 2 blocks of width 128 on the Baron cells:
    300 steps of masked modelling, and the loss falls."""
    out = tmp_path / 'out'
    result = run_script('train.py', 'config/scbert2.py', f'--dataset={baron}', f'--out_dir={out}', '--mode=pretrain',
                        '--n_layer=2', '--n_embd=128', '--max_iters=300', '--warmup_iters=30', '--eval_interval=100',
                        '--log_interval=5', '--batch_size=16', '--compile=False', '--device=cuda')
    assert 'Traceback' not in result.stderr
    history = state(out / 'ckpt.pt')['history']
    train = np.asarray(history['train_loss'])                           # every 5th step's loss
    assert len(train) >= 60 and np.isfinite(train).all(), train
    assert train[-6:].mean() < 0.95 * train[:3].mean(), (train[:3], train[-6:])
    assert history['val_loss'][-1] < history['val_loss'][0], history['val_loss']


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
