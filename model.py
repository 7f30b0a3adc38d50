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
"""
import math
import re
from dataclasses import dataclass

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

    def __post_init__(self):
        if self.nb_features == 0:
            self.nb_features = int(self.dim_head * math.log(self.dim_head))
        assert self.attention in ('performer', 'sdpa'), self.attention
        assert self.head in ('scbert', 'pooled'), self.head

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
# the transformer

class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        inner = config.n_head * config.dim_head
        self.n_head, self.layer_idx, self.config = config.n_head, layer_idx, config
        self.to_q = nn.Linear(config.n_embd, inner, bias=False)
        self.to_k = nn.Linear(config.n_embd, inner, bias=False)
        self.to_v = nn.Linear(config.n_embd, inner, bias=False)
        self.to_out = nn.Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        if config.attention == 'performer':
            self.register_buffer('projection_matrix', torch.zeros(config.nb_features, config.dim_head))
            self.redraw(0)

    def redraw(self, n_redraws):
        # A generator seeded by (seed, layer, redraw count): every DDP rank and a resumed run draw the same features.
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.layer_idx * 10_007 + n_redraws)
        w = orthogonal_random_features(self.config.nb_features, self.config.dim_head, generator=g)
        self.projection_matrix.copy_(w)

    def forward(self, x):                                    # x (B, L, n_embd)
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.n_head, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        if self.config.attention == 'performer':
            out = favor_attention(q, k, v, self.projection_matrix, self.config.favor_batch_max)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.config.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, L, -1)          # (B, L, n_head * dim_head)
        return self.dropout(self.to_out(out))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.ff_mult * config.n_embd)
        self.w2 = nn.Linear(config.ff_mult * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.w2(self.dropout(F.gelu(self.w1(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Classifier(nn.Module):
    """Cell-type head over the encoder output h (B, L, n_embd) -> logits (B, n_classes).

    'scbert' is the original's (finetune.py): a 1×n_embd convolution (= a Linear(n_embd, 1) applied per gene) squeezes
    each gene to one number, then an MLP reads all L genes: L -> 512 -> head_hidden -> n_classes. It is tied to the panel.
    'pooled' averages h over genes and applies n_embd -> head_hidden -> n_classes, so it works for any gene count.
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
        self.fc3 = nn.Linear(config.head_hidden, config.n_classes)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h):
        if self.kind == 'scbert':
            x = F.relu(self.gene_proj(h).squeeze(-1))        # (B, L)
            x = self.dropout(F.relu(self.fc1(x)))            # (B, 512)
        else:
            x = h.mean(1)                                    # (B, n_embd)
        x = self.dropout(F.relu(self.fc2(x)))                # (B, head_hidden)
        return self.fc3(x)


class ScBERT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.n_bins + 2, config.n_embd)
        self.gene_emb = nn.Embedding(config.seq_len, config.n_embd)   # the original's gene2vec "positional" embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.n_bins + 2)
        # performer-pytorch counts training forward passes and redraws the features every feature_redraw_interval
        self.register_buffer('calls_since_redraw', torch.zeros((), dtype=torch.long))
        self.register_buffer('n_redraws', torch.zeros((), dtype=torch.long))
        self.apply(self._init_weights)
        self.gene_emb.weight.requires_grad_(not config.freeze_gene_emb)
        # the classifier keeps PyTorch's default init, as the original's head does: with N(0, 0.02) its 766-gene fc1
        # starts ~50x too small and the head barely trains
        self.cls_head = Classifier(config) if config.n_classes > 0 else None

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
        """All parameters, the gene embedding included (the original's 8.39M count includes its 3.38M gene2vec table)."""
        return sum(p.numel() for p in self.parameters())

    def set_gene_embedding(self, weight, freeze=True):
        """Load a gene2vec-style table (n_genes, n_embd) in panel order; the extra last position gets a zero row."""
        weight = torch.as_tensor(weight, dtype=torch.float32)
        assert weight.shape == (self.config.n_genes, self.config.n_embd), weight.shape
        with torch.no_grad():
            self.gene_emb.weight[:-1] = weight
            self.gene_emb.weight[-1] = 0
        self.config.freeze_gene_emb = freeze
        self.gene_emb.weight.requires_grad_(not freeze)

    @torch.compiler.disable
    def _maybe_redraw_features(self):
        if self.calls_since_redraw >= self.config.feature_redraw_interval:
            self.n_redraws += 1
            for block in self.blocks:
                block.attn.redraw(int(self.n_redraws))
            self.calls_since_redraw.zero_()
        else:
            self.calls_since_redraw += 1

    def encode(self, tokens):
        """tokens (B, L) long, L = n_genes + 1 -> hidden states (B, L, n_embd) after the final LayerNorm."""
        if self.training and self.config.attention == 'performer':
            self._maybe_redraw_features()
        x = self.token_emb(tokens) + self.gene_emb.weight[:tokens.shape[1]]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens, targets=None, task=None, class_weight=None):
        """task 'mlm': logits (B, L, n_bins + 2), targets (B, L) with -100 where not masked.
        task 'classify' (the default when there is a classifier): logits (B, n_classes), targets (B,).
        Returns (logits, loss); loss is None without targets."""
        task = task or ('classify' if self.cls_head is not None else 'mlm')
        h = self.encode(tokens)
        if task == 'mlm':
            logits = self.lm_head(h)
            loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        else:
            logits = self.cls_head(h)
            loss = None if targets is None else F.cross_entropy(logits, targets, weight=class_weight)
        return logits, loss

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
        """AdamW with decoupled weight decay on matrices only (nanoGPT's grouping), or Adam as scBERT used."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        if name == 'adamw':
            groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
            return torch.optim.AdamW(groups, lr=lr, betas=betas)
        if name == 'adam':
            return torch.optim.Adam(params, lr=lr, betas=betas)
        raise ValueError(f"unknown optimizer '{name}' (use adamw or adam)")
