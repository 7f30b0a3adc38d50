"""model.py: shapes, FAVOR+ against exact attention, and the original scBERT's reference outputs (minGPT-style)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, ScBERT, favor_attention, orthogonal_random_features

torch.set_num_threads(1)
REF = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'scbert_ref'
TINY = dict(n_genes=30, n_bins=5, n_embd=32, n_layer=2, n_head=2, dim_head=16)


def load(name):
    if not (REF / name).exists():
        pytest.skip(f'{REF / name} not available')
    return torch.load(REF / name, weights_only=True)


@pytest.mark.parametrize('attention', ['performer', 'sdpa'])
@pytest.mark.parametrize('head', ['scbert', 'pooled'])
def test_shapes(attention, head):
    model = ScBERT(ModelConfig(**TINY, attention=attention, head=head, n_classes=4))
    tokens = torch.randint(0, 6, (3, 31))
    logits, loss = model(tokens, targets=torch.tensor([0, 1, 3]))
    assert logits.shape == (3, 4) and loss.ndim == 0
    mlm_targets = torch.full((3, 31), -100)
    mlm_targets[:, 5] = 2
    logits, loss = model(tokens, targets=mlm_targets, task='mlm')
    assert logits.shape == (3, 31, 7) and torch.isfinite(loss)
    assert model.encode(tokens).shape == (3, 31, 32)


def test_pooled_head_is_independent_of_gene_count():
    model = ScBERT(ModelConfig(**TINY, head='pooled', n_classes=3)).eval()
    assert model(torch.randint(0, 6, (2, 11)))[0].shape == (2, 3)      # fewer genes than the panel still works


def test_full_size_parameter_count():
    # the release: 16,906 genes, dim 200, depth 6, heads 10 -> 8.39M parameters, 3.38M of them the gene embedding
    model = ScBERT(ModelConfig())
    assert model.num_params() == 8_388_607
    assert model.gene_emb.weight.numel() == 3_381_400


def test_favor_approximates_softmax_attention_better_with_more_features():
    torch.manual_seed(0)
    B, H, L, d = 2, 2, 64, 16
    q, k, v = (0.5 * torch.randn(B, H, L, d) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (8, 32, 128, 512):
        trials = [(favor_attention(q, k, v, orthogonal_random_features(m, d, torch.Generator().manual_seed(s))) - exact)
                  .pow(2).mean().sqrt() for s in range(5)]
        errors.append(torch.stack(trials).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0] and errors[-1] < 0.02, errors


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = orthogonal_random_features(20, 8, torch.Generator().manual_seed(0))
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.t(), torch.eye(8), atol=1e-5)


def test_outputs_are_batch_invariant():
    model = ScBERT(ModelConfig(**TINY, n_classes=3)).eval()
    tokens = torch.randint(0, 6, (4, 31))
    tokens[0] = 5                                                       # a very different cell in the same batch
    with torch.no_grad():
        batched = model(tokens)[0]
        alone = torch.cat([model(tokens[i:i + 1])[0] for i in range(4)])
    assert torch.allclose(batched, alone, atol=1e-6)


def test_feature_redraw_is_periodic_and_deterministic():
    config = ModelConfig(**TINY, feature_redraw_interval=2)
    a, b = ScBERT(config), ScBERT(config)
    b.load_state_dict(a.state_dict())
    before = a.blocks[0].attn.projection_matrix.clone()
    tokens = torch.randint(0, 6, (1, 31))
    for model in (a, b):
        model.train()
        for _ in range(3):                                              # calls 0, 1 count; the third redraws
            model.encode(tokens)
    assert not torch.equal(before, a.blocks[0].attn.projection_matrix)
    assert torch.equal(a.blocks[0].attn.projection_matrix, b.blocks[0].attn.projection_matrix)
    assert not torch.equal(a.blocks[0].attn.projection_matrix, a.blocks[1].attn.projection_matrix)
    assert int(a.n_redraws) == 1 and int(a.calls_since_redraw) == 0


# ----------------------------------------------------------------------------- the original's reference outputs

def test_from_scbert_pretrained_matches_reference():
    io, sd = load('io.pt'), load('pretrain_state_dict.pt')
    model = ScBERT.from_scbert(sd).eval()
    assert model.config.n_genes == 1023 and model.config.n_head == 10 and model.config.nb_features == 266
    with torch.no_grad():
        single = model(io['tokens'])[0]
    assert (single - io['pretrain_logits_single']).abs().max() < 1e-4
    # the original's key stabiliser is one max over the batch: with it, the batched outputs are reproduced too
    batched = ScBERT.from_scbert(sd, favor_batch_max=True).eval()
    with torch.no_grad():
        assert (batched.encode(io['tokens']) - io['encodings']).abs().max() < 1e-4
        assert (batched(io['tokens'])[0] - io['pretrain_logits']).abs().max() < 1e-4


def test_from_scbert_finetuned_matches_reference_and_accepts_wrappers():
    io, sd = load('io.pt'), load('finetune_state_dict.pt')
    wrapped = {'model_state_dict': {'module.' + k: v for k, v in sd.items()}, 'epoch': 3}  # as DDP finetune.py saves
    model = ScBERT.from_scbert(wrapped).eval()
    assert model.config.n_classes == 5 and model.config.head == 'scbert'
    with torch.no_grad():
        logits = model(io['tokens'])[0]
    assert (logits - io['finetune_logits_single']).abs().max() < 1e-4
    prob = logits.softmax(-1)
    assert (prob - io['finetune_prob_single']).abs().max() < 1e-5
    assert torch.equal(prob.argmax(-1), io['predict_argmax'])
    assert torch.equal(prob.max(-1).values < 0.5, io['predict_unassigned_thr0.5'])


def test_mlm_loss_and_gradients_match_reference():
    io, sd = load('io.pt'), load('pretrain_state_dict.pt')
    model = ScBERT.from_scbert(sd, favor_batch_max=True).eval()      # the reference ran the batch in eval mode
    labels = io['mlm_labels'].masked_fill(io['mlm_labels'] == 6, -100)   # the original ignores the pad id 6
    logits, loss = model(io['mlm_masked_input'], targets=labels, task='mlm')
    assert (logits - io['mlm_logits']).abs().max() < 1e-4
    assert abs(loss.item() - io['mlm_loss'].item()) < 1e-5
    loss.backward()
    ours = {'token_emb.weight': model.token_emb.weight, 'norm.weight': model.ln_f.weight,
            'performer.net.layers.0.0.fn.to_v.weight': model.blocks[0].attn.to_v.weight,
            'performer.net.layers.5.1.fn.fn.w2.weight': model.blocks[5].mlp.w2.weight,
            'to_out.weight': model.lm_head.weight}
    for name, p in ours.items():
        assert math.isclose(p.grad.norm().item(), io['mlm_grad_norms'][name].item(), rel_tol=1e-3), name
    assert model.gene_emb.weight.grad is None                          # gene2vec stays frozen, as in the original


def test_from_scbert_rejects_other_checkpoints():
    with pytest.raises(ValueError, match='not an original scBERT checkpoint'):
        ScBERT.from_scbert({'blocks.0.ln_1.weight': torch.zeros(3)})
