"""
Every architecture of nanoscBERT, in one file, in the order of the lecture.

    1. ModelConfig               every setting, and every rule between settings (checked once, here)
    2. The input                 scBERT's panel tokens or scBERT 2.0's expressed genes; the value embeddings
    3. FAVOR+                    Performer attention, linear in the number of genes
    4. Attention                 exact softmax attention (SDPA) or FAVOR+, with grouped-query heads
    5. Norms and MLPs            LayerNorm / RMSNorm, GELU / SwiGLU
    6. Mixture of experts        MoE: routing, dropless dispatch, the auxiliary losses
    7. The ScBERT core           Block, then ScBERT: init, embed, encode, forward
    8. Heads                     the cell-type classifier and pooling (the masked-bin heads are plain Linears in 7)
    9. ALBERT, DeBERTa, biology  factorized gene embedding, cross-layer sharing, disentangled attention over genomic
                                 relative positions, a gene's chromosome and start coordinate, its pathways
   10. BitNet b1.58              quantization-aware training: BitLinear, and make_linear, which picks it
   11. Not in the lecture        gene importance; loading checkpoints (ours and the original release's)
   (inference from int8 / ternary weights, the int8 kernels and the packing live in lowbit.py, which imports this
    file; distillation's student and losses live in distill.py)

scBERT (Yang et al. 2022, Nat. Mach. Intell. 4:852) reads a cell as a sentence whose words are genes: position g of
the sequence is gene g of a fixed panel, and its token is the gene's binned expression.

    tokens (B, L) ──> token_emb(bin) + gene_emb(g) ──> n_layer × Block ──> LayerNorm ──> lm_head  (masked bin)
                                                                                    └─> cls_head (cell type)

L = n_genes + 1: like the original, we append one extra position holding bin 0 (its gene2vec row is all zeros), so that
the original checkpoints load without surgery. A Block is pre-LayerNorm attention then a GELU MLP, both residual.
Attention is a Performer (Choromanski et al. 2021): FAVOR+ approximates softmax(q·k/√d) with positive orthogonal random
features, so the cost is linear in L (16,907 genes) instead of quadratic.

Mapping from the original release's names (TencentAILabHealthcare/scBERT, performer_pytorch.PerformerLM):
    token_emb     <- token_emb                       gene_emb      <- pos_emb.emb (gene2vec, frozen)
    blocks.i.ln_1 <- performer.net.layers.i.0.norm   blocks.i.attn <- performer.net.layers.i.0.fn
    blocks.i.ln_2 <- performer.net.layers.i.1.norm   blocks.i.mlp  <- performer.net.layers.i.1.fn.fn
    ln_f          <- norm                            lm_head <- to_out (pretraining); cls_head <- to_out.conv1/fc1-3

scBERT 2.0 is the same classes with other flags (input_genes='expressed'). About 90% of a cell's genes are zero, and
scBERT spends most of its compute on them. Following xTrimoGene (Gong et al. 2023) and scGPT (Cui et al. 2024), a cell
becomes a CLS token plus one token per EXPRESSED gene, (gene id, value), padded to the longest cell of the batch:

    genes (B, T), values (B, T) ──> gene_emb(gene) + value embedding ──> [CLS; ...] (B, 1+T, C) ──> Blocks ──> norm
        ──> lm_head (masked bin, cross-entropy) + value_head (masked value, MSE)   or   cls_head (CLS or mean pooled)

with the parts of modern LMs as options: grouped-query attention through F.scaled_dot_product_attention (flash kernels
on GPU), RMSNorm (llama), SwiGLU (Shazeer 2020), bias-free linears, a sparse mixture of experts in place of the MLP
(Switch Transformer, Fedus et al. 2022; Mixtral's top-2), and ALBERT's, DeBERTa's and biology's ideas (section 9).
"""
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. ModelConfig

CHOICES = dict(attention=('performer', 'sdpa'), head=('scbert', 'pooled', 'cls'), input_genes=('all', 'expressed'),
               value_emb=('bins', 'quantile', 'continuous'), norm=('layernorm', 'rmsnorm'), mlp=('gelu', 'swiglu'),
               share_layers=('none', 'all', 'attention', 'ffn'))


@dataclass
class ModelConfig:
    n_genes: int = 16906            # genes in the panel; the sequence holds n_genes + 1 tokens
    n_bins: int = 5                 # expression bins 0..n_bins; id n_bins + 1 is the mask/pad token
    n_embd: int = 200               # model width
    n_layer: int = 6
    n_head: int = 10
    dim_head: int = 64              # per-head width, independent of n_embd (performer-pytorch's default)
    ff_mult: int = 4                # MLP hidden = ff_mult * n_embd
    attention: str = 'performer'    # 'performer' (FAVOR+, linear in L) | 'sdpa' (exact softmax attention)
    nb_features: int = 0            # FAVOR+ random features; 0 -> int(dim_head * ln(dim_head)) = 266 at dim_head 64
    feature_redraw_interval: int = 1000  # redraw the random features every this many training forward passes
    dropout: float = 0.0
    freeze_gene_emb: bool = False   # True when the gene embedding is loaded (gene2vec) rather than learned
    n_classes: int = 0              # > 0 adds a cell-type classifier head
    head: str = 'scbert'            # 'scbert' (the original's: per-gene projection, MLP over all genes) | 'pooled'
                                    # (mean over the genes) | 'cls' (the CLS token; expressed input only)
    head_hidden: int = 128          # the classifier's last hidden width (the original's h_dim)
    seed: int = 0                   # seeds the random-feature draws: every DDP rank and every resume draws the same
    favor_batch_max: bool = False   # True reproduces the original's batch-dependent key stabiliser (see softmax_kernel)
    favor_chunk: int = 1024         # FAVOR+ makes its feature maps this many tokens at a time (to stay in cache)
    # scBERT 2.0 (the defaults above and below are scBERT's)
    input_genes: str = 'all'        # 'all' (scBERT: every gene of the panel, binned) | 'expressed' (CLS + expressed)
    value_emb: str = 'bins'         # expressed only: 'bins' (scBERT's) | 'quantile' (per cell, scGPT) | 'continuous'
    max_genes: int = 0              # expressed only: at most this many expressed genes per cell (0 = all)
    n_zero_genes: int = 0           # expressed only: also this many randomly chosen unexpressed genes, with value 0
    n_kv_head: int = 0              # key/value heads for grouped-query attention (0 = n_head; 1 = multi-query)
    norm: str = 'layernorm'         # 'layernorm' | 'rmsnorm' (computed in fp32)
    mlp: str = 'gelu'               # 'gelu' | 'swiglu'
    bias: bool = True               # biases in the attention and MLP linears and in the norms
    n_expert: int = 0               # > 0: a sparse mixture of n_expert MLPs replaces each block's MLP
    n_expert_active: int = 2        # experts per token (top-k)
    bitlinear: bool = False         # BitNet b1.58 quantization-aware training: ternary attention/feed-forward weights
    # ALBERT, DeBERTa and biology (the gene annotation comes from prepare_data.py --genome / --gene_sets)
    embd_factor: int = 0            # > 0: ALBERT's factorized gene embedding, a V×E table then an E×n_embd projection
    share_layers: str = 'none'      # ALBERT's cross-layer sharing: 'none' | 'all' (one block) | 'attention' | 'ffn'
    genomic_pe: bool = False        # add a chromosome embedding + a sinusoidal encoding of the gene's start coordinate
    disentangled: bool = False      # DeBERTa's disentangled attention over genomic relative positions (sdpa only)
    n_pos_buckets: int = 16         # disentangled: distance levels 0..n-1 per direction; 2n + 1 buckets with 'other
                                    # chromosome' and 'unknown'
    n_chrom: int = 0                # chromosomes in the gene annotation (set from the dataset by train.py)
    pathway_enc: bool = False       # add the sum of the gene's pathway embeddings (gene sets from GMT files)
    n_pathways: int = 0             # gene sets in the annotation (set from the dataset)
    n_pathway_links: int = 0        # (gene, set) pairs in the annotation (set from the dataset)

    def __post_init__(self):
        """Every rule between the settings, checked here only: a ValueError says what is wrong and which setting fixes
        it (the scripts print it as a one-line error)."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not '{getattr(self, name)}' "
                                 f"(set --{name}=...)")
        if self.n_kv_head < 0 or self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f'n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}) '
                             f'(set --n_kv_head=1, 2, ... or 0 for n_head)')
        if self.n_expert and not 1 <= self.n_expert_active <= self.n_expert:
            raise ValueError(f'n_expert_active must be between 1 and n_expert ({self.n_expert}), '
                             f'not {self.n_expert_active} (set --n_expert_active=...)')
        if self.n_expert and self.share_layers in ('all', 'ffn'):    # a shared MoE keeps only its last call's aux loss
            raise ValueError(f"share_layers='{self.share_layers}' shares the feed-forward, which MoE does not support "
                             f"(set --n_expert=0 or --share_layers=attention)")
        if self.disentangled and self.attention != 'sdpa':          # FAVOR+ never forms the L×L scores DeBERTa adds to
            raise ValueError('disentangled attention adds position terms to the L×L scores, which FAVOR+ never forms '
                             "(set --attention=sdpa)")
        if self.input_genes == 'expressed' and self.attention != 'sdpa':   # padded batches need a key mask
            raise ValueError("input_genes='expressed' needs attention='sdpa': FAVOR+ takes no padding mask "
                             "(set --attention=sdpa)")
        if self.input_genes == 'all' and self.head == 'cls':
            raise ValueError("head='cls' needs input_genes='expressed' (scBERT's input has no CLS token) "
                             "(set --head=scbert or pooled, or --input_genes=expressed)")
        if self.embd_factor < 0 or self.n_pos_buckets < 2 or self.favor_chunk < 1:
            raise ValueError(f'embd_factor must be >= 0, n_pos_buckets >= 2 and favor_chunk >= 1, not '
                             f'{self.embd_factor}, {self.n_pos_buckets} and {self.favor_chunk} '
                             f'(set --embd_factor=... / --n_pos_buckets=... / --favor_chunk=...)')
        if self.nb_features == 0:
            self.nb_features = int(self.dim_head * math.log(self.dim_head))
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head

    @property
    def ff_hidden(self):
        # SwiGLU has three matrices where GELU has two: 2/3 of the width keeps the parameters (llama), rounded up to 8
        hidden = self.ff_mult * self.n_embd
        return hidden if self.mlp == 'gelu' else 8 * math.ceil(2 * hidden / 3 / 8)

    @property
    def seq_len(self):
        return self.n_genes + 1

    @property
    def mask_id(self):
        return self.n_bins + 1


# -----------------------------------------------------------------------------
# 2. The input. scBERT's is a (B, L) tensor of bins, one per panel gene. scBERT 2.0's is a dict of (B, T) tensors:
# 'genes' (vocab index, -1 = padding), 'values' (log-normalized expression) and 'bins' (n_bins + 1 = masked); the
# encoder puts a CLS token first, so it sees L = 1 + T tokens. ScBERT.embed (section 7) turns either into vectors.

def token_valid(x):
    """The real tokens of an encoder input: None for scBERT's panel tokens (all real), else (B, 1 + T) bool with the
    CLS token first and False at padding."""
    if not isinstance(x, dict):
        return None
    genes = x['genes']
    return torch.cat([genes.new_ones(len(genes), 1, dtype=torch.bool), genes >= 0], dim=1)


class AutoDiscretization(nn.Module):
    """xTrimoGene's value embedding (Gong et al. 2023, Sec. 2.2; value_emb='continuous'): a scalar value v becomes a
    soft mix of n_bins learned bin embeddings, so nearby values get nearby embeddings (integer bins put 1.99 and 2.01
    apart):  v1 = LeakyReLU(w1 v) (n_bins,);  v2 = W2 v1 + alpha v1;  e = softmax(v2) @ table (n_embd,).
    'bins' and 'quantile' (scGPT's per-cell quantile bins, made by data.py) use a plain nn.Embedding of the bin."""
    def __init__(self, n_bins, n_embd, alpha=0.1):
        super().__init__()
        self.w1 = nn.Linear(1, n_bins)
        self.w2 = nn.Linear(n_bins, n_bins)
        self.alpha = alpha
        self.table = nn.Parameter(torch.randn(n_bins, n_embd))      # N(0, 1), as the other embeddings

    def forward(self, values):                                # (B, T) float -> (B, T, n_embd)
        v1 = F.leaky_relu(self.w1(values.unsqueeze(-1)))
        v2 = self.w2(v1) + self.alpha * v1
        return v2.softmax(-1) @ self.table


# -----------------------------------------------------------------------------
# 3. FAVOR+ (Choromanski et al. 2021, eqs. 5-7 and Lemma 1)

def orthogonal_random_features(n_rows, dim, generator=None):
    """(n_rows, dim) matrix of random features whose rows are orthogonal within each block of `dim` rows (the "ORF" of
    the paper, Sec. 2.4), each row rescaled to the norm of a Gaussian vector, so the estimator stays unbiased."""
    blocks = []
    for _ in range(math.ceil(n_rows / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.t())
    w = torch.cat(blocks)[:n_rows]
    norms = torch.randn(n_rows, dim, generator=generator).norm(dim=1)
    return norms[:, None] * w


def feature_logits(x, projection, workspace=None):
    """x (B, H, n, d), projection (m, d) -> w·x' (B, H, n, m) and |x'|²/2 (B, H, n, 1), with x' = x / d^(1/4).
    workspace: a flat buffer to write w·x' into instead of fresh memory (inference only: autograd forbids it)."""
    d, m = x.shape[-1], projection.shape[0]
    out = None if workspace is None else workspace[:x[..., 0].numel() * m].view(*x.shape[:-1], m)
    return torch.matmul(x, (projection * d ** -0.25).t(), out=out), (0.5 * d ** -0.5) * (x * x).sum(-1, keepdim=True)


def softmax_kernel(x, projection, is_query, batch_max=False, eps=1e-4, workspace=None):
    """Positive random features phi(x) with E[phi(q)·phi(k)] ∝ exp(q·k / sqrt(d)), all tokens at once (the definition;
    favor_attention computes the same a chunk of tokens at a time).

    x (B, H, L, d), projection (m, d) -> (B, H, L, m).
    phi(x) = exp(w·x' - |x'|²/2 - c) + eps, with x' = x / d^(1/4). The paper's m^-1/2 factor is left out: it cancels
    between the numerator and the denominator of the attention. So would the stabiliser c, but for the +eps floor.
    For queries c is the max per token, as in the original. For keys the original takes ONE max over the whole tensor,
    every cell and head of the batch, so a cell's output depends on the batch it sits in (by up to 0.01 in the logits).
    We take the max per cell, over its heads, genes and features: outputs are then batch-invariant and equal the
    original run on one cell at a time (to ~1e-6). A max per cell AND head would be batch-invariant too, but it moves
    each head's eps floor and the logits by ~0.03, too far to load the original's weights faithfully.
    batch_max=True reproduces the original's batched outputs. c is a constant shift, so it carries no gradient.
    """
    x_proj, half_sq_norm = feature_logits(x, projection, workspace)
    with torch.no_grad():
        if is_query:
            stab = x_proj.amax(-1, keepdim=True)                        # (B, H, L, 1)
        else:                                                           # () or (B, 1, 1, 1)
            stab = x_proj.amax() if batch_max else x_proj.amax((-3, -2, -1), keepdim=True)
    # in place: autograd allows it, since matmul's backward needs its inputs, not its output, and exp's needs only its
    # output. eps=0 leaves the floor to the caller (favor_attention adds it as a rank-one term)
    phi = x_proj.sub_(half_sq_norm + stab).exp_()
    return phi + eps if eps else phi


def favor_attention(q, k, v, projection, batch_max=False, chunk=1024, eps=1e-4):
    """Non-causal linear attention: out = phi(q) (phi(k)ᵀ v) / (phi(q) · Σ phi(k)).
    q, k, v (B, H, L, d) -> (B, H, L, d). A column of ones appended to v makes the same two matmuls compute the
    denominator.

    The feature maps phi are (B, H, L, m): 180 MB per layer for one full-size cell, far bigger than the CPU's caches,
    and allocating them anew in every layer costs more in page faults than the matmuls cost. So we never make them
    whole: about `chunk` tokens of the batch at a time (chunk // B positions of every cell), the keys add their chunk
    to the (m, d + 1) summary phi(k)ᵀ [v 1], then each chunk of queries reads its output from it. The key stabiliser,
    a max over the cell's whole phi(k), is kept as a running max (as flash attention keeps its softmax's): when a chunk
    raises it, the summary so far is rescaled by exp(old - new). The +eps floor of phi is linear, so it is added once,
    as eps Σ_l [v_l 1] to the summary and eps Σ_m context_m to each query's output. Same numbers as softmax_kernel's
    (to float rounding), the same FLOPs, for training too (autograd keeps every chunk's features, as it kept the whole).
    """
    B, H, L, d = q.shape
    step = max(1, chunk // B)                                               # positions per chunk
    # inference writes every chunk's (B, H, step, m) logits into one buffer: fresh pages cost more than the matmul
    workspace = None if torch.is_grad_enabled() else q.new_empty(B * H * step * projection.shape[0])
    context = key_summary(k, v, projection, batch_max, step, workspace)     # (B, H, m, d + 1)
    context = context + eps * torch.cat([v.sum(-2, keepdim=True), v.new_full((B, H, 1, 1), L)], -1)
    floor = eps * context.sum(-2, keepdim=True)                             # (B, H, 1, d + 1)
    # written token-major, (B, L, H, d): the caller's transpose back to (B, L, H * d) is then free
    out = q.new_empty(B, L, H, d)
    for i in range(0, L, step):
        phi_q = softmax_kernel(q[:, :, i:i + step], projection, is_query=True, eps=0.0, workspace=workspace)
        num_den = phi_q @ context + floor                                   # (B, H, step, d + 1)
        out[:, i:i + step] = (num_den[..., :-1] / num_den[..., -1:]).transpose(1, 2)
    return out.transpose(1, 2)                                              # (B, H, L, d)


def key_summary(k, v, projection, batch_max, step, workspace=None):
    """Σ_l exp(w·k_l' - |k_l'|²/2 - c) [v_l 1]: (B, H, m, d + 1), `step` positions at a time, c the running max."""
    context, stab = 0.0, None
    for i in range(0, k.shape[2], step):
        k_proj, half_sq_norm = feature_logits(k[:, :, i:i + step], projection, workspace)  # (B, H, step, m)
        with torch.no_grad():
            chunk_max = k_proj.amax() if batch_max else k_proj.amax((-3, -2, -1), keepdim=True)
            new_stab = chunk_max if stab is None else torch.maximum(stab, chunk_max)
            rescale = 1.0 if stab is None else torch.exp(stab - new_stab)    # the summary so far, in the new scale
            stab = new_stab
        phi = k_proj.sub_(half_sq_norm + stab).exp_()                       # (B, H, step, m), without the floor
        v1 = F.pad(v[:, :, i:i + step], (0, 1), value=1.0)                 # (B, H, step, d + 1)
        context = context * rescale + phi.transpose(-2, -1) @ v1
    return context


# -----------------------------------------------------------------------------
# 4. Attention: exact softmax attention through SDPA, or FAVOR+; grouped-query heads (Ainslie et al. 2023).
# The projections come from make_linear (section 10): nn.Linear, or BitNet's BitLinear when bitlinear=True.

def repeat_kv(x, n_rep):
    """(B, n_kv_head, L, d) -> (B, n_kv_head * n_rep, L, d): each key/value head serves n_rep query heads (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.layer_idx, self.config = config.n_head, config.n_kv_head, layer_idx, config
        self.to_q = make_linear(config, config.n_embd, config.n_head * config.dim_head, bias=False)
        # GQA: fewer key/value heads, shared by groups of query heads
        self.to_k = make_linear(config, config.n_embd, config.n_kv_head * config.dim_head, bias=False)
        self.to_v = make_linear(config, config.n_embd, config.n_kv_head * config.dim_head, bias=False)
        self.to_out = make_linear(config, config.n_head * config.dim_head, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        if config.disentangled:        # DeBERTa's position projections W_q,r and W_k,r (section 9; P is shared)
            self.pos_q = make_linear(config, config.n_embd, config.n_head * config.dim_head, bias=False)
            self.pos_k = make_linear(config, config.n_embd, config.n_head * config.dim_head, bias=False)
        if config.attention == 'performer':
            self.register_buffer('projection_matrix', torch.zeros(config.nb_features, config.dim_head))
            self.redraw(0)

    def redraw(self, n_redraws):
        # A generator seeded by (seed, layer, redraw count): every DDP rank and a resumed run draw the same features.
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.layer_idx * 10_007 + n_redraws)
        w = orthogonal_random_features(self.config.nb_features, self.config.dim_head, generator=g)
        self.projection_matrix.copy_(w)

    def heads(self, x):
        """x (B, L, n_embd) -> q, k, v (B, n_head, L, dim_head), the key/value heads repeated for their query groups."""
        B, L, _ = x.shape
        q = self.to_q(x).view(B, L, self.n_head, -1).transpose(1, 2)
        k, v = (proj(x).view(B, L, self.n_kv_head, -1).transpose(1, 2) for proj in (self.to_k, self.to_v))
        return q, repeat_kv(k, self.n_head // self.n_kv_head), repeat_kv(v, self.n_head // self.n_kv_head)

    def forward(self, x, attn_mask=None, rel=None):          # x (B, L, n_embd); attn_mask (B, 1, 1, L) bool or None
        q, k, v = self.heads(x)                               # rel: DeBERTa's (P (R, n_embd), buckets (B|1, L, L))
        if self.config.attention == 'performer':
            out = favor_attention(q, k, v, self.projection_matrix, self.config.favor_batch_max,
                                  self.config.favor_chunk)
        elif rel is not None:
            out = disentangled_attention(self, q, k, v, attn_mask, *rel)
        else:
            # attn_mask hides the padding keys; None when the batch has no padding, which keeps the flash kernel usable
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.config.dropout if self.training else 0.0)
        out = out.transpose(1, 2).flatten(2)                  # (B, L, n_head * dim_head)
        return self.dropout(self.to_out(out))


# -----------------------------------------------------------------------------
# 5. Norms and MLPs

class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), as llama: computed in fp32 whatever the autocast dtype, since the
    mean of squares of bf16 activations loses too much precision."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


def make_norm(config):
    return RMSNorm(config.n_embd) if config.norm == 'rmsnorm' else nn.LayerNorm(config.n_embd, bias=config.bias)


class MLP(nn.Module):
    """GELU: w2(gelu(w1 x)), as scBERT. SwiGLU (Shazeer 2020, "GLU variants improve Transformer"):
    w2(silu(w1 x) * w3 x). x (..., n_embd) -> (..., n_embd), through ff_hidden."""
    def __init__(self, config):
        super().__init__()
        self.w1 = make_linear(config, config.n_embd, config.ff_hidden, bias=config.bias)
        swiglu = config.mlp == 'swiglu'
        self.w3 = make_linear(config, config.n_embd, config.ff_hidden, bias=config.bias) if swiglu else None
        self.w2 = make_linear(config, config.ff_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.gelu(self.w1(x)) if self.w3 is None else F.silu(self.w1(x)) * self.w3(x)
        return self.w2(self.dropout(h))


# -----------------------------------------------------------------------------
# 6. Mixture of experts (n_expert > 0): everything for it is here; Block and ScBERT only call it

class MoE(nn.Module):
    """A sparse mixture of expert MLPs (Shazeer et al. 2017; Switch, Fedus et al. 2022): a router sends each token to
    its top n_expert_active experts, and the token's output is their outputs weighted by the router's probabilities.

    Dispatch is dropless (no capacity limit, no token is dropped): the (token, expert) assignments are sorted by expert,
    so each expert multiplies one contiguous slice, and index_add_ sums the weighted results back per token. The
    experts' weights are stacked (n_expert, out, in) parameters: every one is in the graph even when an expert gets no
    tokens (DDP needs that), and on CUDA one F.grouped_mm call multiplies all the slices. Each forward leaves two
    auxiliary losses: Switch's load balancing, n_expert * Σ_e f_e P_e (f_e: share of assignments to e, P_e: mean router
    probability of e; exactly 1 when routing is uniform), and the router z-loss (ST-MoE, Zoph et al. 2022):
    mean logsumexp(logits)².
    """
    def __init__(self, config):
        super().__init__()
        E, C, H = config.n_expert, config.n_embd, config.ff_hidden
        self.n_expert, self.top_k, self.swiglu = E, config.n_expert_active, config.mlp == 'swiglu'
        self.router = nn.Linear(C, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, H, C) * 0.02)
        self.w3 = nn.Parameter(torch.randn(E, H, C) * 0.02) if self.swiglu else None
        self.w2 = nn.Parameter(torch.randn(E, C, H) * 0.02)
        # BitNet QAT: BitLinear's norm before each quantized input (shared by the experts: they see the same tokens)
        self.norm_in, self.norm_hidden = (RMSNorm(C), RMSNorm(H)) if config.bitlinear else (None, None)
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer('tokens_per_expert', torch.zeros(E), persistent=False)   # usage since the last reset

    @staticmethod
    def expert_matmul(x, w, counts, norm=None):
        """x (N, in), rows grouped by expert with counts (E,) -> (N, out): row block e times w[e]ᵀ."""
        x = x if norm is None else norm(x)                   # BitNet: BitLinear's norm (bitlinear=True)
        if isinstance(w, nn.Module):                          # int8 experts for inference (lowbit.QuantExperts)
            return w(x, counts)                               # bring their own matmul
        if norm is not None:                                  # BitNet QAT: BitLinear's quantizers, one γ per expert
            x, w = fake_quant(x, absmax_int8), fake_quant(w, absmean_ternary)
        if x.is_cuda and torch.is_autocast_enabled('cuda') and torch.cuda.get_device_capability(x.device) >= (8, 0):
            # one kernel for every expert; it takes bf16 on sm80+ GPUs (autocast does not cast its inputs for us)
            bf16 = torch.bfloat16
            return F.grouped_mm(x.to(bf16), w.transpose(-2, -1).to(bf16), offs=counts.cumsum(0).to(torch.int32))
        # elsewhere (on CPU grouped_mm has no backward) a loop over the E experts, not over tokens, is as fast
        return torch.cat([xe @ w[e].t() for e, xe in enumerate(x.split(counts.tolist()))])

    def forward(self, x):                                     # x (N, C): the real tokens of the batch, padding left out
        logits = self.router(x)                               # (N, E)
        probs = logits.float().softmax(-1)
        weight, expert = probs.topk(self.top_k, dim=-1)       # (N, k) each
        if self.top_k > 1:                                    # Mixtral: renormalise over the chosen experts; Switch
            weight = weight / weight.sum(-1, keepdim=True)    # (k = 1) keeps the raw probability, or no router grad
        order = expert.flatten().argsort(stable=True)         # (N k,) assignments sorted by expert
        token = order // self.top_k                           # the token of each sorted assignment
        counts = torch.bincount(expert.flatten(), minlength=self.n_expert)   # (E,) tokens per expert
        xs = x[token]                                         # (N k, C), grouped by expert
        h = self.expert_matmul(xs, self.w1, counts, self.norm_in)
        h = F.silu(h) * self.expert_matmul(xs, self.w3, counts, self.norm_in) if self.swiglu else F.gelu(h)
        y = self.expert_matmul(self.dropout(h), self.w2, counts, self.norm_hidden)   # (N k, C)
        y = y * weight.flatten()[order, None].to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))      # sum each token's k expert outputs
        with torch.no_grad():
            self.tokens_per_expert += counts.float()
        share = counts.float() / max(1, expert.numel())                    # f_e
        self.aux_loss = self.n_expert * (share * probs.mean(0)).sum() if len(x) else x.new_zeros(())
        self.z_loss = torch.logsumexp(logits.float(), -1).pow(2).mean() if len(x) else x.new_zeros(())
        return out

    def forward_real_tokens(self, h, valid=None):
        """h (B, L, C) -> (B, L, C), routing only the real tokens (valid (B, L) bool; None = all): padding must not
        count in the routing or the losses. Padding positions get 0."""
        flat = h.flatten(0, 1)
        if valid is None:
            return self(flat).view_as(h)
        keep = valid.flatten().nonzero().squeeze(1)
        return torch.zeros_like(flat).index_copy_(0, keep, self(flat[keep])).view_as(h)

    def params_per_expert(self):
        """The weights one expert holds (float, or int8 once lowbit.quantize has run)."""
        return sum((w[0].weight_int8 if isinstance(w, nn.Module) else w[0]).numel()
                   for w in (self.w1, self.w2, self.w3) if w is not None)


def moe_layers(model):
    return [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]


def moe_aux_losses(model):
    """Mean over the MoE layers of the last forward's (load-balancing loss, router z-loss); zeros for a dense model."""
    moes = moe_layers(model)
    if not moes:
        return 0.0, 0.0
    return sum(m.aux_loss for m in moes) / len(moes), sum(m.z_loss for m in moes) / len(moes)


def moe_expert_load(model, reset=True):
    """Tokens routed to each expert since the last reset, as a share of the uniform share: (n_layer, n_expert),
    1.0 everywhere = perfectly balanced. None for a dense model."""
    moes = moe_layers(model)
    if not moes:
        return None
    counts = torch.stack([m.tokens_per_expert.clone() for m in moes]).cpu()
    if reset:
        for m in moes:
            m.tokens_per_expert.zero_()
    return counts * counts.shape[1] / counts.sum(1, keepdim=True).clamp(min=1)


# -----------------------------------------------------------------------------
# 7. The ScBERT core

class Block(nn.Module):
    """Pre-norm attention then feed-forward (an MLP, or a MoE when n_expert > 0), both residual."""
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, attn_mask=None, valid=None, rel=None):  # x (B, L, C); valid (B, L) bool: the real tokens
        x = x + self.attn(self.ln_1(x), attn_mask, rel)
        if isinstance(self.mlp, MoE):
            return x + self.mlp.forward_real_tokens(self.ln_2(x), valid)
        return x + self.mlp(self.ln_2(x))


class ScBERT(nn.Module):
    def __init__(self, config):
        # The order in which parameters are made is the order the RNG draws their init: keep it, or a seed gives
        # another model.
        super().__init__()
        self.config = config
        expressed = config.input_genes == 'expressed'
        if config.value_emb == 'continuous' and expressed:
            self.value_emb = AutoDiscretization(config.n_bins, config.n_embd)
            self.mask_emb = nn.Parameter(torch.randn(config.n_embd))    # the learned embedding of a masked value
        else:                                                # bins 0..n_bins, n_bins + 1 = mask
            self.token_emb = nn.Embedding(config.n_bins + 2, config.n_embd)
        # scBERT: the original's gene2vec "positional" embedding, one row per panel position (+ the appended 0 token);
        # expressed input: one row per gene, + the CLS token's (the last row). ALBERT's factorization: section 9.
        self.gene_emb = nn.Embedding(config.seq_len, config.embd_factor or config.n_embd)
        self.gene_emb_proj = nn.Linear(config.embd_factor, config.n_embd, bias=False) if config.embd_factor else None
        add_annotation_modules(self, config)                 # biology's and DeBERTa's (section 9)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        share_layers(self.blocks, config.share_layers)       # ALBERT (section 9)
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.n_bins + 2)
        self.value_head = nn.Linear(config.n_embd, 1) if expressed else None   # masked regression
        # performer-pytorch counts training forward passes and redraws the features every feature_redraw_interval
        self.register_buffer('calls_since_redraw', torch.zeros((), dtype=torch.long))
        self.register_buffer('n_redraws', torch.zeros((), dtype=torch.long))
        self.apply(self._init_weights)
        if isinstance(getattr(self, 'value_emb', None), AutoDiscretization):
            # PyTorch's default init (w1 ~ U(-1, 1)), not N(0, 0.02): the value must move the softmax over the bins
            # from the start, or every value gets the same embedding and the model sees only which genes are expressed
            self.value_emb.w1.reset_parameters()
            self.value_emb.w2.reset_parameters()
        if self.gene_emb_proj is not None:
            # N(0, 1/E): the projected identity is then ~N(0, 1) per dimension like an unfactorized one (at N(0, 0.02)
            # it would start 10x smaller than the value embedding, and every gene would look alike; see _init_weights)
            nn.init.normal_(self.gene_emb_proj.weight, std=config.embd_factor ** -0.5)
        if self.pathway_emb is not None:
            # a gene is in ~10-50 sets: N(0, 0.1) keeps the sum of its pathways' embeddings below its N(0, 1) identity
            nn.init.normal_(self.pathway_emb.weight, std=0.1)
        self.gene_emb.weight.requires_grad_(not config.freeze_gene_emb)
        # the classifier keeps PyTorch's default init, as the original's head does: with N(0, 0.02) its 766-gene fc1
        # starts ~50x too small and the head barely trains
        self.cls_head = Classifier(config) if config.n_classes > 0 else None
        self.quantization = None                              # 'int8' | 'ternary' once lowbit.quantize() has run

    @staticmethod
    def _init_weights(module):
        # Linears N(0, 0.02) as in GPT-2/nanoGPT. Embeddings keep PyTorch's N(0, 1), as the original does: the bin and
        # gene identities must dominate the residual stream at the start; at std 0.02 the first attention outputs
        # swamp them, every gene of a cell looks alike, and fine-tuning from scratch collapses to the majority class.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def token_genes(self, x):
        """Each token's gene (its embedding row): scBERT's panel positions (L,), or for expressed input (B, 1 + T)
        with the CLS row first (padding reads row 0: its outputs are masked and ignored)."""
        if not isinstance(x, dict):
            return torch.arange(x.shape[1], device=x.device)
        genes = x['genes'].clamp(min=0)
        return torch.cat([genes.new_full((len(genes), 1), self.config.seq_len - 1), genes], dim=1)

    def gene_embedding(self, genes):
        """What a gene contributes to its token: its identity, plus its genomic position and its pathways when those
        are on (section 9). genes: any-shaped long tensor of embedding rows -> (..., n_embd)."""
        e = self.gene_emb(genes)
        if self.gene_emb_proj is not None:                   # ALBERT's factorization: E -> n_embd
            e = self.gene_emb_proj(e)
        return add_annotation_embedding(self, genes, e)     # section 9

    def embed(self, x):
        """The encoder input (B, L, n_embd): a value embedding plus a gene embedding per token (x: see section 2)."""
        if not isinstance(x, dict):
            return self.token_emb(x) + self.gene_embedding(self.token_genes(x))
        genes, bins = x['genes'], x['bins']
        if self.config.value_emb == 'continuous':
            masked = (bins == self.config.mask_id).unsqueeze(-1)
            value = torch.where(masked, self.mask_emb.to(x['values'].dtype), self.value_emb(x['values']))
        else:
            value = self.token_emb(bins)
        value = torch.cat([value.new_zeros(len(genes), 1, value.shape[-1]), value], dim=1)   # the CLS token has none
        return self.gene_embedding(self.token_genes(x)) + value            # (B, 1 + T, C)

    def encoder_input(self, x, emb=None):
        """-> (h, attn_mask, valid, rel): the first block's input (B, L, C) (emb, if given, replaces embed(x)), SDPA's
        padding mask, the real tokens (see token_valid) and DeBERTa's relative positions (or None)."""
        if self.training and self.config.attention == 'performer':
            self._maybe_redraw_features()
        valid = token_valid(x)
        # SDPA's boolean mask: True = may attend. None when nothing is padded, so flash attention stays usable.
        attn_mask = None if valid is None or bool(valid.all()) else valid[:, None, None, :]
        h = self.drop(self.embed(x) if emb is None else emb)
        rel = genomic_relative_positions(self, x) if self.config.disentangled else None   # section 9
        return h, attn_mask, valid, rel

    def encode(self, x, emb=None):
        """-> hidden states (B, L, n_embd) after the final norm (see embed for x; padding positions hold junk)."""
        h, attn_mask, valid, rel = self.encoder_input(x, emb)
        for block in self.blocks:
            h = block(h, attn_mask, valid, rel)
        return self.ln_f(h)

    def forward(self, x, targets=None, task=None, class_weight=None, mlm_weight=1.0, regression_weight=1.0,
                return_hidden=False, label_smoothing=0.0):
        """task 'mlm': scBERT's tokens give logits (B, L, n_bins + 2), targets (B, L) with -100 where not masked.
        Expressed input gives {'bins': (B, T, n_bins + 2) logits, 'values': (B, T) predicted values}, and targets is
        {'bins': (B, T), -100 where not masked, 'values': (B, T)}: the loss is mlm_weight * cross-entropy over the
        masked bins + regression_weight * MSE over the masked values.
        task 'classify' (the default when there is a classifier): logits (B, n_classes), targets (B,); the loss is
        cross-entropy, weighted by class_weight (n_classes,) and with label_smoothing (Szegedy et al. 2016) if given.
        Returns (logits, loss); loss is None without targets. MoE auxiliary losses are not included (see aux_losses).
        return_hidden=True also returns the encoder's hidden states (B, L, n_embd), for distillation."""
        task = task or ('classify' if self.cls_head is not None else 'mlm')
        h = hidden = self.encode(x)                                       # (B, L, C)
        if task == 'classify':
            logits = self.cls_head(h, x)
            loss = None if targets is None else F.cross_entropy(logits, targets, weight=class_weight,
                                                                label_smoothing=label_smoothing)
        elif not isinstance(x, dict):
            logits = self.lm_head(h)
            loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                                ignore_index=-100)
        else:
            h = h[:, 1:]                                                    # the genes, CLS dropped: (B, T, C)
            logits = {'bins': self.lm_head(h), 'values': self.value_head(h).squeeze(-1)}
            loss = None
            if targets is not None:
                sel = targets['bins'] != -100                               # the masked genes
                mlm = F.cross_entropy(logits['bins'][sel].float(), targets['bins'][sel])
                regression = F.mse_loss(logits['values'][sel].float(), targets['values'][sel].float())
                loss = mlm_weight * mlm + regression_weight * regression
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    # -------------------------------------------------------------------------
    # the rest is bookkeeping for the scripts: FAVOR+'s redraws, counts, the optimizer, and pointers to sections 6, 9
    # and 11 (they hold the code; these methods keep the calls short: model.aux_losses(), ScBERT.from_checkpoint(...))

    @torch.compiler.disable
    def _maybe_redraw_features(self):
        if self.calls_since_redraw >= self.config.feature_redraw_interval:
            self.n_redraws += 1
            for block in self.blocks:
                block.attn.redraw(int(self.n_redraws))
            self.calls_since_redraw.zero_()
        else:
            self.calls_since_redraw += 1

    def quantized_linears(self):
        """lowbit.QuantLinear layers (they hold int8 weights), once lowbit.quantize has run."""
        return [m for m in self.modules() if hasattr(m, 'weight_int8')]

    def num_params(self):
        """All parameters, the gene embedding included (the original's 8.39M count includes its 3.38M gene2vec table),
        and a quantized model's int8 weights."""
        return sum(p.numel() for p in self.parameters()) + sum(
            m.weight_int8.numel() + (m.bias.numel() if m.bias is not None else 0) for m in self.quantized_linears())

    def num_active_params(self, embeddings=True):
        """Parameters that one token uses: a MoE layer's inactive experts left out, and the embedding tables too
        when embeddings=False (a lookup costs no FLOPs). Equals num_params() for a dense model with embeddings."""
        n = self.num_params()
        for moe in moe_layers(self):
            n -= (moe.n_expert - moe.top_k) * moe.params_per_expert()
        if not embeddings:
            n -= sum(m.weight.numel() for m in (self.gene_emb, getattr(self, 'token_emb', None), self.chrom_emb,
                                                self.pathway_emb) if m is not None)
        return n

    def aux_losses(self):                                     # section 6
        return moe_aux_losses(self)

    def expert_load(self, reset=True):                        # section 6
        return moe_expert_load(self, reset)

    def set_gene_embedding(self, weight, freeze=True):
        """Load a gene2vec-style table (n_genes, n_embd) in panel order; the extra last position gets a zero row."""
        assert not self.config.embd_factor, 'a gene2vec table replaces the factorized embedding: use embd_factor=0'
        weight = torch.as_tensor(weight, dtype=torch.float32)
        assert weight.shape == (self.config.n_genes, self.config.n_embd), weight.shape
        with torch.no_grad():
            self.gene_emb.weight[:-1] = weight
            self.gene_emb.weight[-1] = 0
        self.config.freeze_gene_emb = freeze
        self.gene_emb.weight.requires_grad_(not freeze)

    def set_gene_annotation(self, chrom=None, start=None, pathway_ptr=None, pathway_idx=None):   # section 9
        set_gene_annotation(self, chrom, start, pathway_ptr, pathway_idx)

    def configure_optimizer(self, name, lr, weight_decay, betas=(0.9, 0.999)):
        """AdamW with decoupled weight decay on matrices only (nanoGPT's grouping), Adam as scBERT used, or Adafactor
        (Shazeer & Stern 2018; torch.optim.Adafactor): factored second moments, so its state is O(rows + columns) per
        matrix instead of Adam's two full copies. torch's lr is a relative step (default 1e-2) and has no momentum."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
        if name == 'adamw':
            return torch.optim.AdamW(groups, lr=lr, betas=betas)
        if name == 'adam':
            return torch.optim.Adam(params, lr=lr, betas=betas)
        if name == 'adafactor':
            return torch.optim.Adafactor(groups, lr=lr)
        raise ValueError(f"unknown optimizer '{name}' (use adamw, adam or adafactor)")

    def attention_received(self, x, chunk=0, as_released=False):     # section 11
        return attention_received(self, x, chunk, as_released)

    def integrated_gradients(self, x, target=None, steps=1):          # section 11
        return integrated_gradients(self, x, target, steps)

    @classmethod
    def from_checkpoint(cls, checkpoint):                              # section 11
        return model_from_checkpoint(checkpoint)

    @classmethod
    def from_scbert(cls, checkpoint, dim_head=64, **overrides):        # section 11
        return model_from_original_scbert(checkpoint, dim_head, **overrides)


# -----------------------------------------------------------------------------
# 8. Heads. The masked-bin head (lm_head) and scBERT 2.0's masked-value head (value_head) are single Linears made in
# ScBERT.__init__; the cell-type head is below.

class Classifier(nn.Module):
    """Cell-type head over the encoder output h (B, L, n_embd) -> logits (B, n_classes).

    'scbert' is the original's (finetune.py): a 1×n_embd convolution (= a Linear(n_embd, 1) applied per gene) squeezes
    each gene to one number, then an MLP reads all L genes: L -> 512 -> head_hidden -> n_classes. It is tied to the
    panel. 'pooled' averages h over the real genes and 'cls' takes the CLS token (expressed input only); both then
    apply n_embd -> head_hidden -> n_classes, so they work for any gene count.
    """
    def __init__(self, config):
        super().__init__()
        self.kind = config.head
        if self.kind == 'scbert':
            self.gene_proj = nn.Linear(config.n_embd, 1)
            # The ReLU after this one-unit projection is a bottleneck: with PyTorch's default init it starts dead for
            # most genes at some seeds (7% alive at seed 1337 on PBMC) and the head cannot learn. A unit bias keeps
            # nearly every gene alive at the start, while the random weight still passes each gene's state through.
            nn.init.ones_(self.gene_proj.bias)
            self.fc1 = nn.Linear(config.seq_len, 512)
            self.fc2 = nn.Linear(512, config.head_hidden)
        else:
            self.fc2 = nn.Linear(config.n_embd, config.head_hidden)
        # The mean of hundreds of normalized gene states is not normalized: its per-cell part is ~1/sqrt(n_genes) in
        # size, so fc2 starts blind and fine-tuning from scratch predicted the majority class on Baron. Renormalize
        # the mean, as BEiT's "fc_norm" does after mean pooling.
        self.pool_norm = nn.LayerNorm(config.n_embd) if self.kind == 'pooled' else None
        self.fc3 = nn.Linear(config.head_hidden, config.n_classes)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h, inputs=None):                        # inputs: the encoder's input (tokens or expressed dict)
        return self.fc3(self.features(h, inputs))

    def features(self, h, inputs=None):
        """The hidden layer the class logits are read from (B, head_hidden): the cell embedding of the novelty
        scores."""
        valid = token_valid(inputs)                          # (B, L) bool, None = all real
        if self.kind == 'scbert':
            x = F.relu(self.gene_proj(h).squeeze(-1))        # (B, L)
            if valid is not None:
                # expressed input: each gene's number goes to its panel position (0 for the genes the cell does not
                # show) and CLS's to the last position, scBERT's appended token: (B, 1 + T) -> (B, n_genes + 1)
                genes = inputs['genes']
                slot = torch.where(genes >= 0, genes, self.fc1.in_features - 1)      # padding writes 0s to the last
                panel = x.new_zeros(len(x), self.fc1.in_features).scatter(1, slot, x[:, 1:] * valid[:, 1:])
                x = torch.cat([panel[:, :-1], x[:, :1]], dim=1)
            x = self.dropout(F.relu(self.fc1(x)))            # (B, 512)
        else:
            x = pool(h, valid, self.kind)                    # (B, n_embd)
            x = x if self.pool_norm is None else self.pool_norm(x)
        return self.dropout(F.relu(self.fc2(x)))             # (B, head_hidden)


def pool(h, valid=None, how='pooled'):
    """One vector per cell from h (B, L, C): the CLS token (position 0), or the mean over the real (non-padding)
    genes, CLS excluded when valid marks it as the expressed input does (B, L) -> (B, C)."""
    if how == 'cls':
        return h[:, 0]
    if valid is None:
        return h.mean(1)
    genes = valid.clone()
    genes[:, 0] = False                                      # the CLS token is not a gene
    w = genes.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1).clamp(min=1)


# -----------------------------------------------------------------------------
# 9. ALBERT, DeBERTa and biology: each a flag, and an `if` where ScBERT or Attention calls into this section.
#
# ALBERT (Lan et al. 2020, Sec. 3.1): a factorized gene embedding, V×E + E×C parameters instead of V×C for E << C
# (embd_factor: gene_emb then gene_emb_proj, in ScBERT.__init__ and gene_embedding), and cross-layer sharing.
# Biology: a gene's chromosome and start coordinate (genomic_pe) and the sum of its pathways' embeddings
# (pathway_enc) are added to its gene embedding. DeBERTa (He et al. 2021): disentangled attention over genomic
# relative positions (disentangled). The annotation they read (chromosome, start, gene sets) comes from
# prepare_data.py and is stored in buffers, so it travels with the checkpoint.

# ALBERT: the factorized embedding is two lines of ScBERT (gene_emb, gene_emb_proj); the sharing is here

def share_layers(blocks, how):
    """ALBERT's cross-layer sharing: every block reuses block 0's attention, feed-forward ('ffn'), or all of it. The
    same module in several places: parameters() counts it once, the optimizer updates it once per step."""
    for block in blocks[1:]:
        if how in ('attention', 'all'):
            block.attn = blocks[0].attn
        if how in ('ffn', 'all'):
            block.mlp = blocks[0].mlp
        if how == 'all':
            block.ln_1, block.ln_2 = blocks[0].ln_1, blocks[0].ln_2


# biology: the gene annotation, its buffers, and what it adds to a gene's embedding (genomic_pe, pathway_enc)

def add_annotation_modules(model, config):
    """The gene annotation's buffers and the tables that read it, on `model` (in this order: it is the init order)."""
    if config.genomic_pe or config.disentangled:         # each gene's (chromosome, start); 0 = unknown, as the CLS row
        model.register_buffer('gene_chrom', torch.zeros(config.seq_len, dtype=torch.long))
        model.register_buffer('gene_start', torch.zeros(config.seq_len))
    model.chrom_emb = nn.Embedding(config.n_chrom + 1, config.n_embd) if config.genomic_pe else None
    if config.pathway_enc:                               # gene -> its gene sets, CSR (the CLS row has none)
        model.register_buffer('pathway_ptr', torch.zeros(config.seq_len + 1, dtype=torch.long))
        model.register_buffer('pathway_idx', torch.zeros(config.n_pathway_links, dtype=torch.long))
    model.pathway_emb = nn.Embedding(max(1, config.n_pathways), config.n_embd) if config.pathway_enc else None
    # DeBERTa shares one table of relative-position embeddings P across the layers; each layer projects it
    model.rel_emb = nn.Embedding(2 * config.n_pos_buckets + 1, config.n_embd) if config.disentangled else None


@torch.no_grad()
def set_gene_annotation(model, chrom=None, start=None, pathway_ptr=None, pathway_idx=None):
    """The dataset's gene annotation (data.Dataset.annotation(), vocab order) into the buffers: chrom (n_genes,)
    0 = unknown, start (n_genes,) base pairs, -1 = unknown; pathway_ptr (n_genes + 1,) / pathway_idx: gene -> its
    gene sets (CSR). The last position (CLS, or scBERT's appended token) stays unknown and in no set. The buffers are
    saved with the weights, so a checkpoint carries its annotation to predict.py."""
    config, n = model.config, model.config.n_genes
    if chrom is not None and hasattr(model, 'gene_chrom'):
        chrom = torch.as_tensor(chrom, dtype=torch.long)
        assert chrom.shape == (n,), chrom.shape
        assert not config.genomic_pe or int(chrom.max()) <= config.n_chrom, 'chrom codes above n_chrom'
        model.gene_chrom[:n] = chrom
        model.gene_start[:n] = torch.as_tensor(start, dtype=torch.float32).clamp(min=0) * (chrom > 0)
    if pathway_ptr is not None and config.pathway_enc:
        ptr = torch.as_tensor(pathway_ptr, dtype=torch.long)
        assert ptr.shape == (n + 1,) and int(ptr[-1]) == config.n_pathway_links, (ptr.shape, int(ptr[-1]))
        model.pathway_ptr[:n + 1] = ptr
        model.pathway_ptr[n + 1] = ptr[-1]                # the CLS row: no sets
        model.pathway_idx.copy_(torch.as_tensor(pathway_idx, dtype=torch.long))


def add_annotation_embedding(model, genes, e):
    """e (..., C), the embedding of genes (...) long, plus the gene's chromosome and coordinate (genomic_pe) and its
    pathways (pathway_enc), when those are on."""
    if model.chrom_emb is not None:
        chrom = model.gene_chrom[genes]
        known = (chrom > 0).unsqueeze(-1)
        e = e + model.chrom_emb(chrom) + genomic_sinusoid(model.gene_start[genes], e.shape[-1]) * known
    if model.pathway_emb is not None:                     # (n_genes + 1, C): each gene's sum over its sets, looked up
        table = F.embedding_bag(model.pathway_idx, model.pathway_emb.weight, model.pathway_ptr, mode='sum',
                                include_last_offset=True)
        e = e + table[genes]
    return e


# Genomic positions: a gene's place on its chromosome is the only "position" a cell's genes have (their order in the
# panel, or in the expressed-gene input, means nothing), so the positional encodings read the annotation's chromosome
# and start coordinate. Distances run from 1 kb (neighbouring genes) to 250 Mb (the longest chromosome).
GENOMIC_MIN_DIST, GENOMIC_MAX_DIST = 1e3, 2.5e8


def genomic_sinusoid(start, dim):
    """genomic_pe: transformer sinusoids (Vaswani et al. 2017) of a gene's start coordinate in base pairs: (...,) float
    -> (..., dim), sin in the first half and cos in the second, wavelengths geometric from 1 kb to 250 Mb, so
    neighbouring genes differ in the fast dimensions and distant ones in the slow. Computed in float64 (a coordinate
    of 2e8 times the fastest frequency needs it; the buffer holding the coordinates is float32, exact to 16 bp at
    250 Mb, far below the 1 kb fastest wavelength), returned as float32."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float64, device=start.device) / max(1, half - 1)
    wavelength = GENOMIC_MIN_DIST * (GENOMIC_MAX_DIST / GENOMIC_MIN_DIST) ** steps
    angle = start.double()[..., None] * (2 * math.pi / wavelength)                  # (..., half)
    return F.pad(torch.cat([angle.sin(), angle.cos()], -1), (0, dim - 2 * half)).float()


# DeBERTa: disentangled attention over genomic relative positions (Attention.forward calls it when rel is given)

def genomic_buckets(chrom, start, n_pos_buckets):
    """DeBERTa's relative positions, made genomic: the bucket of key gene j seen from query gene i.

    chrom (..., L) long (0 = unknown), start (..., L) float -> (..., L, L) long in [0, 2 * n_pos_buckets + 1):
        0 = the two genes are on different chromosomes;   1 = either gene has no coordinates (and the CLS token);
        2 + (n - 1) + sign(d) * level:  d = start_j - start_i on the same chromosome, level 0 for |d| <= 1 kb, rising
        in n - 1 log-spaced steps to n - 1 at |d| >= 250 Mb (DeBERTa's log buckets: near pairs get fine resolution)."""
    n = n_pos_buckets
    d = start[..., None, :] - start[..., :, None]                                  # (..., L, L): start_j - start_i
    frac = (torch.log(d.abs().clamp(min=GENOMIC_MIN_DIST) / GENOMIC_MIN_DIST)
            / math.log(GENOMIC_MAX_DIST / GENOMIC_MIN_DIST))
    level = (frac * (n - 1)).ceil().clamp(max=n - 1).long()
    bucket = 2 + (n - 1) + torch.sign(d).long() * level
    same = chrom[..., :, None] == chrom[..., None, :]
    known = (chrom > 0)[..., :, None] & (chrom > 0)[..., None, :]
    return torch.where(known, torch.where(same, bucket, 0), 1)


def genomic_relative_positions(model, x):
    """DeBERTa's `rel` for every layer, computed once per forward: (P (R, n_embd), the shared relative-position
    embeddings; buckets (B or 1, L, L), genomic_buckets of the input's genes)."""
    genes = model.token_genes(x)
    bucket = genomic_buckets(model.gene_chrom[genes], model.gene_start[genes], model.config.n_pos_buckets)
    return model.rel_emb.weight, bucket if bucket.dim() == 3 else bucket.unsqueeze(0)


def disentangled_attention(attn, q, k, v, attn_mask, pos, bucket):
    """DeBERTa (He et al. 2021, eq. 4) in Attention `attn`: score(i, j) = q_i·k_j + q_i·K^r_δ(i,j) + k_j·Q^r_δ(j,i),
    scaled by 1/√(3d): content-to-content, content-to-position and position-to-content. δ is genomic_buckets'
    relative bucket, P (R, C) the shared relative-position embeddings. The two position terms are an additive bias
    handed to SDPA. q, k, v (B, H, L, d) -> (B, H, L, d)."""
    bias = disentangled_bias(attn, q, k, pos, bucket, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1 / math.sqrt(3 * q.shape[-1]),
                                          dropout_p=attn.config.dropout if attn.training else 0.0)


def disentangled_bias(attn, q, k, pos, bucket, attn_mask=None, rows=slice(None)):
    """The position terms of disentangled_attention, already scaled, for the query rows `rows` (B, H, l, L); -inf at
    the padding keys. q (B, H, l, d) holds only those rows' queries; k (B, H, L, d) every key."""
    B, H, L, d = k.shape
    R = pos.shape[0]
    k_r = attn.pos_k(pos).view(R, H, d).transpose(0, 1)          # (H, R, d)
    q_r = attn.pos_q(pos).view(R, H, d).transpose(0, 1)
    bucket = bucket.expand(B, L, L)
    index = bucket[:, rows].unsqueeze(1).expand(B, H, -1, L)     # (B, H, l, L): δ(i, j) at [i, j]
    c2p = (q @ k_r.transpose(-2, -1)).gather(-1, index)                        # [i, j] = q_i · K^r_δ(i,j)
    index_t = bucket[:, :, rows].unsqueeze(1).expand(B, H, L, -1)  # (B, H, L, l): δ(j, i) at [j, i]
    p2c = (k @ q_r.transpose(-2, -1)).gather(-1, index_t).transpose(-2, -1)    # [i, j] = k_j · Q^r_δ(j,i)
    bias = (c2p + p2c) / math.sqrt(3 * d)
    return bias if attn_mask is None else bias.masked_fill(~attn_mask, float('-inf'))   # padding keys: -inf


# -----------------------------------------------------------------------------
# 10. BitNet b1.58 (Ma et al. 2024): ternary weights, int8 activations, learned through them (bitlinear=True).
#
# Only the attention projections and the feed-forward / expert matrices are quantized: they hold nearly all the FLOPs.
# Embeddings (lookups), norms, the MoE router, FAVOR+'s random features and the heads stay in floating point.
# Inference from the int8 / ternary storage this trains for (QuantLinear, quantize, the packing) is in lowbit.py.

def absmax_int8(x):
    """Symmetric absmax int8 along the last dim (a token's features, or a weight's input row): x ≈ q · scale,
    q = round(x / scale) in [-127, 127], scale = max|x| / 127. Returns (q as int8, scale (..., 1))."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def absmean_ternary(w):
    """BitNet b1.58 (eqs. 1-3): W ≈ q · γ, q = RoundClip(W / γ, -1, 1) in {-1, 0, +1}, γ = mean |W| of the matrix (the
    last two dims: stacked experts (E, out, in) get one γ each). Returns (q as int8, γ (..., 1, 1))."""
    scale = w.abs().mean((-2, -1), keepdim=True).clamp(min=1e-8)
    return torch.round(w / scale).clamp(-1, 1).to(torch.int8), scale


def fake_quant(x, quantize):
    """Quantize-dequantize for training. The straight-through estimator (Bengio et al. 2013): the forward pass sees
    the quantized values, the backward pass treats the rounding as the identity, so the float weights keep learning."""
    q, scale = quantize(x)
    return x + (q.to(x.dtype) * scale - x).detach()


class BitLinear(nn.Linear):
    """BitNet b1.58's linear for quantization-aware training: an RMSNorm (BitNet's SubLN: the input scale the int8
    grid sees no longer depends on the layer), activations fake-quantized to int8 per token (absmax) and weights to
    {-1, 0, +1}·γ (absmean), both through the straight-through estimator. Latent weights stay float."""
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = RMSNorm(in_features)

    def forward(self, x):
        return F.linear(fake_quant(self.norm(x), absmax_int8), fake_quant(self.weight, absmean_ternary), self.bias)


def make_linear(config, in_features, out_features, bias):
    """The attention and feed-forward linears (sections 4 and 5): nn.Linear, or BitLinear when config.bitlinear.
    (MoE's stacked experts take the same quantizers in MoE.expert_matmul.)"""
    return (BitLinear if config.bitlinear else nn.Linear)(in_features, out_features, bias=bias)


def as_bitlinear(model):
    """A float model as a bitlinear one: the same weights, BitLinear's norms added at gain 1 (calibrate_bitlinear sets
    them). For post-training ternary conversion, and for quantization-aware training that starts from a float model."""
    bit = ScBERT(replace(model.config, bitlinear=True))
    missing, unexpected = bit.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(('.norm.weight', '.norm_in.weight', '.norm_hidden.weight'))
                                  for k in missing), (missing, unexpected)
    return bit


@torch.no_grad()
def calibrate_bitlinear(model, batches):
    """Set every BitLinear norm's gain to the RMS of its input over the batches (model inputs): the norm then hands
    the quantizer inputs of the size the float weights were trained on, up to each token's own scale. Layer by layer:
    each norm's gain is updated before it runs, so the layers after it see calibrated inputs. Returns the norm count."""
    norms = [m.norm for m in model.modules() if isinstance(m, BitLinear)]
    norms += [n for m in model.modules() if isinstance(m, MoE) and m.norm_in is not None
              for n in (m.norm_in, m.norm_hidden)]
    sums = {norm: [0.0, 0] for norm in norms}                 # sum of squares, count, over every batch so far

    def set_gain(norm, args):
        x = args[0].float()
        sums[norm][0] += float(x.pow(2).sum())
        sums[norm][1] += x.numel()
        if sums[norm][1]:
            norm.weight.fill_(math.sqrt(sums[norm][0] / sums[norm][1]))
    hooks = [norm.register_forward_pre_hook(set_gain) for norm in norms]
    was_training = model.training
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return len(norms)


# -----------------------------------------------------------------------------
# 11. Not in the lecture: which genes matter for a cell (predict.py --importance), and loading checkpoints

def model_name(config, distilled=False, quantization=''):
    """What logs, metrics.json and plots call a model: scBERT (the panel) or scBERT 2.0 (expressed genes), a distilled
    student, BitNet (bitlinear), a quantized file."""
    name = 'scBERT 2.0' if config.input_genes == 'expressed' else 'scBERT'
    name = f'distilled {name}' if distilled else name
    return name + (' b1.58' if config.bitlinear and not quantization else '') + (f' {quantization}' if quantization
                                                                                  else '')


@torch.no_grad()
def attention_received(model, x, chunk=0, as_released=False):
    """scBERT's attention sum (attn_sum_save.py): the attention each token receives, averaged over the query tokens,
    the heads and the layers, then normalized to sum to 1 per cell. x: an encoder input -> (B, L), 0 at padding.
    The original builds the full (L, L) matrix per head (from an fp32 L×L identity repeated per head as the values:
    11.4 GB at 16,907 genes); layer_attention_received never forms it. Its SequentialSequence also computes each
    layer's matrix a second time, from the layer's input plus the attention's output (the residual), not from what
    the layer attended with; as_released=True repeats that slip, to compare with the original's numbers."""
    h, attn_mask, valid, rel = model.encoder_input(x)
    total = 0.0
    for block in model.blocks:
        a = block.ln_1(h)
        if as_released:
            a = block.ln_1(h + block.attn(a, attn_mask, rel))
        total = total + layer_attention_received(block.attn, a, attn_mask, rel, valid, chunk)
        h = block(h, attn_mask, valid, rel)
    total = total if valid is None else total * valid
    return total / total.sum(-1, keepdim=True)


def layer_attention_received(attn, x, attn_mask=None, rel=None, valid=None, chunk=0):
    """The attention each token receives in one layer: the column means of the (L, L) attention matrix A over the
    real query tokens, averaged over the heads. x (B, L, n_embd) is the layer's (normed) input -> (B, L), fp32.
    No (L, L) matrix is ever held. FAVOR+ by the linear-attention identity: A[i, j] = φ(q_i)·φ(k_j) / D_i with
    D_i = φ(q_i)·Σ_j φ(k_j), so Σ_i A[i, j] = φ(k_j) · Σ_i φ(q_i) / D_i, O(L m) per head. Softmax attention (SDPA,
    DeBERTa's bias included): `chunk` query rows at a time, (B, H, chunk, L) scores; 0 = as many rows as keep
    that at 2^22 numbers."""
    B, L, _ = x.shape
    q = attn.to_q(x).view(B, L, attn.n_head, -1).transpose(1, 2)                         # (B, H, L, d)
    k = repeat_kv(attn.to_k(x).view(B, L, attn.n_kv_head, -1).transpose(1, 2), attn.n_head // attn.n_kv_head)
    with torch.autocast(x.device.type, enabled=False):     # sums over thousands of tokens: fp32 even under AMP
        q, k = q.float(), k.float()
        if attn.config.attention == 'performer':            # the panel input: no padding
            q = softmax_kernel(q, attn.projection_matrix, is_query=True)                    # (B, H, L, m)
            k = softmax_kernel(k, attn.projection_matrix, is_query=False, batch_max=attn.config.favor_batch_max)
            d_inv = 1 / (q @ k.sum(-2, keepdim=True).transpose(-2, -1))                     # (B, H, L, 1): 1 / D_i
            return (k @ (q * d_inv).mean(-2, keepdim=True).transpose(-2, -1)).squeeze(-1).mean(1)
        total = q.new_zeros(B, attn.n_head, L)
        scale = 1 / math.sqrt((3 if rel is not None else 1) * q.shape[-1])
        chunk = chunk or max(1, 2 ** 22 // (B * attn.n_head * L))
        for s in range(0, L, chunk):
            rows = slice(s, s + chunk)
            scores = q[:, :, rows] @ k.transpose(-2, -1) * scale                           # (B, H, chunk, L)
            if rel is not None:
                scores = scores + disentangled_bias(attn, q[:, :, rows], k, *rel, attn_mask, rows)
            elif attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float('-inf'))
            a = scores.softmax(-1)
            if valid is not None:                           # padding queries attend too; leave them out
                a = a * valid[:, None, rows, None]
            total += a.sum(-2)
        n_queries = L if valid is None else valid.sum(-1, keepdim=True)               # (B, 1)
        return total.mean(1) / n_queries


def integrated_gradients(model, x, target=None, steps=1):
    """Per token, how much the gene's expression speaks for the target class's logit: integrated gradients
    (Sundararajan et al. 2017, eq. 3 as a right Riemann sum) from the silent cell, x with every value 0, to x:
        attribution_j = (e_j - e0_j) · mean over k = 1..steps of ∂logit/∂e_j at e0 + (k / steps)(e - e0),
    with e the input embeddings (B, L, C) and e0 the silent cell's (the same genes, no expression). With enough
    steps the attributions add up to logit(x) - logit(silent cell). steps=1 is gradient × input (Shrikumar et al.
    2016): the gradient at x only, a first-order estimate that misses saturated genes (on Baron, hormone genes in
    the top bin of nearly every cell of their type; README "Gene importance"). Unexpressed genes, the CLS token and
    padding get exactly 0. target (B,) long, default the predicted class. -> (attribution (B, L), logits at x)."""
    if isinstance(x, dict):
        silent = {'genes': x['genes'], 'values': torch.zeros_like(x['values']), 'bins': torch.zeros_like(x['bins'])}
    else:
        silent = torch.zeros_like(x)                         # bin 0: not expressed
    with torch.no_grad():
        emb, base = model.embed(x), model.embed(silent)      # (B, L, C)
    total, logits = 0.0, None
    with torch.enable_grad():
        for k in range(steps, 0, -1):                        # x itself first: its logits pick the target
            e = (base + (k / steps) * (emb - base)).requires_grad_()
            out = model.cls_head(model.encode(x, e), x)
            if logits is None:
                logits = out.detach()
                target = logits.argmax(-1) if target is None else target
            total = total + torch.autograd.grad(out.gather(1, target[:, None]).sum(), e)[0]
    return (total / steps * (emb - base)).sum(-1), logits


def clean_state_dict(state):
    """A state dict without what torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    return {k.replace('_orig_mod.', '').removeprefix('module.'): v for k, v in state.items()}


def model_from_checkpoint(checkpoint):
    """ScBERT.from_checkpoint: the model in a loaded checkpoint, ours (a dict with 'model_args' and 'model') or an
    original scBERT state dict. The '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes are stripped."""
    if not (isinstance(checkpoint, dict) and 'model_args' in checkpoint):
        return model_from_original_scbert(checkpoint)
    model = ScBERT(ModelConfig(**checkpoint['model_args']))
    state = clean_state_dict(checkpoint['model'])
    if checkpoint.get('quantization'):                    # quantize.py's file: int8 / packed ternary weights
        import lowbit                                     # (here only: lowbit.py imports this file, not the reverse)
        lowbit.quantize(model, checkpoint['quantization'])          # the shapes, then the int8 / packed weights
        state = lowbit.unpack_state_dict(state, model)
    model.load_state_dict(state)
    return model


# the original release's parameter names -> ours (see the module docstring), tried in order, first match wins
ORIGINAL_NAMES = [
    (r'^pos_emb\.emb\.', 'gene_emb.'),
    (r'^performer\.calls_since_last_redraw$', 'calls_since_redraw'),
    (r'^performer\.net\.layers\.(\d+)\.0\.norm\.', r'blocks.\1.ln_1.'),
    (r'^performer\.net\.layers\.(\d+)\.0\.fn\.fast_attention\.', r'blocks.\1.attn.'),
    (r'^performer\.net\.layers\.(\d+)\.0\.fn\.', r'blocks.\1.attn.'),
    (r'^performer\.net\.layers\.(\d+)\.1\.norm\.', r'blocks.\1.ln_2.'),
    (r'^performer\.net\.layers\.(\d+)\.1\.fn\.fn\.', r'blocks.\1.mlp.'),
    (r'^norm\.', 'ln_f.'),
    (r'^to_out\.conv1\.', 'cls_head.gene_proj.'),
    (r'^to_out\.(fc\d)\.', r'cls_head.\1.'),
    (r'^to_out\.', 'lm_head.'),
]


def original_scbert_config(sd, dim_head=64):
    """The ModelConfig settings of an original state dict, read from its shapes: every size but the head count,
    which the release fixes through dim_head = 64 (n_head = inner width / 64)."""
    n_tokens, n_embd = sd['token_emb.weight'].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r'performer\.net\.layers\.(\d+)\.', k))}
    inner = sd['performer.net.layers.0.0.fn.to_q.weight'].shape[0]
    finetuned = 'to_out.fc3.weight' in sd
    return dict(
        n_genes=sd['pos_emb.emb.weight'].shape[0] - 1, n_bins=n_tokens - 2, n_embd=n_embd, n_layer=len(layers),
        n_head=inner // dim_head, dim_head=dim_head,
        ff_mult=sd['performer.net.layers.0.1.fn.fn.w1.weight'].shape[0] // n_embd,
        nb_features=sd['performer.net.layers.0.0.fn.fast_attention.projection_matrix'].shape[0],
        freeze_gene_emb=True,
        n_classes=sd['to_out.fc3.weight'].shape[0] if finetuned else 0,
        head_hidden=sd['to_out.fc2.weight'].shape[0] if finetuned else 128, head='scbert')


def model_from_original_scbert(checkpoint, dim_head=64, **overrides):
    """ScBERT.from_scbert: a model from an original scBERT checkpoint (pretrained panglao_pretrain.pth or a fine-tuned
    one). `checkpoint` is a state dict or a dict holding one under 'model_state_dict'; overrides: ModelConfig settings.
    The gene2vec table (float64 in the release) is loaded as float32 and frozen, as the original keeps it."""
    sd = checkpoint.get('model_state_dict', checkpoint)
    sd = {k.removeprefix('module.'): v for k, v in sd.items()}    # saved from DDP
    if 'token_emb.weight' not in sd or 'pos_emb.emb.weight' not in sd:
        raise ValueError('not an original scBERT checkpoint: it has no token_emb.weight / pos_emb.emb.weight')
    model = ScBERT(ModelConfig(**{**original_scbert_config(sd, dim_head), **overrides}))
    ours = {}
    for k, v in sd.items():
        for pattern, repl in ORIGINAL_NAMES:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        ours[k] = v.float() if v.is_floating_point() else v
    if 'cls_head.gene_proj.weight' in ours:                 # Conv2d(1, 1, (1, n_embd)) weight -> Linear(n_embd, 1)
        ours['cls_head.gene_proj.weight'] = ours['cls_head.gene_proj.weight'].reshape(1, -1)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    # a fine-tuned original has no MLM head (finetune.py replaced it), and no redraw count: ours keeps fresh ones
    finetuned = 'to_out.fc3.weight' in sd
    missing = [k for k in missing if k != 'n_redraws' and not (finetuned and k.startswith('lm_head.'))]
    if missing or unexpected:
        raise ValueError(f'scBERT checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}')
    return model
