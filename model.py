"""
Every architecture of nanoscBERT, in one file.

scBERT (Yang et al. 2022, Nat. Mach. Intell. 4:852) reads a cell as a sentence whose words are genes:
position g of the sequence is gene g of a fixed panel, and its token is the gene's binned expression.

    tokens (B, L) ──> token_emb(bin) + gene_emb(g) ──> n_layer × Block ──> LayerNorm ──> lm_head    (masked-bin prediction)
                                                                                     └─> cls_head   (cell type)

L = n_genes + 1: like the original, we append one extra position holding bin 0 (its gene2vec row is all zeros),
so that the original checkpoints load without surgery. A Block is pre-LayerNorm attention then a GELU MLP, both residual.
Attention is a Performer (Choromanski et al. 2021, "Rethinking attention with Performers"): FAVOR+ approximates
softmax(q·k/√d) with positive orthogonal random features, so the cost is linear in L (16,907 genes) instead of quadratic.

Mapping from the original release's names (TencentAILabHealthcare/scBERT, performer_pytorch.PerformerLM):
    token_emb        <- token_emb                pos_emb.emb (gene2vec, frozen)      -> gene_emb
    blocks.i.ln_1    <- performer.net.layers.i.0.norm     blocks.i.attn.*  <- performer.net.layers.i.0.fn.*
    blocks.i.ln_2    <- performer.net.layers.i.1.norm     blocks.i.mlp.*   <- performer.net.layers.i.1.fn.fn.*
    ln_f             <- norm                     lm_head <- to_out (pretraining)     cls_head <- to_out.conv1/fc1/fc2/fc3

scBERT 2.0 is the same classes with other flags (input_genes='expressed'). About 90% of a cell's genes are zero, and
scBERT spends most of its compute on them. Following xTrimoGene (Gong et al. 2023) and scGPT (Cui et al. 2024), a cell
becomes a CLS token plus one token per EXPRESSED gene, (gene id, value), padded to the longest cell of the batch:

    genes (B, T), values (B, T) ──> gene_emb(gene) + value embedding ──> [CLS; ...] (B, 1+T, C) ──> Blocks ──> norm
        value embedding: 'bins' (scBERT's), 'quantile' (per-cell quantile bins, scGPT) or 'continuous' (xTrimoGene's
        auto-discretization: a softmax mix of n_bins learned embeddings, computed from the scalar value)
        ──> lm_head (masked bin, cross-entropy) + value_head (masked value, MSE)   or   cls_head (CLS or mean pooled)

with the parts of modern LMs as options: grouped-query attention through F.scaled_dot_product_attention (flash kernels
on GPU), RMSNorm (llama), SwiGLU (Shazeer 2020), bias-free linears, and a sparse mixture of experts in place of the MLP
(Switch Transformer, Fedus et al. 2022; Mixtral's top-2).

Ideas from ALBERT, DeBERTa and biology, each a flag: a factorized gene embedding (V×E then E×C, embd_factor) and
cross-layer sharing (share_layers) from ALBERT (Lan et al. 2020); DeBERTa's disentangled attention (He et al. 2021)
whose relative positions are genomic: the distance between two genes on one chromosome in log buckets, or "different
chromosome" (genomic_buckets); and two gene encodings added to the gene embedding, the gene's chromosome and start
coordinate (genomic_pe) and the sum of its pathways' embeddings (pathway_enc). The annotation they read (chromosome,
start, gene sets) comes from prepare_data.py and is stored in buffers, so it travels with the checkpoint.

Distillation (DistilBERT, Sanh et al. 2019) needs three small pieces here: distil_student (a student from every other
teacher layer), kd_loss (soft targets, with T²) and cosine_loss (hidden states); train.py combines them.

Quantization, last: int8 (absmax per weight row and per token) and BitNet b1.58 (Ma et al. 2024: ternary weights,
int8 activations). BitLinear trains through them (bitlinear=True, quantization-aware), QuantLinear runs inference from
int8 storage, quantize() swaps them in, and pack_ternary stores five ternary weights per byte.
"""
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    head: str = 'scbert'            # 'scbert' (the original's: per-gene projection, then an MLP over all genes) | 'pooled'
    head_hidden: int = 128          # the classifier's last hidden width (the original's h_dim)
    seed: int = 0                   # seeds the random-feature draws, so that every DDP rank and every resume draws the same
    favor_batch_max: bool = False   # True reproduces the original's batch-dependent key stabiliser (see softmax_kernel)
    # scBERT 2.0 (the defaults above and below are scBERT's)
    input_genes: str = 'all'        # 'all' (scBERT: every gene of the panel, binned) | 'expressed' (CLS + expressed genes)
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
        if self.nb_features == 0:
            self.nb_features = int(self.dim_head * math.log(self.dim_head))
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        assert self.attention in ('performer', 'sdpa'), self.attention
        assert self.head in ('scbert', 'pooled', 'cls'), self.head
        assert self.input_genes in ('all', 'expressed'), self.input_genes
        assert self.value_emb in ('bins', 'quantile', 'continuous'), self.value_emb
        assert self.norm in ('layernorm', 'rmsnorm') and self.mlp in ('gelu', 'swiglu'), (self.norm, self.mlp)
        assert self.n_head % self.n_kv_head == 0, 'n_head must be a multiple of n_kv_head'
        assert self.n_expert == 0 or 1 <= self.n_expert_active <= self.n_expert, 'need 1 <= n_expert_active <= n_expert'
        assert self.share_layers in ('none', 'all', 'attention', 'ffn'), self.share_layers
        # a shared MoE would keep only its last call's load-balancing loss
        assert not (self.n_expert and self.share_layers in ('all', 'ffn')), "share_layers='all'/'ffn' needs n_expert=0"
        # DeBERTa's position terms are added to the L×L scores, which FAVOR+ never forms
        assert not self.disentangled or self.attention == 'sdpa', "disentangled=True needs attention='sdpa'"
        assert self.embd_factor >= 0 and self.n_pos_buckets >= 2, (self.embd_factor, self.n_pos_buckets)
        if self.input_genes == 'expressed':
            # padded batches need a key mask, which FAVOR+ does not take
            assert self.attention == 'sdpa', "input_genes='expressed' needs attention='sdpa'"
        else:
            assert self.head != 'cls', "head='cls' needs input_genes='expressed' (scBERT's input has no CLS token)"

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
# FAVOR+ (Choromanski et al. 2021, eqs. 5-7 and Lemma 1)

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


def softmax_kernel(x, projection, is_query, batch_max=False, eps=1e-4):
    """Positive random features phi(x) with E[phi(q)·phi(k)] ∝ exp(q·k / sqrt(d)).

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
    d = x.shape[-1]
    x_proj = x @ (projection * d ** -0.25).t()                          # (B, H, L, m): w·x'
    half_sq_norm = (0.5 * d ** -0.5) * (x * x).sum(-1, keepdim=True)    # (B, H, L, 1): |x'|²/2
    with torch.no_grad():
        if is_query:
            stab = x_proj.amax(-1, keepdim=True)                        # (B, H, L, 1)
        else:
            stab = x_proj.amax() if batch_max else x_proj.amax((-3, -2, -1), keepdim=True)   # () or (B, 1, 1, 1)
    # in place: the (B, H, L, m) tensor is the biggest in the model (180 MB per layer for one full-size cell), and
    # autograd allows it, since matmul's backward needs its inputs, not its output, and exp's needs only its output
    return x_proj.sub_(half_sq_norm + stab).exp_() + eps


def favor_attention(q, k, v, projection, batch_max=False):
    """Non-causal linear attention: out = phi(q) (phi(k)ᵀ v) / (phi(q) · Σ phi(k)). q, k, v (B, H, L, d) -> (B, H, L, d).
    A column of ones appended to v makes the same two matmuls compute the denominator."""
    q = softmax_kernel(q, projection, is_query=True)                        # (B, H, L, m)
    k = softmax_kernel(k, projection, is_query=False, batch_max=batch_max)  # (B, H, L, m)
    context = k.transpose(-2, -1) @ F.pad(v, (0, 1), value=1.0)            # (B, H, m, d + 1): L is summed away, hence linear cost
    out = q @ context                                                       # (B, H, L, d + 1)
    return out[..., :-1] / out[..., -1:]


# -----------------------------------------------------------------------------
# genomic positions: a gene's place on its chromosome is the only "position" a cell's genes have (their order in the
# panel, or in the expressed-gene input, means nothing), so the positional encodings below read the annotation's
# chromosome and start coordinate. Distances run from 1 kb (neighbouring genes) to 250 Mb (the longest chromosome).
GENOMIC_MIN_DIST, GENOMIC_MAX_DIST = 1e3, 2.5e8


def genomic_buckets(chrom, start, n_pos_buckets):
    """DeBERTa's relative positions, made genomic: the bucket of key gene j seen from query gene i.

    chrom (..., L) long (0 = unknown), start (..., L) float -> (..., L, L) long in [0, 2 * n_pos_buckets + 1):
        0 = the two genes are on different chromosomes;   1 = either gene has no coordinates (and the CLS token);
        2 + (n - 1) + sign(d) * level:  d = start_j - start_i on the same chromosome, level 0 for |d| <= 1 kb, rising
        in n - 1 log-spaced steps to n - 1 at |d| >= 250 Mb (DeBERTa's log buckets: near pairs get fine resolution)."""
    n = n_pos_buckets
    d = start[..., None, :] - start[..., :, None]                                  # (..., L, L): start_j - start_i
    frac = torch.log(d.abs().clamp(min=GENOMIC_MIN_DIST) / GENOMIC_MIN_DIST) / math.log(GENOMIC_MAX_DIST / GENOMIC_MIN_DIST)
    level = (frac * (n - 1)).ceil().clamp(max=n - 1).long()
    bucket = 2 + (n - 1) + torch.sign(d).long() * level
    same = chrom[..., :, None] == chrom[..., None, :]
    known = (chrom > 0)[..., :, None] & (chrom > 0)[..., None, :]
    return torch.where(known, torch.where(same, bucket, 0), 1)


def genomic_sinusoid(start, dim):
    """Transformer sinusoids (Vaswani et al. 2017) of a gene's start coordinate in base pairs: (...,) float ->
    (..., dim), sin in the first half and cos in the second, wavelengths geometric from 1 kb to 250 Mb, so neighbouring
    genes differ in the fast dimensions and distant ones in the slow. Computed in float64 (a coordinate of 2e8 times the
    fastest frequency needs it; the buffer holding the coordinates is float32, exact to 16 bp at 250 Mb, far below the
    1 kb fastest wavelength), returned as float32."""
    half = dim // 2
    wavelength = GENOMIC_MIN_DIST * (GENOMIC_MAX_DIST / GENOMIC_MIN_DIST) ** (torch.arange(half, dtype=torch.float64,
                                                                                             device=start.device) / max(1, half - 1))
    angle = start.double()[..., None] * (2 * math.pi / wavelength)                  # (..., half)
    return F.pad(torch.cat([angle.sin(), angle.cos()], -1), (0, dim - 2 * half)).float()


# -----------------------------------------------------------------------------
# the transformer

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


def make_linear(config, in_features, out_features, bias):
    """The attention and feed-forward linears: nn.Linear, or BitLinear when config.bitlinear (quantization-aware)."""
    return (BitLinear if config.bitlinear else nn.Linear)(in_features, out_features, bias=bias)


def repeat_kv(x, n_rep):
    """(B, n_kv_head, L, d) -> (B, n_kv_head * n_rep, L, d): each key/value head serves n_rep query heads (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.layer_idx, self.config = config.n_head, config.n_kv_head, layer_idx, config
        self.to_q = make_linear(config, config.n_embd, config.n_head * config.dim_head, bias=False)
        # grouped-query attention (Ainslie et al. 2023): fewer key/value heads, shared by groups of query heads
        self.to_k = make_linear(config, config.n_embd, config.n_kv_head * config.dim_head, bias=False)
        self.to_v = make_linear(config, config.n_embd, config.n_kv_head * config.dim_head, bias=False)
        self.to_out = make_linear(config, config.n_head * config.dim_head, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        if config.disentangled:        # DeBERTa's position projections W_q,r and W_k,r (one per layer; P is shared)
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

    def forward(self, x, attn_mask=None, rel=None):          # x (B, L, n_embd); attn_mask (B, 1, 1, L) bool or None
        B, L, _ = x.shape                                     # rel: (P (R, n_embd), buckets (B or 1, L, L)) or None
        q = self.to_q(x).view(B, L, self.n_head, -1).transpose(1, 2)                         # (B, n_head, L, d)
        k, v = (proj(x).view(B, L, self.n_kv_head, -1).transpose(1, 2) for proj in (self.to_k, self.to_v))
        k, v = repeat_kv(k, self.n_head // self.n_kv_head), repeat_kv(v, self.n_head // self.n_kv_head)
        if self.config.attention == 'performer':
            out = favor_attention(q, k, v, self.projection_matrix, self.config.favor_batch_max)
        elif rel is not None:
            out = self.disentangled_attention(q, k, v, attn_mask, *rel)
        else:
            # attn_mask hides the padding keys; None when the batch has no padding, which keeps the flash kernel usable
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=self.config.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, L, -1)          # (B, L, n_head * dim_head)
        return self.dropout(self.to_out(out))

    def disentangled_attention(self, q, k, v, attn_mask, pos, bucket):
        """DeBERTa (He et al. 2021, eq. 4): score(i, j) = q_i·k_j + q_i·K^r_δ(i,j) + k_j·Q^r_δ(j,i), scaled by 1/√(3d):
        content-to-content, content-to-position and position-to-content. δ is genomic_buckets' relative bucket, P (R, C)
        the shared relative-position embeddings. The two position terms are an additive bias handed to SDPA."""
        bias = self.disentangled_bias(q, k, pos, bucket, attn_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1 / math.sqrt(3 * q.shape[-1]),
                                              dropout_p=self.config.dropout if self.training else 0.0)

    def disentangled_bias(self, q, k, pos, bucket, attn_mask=None, rows=slice(None)):
        """The position terms of disentangled_attention, already scaled, for the query rows `rows` (B, H, l, L); -inf at
        the padding keys. q (B, H, l, d) holds only those rows' queries; k (B, H, L, d) every key."""
        B, H, L, d = k.shape
        R = pos.shape[0]
        k_r = self.pos_k(pos).view(R, H, d).transpose(0, 1)          # (H, R, d)
        q_r = self.pos_q(pos).view(R, H, d).transpose(0, 1)
        bucket = bucket.expand(B, L, L)
        index = bucket[:, rows].unsqueeze(1).expand(B, H, -1, L)     # (B, H, l, L): δ(i, j) at [i, j]
        c2p = (q @ k_r.transpose(-2, -1)).gather(-1, index)                        # [i, j] = q_i · K^r_δ(i,j)
        index_t = bucket[:, :, rows].unsqueeze(1).expand(B, H, L, -1)  # (B, H, L, l): δ(j, i) at [j, i]
        p2c = (k @ q_r.transpose(-2, -1)).gather(-1, index_t).transpose(-2, -1)    # [i, j] = k_j · Q^r_δ(j,i)
        bias = (c2p + p2c) / math.sqrt(3 * d)
        return bias if attn_mask is None else bias.masked_fill(~attn_mask, float('-inf'))   # padding keys: -inf

    def received(self, x, attn_mask=None, rel=None, valid=None, chunk=0):
        """The attention each token receives in this layer: the column means of the (L, L) attention matrix A over the
        real query tokens, averaged over the heads. x (B, L, n_embd) is the layer's (normed) input -> (B, L), fp32.
        No (L, L) matrix is ever held. FAVOR+ by the linear-attention identity: A[i, j] = φ(q_i)·φ(k_j) / D_i with
        D_i = φ(q_i)·Σ_j φ(k_j), so Σ_i A[i, j] = φ(k_j) · Σ_i φ(q_i) / D_i, O(L m) per head. Softmax attention (SDPA,
        DeBERTa's bias included): `chunk` query rows at a time, (B, H, chunk, L) scores; 0 = as many rows as keep
        that at 2^22 numbers."""
        B, L, _ = x.shape
        q = self.to_q(x).view(B, L, self.n_head, -1).transpose(1, 2)                         # (B, H, L, d)
        k = repeat_kv(self.to_k(x).view(B, L, self.n_kv_head, -1).transpose(1, 2), self.n_head // self.n_kv_head)
        with torch.autocast(x.device.type, enabled=False):     # sums over thousands of tokens: fp32 even under AMP
            q, k = q.float(), k.float()
            if self.config.attention == 'performer':            # the panel input: no padding
                q = softmax_kernel(q, self.projection_matrix, is_query=True)                    # (B, H, L, m)
                k = softmax_kernel(k, self.projection_matrix, is_query=False, batch_max=self.config.favor_batch_max)
                d_inv = 1 / (q @ k.sum(-2, keepdim=True).transpose(-2, -1))                     # (B, H, L, 1): 1 / D_i
                return (k @ (q * d_inv).mean(-2, keepdim=True).transpose(-2, -1)).squeeze(-1).mean(1)
            total = q.new_zeros(B, self.n_head, L)
            scale = 1 / math.sqrt((3 if rel is not None else 1) * q.shape[-1])
            chunk = chunk or max(1, 2 ** 22 // (B * self.n_head * L))
            for s in range(0, L, chunk):
                rows = slice(s, s + chunk)
                scores = q[:, :, rows] @ k.transpose(-2, -1) * scale                           # (B, H, chunk, L)
                if rel is not None:
                    scores = scores + self.disentangled_bias(q[:, :, rows], k, *rel, attn_mask, rows)
                elif attn_mask is not None:
                    scores = scores.masked_fill(~attn_mask, float('-inf'))
                a = scores.softmax(-1)
                if valid is not None:                           # padding queries attend too; leave them out
                    a = a * valid[:, None, rows, None]
                total += a.sum(-2)
            n_queries = L if valid is None else valid.sum(-1, keepdim=True)               # (B, 1)
            return total.mean(1) / n_queries


class MLP(nn.Module):
    """GELU: w2(gelu(w1 x)), as scBERT. SwiGLU (Shazeer 2020, "GLU variants improve Transformer"): w2(silu(w1 x) * w3 x)."""
    def __init__(self, config):
        super().__init__()
        self.w1 = make_linear(config, config.n_embd, config.ff_hidden, bias=config.bias)
        self.w3 = make_linear(config, config.n_embd, config.ff_hidden, bias=config.bias) if config.mlp == 'swiglu' else None
        self.w2 = make_linear(config, config.ff_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.gelu(self.w1(x)) if self.w3 is None else F.silu(self.w1(x)) * self.w3(x)
        return self.w2(self.dropout(h))


class MoE(nn.Module):
    """A sparse mixture of expert MLPs (Shazeer et al. 2017; Switch, Fedus et al. 2022): a router sends each token to
    its top n_expert_active experts, and the token's output is their outputs weighted by the router's probabilities.

    Dispatch is dropless (no capacity limit, no token is dropped): the (token, expert) assignments are sorted by expert,
    so each expert multiplies one contiguous slice, and index_add_ sums the weighted results back per token. The experts'
    weights are stacked (n_expert, out, in) parameters: every one is in the graph even when an expert gets no tokens (DDP
    needs that), and on CUDA one F.grouped_mm call multiplies all the slices. Each forward leaves two auxiliary losses:
    Switch's load balancing, n_expert * Σ_e f_e P_e (f_e: share of assignments to e, P_e: mean router probability of e;
    exactly 1 when routing is uniform), and the router z-loss (ST-MoE, Zoph et al. 2022): mean logsumexp(logits)².
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
        if isinstance(w, nn.ModuleList):                      # quantized for inference: a QuantLinear per expert
            return torch.cat([w[e](xe) for e, xe in enumerate(x.split(counts.tolist()))])
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
            weight = weight / weight.sum(-1, keepdim=True)    # (k = 1) keeps the raw probability, or the router gets no gradient
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


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, attn_mask=None, valid=None, rel=None):  # x (B, L, C); valid (B, L) bool: the real tokens
        x = x + self.attn(self.ln_1(x), attn_mask, rel)
        h = self.ln_2(x)
        if isinstance(self.mlp, MoE):                         # route the real tokens only: padding must not count
            flat = h.flatten(0, 1)
            if valid is None:
                return x + self.mlp(flat).view_as(x)
            keep = valid.flatten().nonzero().squeeze(1)
            return x + torch.zeros_like(flat).index_copy_(0, keep, self.mlp(flat[keep])).view_as(x)
        return x + self.mlp(h)


class AutoDiscretization(nn.Module):
    """xTrimoGene's value embedding (Gong et al. 2023, Sec. 2.2): a scalar value v becomes a soft mix of n_bins learned
    bin embeddings, so nearby values get nearby embeddings (integer bins put 1.99 and 2.01 apart):
        v1 = LeakyReLU(w1 v)   (n_bins,);   v2 = W2 v1 + alpha v1;   e = softmax(v2) @ table   (n_embd,)"""
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


class Classifier(nn.Module):
    """Cell-type head over the encoder output h (B, L, n_embd) -> logits (B, n_classes).

    'scbert' is the original's (finetune.py): a 1×n_embd convolution (= a Linear(n_embd, 1) applied per gene) squeezes
    each gene to one number, then an MLP reads all L genes: L -> 512 -> head_hidden -> n_classes. It is tied to the panel.
    'pooled' averages h over the real genes and 'cls' takes the CLS token (expressed input only); both then apply
    n_embd -> head_hidden -> n_classes, so they work for any gene count.
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
        # size, so fc2 starts blind and fine-tuning from scratch predicted the majority class on Baron. Renormalize the
        # mean, as BEiT's "fc_norm" does after mean pooling.
        self.pool_norm = nn.LayerNorm(config.n_embd) if self.kind == 'pooled' else None
        self.fc3 = nn.Linear(config.head_hidden, config.n_classes)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h, inputs=None):                        # inputs: the encoder's input (tokens or expressed dict)
        return self.fc3(self.features(h, inputs))

    def features(self, h, inputs=None):
        """The hidden layer the class logits are read from (B, head_hidden): the cell embedding of the novelty scores."""
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


def token_valid(x):
    """The real tokens of an encoder input: None for scBERT's panel tokens (all real), else (B, 1 + T) bool with the
    CLS token first and False at padding."""
    if not isinstance(x, dict):
        return None
    genes = x['genes']
    return torch.cat([genes.new_ones(len(genes), 1, dtype=torch.bool), genes >= 0], dim=1)


class ScBERT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        expressed = config.input_genes == 'expressed'
        if config.value_emb == 'continuous' and expressed:
            self.value_emb = AutoDiscretization(config.n_bins, config.n_embd)
            self.mask_emb = nn.Parameter(torch.randn(config.n_embd))    # the learned embedding of a masked value
        else:                                                # bins 0..n_bins, n_bins + 1 = mask
            self.token_emb = nn.Embedding(config.n_bins + 2, config.n_embd)
        # scBERT: the original's gene2vec "positional" embedding, one row per panel position (+ the appended 0 token);
        # expressed input: one row per gene, + the CLS token's (the last row)
        # ALBERT's factorization (Lan et al. 2020, Sec. 3.1): V×E + E×C parameters instead of V×C, for E << C
        self.gene_emb = nn.Embedding(config.seq_len, config.embd_factor or config.n_embd)
        self.gene_emb_proj = nn.Linear(config.embd_factor, config.n_embd, bias=False) if config.embd_factor else None
        if config.genomic_pe or config.disentangled:         # each gene's (chromosome, start); 0 = unknown, as the CLS row
            self.register_buffer('gene_chrom', torch.zeros(config.seq_len, dtype=torch.long))
            self.register_buffer('gene_start', torch.zeros(config.seq_len))
        self.chrom_emb = nn.Embedding(config.n_chrom + 1, config.n_embd) if config.genomic_pe else None
        if config.pathway_enc:                               # gene -> its gene sets, CSR (the CLS row has none)
            self.register_buffer('pathway_ptr', torch.zeros(config.seq_len + 1, dtype=torch.long))
            self.register_buffer('pathway_idx', torch.zeros(config.n_pathway_links, dtype=torch.long))
        self.pathway_emb = nn.Embedding(max(1, config.n_pathways), config.n_embd) if config.pathway_enc else None
        # DeBERTa shares one table of relative-position embeddings P across the layers; each layer projects it
        self.rel_emb = nn.Embedding(2 * config.n_pos_buckets + 1, config.n_embd) if config.disentangled else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # ALBERT's cross-layer sharing (Sec. 3.1): every block reuses block 0's attention, feed-forward, or all of it.
        # The same module in several places: parameters() counts it once, the optimizer updates it once per step.
        for block in self.blocks[1:]:
            if config.share_layers in ('attention', 'all'):
                block.attn = self.blocks[0].attn
            if config.share_layers in ('ffn', 'all'):
                block.mlp = self.blocks[0].mlp
            if config.share_layers == 'all':
                block.ln_1, block.ln_2 = self.blocks[0].ln_1, self.blocks[0].ln_2
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
            # a gene is in ~10-50 sets: N(0, 0.1) keeps the sum of its pathways' embeddings below its own N(0, 1) identity
            nn.init.normal_(self.pathway_emb.weight, std=0.1)
        self.gene_emb.weight.requires_grad_(not config.freeze_gene_emb)
        # the classifier keeps PyTorch's default init, as the original's head does: with N(0, 0.02) its 766-gene fc1
        # starts ~50x too small and the head barely trains
        self.cls_head = Classifier(config) if config.n_classes > 0 else None
        self.quantization = None                              # 'int8' | 'ternary' once quantize() has run

    @staticmethod
    def _init_weights(module):
        # Linears N(0, 0.02) as in GPT-2/nanoGPT. Embeddings keep PyTorch's N(0, 1), as the original does: the bin and
        # gene identities must dominate the residual stream at the start; at std 0.02 the first attention outputs
        # swamp them, every gene of a cell looks alike, and fine-tuning from scratch collapses to the majority class.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self):
        """All parameters, the gene embedding included (the original's 8.39M count includes its 3.38M gene2vec table),
        and a quantized model's int8 weights."""
        return sum(p.numel() for p in self.parameters()) + sum(m.weight_int8.numel() + (m.bias.numel() if m.bias is not None
                                                                                     else 0) for m in self.quantized_linears())

    def quantized_linears(self):
        return [m for m in self.modules() if isinstance(m, QuantLinear)]

    def num_active_params(self, embeddings=True):
        """Parameters that one token uses: a MoE layer's inactive experts left out, and the embedding tables too
        when embeddings=False (a lookup costs no FLOPs). Equals num_params() for a dense model with embeddings."""
        n = self.num_params()
        for block in self.blocks:
            if isinstance(block.mlp, MoE):
                per_expert = sum((w[0].weight_int8 if isinstance(w, nn.ModuleList) else w[0]).numel()
                                 for w in (block.mlp.w1, block.mlp.w2, block.mlp.w3) if w is not None)
                n -= (block.mlp.n_expert - block.mlp.top_k) * per_expert
        if not embeddings:
            n -= sum(m.weight.numel() for m in (self.gene_emb, getattr(self, 'token_emb', None), self.chrom_emb,
                                                self.pathway_emb) if m is not None)
        return n

    def expert_load(self, reset=True):
        """Tokens routed to each expert since the last reset, as a share of the uniform share: (n_layer, n_expert),
        1.0 everywhere = perfectly balanced. None for a dense model."""
        moes = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        if not moes:
            return None
        counts = torch.stack([m.tokens_per_expert.clone() for m in moes]).cpu()
        if reset:
            for m in moes:
                m.tokens_per_expert.zero_()
        return counts * counts.shape[1] / counts.sum(1, keepdim=True).clamp(min=1)

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

    @torch.no_grad()
    def set_gene_annotation(self, chrom=None, start=None, pathway_ptr=None, pathway_idx=None):
        """The dataset's gene annotation (data.Dataset.annotation(), vocab order) into the buffers: chrom (n_genes,)
        0 = unknown, start (n_genes,) base pairs, -1 = unknown; pathway_ptr (n_genes + 1,) / pathway_idx: gene -> its
        gene sets (CSR). The last position (CLS, or scBERT's appended token) stays unknown and in no set. The buffers are
        saved with the weights, so a checkpoint carries its annotation to predict.py."""
        n = self.config.n_genes
        if chrom is not None and hasattr(self, 'gene_chrom'):
            chrom = torch.as_tensor(chrom, dtype=torch.long)
            assert chrom.shape == (n,), chrom.shape
            assert not self.config.genomic_pe or int(chrom.max()) <= self.config.n_chrom, 'chrom codes above n_chrom'
            self.gene_chrom[:n] = chrom
            self.gene_start[:n] = torch.as_tensor(start, dtype=torch.float32).clamp(min=0) * (chrom > 0)
        if pathway_ptr is not None and self.config.pathway_enc:
            ptr = torch.as_tensor(pathway_ptr, dtype=torch.long)
            assert ptr.shape == (n + 1,) and int(ptr[-1]) == self.config.n_pathway_links, (ptr.shape, int(ptr[-1]))
            self.pathway_ptr[:n + 1] = ptr
            self.pathway_ptr[n + 1] = ptr[-1]                 # the CLS row: no sets
            self.pathway_idx.copy_(torch.as_tensor(pathway_idx, dtype=torch.long))

    def gene_embedding(self, genes):
        """What a gene contributes to its token: its identity (factorized or not), plus its genomic position and its
        pathways when those are on. genes: any-shaped long tensor of embedding rows (n_genes = the CLS / appended row)
        -> (..., n_embd)."""
        e = self.gene_emb(genes)
        if self.gene_emb_proj is not None:
            e = self.gene_emb_proj(e)
        if self.chrom_emb is not None:
            known = (self.gene_chrom[genes] > 0).unsqueeze(-1)
            e = e + self.chrom_emb(self.gene_chrom[genes]) + genomic_sinusoid(self.gene_start[genes], e.shape[-1]) * known
        if self.pathway_emb is not None:                     # (n_genes + 1, C): each gene's sum over its sets, then look up
            table = F.embedding_bag(self.pathway_idx, self.pathway_emb.weight, self.pathway_ptr, mode='sum',
                                    include_last_offset=True)
            e = e + table[genes]
        return e

    def token_genes(self, x):
        """Each token's gene (its embedding row): scBERT's panel positions (L,), or for expressed input (B, 1 + T)
        with the CLS row first (padding reads row 0: its outputs are masked and ignored)."""
        if not isinstance(x, dict):
            return torch.arange(x.shape[1], device=x.device)
        genes = x['genes'].clamp(min=0)
        return torch.cat([genes.new_full((len(genes), 1), self.config.seq_len - 1), genes], dim=1)

    @torch.compiler.disable
    def _maybe_redraw_features(self):
        if self.calls_since_redraw >= self.config.feature_redraw_interval:
            self.n_redraws += 1
            for block in self.blocks:
                block.attn.redraw(int(self.n_redraws))
            self.calls_since_redraw.zero_()
        else:
            self.calls_since_redraw += 1

    def embed(self, x):
        """The encoder input (B, L, n_embd). x is scBERT's tokens (B, L), bins of every panel gene, or for expressed
        input a dict of (B, T) tensors: 'genes' (vocab index, -1 = padding), 'values' (log-normalized expression) and
        'bins' (the value's bin, n_bins + 1 = masked). A CLS token goes first: L = 1 + T."""
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
        # SDPA's boolean mask: True = may attend. No mask at all when nothing is padded, so flash attention stays usable.
        attn_mask = None if valid is None or bool(valid.all()) else valid[:, None, None, :]
        h = self.drop(self.embed(x) if emb is None else emb)
        rel = None
        if self.config.disentangled:                         # the genomic relative buckets, once for every layer
            genes = self.token_genes(x)
            bucket = genomic_buckets(self.gene_chrom[genes], self.gene_start[genes], self.config.n_pos_buckets)
            rel = (self.rel_emb.weight, bucket if bucket.dim() == 3 else bucket.unsqueeze(0))   # (B or 1, L, L)
        return h, attn_mask, valid, rel

    def encode(self, x, emb=None):
        """-> hidden states (B, L, n_embd) after the final norm (see embed for x; padding positions hold junk)."""
        h, attn_mask, valid, rel = self.encoder_input(x, emb)
        for block in self.blocks:
            h = block(h, attn_mask, valid, rel)
        return self.ln_f(h)

    # -------------------------------------------------------------------------
    # which genes matter for a cell (predict.py --importance)

    @torch.no_grad()
    def attention_received(self, x, chunk=0, as_released=False):
        """scBERT's attention sum (attn_sum_save.py): the attention each token receives, averaged over the query tokens,
        the heads and the layers, then normalized to sum to 1 per cell. x: an encoder input -> (B, L), 0 at padding.
        The original builds the full (L, L) matrix per head (from an fp32 L×L identity repeated per head as the values:
        11.4 GB at 16,907 genes); Attention.received never forms it. Its SequentialSequence also computes each layer's matrix a second time, from the layer's input plus
        the attention's output (the residual), not from what the layer attended with; as_released=True repeats that
        slip, to compare with the original's numbers."""
        h, attn_mask, valid, rel = self.encoder_input(x)
        total = 0.0
        for block in self.blocks:
            a = block.ln_1(h)
            if as_released:
                a = block.ln_1(h + block.attn(a, attn_mask, rel))
            total = total + block.attn.received(a, attn_mask, rel, valid, chunk)
            h = block(h, attn_mask, valid, rel)
        total = total if valid is None else total * valid
        return total / total.sum(-1, keepdim=True)

    def integrated_gradients(self, x, target=None, steps=1):
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
            emb, base = self.embed(x), self.embed(silent)        # (B, L, C)
        total, logits = 0.0, None
        with torch.enable_grad():
            for k in range(steps, 0, -1):                        # x itself first: its logits pick the target
                e = (base + (k / steps) * (emb - base)).requires_grad_()
                out = self.cls_head(self.encode(x, e), x)
                if logits is None:
                    logits = out.detach()
                    target = logits.argmax(-1) if target is None else target
                total = total + torch.autograd.grad(out.gather(1, target[:, None]).sum(), e)[0]
        return (total / steps * (emb - base)).sum(-1), logits

    def aux_losses(self):
        """Mean over the MoE layers of the last forward's (load-balancing loss, router z-loss); zeros for a dense model."""
        moes = [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
        if not moes:
            return 0.0, 0.0
        return sum(m.aux_loss for m in moes) / len(moes), sum(m.z_loss for m in moes) / len(moes)

    def forward(self, x, targets=None, task=None, class_weight=None, mlm_weight=1.0, regression_weight=1.0,
                return_hidden=False):
        """task 'mlm': scBERT's tokens give logits (B, L, n_bins + 2), targets (B, L) with -100 where not masked.
        Expressed input gives {'bins': (B, T, n_bins + 2) logits, 'values': (B, T) predicted values}, and targets is
        {'bins': (B, T), -100 where not masked, 'values': (B, T)}: the loss is mlm_weight * cross-entropy over the
        masked bins + regression_weight * MSE over the masked values.
        task 'classify' (the default when there is a classifier): logits (B, n_classes), targets (B,).
        Returns (logits, loss); loss is None without targets. MoE auxiliary losses are not included (see aux_losses).
        return_hidden=True also returns the encoder's hidden states (B, L, n_embd), for distillation."""
        task = task or ('classify' if self.cls_head is not None else 'mlm')
        h = hidden = self.encode(x)                                       # (B, L, C)
        if task == 'classify':
            logits = self.cls_head(h, x)
            loss = None if targets is None else F.cross_entropy(logits, targets, weight=class_weight)
        elif not isinstance(x, dict):
            logits = self.lm_head(h)
            loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
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

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The model in a loaded checkpoint: ours (a dict with 'model_args' and 'model') or an original scBERT state
        dict. The '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes are stripped."""
        if isinstance(checkpoint, dict) and 'model_args' in checkpoint:
            model = cls(ModelConfig(**checkpoint['model_args']))
            state = clean_state_dict(checkpoint['model'])
            if checkpoint.get('quantization'):                # quantize.py's: the shapes, then the int8 / packed weights
                quantize(model, checkpoint['quantization'])
                state = unpack_state_dict(state, model)
            model.load_state_dict(state)
            return model
        return cls.from_scbert(checkpoint)

    # -------------------------------------------------------------------------
    # the original release's checkpoints

    @classmethod
    def from_scbert(cls, checkpoint, dim_head=64, **overrides):
        """Build a model from an original scBERT checkpoint (pretrained panglao_pretrain.pth or a fine-tuned one).

        `checkpoint` is a state dict or a dict holding one under 'model_state_dict'. Shapes give every size but the head
        count: the release fixes dim_head = 64, so n_head = inner width / 64. The gene2vec table (float64 in the release)
        is loaded as float32 and frozen, as the original keeps it.
        """
        sd = checkpoint.get('model_state_dict', checkpoint)
        sd = {k.removeprefix('module.'): v for k, v in sd.items()}    # saved from DDP
        if 'token_emb.weight' not in sd or 'pos_emb.emb.weight' not in sd:
            raise ValueError('not an original scBERT checkpoint: it has no token_emb.weight / pos_emb.emb.weight')
        n_tokens, n_embd = sd['token_emb.weight'].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r'performer\.net\.layers\.(\d+)\.', k))}
        inner = sd['performer.net.layers.0.0.fn.to_q.weight'].shape[0]
        finetuned = 'to_out.fc3.weight' in sd
        config = dict(
            n_genes=sd['pos_emb.emb.weight'].shape[0] - 1, n_bins=n_tokens - 2, n_embd=n_embd, n_layer=len(layers),
            n_head=inner // dim_head, dim_head=dim_head,
            ff_mult=sd['performer.net.layers.0.1.fn.fn.w1.weight'].shape[0] // n_embd,
            nb_features=sd['performer.net.layers.0.0.fn.fast_attention.projection_matrix'].shape[0],
            freeze_gene_emb=True,
            n_classes=sd['to_out.fc3.weight'].shape[0] if finetuned else 0,
            head_hidden=sd['to_out.fc2.weight'].shape[0] if finetuned else 128, head='scbert')
        config.update(overrides)
        model = cls(ModelConfig(**config))
        renames = [
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
        ours = {}
        for k, v in sd.items():
            for pattern, repl in renames:
                k, n = re.subn(pattern, repl, k)
                if n:
                    break
            ours[k] = v.float() if v.is_floating_point() else v
        if 'cls_head.gene_proj.weight' in ours:                     # Conv2d(1, 1, (1, n_embd)) weight -> Linear(n_embd, 1)
            ours['cls_head.gene_proj.weight'] = ours['cls_head.gene_proj.weight'].reshape(1, n_embd)
        missing, unexpected = model.load_state_dict(ours, strict=False)
        # a fine-tuned original has no MLM head (finetune.py replaced it), and no redraw count: ours keeps fresh ones
        missing = [k for k in missing if k != 'n_redraws' and not (finetuned and k.startswith('lm_head.'))]
        if missing or unexpected:
            raise ValueError(f'scBERT checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}')
        return model

    # -------------------------------------------------------------------------

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


# -----------------------------------------------------------------------------
# distillation (DistilBERT, Sanh et al. 2019; train.py's teacher setting, run by distill.py)

def distil_student(teacher, layers, n_embd=0):
    """DistilBERT's student: the teacher's architecture with only the teacher blocks `layers` (DistilBERT keeps every
    other one), initialised from those blocks and the teacher's embeddings, final norm and heads. A narrower student
    (n_embd below the teacher's) has no weights to take, so it starts at random (train.py then learns a projection of
    its hidden states for the cosine loss)."""
    narrow = bool(n_embd) and n_embd != teacher.config.n_embd
    config = replace(teacher.config, n_layer=len(layers), n_embd=n_embd or teacher.config.n_embd,
                     freeze_gene_emb=teacher.config.freeze_gene_emb and not narrow)   # a random table must learn
    student = ScBERT(config)
    annotation = ('gene_chrom', 'gene_start', 'pathway_ptr', 'pathway_idx')   # gene facts, not weights: always kept
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in annotation}, strict=False)
    if not narrow:
        state = {}
        for name, value in teacher.state_dict().items():
            block = re.match(r'blocks\.(\d+)\.(.*)', name)
            if block is None:
                state[name] = value
            elif int(block[1]) in layers:                               # teacher block layers[j] -> student block j
                state[f'blocks.{layers.index(int(block[1]))}.{block[2]}'] = value
        student.load_state_dict(state)
    return student


def kd_loss(student_logits, teacher_logits, temperature):
    """Soft-target loss (Hinton et al. 2015): KL(softmax(teacher / T) ‖ softmax(student / T)) · T², averaged over the
    rows of (..., n_classes) logits. The T² keeps its gradients the same size whatever T (they scale as 1/T²)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction='batchmean') * temperature ** 2


def cosine_loss(student_hidden, teacher_hidden, valid=None):
    """DistilBERT's cosine-embedding loss: 1 - cos(student, teacher) per token of (B, L, C) hidden states, averaged over
    the real tokens (valid (B, L) bool, None = all): it aligns the directions of the two models' hidden states."""
    loss = 1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)     # (B, L)
    return loss.mean() if valid is None else loss[valid].mean()


# -----------------------------------------------------------------------------
# quantization: int8 and BitNet b1.58 (quantize.py; train.py's bitlinear; bench.py's +int8 / +ternary)
#
# Only the attention projections and the feed-forward / expert matrices are quantized: they hold nearly all the FLOPs.
# Embeddings (lookups), norms, the MoE router, FAVOR+'s random features and the heads stay in floating point.

def absmax_int8(x):
    """Symmetric absmax int8 along the last dim (a token's features, or a weight's input row): x ≈ q · scale,
    q = round(x / scale) in [-127, 127], scale = max|x| / 127. Returns (q as int8, scale (..., 1))."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def absmean_ternary(w):
    """BitNet b1.58 (Ma et al. 2024, eqs. 1-3): W ≈ q · γ, q = RoundClip(W / γ, -1, 1) in {-1, 0, +1}, γ = mean |W| of the
    matrix (the last two dims: stacked experts (E, out, in) get one γ each). Returns (q as int8, γ (..., 1, 1))."""
    scale = w.abs().mean((-2, -1), keepdim=True).clamp(min=1e-8)
    return torch.round(w / scale).clamp(-1, 1).to(torch.int8), scale


def fake_quant(x, quantize):
    """Quantize-dequantize for training. The straight-through estimator (Bengio et al. 2013): the forward pass sees
    the quantized values, the backward pass treats the rounding as the identity, so the float weights keep learning."""
    q, scale = quantize(x)
    return x + (q.to(x.dtype) * scale - x).detach()


class BitLinear(nn.Linear):
    """BitNet b1.58's linear for quantization-aware training (bitlinear=True): an RMSNorm (BitNet's SubLN: the input
    scale the int8 grid sees no longer depends on the layer), activations fake-quantized to int8 per token (absmax)
    and weights to {-1, 0, +1}·γ (absmean), both through the straight-through estimator. Latent weights stay float."""
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = RMSNorm(in_features)

    def forward(self, x):
        return F.linear(fake_quant(self.norm(x), absmax_int8), fake_quant(self.weight, absmean_ternary), self.bias)


class QuantLinear(nn.Module):
    """Inference with int8 weights, one scale per output row (int8: absmax per row) or per matrix (ternary: γ), times
    int8 activations with one scale per token (absmax): y = (q_x · s_x)(q_w · s_w)ᵀ + b, after BitLinear's norm if any.

    kernel 'auto' on CPU runs PyTorch's int8 GEMM (the x86/fbgemm engine's quantized::linear_dynamic). That kernel
    quantizes its input per tensor, so each token is first divided by its own absmax: every token then spans [-1, 1],
    and the per-tensor grid is a per-token one; the output is multiplied back. The kernel's grid is asymmetric (uint8
    with a zero point), and int8 weights need reduce_range, which halves it to 128 levels (its u8·s8 pair sums overflow
    int16 otherwise): a step of 2·absmax/127, twice the reference's. Ternary weights cannot overflow: 255 levels.
    Elsewhere (GPU, or a PyTorch without that engine) 'auto' is weight-only int8: the weights dequantized to the input's
    dtype and the activations left as they are (the lowest error; it saves memory, not time). kernel='reference' runs
    the W8A8 arithmetic in fp32, symmetric ±127 per token: integer-valued operands, exact products."""
    def __init__(self, in_features, out_features, bias=True, ternary=False, norm=False):
        super().__init__()
        self.ternary, self.kernel, self._packed = ternary, 'auto', None
        self.register_buffer('weight_int8', torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer('weight_scale', torch.ones(1 if ternary else out_features))
        self.register_buffer('bias', torch.zeros(out_features) if bias else None)
        self.norm = RMSNorm(in_features) if norm else None

    @classmethod
    def from_float(cls, weight, bias=None, ternary=False, norm=None):
        """From a float weight (out, in): absmax int8 per row, or BitNet's absmean ternary; norm: BitLinear's RMSNorm."""
        q = cls(weight.shape[1], weight.shape[0], bias is not None, ternary, norm is not None)
        w_q, scale = absmean_ternary(weight.detach()) if ternary else absmax_int8(weight.detach())
        q.weight_int8.copy_(w_q)
        q.weight_scale.copy_(scale.flatten())
        if bias is not None:
            q.bias.copy_(bias.detach())
        if norm is not None:
            q.norm.load_state_dict(norm.state_dict())
        return q

    def int8_gemm_weight(self):
        """The weight packed for PyTorch's int8 GEMM (made once), or None where that kernel cannot run."""
        if self._packed is None and int8_gemm_available():
            try:
                self._packed = pack_for_int8_gemm(self.weight_int8, self.weight_scale)
            except (RuntimeError, AttributeError):            # quantized tensors removed from this PyTorch
                self._packed = False
        return None if self._packed is False else self._packed

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None                                   # new weights: pack them again for the int8 kernel
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x):                                     # x (..., in) -> (..., out)
        if self.norm is not None:
            x = self.norm(x)
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        cpu_fp32 = x.device.type == 'cpu' and x.dtype == torch.float32
        packed = self.int8_gemm_weight() if self.kernel == 'auto' and cpu_fp32 else None
        if packed is not None:                                # PyTorch's int8 GEMM, a grid per token (see above)
            s = token_absmax(x)
            y = torch.ops.quantized.linear_dynamic(x / s, packed, not self.ternary).mul_(s)
            if self.bias is not None:
                y.add_(self.bias)
        elif self.kernel == 'auto':                           # weight-only int8
            w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        else:                   # in fp32 whatever the autocast: 127² · in_features overflows fp16
            with torch.autocast(x.device.type, enabled=False):
                x32 = x.float()
                s32 = token_absmax(x32)
                q = torch.round(x32 * (127 / s32)).clamp(-127, 127)   # the token's int8 values, held as floats
                y = F.linear(q, self.weight_int8.float()) * (s32 / 127) * self.weight_scale
                y = (y if self.bias is None else y + self.bias).to(x.dtype)
        return y.view(*shape[:-1], len(self.weight_int8))    # (an expert may get no tokens: 0 rows)


def token_absmax(x):
    """(N, C) -> (N, 1): each token's max |x| (max and -min: two reductions and no |x| copy, which costs more)."""
    return torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)).float().clamp(min=1e-8)


def int8_gemm_available():
    return torch.backends.quantized.engine in ('x86', 'fbgemm') and hasattr(torch.ops.quantized, 'linear_dynamic')


def pack_for_int8_gemm(weight_int8, scale):
    """The int8 kernel's packed weight (a per-channel qint8 tensor). PyTorch warns that quantized tensors are
    deprecated; if they go, QuantLinear falls back to weight-only int8 (see int8_gemm_weight)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        q = torch._make_per_channel_quantized_tensor(weight_int8, scale.double().expand(len(weight_int8)).contiguous(),
                                                     torch.zeros(len(weight_int8), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


def quantize(model, scheme):
    """Replace, in place, every attention and feed-forward linear (experts included) with a QuantLinear: 'int8' (any
    float model) or 'ternary' (a bitlinear model: its BitLinear norms go with the weights; see as_bitlinear for a float
    one). Returns the model, now for inference only."""
    assert scheme in ('int8', 'ternary'), scheme
    if scheme == 'ternary' and not model.config.bitlinear:
        raise ValueError('ternary quantization needs a bitlinear model: as_bitlinear(model) converts a float one')
    ternary = scheme == 'ternary'
    for block in model.blocks:
        for layer, names in ((block.attn, ('to_q', 'to_k', 'to_v', 'to_out', 'pos_q', 'pos_k')),
                             (block.mlp, ('w1', 'w3', 'w2'))):
            for name in names:
                w = getattr(layer, name, None)
                if isinstance(w, nn.Linear):
                    setattr(layer, name, QuantLinear.from_float(w.weight, w.bias, ternary, getattr(w, 'norm', None)))
                elif isinstance(w, nn.Parameter):             # stacked experts (E, out, in) -> one QuantLinear each
                    delattr(layer, name)                      # (their BitLinear norms stay in the MoE, shared)
                    setattr(layer, name, nn.ModuleList(QuantLinear.from_float(we, None, ternary) for we in w))
    model.quantization = scheme
    return model.eval().requires_grad_(False)


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
    norms += [n for m in model.modules() if isinstance(m, MoE) and m.norm_in is not None for n in (m.norm_in, m.norm_hidden)]
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


def pack_ternary(q):
    """{-1, 0, +1} int8 tensor -> uint8, five weights per byte in base 3 (3⁵ = 243 ≤ 256): 1.6 bits per weight."""
    digits = (q.flatten().to(torch.int16) + 1).to(torch.uint8)               # {0, 1, 2}
    digits = torch.cat([digits, digits.new_zeros(-len(digits) % 5)]).view(-1, 5)
    return (digits * torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_ternary(packed, shape):
    """pack_ternary's inverse: uint8 (ceil(n / 5),) -> int8 tensor of `shape`, exactly."""
    n = math.prod(shape)
    digits = (packed.to(torch.int16)[:, None] // torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)) % 3
    return (digits.flatten()[:n] - 1).to(torch.int8).view(shape)


def clean_state_dict(state):
    """A state dict without what torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    return {k.replace('_orig_mod.', '').removeprefix('module.'): v for k, v in state.items()}


def packed_state_dict(model):
    """A quantized model's state dict for the checkpoint file: a ternary model's weights packed 5 to a byte."""
    state = model.state_dict()
    if model.quantization == 'ternary':
        for name in [k for k in state if k.endswith('.weight_int8')]:
            state[name.replace('.weight_int8', '.weight_packed')] = pack_ternary(state.pop(name))
    return state


def unpack_state_dict(state, model):
    """packed_state_dict's inverse, given the quantized model whose weight shapes it fills."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {(k.replace('.weight_packed', '.weight_int8') if k.endswith('.weight_packed') else k):
            (unpack_ternary(v, shapes[k.replace('.weight_packed', '.weight_int8')]) if k.endswith('.weight_packed') else v)
            for k, v in state.items()}
