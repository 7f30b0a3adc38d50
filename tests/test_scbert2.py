"""scBERT 2.0's parts of model.py and data.py against naive references: grouped-query attention and SDPA with padding,
padding invariance of the expressed-gene input (MoE on and off, every value embedding), the MoE's dispatch, top-k,
auxiliary losses and gradients, the continuous value embedding, the masked-regression loss, per-cell quantile bins,
expressed_batch, RMSNorm, Adafactor and the active-parameter count. Tiny configs only: the file runs in seconds."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from model import MLP, MoE, Attention, AutoDiscretization, ModelConfig, RMSNorm, ScBERT, token_valid

torch.set_num_threads(1)
TINY = dict(n_genes=50, n_bins=5, n_embd=32, n_layer=2, n_head=4, dim_head=8, attention='sdpa',
            input_genes='expressed', head='cls')


def config(**overrides):
    return ModelConfig(**{**TINY, **overrides})


def randomize(module, std=0.3, seed=0):
    """Weights large enough that every part matters (the model's init is N(0, 0.02): outputs near zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def random_csr(lengths, n_genes=50, seed=0, ties=False):
    """CSR cells with the given numbers of expressed genes: indices ascending and distinct, values > 0."""
    rng = np.random.default_rng(seed)
    indices = [np.sort(rng.choice(n_genes, n, replace=False)) for n in lengths]
    values = [rng.exponential(1.5, n) + 0.05 for n in lengths]
    if ties:
        values = [np.round(v, 0) + 0.5 for v in values]                    # few distinct values: many ties
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return (indptr, np.concatenate(indices).astype(np.int32) if indices else np.zeros(0, np.int32),
            np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32))


# ----------------------------------------------------------------------------------------------------------------
# attention

def naive_attention(attn, x, key_mask=None):
    """Softmax attention written out head by head, query head h reading key/value head h // (n_head / n_kv_head),
    from the module's own to_q/to_k/to_v/to_out. key_mask (B, L) bool, True = a real key."""
    B, L, _ = x.shape
    H, Hkv = attn.n_head, attn.n_kv_head
    d = attn.to_q.out_features // H
    q = attn.to_q(x).view(B, L, H, d)
    k = attn.to_k(x).view(B, L, Hkv, d)
    v = attn.to_v(x).view(B, L, Hkv, d)
    heads = []
    for h in range(H):
        g = h // (H // Hkv)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(d)     # (B, L, L)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float('-inf'))
        heads.append(scores.softmax(-1) @ v[:, :, g])                        # (B, L, d)
    return attn.to_out(torch.cat(heads, dim=-1))


def repeat_kv_reference(attn, x):
    """The GQA reference the brief names: k/v heads repeated with torch.repeat_interleave, then plain MHA."""
    B, L, _ = x.shape
    H, Hkv = attn.n_head, attn.n_kv_head
    d = attn.to_q.out_features // H
    q = attn.to_q(x).view(B, L, H, d).transpose(1, 2)
    k = attn.to_k(x).view(B, L, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = attn.to_v(x).view(B, L, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    out = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1) @ v
    return attn.to_out(out.transpose(1, 2).reshape(B, L, H * d))


@pytest.mark.parametrize('n_kv_head', [4, 2, 1])
def test_grouped_query_attention_matches_naive_reference(n_kv_head):
    torch.manual_seed(0)
    cfg = config(n_kv_head=n_kv_head)
    attn = randomize(Attention(cfg, 0)).eval()
    assert attn.to_q.out_features == 4 * 8 and attn.to_k.out_features == attn.to_v.out_features == n_kv_head * 8
    x = torch.randn(3, 11, 32)
    out = attn(x)
    torch.testing.assert_close(out, naive_attention(attn, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, repeat_kv_reference(attn, x), rtol=1e-5, atol=1e-5)
    if n_kv_head < 4:
        # GQA is MHA whose key/value weights repeat per group of query heads
        mha = Attention(config(n_kv_head=4), 0).eval()
        with torch.no_grad():
            mha.to_q.weight.copy_(attn.to_q.weight)
            mha.to_out.weight.copy_(attn.to_out.weight)
            mha.to_out.bias.copy_(attn.to_out.bias)
            for name in ('to_k', 'to_v'):
                w = getattr(attn, name).weight.view(n_kv_head, 8, 32).repeat_interleave(4 // n_kv_head, dim=0)
                getattr(mha, name).weight.copy_(w.reshape(32, 32))
        torch.testing.assert_close(out, mha(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n_kv_head', [4, 2])
def test_sdpa_with_padding_matches_naive_masked_attention(n_kv_head):
    torch.manual_seed(1)
    attn = randomize(Attention(config(n_kv_head=n_kv_head), 0), seed=1).eval()
    B, L = 4, 9
    x = torch.randn(B, L, 32)
    lengths = torch.tensor([9, 6, 1, 4])                                    # one cell unpadded, one a single token
    valid = torch.arange(L)[None, :] < lengths[:, None]                     # (B, L)
    out = attn(x, valid[:, None, None, :])
    ref = naive_attention(attn, x, valid)
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    # the padded keys really are hidden: changing them leaves the real positions as they were
    x2 = torch.where(valid[..., None], x, torch.randn(B, L, 32) * 5)
    torch.testing.assert_close(attn(x2, valid[:, None, None, :])[valid], out[valid], rtol=1e-5, atol=1e-5)
    # and without the mask they would not: the test can tell
    assert not torch.allclose(attn(x)[valid], out[valid], atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# padding invariance of the whole model

def strip_targets(x):
    return {k: x[k] for k in ('genes', 'values', 'bins')}


@pytest.mark.parametrize('value_emb', ['bins', 'quantile', 'continuous'])
@pytest.mark.parametrize('n_expert', [0, 4])
@pytest.mark.parametrize('head', ['cls', 'pooled', 'scbert'])
def test_a_cell_gives_the_same_outputs_alone_and_in_a_padded_batch(value_emb, n_expert, head):
    torch.manual_seed(0)
    cfg = config(value_emb=value_emb, n_expert=n_expert, head=head, n_classes=3, n_kv_head=2, mlp='swiglu',
                 norm='rmsnorm')
    model = ScBERT(cfg).eval()
    indptr, indices, values = random_csr([5, 17, 12, 23], seed=3)
    seeds = data.cell_seeds(indptr, indices)
    batch = data.expressed_batch(indptr, indices, values, seeds, cfg, 2.0, mask_prob=0.3)
    alone_csr = data.take_rows(indptr, indices, values, [0])
    alone = data.expressed_batch(*alone_csr, data.cell_seeds(*alone_csr[:2]), cfg, 2.0, mask_prob=0.3)
    n = 5
    assert batch['genes'].shape == (4, 23) and (batch['genes'][0, n:] == -1).all() and alone['genes'].shape == (1, n)
    for key in ('genes', 'values', 'bins'):                                # the same cell, the same mask
        assert torch.equal(batch[key][0, :n], alone[key][0])
    assert (batch['bins'][0] == cfg.mask_id).any()
    xb, xa = strip_targets(batch), strip_targets(alone)
    with torch.no_grad():
        logits_b, logits_a = model(xb)[0], model(xa)[0]
        torch.testing.assert_close(logits_b[0], logits_a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode(xb)[0, :1 + n], model.encode(xa)[0], rtol=1e-5, atol=1e-5)
        mlm_b, mlm_a = model(xb, task='mlm')[0], model(xa, task='mlm')[0]
        assert mlm_b['bins'].shape == (4, 23, cfg.n_bins + 2) and mlm_b['values'].shape == (4, 23)
        torch.testing.assert_close(mlm_b['bins'][0, :n], mlm_a['bins'][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlm_b['values'][0, :n], mlm_a['values'][0], rtol=1e-5, atol=1e-5)
        # the other cells do influence a cell if the padding is not masked: the test can tell
        unmasked = dict(xb, genes=xb['genes'].clamp(min=0))
        assert not torch.allclose(model.encode(unmasked)[0, :1 + n], model.encode(xa)[0], atol=1e-4)


def test_moe_routes_only_the_real_tokens():
    torch.manual_seed(0)
    model = ScBERT(config(n_expert=4, n_expert_active=2, n_classes=2)).eval()
    indptr, indices, values = random_csr([3, 10, 7])
    x = data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), model.config, 2.0)
    model.expert_load(reset=True)
    with torch.no_grad():
        model(x)
    n_real = 3 * 1 + 3 + 10 + 7                                             # a CLS token per cell, no padding
    for block in model.blocks:
        assert block.mlp.tokens_per_expert.sum().item() == n_real * 2
    load = model.expert_load()
    assert load.shape == (2, 4) and torch.allclose(load.sum(1), torch.full((2,), 4.0))
    assert model.expert_load(reset=False).sum() == 0                        # reset by the call before


# ----------------------------------------------------------------------------------------------------------------
# mixture of experts

def expert_reference(moe, x):
    """A python loop over tokens: softmax router probs, top-k, renormalised when k > 1, weighted expert MLPs."""
    probs = (x @ moe.router.weight.t()).softmax(-1)
    out = torch.zeros_like(x)
    for n in range(len(x)):
        w, experts = probs[n].topk(moe.top_k)
        if moe.top_k > 1:
            w = w / w.sum()
        for weight, e in zip(w, experts.tolist()):
            h = x[n] @ moe.w1[e].t()
            h = F.silu(h) * (x[n] @ moe.w3[e].t()) if moe.swiglu else F.gelu(h)
            out[n] += weight * (h @ moe.w2[e].t())
    return out


def make_moe(mlp, k, seed=0, n_expert=4):
    moe = MoE(config(n_expert=n_expert, n_expert_active=k, mlp=mlp))
    return randomize(moe, std=0.3, seed=seed).eval()


@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
@pytest.mark.parametrize('k', [1, 2])
def test_moe_dispatch_matches_dense_per_token_reference(mlp, k):
    moe = make_moe(mlp, k)
    assert moe.w1.shape == (4, moe.w1.shape[1], 32) and moe.w2.shape == (4, 32, moe.w1.shape[1])
    assert (moe.w3 is not None) == (mlp == 'swiglu')
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    out = moe(x)
    assert (moe.tokens_per_expert > 0).sum() >= 3                           # the routing is not trivial
    torch.testing.assert_close(out, expert_reference(moe, x), rtol=1e-5, atol=1e-5)
    # no token is dropped and each token is independent of the others: one at a time gives the same
    torch.testing.assert_close(torch.cat([moe(x[i:i + 1]) for i in range(len(x))]), out, rtol=1e-5, atol=1e-5)
    assert moe(x[:0]).shape == (0, 32)                                      # an empty batch (every token padding)


@pytest.mark.parametrize('k', [1, 2])
def test_moe_uses_exactly_the_top_k_experts(k):
    moe = make_moe('swiglu', k, seed=2)
    x = torch.randn(30, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        moe(x)
        assert moe.tokens_per_expert.sum().item() == 30 * k
        chosen = (x @ moe.router.weight.t()).softmax(-1).topk(k).indices
        assert torch.equal(moe.tokens_per_expert, torch.bincount(chosen.flatten(), minlength=4).float())
        for n in range(5):
            token = x[n:n + 1]
            base = moe(token)
            for e in range(4):
                saved = [w[e].clone() for w in (moe.w1, moe.w2, moe.w3)]
                for w in (moe.w1, moe.w2, moe.w3):
                    w[e].zero_()                                            # expert e now outputs exactly 0
                changed = moe(token)
                for w, s in zip((moe.w1, moe.w2, moe.w3), saved):
                    w[e].copy_(s)
                if e in chosen[n].tolist():
                    assert not torch.allclose(changed, base, atol=1e-6), (n, e)
                else:
                    assert torch.equal(changed, base), (n, e)


def test_moe_aux_loss_is_one_under_uniform_router_probabilities():
    for k in (1, 2):
        moe = make_moe('gelu', k)
        with torch.no_grad():
            moe.router.weight.zero_()                                       # every probability 1/E
        moe(torch.randn(24, 32))
        # top-k breaks the ties somehow, so the counts f_e need not be uniform: aux = E * sum_e f_e / E = sum f_e = 1
        # for ANY f (and perfectly balanced counts are impossible to force while the probabilities stay uniform)
        assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
        assert moe.z_loss.item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


@pytest.mark.parametrize('k', [1, 2])
def test_moe_aux_loss_formula_and_collapse(k):
    moe = make_moe('swiglu', k, seed=4)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(5))
    moe(x)
    logits = x @ moe.router.weight.t()
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(k).indices.flatten(), minlength=4).float()
    f, P = counts / (50 * k), probs.mean(0)
    assert moe.aux_loss.item() == pytest.approx(4 * (f * P).sum().item(), rel=1e-5)
    assert moe.z_loss.item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-5)
    # a router that sends every token to expert 0: a constant feature and a large weight on it
    x = x.clone()
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    moe(x)
    assert moe.tokens_per_expert.sum() > 0
    assert moe.aux_loss.item() > 1.5                                        # k=1: ~4 * 1 * 0.99; k=2: ~4 * 0.5 * 0.99
    z = torch.logsumexp(x @ moe.router.weight.t(), -1).pow(2).mean()
    assert moe.z_loss.item() == pytest.approx(z.item(), rel=1e-5)


@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
@pytest.mark.parametrize('k', [1, 2])
def test_moe_gradients_reach_every_routed_expert_and_only_those(mlp, k):
    moe = make_moe(mlp, k, seed=6).train()
    g = torch.Generator().manual_seed(7)
    N = 24
    x = 0.1 * torch.randn(N, 32, generator=g)
    x[:, 0] = 1.0
    for n in range(N):
        x[n, 1 + n % 3] += 3.0                                              # token n prefers expert n % 3
    with torch.no_grad():
        moe.router.weight.zero_()
        for e in range(3):
            moe.router.weight[e, 1 + e] = 5.0
        moe.router.weight[3, 0] = -5.0                                      # expert 3 is never chosen
    x.requires_grad_(True)
    out = moe(x)
    assert moe.tokens_per_expert.tolist()[3] == 0 and all(c > 0 for c in moe.tokens_per_expert.tolist()[:3])
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    weights = [moe.w1, moe.w2] + ([moe.w3] if mlp == 'swiglu' else [])
    for w in weights:
        assert w.grad is not None and w.grad.shape == w.shape
        for e in range(3):
            assert w.grad[e].abs().sum() > 0, e
        assert torch.equal(w.grad[3], torch.zeros_like(w.grad[3]))
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_moe_aux_losses_reach_the_router_and_average_over_layers():
    torch.manual_seed(0)
    model = ScBERT(config(n_expert=4, n_expert_active=2, n_classes=2)).train()
    indptr, indices, values = random_csr([6, 9])
    x = data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), model.config, 2.0)
    model(x, torch.tensor([0, 1]))
    aux, z = model.aux_losses()
    moes = [b.mlp for b in model.blocks]
    assert aux.item() == pytest.approx(sum(m.aux_loss.item() for m in moes) / 2, rel=1e-6)
    assert z.item() == pytest.approx(sum(m.z_loss.item() for m in moes) / 2, rel=1e-6)
    (aux + z).backward()
    for m in moes:
        assert m.router.weight.grad.abs().sum() > 0
    assert ScBERT(config(n_classes=2)).aux_losses() == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# continuous value embedding and masked regression

def test_auto_discretization_shape_gradients_and_reference():
    torch.manual_seed(0)
    ad = AutoDiscretization(n_bins=5, n_embd=32)
    values = torch.rand(3, 7) * 4
    out = ad(values)
    assert out.shape == (3, 7, 32)
    v1 = F.leaky_relu(values[..., None] * ad.w1.weight[:, 0] + ad.w1.bias)
    ref = (v1 @ ad.w2.weight.t() + ad.w2.bias + 0.1 * v1).softmax(-1) @ ad.table
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (out * torch.randn(out.shape)).sum().backward()
    for p in (ad.w1.weight, ad.w1.bias, ad.w2.weight, ad.w2.bias, ad.table):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_masked_positions_get_the_mask_embedding():
    torch.manual_seed(0)
    model = ScBERT(config(value_emb='continuous'))
    assert not hasattr(model, 'token_emb') and model.mask_emb.shape == (32,)
    mask_id = model.config.mask_id
    genes = torch.tensor([[3, 7, 11, 20], [5, 8, -1, -1]])
    values = torch.tensor([[0.5, 1.5, 2.5, 3.0], [0.7, 1.1, 0.0, 0.0]])
    bins = torch.tensor([[1, mask_id, 2, mask_id], [mask_id, 1, 0, 0]])
    x = {'genes': genes, 'values': values, 'bins': bins}
    emb = model.embed(x)
    assert emb.shape == (2, 5, 32)
    assert torch.equal(emb[:, 0], model.gene_emb.weight[-1].expand(2, 32))  # CLS first
    masked = bins == mask_id
    gene_part = model.gene_emb(genes.clamp(min=0))
    for b, t in masked.nonzero().tolist():
        assert torch.equal(emb[b, 1 + t], gene_part[b, t] + model.mask_emb)
    value_part = model.value_emb(values)
    for b, t in (~masked).nonzero().tolist():
        assert torch.equal(emb[b, 1 + t], gene_part[b, t] + value_part[b, t])
    # a masked value is hidden from the model: whatever it is, the embedding is the same
    emb2 = model.embed(dict(x, values=torch.where(masked, torch.full_like(values, 9.0), values)))
    assert torch.equal(emb2, emb)
    # and the mask embedding trains
    emb.sum().backward()
    assert model.mask_emb.grad is not None and model.mask_emb.grad.abs().sum() > 0
    assert model.value_emb.table.grad.abs().sum() > 0


def mlm_example():
    torch.manual_seed(0)
    model = ScBERT(config(value_emb='bins')).eval()
    mask_id = model.config.mask_id
    genes = torch.tensor([[1, 4, 9, 12, 30, 41], [2, 3, 5, 7, -1, -1], [0, 10, 20, -1, -1, -1]])
    values = torch.rand(3, 6) * 3 + 0.1
    bins = torch.randint(1, 6, (3, 6))
    target_bins = torch.full((3, 6), -100)
    for b, t in [(0, 1), (0, 4), (1, 0), (1, 3), (2, 2)]:
        target_bins[b, t] = bins[b, t]
        bins[b, t] = mask_id
        values[b, t] = 0.0
    values[genes < 0], bins[genes < 0] = 0.0, 0
    x = {'genes': genes, 'values': values, 'bins': bins}
    targets = {'bins': target_bins, 'values': torch.rand(3, 6) * 3}
    return model, x, targets


def test_masked_loss_is_weighted_ce_plus_mse_over_masked_positions():
    model, x, targets = mlm_example()
    with torch.no_grad():
        logits, loss = model(x, targets, task='mlm', mlm_weight=0.7, regression_weight=2.5)
    sel = targets['bins'] != -100
    assert sel.sum() == 5
    logp = logits['bins'].log_softmax(-1)
    ce = -torch.stack([logp[b, t, targets['bins'][b, t]] for b, t in sel.nonzero().tolist()]).mean()
    mse = torch.stack([(logits['values'][b, t] - targets['values'][b, t]) ** 2
                       for b, t in sel.nonzero().tolist()]).mean()
    assert loss.item() == pytest.approx((0.7 * ce + 2.5 * mse).item(), rel=1e-5)
    _, plain = model(x, targets, task='mlm')
    assert plain.item() == pytest.approx((ce + mse).item(), rel=1e-5)


def test_masked_loss_ignores_unmasked_positions():
    model, x, targets = mlm_example()
    sel = targets['bins'] != -100
    with torch.no_grad():
        _, loss = model(x, targets, task='mlm', mlm_weight=0.7, regression_weight=2.5)
        # other value targets where nothing was masked (padding included)
        other = dict(targets, values=torch.where(sel, targets['values'], targets['values'] + 100.0))
        assert model(x, other, task='mlm', mlm_weight=0.7, regression_weight=2.5)[1].item() == loss.item()
        # other predictions where nothing was masked: the heads' outputs shifted there by hooks
        hooks = [model.value_head.register_forward_hook(lambda m, i, o: o + 50.0 * (~sel)[..., None]),
                 model.lm_head.register_forward_hook(
                     lambda m, i, o: o + 50.0 * torch.randn(o.shape) * (~sel)[..., None])]
        logits2, loss2 = model(x, targets, task='mlm', mlm_weight=0.7, regression_weight=2.5)
        for h in hooks:
            h.remove()
        logits, _ = model(x, task='mlm')
        assert not torch.allclose(logits2['values'], logits['values'])      # the hooks did change them
        assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
        # while a masked position's target does count
        moved = dict(targets, values=torch.where(sel, targets['values'] + 1.0, targets['values']))
        moved_loss = model(x, moved, task='mlm', mlm_weight=0.7, regression_weight=2.5)[1]
        assert moved_loss.item() != pytest.approx(loss.item())


# ----------------------------------------------------------------------------------------------------------------
# data: quantile bins and the expressed batch

def quantile_reference(v, n_bins):
    return 1 + np.digitize(v, np.quantile(v, np.arange(1, n_bins) / n_bins))


@pytest.mark.parametrize('n_bins', [2, 3, 5, 10])
@pytest.mark.parametrize('ties', [False, True])
def test_quantile_bins_match_numpy(n_bins, ties):
    for seed in range(20):
        lengths = [1, 2, 7, 30, 13, 5, 0, 11] if seed % 2 else [4, 1, 25]   # a 1-gene cell and an empty one
        indptr, _, values = random_csr(lengths, seed=seed, ties=ties)
        bins = data.quantile_bins(indptr, values, n_bins)
        assert bins.dtype == np.int64 and bins.shape == values.shape
        assert ((bins >= 1) & (bins <= n_bins)).all()
        for a, b in zip(indptr[:-1], indptr[1:]):
            if b > a:
                np.testing.assert_array_equal(bins[a:b], quantile_reference(values[a:b], n_bins))
        if ties:
            assert any(len(np.unique(values[a:b])) < b - a for a, b in zip(indptr[:-1], indptr[1:]))
    # per cell: a cell's bins do not depend on the others in the batch, nor on its scale (sequencing depth)
    indptr, _, values = random_csr([9, 14, 6], seed=99)
    alone = data.quantile_bins(np.array([0, 14]), values[9:23], n_bins)
    np.testing.assert_array_equal(data.quantile_bins(indptr, values, n_bins)[9:23], alone)
    np.testing.assert_array_equal(data.quantile_bins(np.array([0, 14]), values[9:23] * 7.5, n_bins), alone)
    assert data.quantile_bins(np.array([0, 0]), np.zeros(0, np.float32), n_bins).shape == (0,)


def test_quantile_bins_are_balanced_without_ties():
    indptr, _, values = random_csr([100], n_genes=200, seed=5)
    np.testing.assert_array_equal(np.bincount(data.quantile_bins(indptr, values, 5))[1:], [20] * 5)


def test_value_bins_dispatch():
    indptr, _, values = random_csr([8, 12], seed=1)
    np.testing.assert_array_equal(data.value_bins(indptr, values, 2.0, 'quantile', 5),
                                  data.quantile_bins(indptr, values, 5))
    for emb in ('bins', 'continuous'):
        np.testing.assert_array_equal(data.value_bins(indptr, values, 2.0, emb, 5),
                                      np.minimum(np.floor(values), 5).astype(np.int64))


def cells(batch, i):
    """The real tokens of cell i of an expressed batch: {gene: (value, bin)}."""
    real = batch['genes'][i] >= 0
    return {int(g): (float(v), int(b)) for g, v, b in
            zip(batch['genes'][i][real], batch['values'][i][real], batch['bins'][i][real])}


def test_expressed_batch_shapes_and_padding():
    cfg = config(value_emb='quantile')
    indptr, indices, values = random_csr([3, 20, 12, 1])
    batch = data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), cfg, 2.0)
    assert set(batch) == {'genes', 'values', 'bins'}
    assert batch['genes'].shape == batch['values'].shape == batch['bins'].shape == (4, 20)
    assert batch['genes'].dtype == torch.long and batch['bins'].dtype == torch.long
    assert batch['values'].dtype == torch.float32
    bins = data.quantile_bins(indptr, values, cfg.n_bins)
    for i, (a, b) in enumerate(zip(indptr[:-1], indptr[1:])):
        n = b - a
        assert batch['genes'][i, :n].tolist() == indices[a:b].tolist()
        np.testing.assert_array_equal(batch['values'][i, :n].numpy(), values[a:b])
        assert batch['bins'][i, :n].tolist() == bins[a:b].tolist()
        assert (batch['genes'][i, n:] == -1).all() and (batch['values'][i, n:] == 0).all()
        assert (batch['bins'][i, n:] == 0).all()
    assert torch.equal(token_valid(batch)[:, 1:], batch['genes'] >= 0) and token_valid(batch)[:, 0].all()


def test_expressed_batch_max_genes_subsets():
    cfg = config(max_genes=8, value_emb='quantile')
    indptr, indices, values = random_csr([3, 20, 12], seed=2)
    full = data.quantile_bins(indptr, values, cfg.n_bins)
    truth = [{int(g): (float(v), int(q)) for g, v, q in zip(indices[a:b], values[a:b], full[a:b])}
             for a, b in zip(indptr[:-1], indptr[1:])]
    subsets = []
    for s in range(6):
        batch = data.expressed_batch(indptr, indices, values, [[s, 0], [s, 1], [s, 2]], cfg, 2.0)
        assert batch['genes'].shape == (3, 8)
        assert cells(batch, 0) == truth[0]                                  # fewer than max_genes: all of them
        for i in (1, 2):
            got = cells(batch, i)
            # bins from the whole cell, before dropping
            assert len(got) == 8 and all(truth[i][g] == got[g] for g in got)
            genes = batch['genes'][i].tolist()
            assert genes == sorted(genes)                                   # kept in vocab order
        subsets.append(tuple(batch['genes'][1].tolist()))
        again = data.expressed_batch(indptr, indices, values, [[s, 0], [s, 1], [s, 2]], cfg, 2.0)
        for key in batch:
            assert torch.equal(batch[key], again[key])                      # the same seed, the same subset
    assert len(set(subsets)) > 1                                            # other seeds, other subsets
    # cell_seeds: a cell gets the same subset whatever batch it is in, and wherever
    seeds = data.cell_seeds(indptr, indices)
    batch = data.expressed_batch(indptr, indices, values, seeds, cfg, 2.0)
    sub = data.take_rows(indptr, indices, values, [2, 1])
    other = data.expressed_batch(*sub, data.cell_seeds(*sub[:2]), cfg, 2.0)
    assert cells(other, 0) == cells(batch, 2) and cells(other, 1) == cells(batch, 1)
    assert data.cell_seeds(indptr, indices, seed=1) != seeds


def test_expressed_batch_adds_unexpressed_zero_genes():
    cfg = config(n_zero_genes=5)
    indptr, indices, values = random_csr([3, 20, 47], seed=4)               # 47 of 50 genes: only 3 unexpressed left
    batch = data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), cfg, 2.0)
    for i, (a, b) in enumerate(zip(indptr[:-1], indptr[1:])):
        got = cells(batch, i)
        expressed = set(indices[a:b].tolist())
        zeros = {g: vb for g, vb in got.items() if g not in expressed}
        assert expressed <= set(got) and len(got) == len(expressed) + min(5, 50 - len(expressed))
        assert all(0 <= g < 50 for g in zeros) and all(vb == (0.0, 0) for vb in zeros.values())
        assert all(got[g][0] > 0 for g in expressed)
    assert batch['genes'].shape == (3, 50)


@pytest.mark.parametrize('masking', ['random', 'nonzero'])
@pytest.mark.parametrize('replace_prob', [0.9, 1.0, 0.0])
def test_expressed_batch_masking(replace_prob, masking):
    cfg = config(max_genes=16, n_zero_genes=3, value_emb='bins')
    lengths = [1, 5, 20, 13]
    indptr, indices, values = random_csr(lengths, seed=7)
    seeds = [[3, i] for i in range(4)]
    plain = data.expressed_batch(indptr, indices, values, seeds, cfg, 2.0)
    batch = data.expressed_batch(indptr, indices, values, seeds, cfg, 2.0, mask_prob=0.3, replace_prob=replace_prob,
                                 masking=masking)
    assert set(batch) == {'genes', 'values', 'bins', 'target_bins', 'target_values'}
    replaced_total = 0
    for i, length in enumerate(lengths):
        n = min(length, 16) + 3
        real = batch['genes'][i] >= 0
        assert real.sum() == n and torch.equal(batch['genes'][i], plain['genes'][i])
        chosen = batch['target_bins'][i] != -100
        assert not chosen[~real].any()
        if masking == 'random':                                             # the zero genes can be masked too
            assert chosen.sum() == math.ceil(0.3 * n)
        else:                                                               # scBERT's rule: expressed genes only
            assert chosen.sum() == math.ceil(0.3 * (n - 3)) and (plain['values'][i][chosen] > 0).all()
        assert torch.equal(batch['target_bins'][i][chosen], plain['bins'][i][chosen])
        # the true values, before masking
        assert torch.equal(batch['target_values'][i][real], plain['values'][i][real])
        replaced = batch['bins'][i] == cfg.mask_id
        assert not replaced[~chosen].any()
        assert (batch['values'][i][replaced] == 0).all()
        kept = real & ~replaced
        assert torch.equal(batch['bins'][i][kept], plain['bins'][i][kept])
        assert torch.equal(batch['values'][i][kept], plain['values'][i][kept])
        if replace_prob == 1.0:
            assert torch.equal(replaced, chosen)
        replaced_total += int(replaced.sum())
    if replace_prob == 0.0:
        assert replaced_total == 0


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm, optimizer, parameter counts

def test_rmsnorm_matches_formula_and_computes_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = torch.randn(4, 7, 32) * 3
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    exact = norm(xb.float())
    assert torch.equal(out, exact.bfloat16())                               # fp32 inside, one rounding at the end
    torch.testing.assert_close(out.float(), exact, rtol=2 ** -8, atol=1e-6)
    assert isinstance(ScBERT(config(norm='rmsnorm')).blocks[0].ln_1, RMSNorm)
    assert not config(norm='rmsnorm', bias=False).bias and ScBERT(config(bias=False)).blocks[0].attn.to_out.bias is None


def test_adafactor_reduces_the_loss():
    torch.manual_seed(0)
    model = ScBERT(config(n_classes=3, n_expert=4, mlp='swiglu', norm='rmsnorm'))
    optim = model.configure_optimizer('adafactor', 1e-2, 0.0)
    assert isinstance(optim, torch.optim.Adafactor)
    assert isinstance(model.configure_optimizer('adamw', 1e-3, 0.1), torch.optim.AdamW)
    with pytest.raises(ValueError, match='adafactor'):
        model.configure_optimizer('sgd', 1e-3, 0.0)
    indptr, indices, values = random_csr([6, 9, 4, 11])
    x = data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), model.config, 2.0)
    y = torch.tensor([0, 1, 2, 1])
    losses = []
    for _ in range(12):
        _, loss = model(x, y)
        losses.append(loss.item())
        optim.zero_grad()
        loss.backward()
        optim.step()
    # torch's Adafactor steps are relative to each parameter's RMS (N(0, 0.02) here): the loss falls slowly but surely
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.03, losses
    # factored second moments: a row and a column vector per matrix, per expert for the stacked expert weights
    w1 = model.blocks[0].mlp.w1
    assert optim.state[w1]['row_var'].shape == (4, w1.shape[1], 1) and optim.state[w1]['col_var'].shape == (4, 1, 32)


@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
def test_num_active_params(mlp):
    cfg = config(n_expert=4, n_expert_active=2, mlp=mlp)
    model = ScBERT(cfg)
    per_expert = (3 if mlp == 'swiglu' else 2) * cfg.n_embd * cfg.ff_hidden
    assert model.blocks[0].mlp.w1[0].numel() == cfg.n_embd * cfg.ff_hidden
    assert model.num_active_params() == model.num_params() - cfg.n_layer * 2 * per_expert
    embeddings = model.gene_emb.weight.numel() + model.token_emb.weight.numel()
    assert model.num_active_params(embeddings=False) == model.num_active_params() - embeddings
    top1 = ScBERT(config(n_expert=4, n_expert_active=1, mlp=mlp))
    assert top1.num_active_params() == top1.num_params() - cfg.n_layer * 3 * per_expert
    dense = ScBERT(config(mlp=mlp))
    assert dense.num_active_params() == dense.num_params()
    # a dense MLP and one active expert have the same matrices: top-1 MoE = dense + router (+ the dense biases)
    mlp_biases = sum(p.numel() for n, p in dense.blocks[0].mlp.named_parameters() if n.endswith('bias'))
    assert top1.num_active_params() == dense.num_params() + cfg.n_layer * (cfg.n_embd * 4 - mlp_biases)
    assert isinstance(dense.blocks[0].mlp, MLP)


def test_scbert_head_on_expressed_input_reads_each_gene_at_its_panel_position():
    """head='scbert' with expressed input: gene g's one-number summary goes to panel position g (0 for the genes the
    cell does not show), CLS's to the last position, then the original's MLP over the panel."""
    torch.manual_seed(0)
    cfg = config(head='scbert', n_classes=3)
    model = ScBERT(cfg).eval()
    indptr, indices, values = random_csr([5, 9], seed=1)
    x = strip_targets(data.expressed_batch(indptr, indices, values, data.cell_seeds(indptr, indices), cfg, 2.0))
    head = model.cls_head
    with torch.no_grad():
        h = model.encode(x)
        logits = model(x)[0]
        for i in range(2):
            genes = x['genes'][i][x['genes'][i] >= 0]
            score = torch.relu(head.gene_proj(h[i, :1 + len(genes)]).squeeze(-1))      # CLS, then the genes
            panel = torch.zeros(cfg.seq_len)
            panel[genes] = score[1:]
            panel[-1] = score[0]
            expected = head.fc3(torch.relu(head.fc2(torch.relu(head.fc1(panel)))))
            torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)
