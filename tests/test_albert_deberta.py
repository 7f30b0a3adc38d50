"""ALBERT's factorized embedding and cross-layer sharing, DeBERTa's disentangled attention over genomic relative
positions, and the genomic and pathway encodings (model.py), checked against hand computations and dense references."""
import math

import pytest
import torch

from conftest import CHROM, IDX, PTR, ROOT, START, small, state, user_error
from conftest import run_script as run
from model import ModelConfig, ScBERT, genomic_buckets, genomic_sinusoid


def cells():
    """Two cells of the expressed-gene input, the first padded."""
    return {'genes': torch.tensor([[0, 3, 5, 8, -1], [1, 2, 7, 9, 4]]), 'values': torch.rand(2, 5) * 3,
            'bins': torch.randint(1, 6, (2, 5))}


def test_factorized_embedding_shapes_and_count():
    V, D, E = 11, 32, 4                                    # 10 genes + the CLS row
    plain, factored = small(), small(embd_factor=E)
    assert factored.gene_emb.weight.shape == (V, E) and factored.gene_emb_proj.weight.shape == (D, E)
    assert plain.num_params() - factored.num_params() == V * D - (V * E + E * D)
    big = dict(n_genes=20000, n_embd=200, n_layer=1, attention='sdpa')
    saved = ScBERT(ModelConfig(**big)).num_params() - ScBERT(ModelConfig(**big, embd_factor=64)).num_params()
    assert saved == 20001 * 200 - (20001 * 64 + 64 * 200)    # at a real vocabulary: 2.7M parameters fewer
    genes = torch.tensor([0, 7, 10])
    torch.testing.assert_close(factored.gene_embedding(genes),
                               factored.gene_emb(genes) @ factored.gene_emb_proj.weight.t())
    logits, _ = factored(cells())
    assert logits.shape == (2, 3)


@pytest.mark.parametrize('share, per_block', [('all', ('attn', 'mlp', 'ln_1', 'ln_2')), ('attention', ('attn',)),
                                              ('ffn', ('mlp',))])
def test_cross_layer_sharing_reduces_parameters(share, per_block):
    plain, shared = small(), small(share_layers=share)
    block_params = sum(sum(p.numel() for p in getattr(plain.blocks[0], part).parameters()) for part in per_block)
    assert plain.num_params() - shared.num_params() == 2 * block_params          # 3 layers -> 1 copy of each part
    for part in per_block:
        assert all(getattr(b, part) is getattr(shared.blocks[0], part) for b in shared.blocks)
    unshared = {'attn', 'mlp', 'ln_1', 'ln_2'} - set(per_block)
    assert all(getattr(shared.blocks[1], p) is not getattr(shared.blocks[0], p) for p in unshared)
    # the shared weights get one gradient, summed over the layers that use them; the state dict round trips
    shared.train()
    _, loss = shared(cells(), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for p in shared.blocks.parameters())
    shared.eval()
    again = ScBERT.from_checkpoint({'model_args': vars(shared.config), 'model': shared.state_dict()}).eval()
    x = cells()
    torch.testing.assert_close(again(x)[0], shared(x)[0])
    assert again.blocks[2].attn is again.blocks[0].attn or share == 'ffn'


def test_students_and_quantized_models_keep_the_options():
    """A narrower DistilBERT student (random weights) still knows where its genes are; int8 covers DeBERTa's position
    projections like every other attention linear, and the outputs stay close."""
    from lowbit import QuantLinear, quantize
    from distill import cut_student
    teacher = small(genomic_pe=True, n_chrom=3, pathway_enc=True, n_pathways=5, n_pathway_links=7, disentangled=True)
    student = cut_student(teacher, [0], n_embd=16)
    for name in ('gene_chrom', 'gene_start', 'pathway_ptr', 'pathway_idx'):
        torch.testing.assert_close(getattr(student, name), getattr(teacher, name))
    x = cells()
    with torch.no_grad():
        before = teacher(x)[0]
        quantize(teacher, 'int8')
        after = teacher(x)[0]
    assert all(isinstance(getattr(b.attn, p), QuantLinear) for b in teacher.blocks for p in ('pos_q', 'pos_k'))
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_sharing_refuses_moe_ffn():
    with pytest.raises(ValueError, match='n_expert=0'):
        ModelConfig(n_expert=4, share_layers='ffn')


def test_genomic_buckets_on_known_coordinates():
    n = 4                                                   # levels 0..3 per direction; buckets 0..8
    b = genomic_buckets(CHROM, START, n)
    assert b.shape == (10, 10) and int(b.min()) >= 0 and int(b.max()) <= 2 * n
    centre = 2 + (n - 1)

    def level(d):                                           # the documented rule, by hand
        if abs(d) <= 1e3:
            return 0
        return min(n - 1, math.ceil(math.log(abs(d) / 1e3) / math.log(2.5e8 / 1e3) * (n - 1)))
    assert level(4_900) == 1 and level(2e6 - 100) == 2 and level(2.4e8 - 100) == 3
    assert b[0, 1] == centre + 1 and b[1, 0] == centre - 1              # 4.9 kb downstream / upstream
    assert b[0, 2] == centre + 2 and b[2, 0] == centre - 2              # 2 Mb
    assert b[0, 8] == centre + 3 and b[8, 0] == centre - 3              # 240 Mb: the last bucket
    assert b[6, 7] == centre and b[0, 0] == centre                      # 1 bp apart, and a gene with itself
    assert b[0, 3] == 0 and b[3, 0] == 0 and b[4, 9] == centre - 3      # different chromosomes; 100 Mb upstream
    assert (b[5] == 1).all() and (b[:, 5] == 1).all()                   # an unknown gene: bucket 1 either way
    for i in range(10):                                                 # antisymmetric on the same chromosome
        for j in range(10):
            if int(b[i, j]) >= 2:
                assert int(b[i, j]) - centre == -(int(b[j, i]) - centre)
    batched = genomic_buckets(torch.stack([CHROM, CHROM.flip(0)]), torch.stack([START, START.flip(0)]), n)
    torch.testing.assert_close(batched[1], b.flip(0).flip(1))


def test_genomic_sinusoid():
    pe = genomic_sinusoid(torch.tensor([0., 1e3, 2.4e8]), 8)
    assert pe.shape == (3, 8) and pe.dtype == torch.float32
    torch.testing.assert_close(pe[0], torch.tensor([0., 0, 0, 0, 1, 1, 1, 1]))
    # the fastest wavelength is 1 kb: 1 kb is a full turn there; the slowest is 250 Mb
    assert abs(float(pe[1, 0])) < 1e-6 and abs(float(pe[1, 4]) - 1) < 1e-6
    torch.testing.assert_close(pe[2, 3], torch.tensor(math.sin(2 * math.pi * 2.4e8 / 2.5e8)))
    assert genomic_sinusoid(torch.zeros(2), 7).shape == (2, 7)


def test_genomic_position_and_pathway_encodings_are_added():
    model = small(genomic_pe=True, n_chrom=3, pathway_enc=True, n_pathways=5, n_pathway_links=7)
    genes = torch.arange(11)
    e = model.gene_embedding(genes)
    known = (CHROM > 0).float()[:, None]
    expected = model.gene_emb(genes)[:10] + model.chrom_emb(CHROM) + genomic_sinusoid(START.clamp(min=0), 32) * known
    sets = [[0, 1], [1], [], [2, 3], [4], [], [0], [], [], []]
    expected = expected + torch.stack([model.pathway_emb.weight[s].sum(0) if s else torch.zeros(32) for s in sets])
    torch.testing.assert_close(e[:10], expected)
    torch.testing.assert_close(e[10], model.gene_emb.weight[10] + model.chrom_emb.weight[0])   # CLS: unknown, no sets
    # the annotation travels in the checkpoint
    again = ScBERT.from_checkpoint({'model_args': vars(model.config), 'model': model.state_dict()})
    torch.testing.assert_close(again.gene_embedding(genes), e)


def dense_deberta(attn, x, bucket, pos, mask):
    """DeBERTa's eq. 4 written out, one (L, L) score matrix per head: the reference for Attention.disentangled."""
    B, L, _ = x.shape
    H, d = attn.n_head, attn.config.dim_head
    q = attn.to_q(x).view(B, L, H, d)
    k = attn.to_k(x).view(B, L, attn.n_kv_head, d).repeat_interleave(H // attn.n_kv_head, 2)
    v = attn.to_v(x).view(B, L, attn.n_kv_head, d).repeat_interleave(H // attn.n_kv_head, 2)
    kr = attn.pos_k(pos).view(-1, H, d)
    qr = attn.pos_q(pos).view(-1, H, d)
    out = torch.zeros(B, L, H, d)
    for b in range(B):
        for h in range(H):
            s = torch.zeros(L, L)
            for i in range(L):
                for j in range(L):
                    s[i, j] = (q[b, i, h] @ k[b, j, h] + q[b, i, h] @ kr[bucket[b, i, j], h]
                               + k[b, j, h] @ qr[bucket[b, j, i], h])
            s = (s / math.sqrt(3 * d)).masked_fill(~mask[b][None, :], float('-inf'))
            out[b, :, h] = s.softmax(-1) @ v[b, :, h]
    return attn.to_out(out.reshape(B, L, H * d))


def test_disentangled_attention_equals_dense_reference():
    model = small(disentangled=True, n_kv_head=2, n_pos_buckets=4)
    x = cells()
    h = model.embed(x)
    genes = model.token_genes(x)
    bucket = genomic_buckets(model.gene_chrom[genes], model.gene_start[genes], 4)
    valid = torch.cat([torch.ones(2, 1, dtype=torch.bool), x['genes'] >= 0], 1)
    attn = model.blocks[0].attn
    with torch.no_grad():
        ours = attn(h, valid[:, None, None, :], (model.rel_emb.weight, bucket))
        ref = dense_deberta(attn, h, bucket, model.rel_emb.weight, valid)
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_disentangled_attention_uses_positions_and_ignores_padding():
    model = small(disentangled=True)
    x = cells()
    logits, _ = model(x)
    alone = {k: v[:1, :4] for k, v in x.items()}            # the padded cell without its padding
    torch.testing.assert_close(model(alone)[0], logits[:1], atol=1e-5, rtol=1e-5)
    moved = small(disentangled=True)
    moved.set_gene_annotation(CHROM, START * 3, PTR, IDX)   # other distances -> other buckets -> other outputs
    assert not torch.allclose(moved(x)[0], logits)
    with pytest.raises(ValueError, match='sdpa'):
        ModelConfig(disentangled=True, attention='performer')


def test_panel_input_with_every_option():
    """scBERT's panel input (every gene a token) with all the options at once: it trains, and a checkpoint reloads."""
    model = small(input_genes='all', value_emb='bins', head='scbert', genomic_pe=True, n_chrom=3, pathway_enc=True,
                  n_pathways=5, n_pathway_links=7, disentangled=True, embd_factor=8, share_layers='attention').train()
    tokens = torch.randint(0, 6, (2, 11))
    _, loss = model(tokens, torch.tensor([1, 2]))
    loss.backward()
    assert model.rel_emb.weight.grad.abs().sum() > 0 and model.pathway_emb.weight.grad.abs().sum() > 0
    assert model.chrom_emb.weight.grad.abs().sum() > 0 and model.gene_emb_proj.weight.grad.abs().sum() > 0
    model.eval()
    again = ScBERT.from_checkpoint({'model_args': vars(model.config), 'model': model.state_dict()}).eval()
    torch.testing.assert_close(again(tokens)[0], model(tokens)[0])


# ---------------------------------------------------------------------------------------------------------------------
# train.py and predict.py end to end, on the 78 real Baron cells annotated with the mouse genome and gene sets


GENOME = ROOT.parent / 'shared' / 'data' / 'genome' / 'mouse_gencode_vM38_genes.csv.gz'
GMT = ROOT.parent / 'shared' / 'data' / 'genesets' / 'mouse_reactome.gmt'
SMALL = ['--input_genes=expressed', '--attention=sdpa', '--value_emb=continuous', '--head=pooled', '--n_embd=16',
         '--n_layer=3', '--n_head=2', '--dim_head=8', '--head_hidden=16', '--num_threads=1', '--batch_size=8',
         '--baseline=False', '--max_genes=64', '--max_iters=6', '--eval_interval=3', '--warmup_iters=1']


def test_train_and_predict_with_every_option(baron, tmp_path):
    import shutil
    data = tmp_path / 'baron'
    shutil.copytree(baron, data)
    out = tmp_path / 'out'
    user_error(run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--genomic_pe=True', check=False),
               'has no gene annotation: run python prepare_data.py --annotate=')
    run('prepare_data.py', f'--annotate={data}', f'--genome={GENOME}', f'--gene_sets={GMT}')
    note = __import__('data').Dataset(str(data)).annotation()
    result = run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--genomic_pe=True', '--pathway_enc=True',
                 '--disentangled=True', '--embd_factor=4', '--share_layers=attention')
    assert 'fold 0 test' in result.stdout
    ckpt = state(out / 'best.pt')
    args = ckpt['model_args']
    assert args['n_chrom'] == len(note['chrom_names']) and args['n_pathways'] == len(note['pathway_names']) > 0
    assert args['n_pathway_links'] == len(note['pathway_idx'])
    # the annotation is in the checkpoint: genes in vocab order, the CLS row unknown
    torch.testing.assert_close(ckpt['model']['gene_chrom'][:-1], torch.as_tensor(note['chrom']))
    assert int(ckpt['model']['gene_chrom'][-1]) == 0
    torch.testing.assert_close(ckpt['model']['pathway_ptr'][:-1], torch.as_tensor(note['pathway_ptr']))
    # the shared attention is stored once per block name but is one module: blocks 1 and 2 equal block 0
    torch.testing.assert_close(ckpt['model']['blocks.2.attn.to_q.weight'], ckpt['model']['blocks.0.attn.to_q.weight'])
    run('predict.py', f'--ckpt={out / "best.pt"}', f'--input={ROOT.parent / "shared/data/fixtures/counts_csr.h5ad"}',
        f'--output={tmp_path / "pred.csv"}', '--num_threads=1')
    assert len((tmp_path / 'pred.csv').read_text().splitlines()) == 79
    # fine-tuning from it continues the same architecture and annotation
    run('train.py', f'--dataset={data}', f'--out_dir={tmp_path / "again"}', *SMALL, f'--init_from={out / "best.pt"}')
    user_error(run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--disentangled=True',
                   '--attention=performer', '--input_genes=all', check=False), 'disentangled.*--attention=sdpa')
    user_error(run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--share_layers=ffn', '--n_expert=2',
                   check=False), 'share_layers')
    user_error(run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--share_layers=some', check=False),
               'share_layers must be one of')
    # an annotation without coordinates or without gene sets: the flags that need them say so
    run('prepare_data.py', f'--annotate={data}', f'--gene_sets={GMT}')
    user_error(run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--disentangled=True', check=False),
               'no gene of .* has any: python prepare_data.py --annotate=')
    run('prepare_data.py', f'--annotate={data}', f'--genome={GENOME}')
    user_error(run('train.py', f'--dataset={data}', f'--out_dir={out}', *SMALL, '--pathway_enc=True', check=False),
               'no gene of .* is in one')
