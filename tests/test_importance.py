"""Gene importance (model.py): the attention each gene receives, computed without an (L, L) matrix, equals the dense
computation for FAVOR+, softmax attention with padding and GQA, and DeBERTa's disentangled attention; it reproduces the
original scBERT's attn_sum_save.py on its reference cell; gradient × input has the right shapes, zeros and sign."""
import math
from pathlib import Path

import pytest
import torch

from conftest import small   # a 10-gene model with a gene annotation, in eval mode
from model import ScBERT, repeat_kv, softmax_kernel

REF = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'scbert_ref'


def expressed_cells():
    """Three cells of the expressed-gene input, two of them padded."""
    torch.manual_seed(1)
    return {'genes': torch.tensor([[0, 3, 5, 8, -1, -1], [1, 2, 7, 9, 4, 6], [2, 9, -1, -1, -1, -1]]),
            'values': torch.rand(3, 6) * 3 + 0.5, 'bins': torch.randint(1, 6, (3, 6))}


def panel_cells(n_genes=10, n_bins=5):
    torch.manual_seed(1)
    tokens = torch.randint(0, n_bins + 1, (3, n_genes + 1))
    tokens[:, -1] = 0                                        # scBERT's appended token
    return tokens


def layer_inputs(model, x):
    """What each block's attention sees (its normed input), captured by hooks during an ordinary forward."""
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model.encode(x)
    for h in hooks:
        h.remove()
    return seen


def dense_attention(model, attn, a, x):
    """The full (B, H, L, L) attention matrix of one layer, written out."""
    B, L, _ = a.shape
    cfg = model.config
    q = attn.to_q(a).view(B, L, cfg.n_head, -1).transpose(1, 2)
    k = repeat_kv(attn.to_k(a).view(B, L, cfg.n_kv_head, -1).transpose(1, 2), cfg.n_head // cfg.n_kv_head)
    if cfg.attention == 'performer':
        qp = softmax_kernel(q, attn.projection_matrix, is_query=True)
        kp = softmax_kernel(k, attn.projection_matrix, is_query=False)
        scores = qp @ kp.transpose(-2, -1)                                    # (B, H, L, L), positive
        return scores / scores.sum(-1, keepdim=True)
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1)
    if cfg.disentangled:                                    # DeBERTa eq. 4, position by position
        genes = model.token_genes(x)
        from model import genomic_buckets
        bucket = genomic_buckets(model.gene_chrom[genes], model.gene_start[genes], cfg.n_pos_buckets)
        pos = model.rel_emb.weight
        k_r = attn.pos_k(pos).view(len(pos), cfg.n_head, d)                     # (R, H, d)
        q_r = attn.pos_q(pos).view(len(pos), cfg.n_head, d)
        for b in range(B):
            for i in range(L):
                for j in range(L):
                    scores[b, :, i, j] += (q[b, :, i] * k_r[bucket[b, i, j]]).sum(-1)
                    scores[b, :, i, j] += (k[b, :, j] * q_r[bucket[b, j, i]]).sum(-1)
        scores = scores / math.sqrt(3 * d)
    else:
        scores = scores / math.sqrt(d)
    if isinstance(x, dict):
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), x['genes'] >= 0], 1)
        scores = scores.masked_fill(~valid[:, None, None, :], float('-inf'))
    return scores.softmax(-1)


def dense_received(model, x):
    """scBERT's definition with the matrices held in full: mean over real queries, heads and layers; sums to 1."""
    valid = None if not isinstance(x, dict) else torch.cat([torch.ones(len(x['genes']), 1, dtype=torch.bool),
                                                             x['genes'] >= 0], 1)
    total = 0
    with torch.no_grad():
        for block, a in zip(model.blocks, layer_inputs(model, x)):
            A = dense_attention(model, block.attn, a, x)                       # (B, H, L, L)
            if valid is not None:
                A = A * valid[:, None, :, None]
                total = total + A.sum(2).mean(1) / valid.sum(-1, keepdim=True)
            else:
                total = total + A.mean(2).mean(1)
    total = total if valid is None else total * valid
    return total / total.sum(-1, keepdim=True)


@pytest.mark.parametrize('kw', [dict(), dict(n_kv_head=2), dict(n_kv_head=1, disentangled=True)],
                         ids=['sdpa', 'gqa', 'disentangled'])
@pytest.mark.parametrize('chunk', [1, 3, 256])
def test_chunked_attention_received_equals_dense_softmax(kw, chunk):
    model, x = small(**kw), expressed_cells()
    got = model.attention_received(x, chunk=chunk)
    want = dense_received(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got.shape == (3, 7)
    padding = torch.cat([torch.zeros(3, 1, dtype=torch.bool), x['genes'] < 0], 1)
    assert (got[padding] == 0).all() and (got[~padding] > 0).all() and torch.allclose(got.sum(-1), torch.ones(3))


def test_linear_attention_identity_equals_dense_favor():
    """FAVOR+: Σ_i A[i, j] from φ(k_j) · Σ_i φ(q_i) / D_i equals the column sums of the explicit matrix."""
    model = small(attention='performer', input_genes='all', value_emb='bins', head='scbert', nb_features=16)
    x = panel_cells()
    got = model.attention_received(x)
    torch.testing.assert_close(got, dense_received(model, x), rtol=1e-5, atol=1e-8)
    assert got.shape == (3, 11) and (got > 0).all()


def test_attention_received_matches_the_original_attn_sum_save():
    """The original scBERT (attn_sum_save.py) on its reference cell: with as_released=True, our attention sum is its
    output to fp16 accuracy; without, the layers' matrices come from what each layer attended with."""
    if not REF.exists():
        pytest.skip('reference artefacts not available')
    io = torch.load(REF / 'io.pt', weights_only=True)
    model = ScBERT.from_scbert(torch.load(REF / 'pretrain_state_dict.pt', weights_only=True)).eval()
    want = io['attn_sum_cell0'].float()
    released = model.attention_received(io['tokens'][:1], as_released=True)[0]
    assert (released - want).abs().max() < 2e-6 * 1024 * want.mean()        # 1e-3 of a typical value; fp16 there
    ours = model.attention_received(io['tokens'][:1])[0]
    assert (ours - want).abs().max() > 10 * (released - want).abs().max()    # the slip changes the numbers
    torch.testing.assert_close(ours, dense_received(model, io['tokens'][:1])[0], rtol=1e-4, atol=1e-9)


def test_gradient_x_input_shapes_and_zeros():
    for model, x in ((small(), expressed_cells()),
                     (small(attention='performer', input_genes='all', value_emb='bins', head='scbert', nb_features=16),
                      panel_cells())):
        attribution, logits = model.integrated_gradients(x)
        L = x['genes'].shape[1] + 1 if isinstance(x, dict) else x.shape[1]
        assert attribution.shape == (3, L) and logits.shape == (3, 3) and not attribution.requires_grad
        if isinstance(x, dict):                     # CLS and padding: no expression, no attribution
            assert (attribution[:, 0] == 0).all() and (attribution[:, 1:][x['genes'] < 0] == 0).all()
        else:                                       # unexpressed panel genes (bin 0) and the appended token
            assert (attribution[x == 0] == 0).all()
        assert (attribution != 0).sum() > 5
        # the default target is the predicted class; another target gives other numbers
        other, _ = model.integrated_gradients(x, target=(logits.argmax(-1) + 1) % 3)
        assert not torch.allclose(other, attribution)


@pytest.mark.parametrize('panel', [False, True])
def test_gradient_x_input_sign_silencing_a_gene_moves_the_logit_by_its_attribution(panel):
    """Gradient × input is the first-order change of the target logit when the gene falls silent: with small value
    embeddings the first order is nearly exact, so silencing each gene (its value set to 0 in the input) lowers the
    logit by its attribution, sign included."""
    if panel:
        model = small(attention='performer', input_genes='all', value_emb='bins', head='scbert', nb_features=16)
        x = panel_cells()
    else:
        model = small(value_emb='bins')
        x = expressed_cells()
    model = model.double()
    with torch.no_grad():
        model.token_emb.weight.mul_(1e-3)           # the expression part of each token: small
    attribution, logits = model.integrated_gradients(x)
    target = logits.argmax(-1)
    scale = attribution.abs().max()
    checked = 0
    for b in range(3):
        for t in range(attribution.shape[1]):
            if attribution[b, t].abs() < 0.1 * scale:      # the sign of a near-zero first order is the second order's
                continue
            silent = {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()
            if isinstance(x, dict):
                silent['values'][b, t - 1], silent['bins'][b, t - 1] = 0, 0      # token t is gene t - 1 (CLS first)
            else:
                silent[b, t] = 0
            with torch.no_grad():
                drop = logits[b, target[b]] - model(silent)[0][b, target[b]]
            assert torch.sign(drop) == torch.sign(attribution[b, t])
            assert abs(drop - attribution[b, t]) < 0.05 * scale
            checked += 1
    assert checked >= 5 and (attribution > 0.1 * scale).any() and (attribution < -0.1 * scale).any()


@pytest.mark.parametrize('panel', [False, True])
def test_integrated_gradients_add_up_to_the_logit_change(panel):
    """Completeness (Sundararajan et al. 2017): with enough steps the attributions of a cell add up to its target
    logit minus the silent cell's (every value 0); gradient × input (steps=1) does not, and is the first step's term."""
    if panel:
        model = small(attention='performer', input_genes='all', value_emb='bins', head='scbert', nb_features=16)
        x, silent = panel_cells(), torch.zeros_like(panel_cells())
    else:
        model, x = small(), expressed_cells()                 # continuous values: xTrimoGene's embedding
        x['values'] = x['values'].double()
        silent = dict(x, values=torch.zeros_like(x['values']), bins=torch.zeros_like(x['bins']))
    model = model.double()
    attribution, logits = model.integrated_gradients(x, steps=256)
    target = logits.argmax(-1)
    with torch.no_grad():
        change = logits.gather(1, target[:, None])[:, 0] - model(silent)[0].gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(attribution.sum(-1), change, rtol=0.02, atol=0.02 * change.abs().max().item())
    first_order, same_logits = model.integrated_gradients(x, steps=1)
    assert torch.equal(same_logits, logits)
    assert (first_order.sum(-1) - change).abs().max() > 2 * (attribution.sum(-1) - change).abs().max()
