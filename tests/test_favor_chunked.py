"""FAVOR+ a chunk of tokens at a time (model.favor_attention) against the definition, all tokens at once
(model.softmax_kernel, written out here as the original computes it): the same outputs and the same gradients, for
chunk sizes that divide the length and ones that do not, batches of several cells, both key stabilisers, and with the
inference-only workspace. Then bench.py's performer_pytorch reference: a clear error when the package is absent, and,
where it is installed, a tiny run beside ours."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, user_error
from model import ModelConfig, ScBERT, favor_attention, orthogonal_random_features, softmax_kernel


def whole_favor(q, k, v, projection, batch_max=False):
    """The unchunked FAVOR+: every (B, H, L, m) feature map made whole, as the original scBERT does."""
    phi_q = softmax_kernel(q, projection, is_query=True)
    phi_k = softmax_kernel(k, projection, is_query=False, batch_max=batch_max)
    out = phi_q @ (phi_k.transpose(-2, -1) @ F.pad(v, (0, 1), value=1.0))
    return out[..., :-1] / out[..., -1:]


def qkv(B=3, H=2, L=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # keys of one cell far larger than the rest, so the running max of the key stabiliser must rescale mid-way
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, L // 2:] *= 3
    return q, k, v, orthogonal_random_features(20, d, g).double()


@pytest.mark.parametrize('chunk', [1, 5, 16, 37 * 3, 1000])   # 5 and 16 do not divide 37 (positions per chunk: 1, 5)
@pytest.mark.parametrize('batch_max', [False, True])
def test_chunked_equals_whole_forward_and_gradients(chunk, batch_max):
    q, k, v, projection = qkv()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    whole = whole_favor(*inputs, projection, batch_max)
    grads_whole = torch.autograd.grad(whole.pow(2).sum(), inputs)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    chunked = favor_attention(*inputs, projection, batch_max, chunk=chunk)
    grads_chunked = torch.autograd.grad(chunked.pow(2).sum(), inputs)
    assert chunked.shape == (3, 2, 37, 8)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    with torch.no_grad():                      # inference writes the logits into one reused workspace
        torch.testing.assert_close(favor_attention(q, k, v, projection, batch_max, chunk=chunk), whole.detach(),
                                   rtol=1e-10, atol=1e-12)


def test_per_cell_stabiliser_keeps_cells_independent_of_their_batch():
    q, k, v, projection = qkv()
    together = favor_attention(q, k, v, projection, chunk=7)
    alone = torch.cat([favor_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], projection, chunk=7) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)


def test_model_chunk_setting_changes_nothing_but_speed():
    torch.manual_seed(0)
    small = dict(n_genes=50, n_embd=16, n_layer=2, n_head=2, dim_head=8, n_classes=3)
    a, b = ScBERT(ModelConfig(**small)).eval(), ScBERT(ModelConfig(**small, favor_chunk=7)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 7, (2, 51))
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='favor_chunk'):
        ModelConfig(**small, favor_chunk=0)


TINY = ['--dataset=', '--n_genes=64', '--n_embd=16', '--n_layer=2', '--n_head=2', '--dim_head=8', '--num_threads=1',
        '--peak_flops=1e11', '--batch_sizes=1,2', '--train=False', '--repeats=1', '--warmup=0']


def test_reference_variant_without_the_package_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'performer_pytorch', None)      # import performer_pytorch -> ImportError
    result = run_script('bench.py', *TINY, '--variants=scbert,performer_pytorch', f'--out={tmp_path / "b.json"}',
                        check=False)
    user_error(result, r'pip install performer-pytorch')
    assert not (tmp_path / 'b.json').exists()


def test_reference_variant_runs_beside_ours(tmp_path):
    pytest.importorskip('performer_pytorch')
    result = run_script('bench.py', *TINY, '--variants=scbert,performer_pytorch', f'--out={tmp_path / "b.json"}',
                        f'--plot={tmp_path / "b.png"}')
    rows = {r['variant']: r for r in json.loads((tmp_path / 'b.json').read_text())['variants']}
    ours, theirs = rows['scbert'], rows['performer_pytorch']
    assert ours['params'] == theirs['params']            # the same size, the same head
    assert abs(theirs['flop_check']['counted'] / ours['flop_check']['counted'] - 1) < 0.01
    for r in (ours, theirs):
        assert [run['batch_size'] for run in r['inference']] == [1, 2]
        assert all(run['cells_per_s'] > 0 and run['minor_faults_per_pass'] >= 0 for run in r['inference'])
    assert set(ours['vs_performer_pytorch']) == {'1', '2'} and 'performer_pytorch' in result.stdout
