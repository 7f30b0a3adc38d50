"""
Benchmark the model variants side by side: inference and training speed, peak memory, parameters, FLOPs per cell and
MFU against this machine's own limit. What each design choice buys, measured.

    python bench.py                                       # every variant, embedded PBMC cells (< 2 min on 2 cores)
    python bench.py --variants=scbert2_gqa,scbert2_gqa+compile,scbert2_gqa+bf16   # compiled vs eager, bf16 vs fp32
    python bench.py --dataset=data/baron --batch_sizes=1,32 --profile  # any prepared dataset; torch.profiler's top ops
    python bench.py --variants=out/ckpt.pt --dataset=data/baron        # a checkpoint of train.py (or distill.py ...)
    python bench.py --dataset= --n_genes=16906 --variants=scbert       # synthetic cells, the original's full panel
    python bench.py --scaling=True                        # synthetic sweep of the work per cell -> bench_scaling.png
    python bench.py --variants=out/best.pt,out/best_int8.pt,out/best_ternary.pt --dataset=data/baron1k   # quantize.py's

Variants (--variants, comma-separated); from scbert2_dense to scbert2_moe each adds one thing:
    scbert          the original scBERT: Performer (FAVOR+) over the full gene panel, width 200, 6 layers, 10 heads
                    of 64
    scbert_exact    the same with exact softmax attention, F.scaled_dot_product_attention (flash kernels where possible)
    scbert2_dense   scBERT 2.0 at the flagship's size (config/scbert2.py): expressed genes only, SDPA, RMSNorm, a
                    dense SwiGLU MLP, multi-head attention (8 key/value heads)
    scbert2_gqa     + grouped-query attention (2 key/value heads for 8 query heads)
    scbert2_moe     + the 8-expert, top-2 mixture of experts: the flagship itself (alias: scbert2)
    scbert2_small   config/scbert2_small.py, the CPU-sized scBERT 2.0 (4 layers of 64, GQA, 4 experts)
    scbert_distilled, scbert2_distilled   scbert and the flagship with half their blocks: the architecture of
                    distill.py's default student (speed depends on it, not on the weights; a trained student's
                    checkpoint runs as a path)
    <path>.pt       a checkpoint of ours (train.py's ckpt.pt), run on the dataset's cells mapped onto its genes
    <path>_int8.pt  a quantized checkpoint of quantize.py (int8, or ternary packed at 1.6 bits), as stored
  modifiers, appended to any of them: +compile (torch.compile; the default is eager), +fp32, +bf16 (autocast; the
  run's default is fp32 on CPU, bf16 on CUDA), +fp16 (CUDA), +int8 and +ternary: the variant quantized after training
  as quantize.py does (lowbit.quantize: int8 or BitNet b1.58 weights, int8 activations per token; on CPU PyTorch's
  int8 GEMM, so fp32 only), inference only. Ternary's norm gains are left at 1: the speed is right, the accuracy is
  quantize.py's to measure.
The scBERT 2.0 architectures are read from the config files, so the bench measures what train.py trains. n_embd,
n_layer, n_head, n_kv_head and dim_head override every variant's own (0 = keep it).

Cells: real ones from `dataset` (a prepared dataset; the default is made from the embedded PBMC data on first use): the
same fixed random sample for every variant, because the cost of the expressed-gene models depends on real sparsity. The
scBERT variants read the dataset's whole panel (n_genes + 1 tokens, binned as train.py does); scBERT 2.0 reads each
cell's expressed genes (at most max_genes, a fixed subset as at evaluation). With dataset='' the cells are synthetic:
expressed_frac of an n_genes panel expressed, with exponential values.

Method: each run is warmed up (`warmup` untimed runs, which include compilation), then timed `repeats` times, CUDA
synchronized; we report the median with min and max. Inference runs under torch.no_grad; a training step is forward,
backward (classification loss, plus the MoE's load-balancing loss) and an AdamW step. The thread count is fixed and
recorded with the machine's details in the JSON.

FLOPs are counted analytically per module, matmuls only (2 per multiply-add), as torch.utils.flop_counter counts them:
the linears, FAVOR+'s feature maps and its two linear-attention matmuls, or exact attention's QKᵀ and AV; the real
tokens only (padding is waste, not work). Norms, activations, exp and softmax are left out. A training step counts as
3x the forward pass. Every variant is cross-checked: one cell's forward is run under torch.utils.flop_counter (with
SDPA's math kernel, whose matmuls it sees) and each module group's count is compared with ours.

MFU = achieved FLOP/s / peak FLOP/s, where the peak is this machine's: on CPU, the fastest large matmul in the run's
dtype, timed at the start and at the end of this run (a busy machine lowers it as it lowers the model); on CUDA, the
datasheet's dense bf16/fp16 or TF32 peak of the GPU found in a table, or --peak_flops. Nothing assumes one GPU.

Peak memory is CUDA's max allocated, or on CPU the process's peak RSS (resource.getrusage), reset before each run
(/proc/self/clear_refs on Linux), so each run reports its own peak, which still includes the model, the libraries and
what earlier runs left allocated. A run whose estimated memory would not fit (exact attention's L² scores when SDPA
falls back to its math kernel: 10 heads x 16,907² floats = 11 GB per cell) is skipped with a note.

Output: a markdown table on stdout, `out` (JSON: settings, machine, every run) and `plot` (cells/s and MFU per variant).
--scaling=True instead sweeps synthetic cells: scBERT's panel size (scaling_panels) and scBERT 2.0's expressed genes
per cell (scaling_genes, all of them read), inference at scaling_batch, and plots time and MFU against the tokens per
cell (scaling_plot); dataset, batch_sizes, train, flop_check, mask_cost and profile do not apply to it.
"""
import ctypes
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data import (Dataset, UserError, atomic_write, cell_seeds, load_checkpoint, model_input,
                  prepare_default_dataset)
from lowbit import packed_state_dict, quantize
from model import Classifier, ModelConfig, ScBERT, as_bitlinear

# -----------------------------------------------------------------------------
variants = ('scbert,scbert_exact,scbert2_dense,scbert2_gqa,scbert2_moe,scbert2_small,'    # what to measure (see above)
            'scbert+int8,scbert+ternary,scbert2_gqa+int8,scbert2_gqa+ternary')
dataset = 'data/pbmc68k'       # prepared dataset whose real cells are measured ('' = synthetic cells)
n_genes = 16906                # synthetic cells: genes in the panel (the original scBERT's 16,906)
expressed_frac = 0.1           # synthetic cells: the fraction of the panel each cell expresses (real cells: ~5-30%)
n_embd = 0                     # model width for every variant (0 = each variant's own)
n_layer = 0                    # transformer blocks for every variant (0 = each variant's own)
n_head = 0                     # attention heads for every variant (0 = each variant's own)
n_kv_head = 0                  # key/value heads of the GQA variants (0 = each variant's own)
dim_head = 0                   # width per head for every variant (0 = each variant's own)
n_classes = 10                 # classifier outputs (0 = a pretrained model: the MLM head, trained by masked modelling)
batch_sizes = '1,8'            # inference batch sizes, comma-separated
train_batch_size = 8           # cells per training step
train = True                   # also time training steps (forward + backward + AdamW)
warmup = 1                     # untimed runs before timing (compilation, allocator, caches)
repeats = 3                    # timed runs; we report the median, min and max
seed = 0                       # seeds the weights, the sampled cells and the synthetic cells
device = 'auto'                # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'                 # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False                # torch.compile every variant (or add +compile to one)
num_threads = 0                # CPU threads (0 = PyTorch's default, one per core); the number used is recorded
peak_flops = 0.0               # the peak FLOP/s for MFU, for every dtype (0 = measure a matmul on CPU, a GPU table
                               # on CUDA)
mem_limit_gb = 0.0             # skip runs estimated to need more memory than this (0 = the memory available at start)
flop_check = True              # cross-check the analytic FLOPs with torch.utils.flop_counter on one cell per variant
profile = False                # print torch.profiler's top ops of each variant's biggest inference batch
mask_cost = True               # scBERT 2.0: time the biggest inference batch with its padding mask against the same
                               # shape with no padding (no mask: the flash kernel on GPU), and name SDPA's kernel for
                               # each
scaling = False                # instead of the table: sweep synthetic cells of growing size (see above)
scaling_genes = '500,1000,2000,4000'            # expressed genes per cell for the scBERT 2.0 variants
scaling_panels = '1000,2000,4000,8000,16906'    # panel sizes for the scBERT variants
scaling_batch = 1              # inference batch size of the sweep
out = 'bench.json'             # every result as JSON ('' = none)
plot = 'bench.png'             # cells/s and MFU per variant ('' = none)
scaling_plot = 'bench_scaling.png'  # the sweep's plot ('' = none)
# -----------------------------------------------------------------------------
from configurator import ConfigError, configure, read_config  # noqa: E402
config = configure(globals())

HERE = os.path.dirname(os.path.abspath(__file__))


def architecture(config_file):
    """The ModelConfig fields a train.py config file sets (read with configurator.read_config)."""
    try:
        settings = read_config(os.path.join(HERE, config_file))
    except ConfigError as e:
        raise UserError(str(e)) from None
    return {k: v for k, v in settings.items() if k in ModelConfig.__dataclass_fields__}


SCBERT = dict(n_embd=200, n_layer=6, n_head=10, dim_head=64, head='scbert')   # the original's architecture
FLAGSHIP, SMALL = architecture('config/scbert2.py'), architecture('config/scbert2_small.py')
VARIANTS = {   # name -> (its architecture, the fields that define the variant: they win over the n_embd... settings)
    'scbert': (SCBERT, dict(attention='performer')),
    'scbert_exact': (SCBERT, dict(attention='sdpa')),
    'scbert2_dense': (FLAGSHIP, dict(n_kv_head=0, n_expert=0)),   # n_kv_head 0 = n_head: multi-head attention
    'scbert2_gqa': (FLAGSHIP, dict(n_expert=0)),
    'scbert2_moe': (FLAGSHIP, {}),
    'scbert2': (FLAGSHIP, {}),
    'scbert2_small': (SMALL, {}),
    'scbert_distilled': (SCBERT, dict(attention='performer')),   # + half the blocks: distill.py's default student
    'performer_pytorch': (SCBERT, dict(attention='performer')),  # the reference implementation, not our model
    'scbert2_distilled': (FLAGSHIP, {}),
}
DTYPES = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
QUANT = ('int8', 'ternary')
OVERRIDES = {k: v for k, v in dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                                   dim_head=dim_head).items() if v}


def parse_variant(name):
    """'scbert2_gqa+compile+bf16' -> dict(base, dtype, compile, ckpt, quant): what to build."""
    base, *mods = name.split('+')
    spec = dict(name=name, base=base, dtype=dtype, compile=compile, ckpt=None, quant=None)
    if base.endswith(('.pt', '.pth')) or os.path.sep in base:
        if not os.path.isfile(base):
            raise UserError(f"checkpoint {base} not found (a variant ending in .pt or .pth is a checkpoint path)")
        spec['ckpt'] = base
    elif base not in VARIANTS:
        hint = f'; quantization is a modifier, like scbert+{base}' if base in QUANT else ''
        raise UserError(f"unknown variant '{base}' (known: {', '.join(VARIANTS)}, or a checkpoint path; set "
                        f"--variants=...{hint})")
    for mod in mods:
        if mod in QUANT:
            spec['quant'] = mod
        elif mod in DTYPES:
            spec['dtype'] = DTYPES[mod]
        elif mod in ('compile', 'eager'):
            spec['compile'] = mod == 'compile'
        else:
            raise UserError(f"unknown modifier '+{mod}' in '{name}' (known: +compile, +eager, +fp32, +bf16, +fp16, "
                            f"+int8, +ternary)")
    return spec


def int_list(text, setting):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{setting} must be positive integers separated by commas, like '1,8' (got '{text}')")
    return sorted(set(values))


names = [v.strip() for v in variants.split(',') if v.strip()]
if not names or len(set(names)) < len(names):
    raise UserError(f"variants must name each variant once, like --variants=scbert,scbert2_gqa (got '{variants}')")
specs = [parse_variant(name) for name in names]
batch_list = int_list(batch_sizes, 'batch_sizes')
sweep_genes, sweep_panels = int_list(scaling_genes, 'scaling_genes'), int_list(scaling_panels, 'scaling_panels')
if train_batch_size < 1 or repeats < 1 or warmup < 0 or scaling_batch < 1 or not 0 < expressed_frac <= 1:
    raise UserError("train_batch_size, scaling_batch and repeats must be >= 1, warmup >= 0, 0 < expressed_frac <= 1")
if min(n_embd, n_layer, n_head, n_kv_head, dim_head, num_threads, n_classes) < 0 or n_genes < 1:
    raise UserError("n_embd, n_layer, n_head, n_kv_head, dim_head and num_threads must be >= 0 (0 = the default), "
                    "n_classes >= 0, n_genes >= 1")
for path in (out, plot, scaling_plot):   # fail now, not after the whole benchmark has run
    folder = os.path.dirname(os.path.abspath(path)) if path else ''
    if path and (os.path.isdir(path) or not os.path.isdir(folder)):
        why = 'it is a directory' if os.path.isdir(path) else 'its folder does not exist'
        raise UserError(f"cannot write {path}: {why}"
                        f"; give a file path in an existing folder, or '' for none")

if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
if not re.fullmatch(r'cpu|cuda(:\d+)?', device):
    raise UserError(f"device must be auto, cpu, cuda or cuda:N, not '{device}'")
device_type = 'cuda' if 'cuda' in device else 'cpu'
if device_type == 'cuda' and (torch.device(device).index or 0) >= torch.cuda.device_count():   # 0 without CUDA
    raise UserError(f'device {device} asked for, but CUDA has {torch.cuda.device_count()} device(s) here '
                    f'(use --device=cpu)')
if num_threads:
    torch.set_num_threads(num_threads)
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' else 'float32'     # as train.py: fp32 is exact and fast on every CPU
for spec in specs:
    spec['dtype'] = dtype if spec['dtype'] == 'auto' else spec['dtype']
    if spec['dtype'] not in DTYPES.values() or (device_type == 'cpu' and spec['dtype'] == 'float16'):
        raise UserError(f"dtype must be float32, bfloat16 or float16 (float16 needs CUDA), not '{spec['dtype']}'")
    if spec['quant'] and device_type == 'cpu' and spec['dtype'] != 'float32':
        raise UserError(f"{spec['name']}: a quantized model runs PyTorch's int8 GEMM on CPU, which takes fp32 "
                        f"activations; drop +{ {v: k for k, v in DTYPES.items()}[spec['dtype']]} or set "
                        f"--dtype=float32")
PT_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
torch.set_flush_denormal(True)  # exp() in FAVOR+ underflows to denormal floats, which slow CPU matmuls many-fold
if any(spec['compile'] for spec in specs):
    # the model breaks its graph at data-dependent branches (a mask only when a batch has padding), as intended: keep
    # dynamo's warnings about it out of the table (TORCH_LOGS=graph_breaks lists them)
    torch._logging.set_logs(dynamo=logging.ERROR)
    warnings.filterwarnings('ignore', module=r'torch\._dynamo')
if device_type == 'cuda':       # as train.py: fp32 matmuls run as TF32 on tensor cores
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize(device)


def autocast(dt):
    return nullcontext() if dt == 'float32' else torch.autocast(device_type=device_type, dtype=PT_DTYPES[dt])


# -----------------------------------------------------------------------------
# FLOPs and memory, counted from the config

def forward_flops_per_cell(mc, lengths=None):
    """FLOPs of a forward pass by module, per cell on average over cells of `lengths` tokens each (default: scBERT's
    L = n_genes + 1): matmuls only, 2 per multiply-add, the real tokens only (padding is waste, not work)."""
    lengths = np.asarray(lengths if lengths is not None else [mc.seq_len], dtype=np.float64)
    n_cells, L, L2 = len(lengths), lengths.mean(), (lengths ** 2).mean()   # per cell: tokens, squared for attention
    E, H, KV, D, m = mc.n_embd, mc.n_head, mc.n_kv_head, mc.dim_head, mc.nb_features
    ffn = 2 * E * mc.ff_hidden * (3 if mc.mlp == 'swiglu' else 2)            # one token through one MLP (or expert)
    per_layer = {'attn_proj': 2 * L * E * D * (2 * H + 2 * KV)}             # to_q, to_out (H heads); to_k, to_v (KV)
    if mc.n_expert:
        per_layer['moe'] = L * (ffn * mc.n_expert_active + 2 * E * mc.n_expert)   # k experts per token, and the router
    else:
        per_layer['mlp'] = L * ffn
    if mc.attention == 'performer':
        per_layer['favor_features'] = 2 * H * L * D * m * 2        # w·x for queries and keys: (L, D) @ (D, m) per head
        per_layer['favor_attention'] = 2 * H * m * L * (D + 1) * 2  # phi(k)ᵀ [v 1] (m, D+1), then phi(q) @ that
    else:
        per_layer['attention_scores'] = 2 * H * L2 * D * 2         # q kᵀ (L, L) per head, then softmax @ v
    if getattr(mc, 'disentangled', False):      # DeBERTa: project the R position embeddings (W_q,r, W_k,r), then
        R = 2 * mc.n_pos_buckets + 1            # q·K^r and k·Q^r against all R of them, per token and head
        per_layer['disentangled'] = 2 * R * E * H * D * 2 / n_cells + 2 * H * L * D * R * 2
    flops = {k: v * mc.n_layer for k, v in per_layer.items()}
    if getattr(mc, 'embd_factor', 0):           # ALBERT's factorized gene embedding: each token's E -> n_embd
        flops['gene_emb_proj'] = 2 * L * mc.embd_factor * E
    if mc.input_genes == 'expressed' and mc.value_emb == 'continuous':     # auto-discretization of each gene's value
        B = mc.n_bins
        flops['value_emb'] = (L - 1) * 2 * (B + B * B + B * E)
    if mc.n_classes == 0:     # a pretrained model: the MLM head over the genes (and the value head for scBERT 2.0)
        genes = L - 1 if mc.input_genes == 'expressed' else L
        flops['head'] = 2 * genes * E * (mc.n_bins + 2 + (mc.input_genes == 'expressed'))
    elif mc.head == 'scbert':   # gene_proj (E -> 1 per token), fc1 (the whole panel, seq_len -> 512), fc2, fc3
        flops['head'] = 2 * (L * E + mc.seq_len * 512 + 512 * mc.head_hidden + mc.head_hidden * mc.n_classes)
    else:
        flops['head'] = 2 * (E * mc.head_hidden + mc.head_hidden * mc.n_classes)
    return {k: float(v) if n_cells > 1 else int(round(v)) for k, v in flops.items()}


# which model modules (as torch.utils.flop_counter names them) do the work of each analytic term
FLOP_GROUPS = {
    'attention': (r'ScBERT\.blocks\.\d+\.attn', ('attn_proj', 'favor_features', 'favor_attention', 'attention_scores',
                                                 'disentangled')),
    'gene_emb_proj': (r'ScBERT\.gene_emb_proj', ('gene_emb_proj',)),
    'mlp': (r'ScBERT\.blocks\.\d+\.mlp', ('mlp', 'moe')),
    'value_emb': (r'ScBERT\.value_emb', ('value_emb',)),
    'head': (r'ScBERT\.(cls_head|lm_head|value_head)', ('head',)),
}


def count_flops(model, mc, x, length):
    """One cell's forward under torch.utils.flop_counter, against our count, per module group. SDPA runs its math
    kernel here: the counter sees its matmuls, but no FLOPs inside the CPU flash kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    ours = forward_flops_per_cell(mc, [length])
    check = {'counted': int(sum(counts['Global'].values())), 'analytic': sum(ours.values()), 'by_module': {}}
    for group, (pattern, terms) in FLOP_GROUPS.items() if isinstance(model, ScBERT) else ():   # the reference: total
        counted = sum(sum(ops.values()) for module, ops in counts.items() if re.fullmatch(pattern, module))
        analytic = sum(ours.get(t, 0) for t in terms)
        if counted or analytic:
            check['by_module'][group] = {'counted': int(counted), 'analytic': analytic}
    check['match'] = all(v['counted'] == v['analytic'] for v in check['by_module'].values()) and \
        check['counted'] == check['analytic']
    if not isinstance(model, ScBERT):   # the reference computes the same attention in its own order: comparable only
        check['match'] = abs(check['counted'] / check['analytic'] - 1) < 0.01
    return check


def memory_estimate(mc, n_params, batch, training, backend, L=None):
    """Bytes a run may hold at its peak, roughly and on the high side (4 bytes a number): the weights (x4 in training:
    gradients and AdamW's two moments), and the activations of one layer (inference) or of every layer (training keeps
    them for backward). Only a guard against runs that cannot fit; the measured peak is reported beside it."""
    L, H = L or mc.seq_len, mc.n_head
    # residual, norms, q k v, MLP
    per_layer = batch * L * (6 * mc.n_embd + 4 * H * mc.dim_head + 2 * mc.ff_mult * mc.n_embd
                             * max(1, mc.n_expert_active if mc.n_expert else 1))
    if mc.attention == 'performer':
        # FAVOR+ features (B, H, L, m) of q and k: w·x, exp, +eps, as performer_pytorch makes them (ours makes them
        # a chunk at a time in inference, so for ours this is on the high side)
        per_layer += batch * H * L * mc.nb_features * 6
    elif backend == 'MATH' or getattr(mc, 'disentangled', False):
        per_layer += batch * H * L * L * 2                # exact scores and their softmax, (B, H, L, L) each
    if getattr(mc, 'disentangled', False):
        per_layer += batch * H * L * L * 3                # DeBERTa: c2p, p2c and their sum, the additive bias
    # (the flash and memory-efficient kernels work in tiles: O(L), not O(L²))
    return 4 * (n_params * (4 if training else 1) + per_layer * (mc.n_layer if training else 1))


def sdpa_backend(mc, batch, dt, mask=None):
    """The kernel F.scaled_dot_product_attention picks for these shapes and this dtype ('MATH' materialises L² scores).
    The choice does not depend on the sequence length, so 8 tokens stand in for L."""
    q = torch.zeros(batch, 8, mc.n_head, mc.dim_head, device=device, dtype=PT_DTYPES[dt]).transpose(1, 2)
    if mask is not None:
        mask = torch.ones(batch, 1, 1, 8, dtype=torch.bool, device=device)
    try:                                         # a private function of torch's, so guard it
        return SDPBackend(torch._fused_sdp_choice(q, q, q, mask)).name
    except (AttributeError, RuntimeError, ValueError):
        return 'unknown'


def available_memory():
    """Bytes free now: on CUDA the device's free memory; on CPU MemAvailable (free RAM plus reclaimable caches)."""
    if device_type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        return int(re.search(r'MemAvailable:\s+(\d+) kB', open('/proc/meminfo').read()).group(1)) * 1024
    except (OSError, AttributeError):
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def reset_peak_memory():
    """Start a new peak-memory window. True if the peak now covers this run alone."""
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # glibc keeps freed heap pages; hand them back, so that the high-water mark starts from the live memory
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass
    try:  # Linux: writing 5 resets the process's RSS high-water mark, which getrusage reports
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_memory_mb():
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                    # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == 'darwin' else rss / 2**10


# -----------------------------------------------------------------------------
# the machine and its peak

def cpu_info():
    """The CPU's name, family/model (the name alone can be as vague as 'AMD EPYC') and its vector extensions."""
    try:
        text = open('/proc/cpuinfo').read()
    except OSError:
        return {'cpu': platform.processor() or 'unknown'}

    def field(key):
        found = re.search(rf'^{key}\s*:\s*(.*)$', text, re.M)
        return found[1].strip() if found else '?'
    simd = sorted(set(re.findall(r'\b(avx2|avx512f|avx512_bf16|avx512_fp16|avx512_vnni|amx_\w+|sve|asimd)\b',
                                 field('flags'))))
    return {'cpu': field('model name'), 'cpu_family_model': f"{field('cpu family')}/{field('model')}", 'cpu_simd': simd}


# Datasheet dense peaks (no sparsity), FLOP/s: (bf16/fp16 tensor core, TF32 tensor core). First match wins.
GPU_PEAKS = [
    (r'H200', 989e12, 494.7e12),
    (r'H100.*PCIe', 756e12, 378e12),
    (r'H100.*NVL', 835e12, 417.5e12),
    (r'H100', 989e12, 494.7e12),          # SXM ("NVIDIA H100 80GB HBM3")
    (r'A100', 312e12, 156e12),
    (r'L40S', 362e12, 183e12),
    (r'\bL4\b', 121e12, 60e12),
]


def matmul_peak(dt, seconds=2.0):
    """FLOP/s of the fastest (n, n) @ (n, n) matmul in dtype dt, over `seconds` (at least 5 runs, after one warm-up):
    on a busy machine the fastest run is the one least disturbed, the nearest to the machine's own peak."""
    n = 2048 if device_type == 'cpu' else 8192
    a, b = (torch.randn(n, n, device=device).to(PT_DTYPES[dt]) for _ in range(2))
    a @ b
    times = []
    while len(times) < 5 or sum(times) < seconds:
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


cpu = cpu_info()
device_name = torch.cuda.get_device_name(device) if device_type == 'cuda' else cpu['cpu']
machine = {
    'device': device, 'device_name': device_name, 'dtype': dtype, **cpu, 'cpu_cores': os.cpu_count(),
    'threads': torch.get_num_threads(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
    'python': platform.python_version(), 'platform': platform.platform(), 'load_avg_start': os.getloadavg(),
    'mem_available_gb': round(available_memory() / 2**30, 2),
}
gpu_row = next((r for r in GPU_PEAKS if re.search(r[0], device_name)), None) if device_type == 'cuda' else None
peaks = {}   # dtype -> {'flops', 'source', 'samples'}: set, from the datasheet, or measured now and again at the end


def peak_of(dt):
    if dt not in peaks:
        if peak_flops > 0:
            peaks[dt] = {'flops': peak_flops, 'source': 'the peak_flops setting', 'samples': []}
        elif gpu_row:
            flops = gpu_row[1] if dt != 'float32' else gpu_row[2]
            peaks[dt] = {'flops': flops, 'samples': [], 'source': f'datasheet dense '
                         f'{"bf16/fp16" if dt != "float32" else "TF32"} peak for {device_name}'}
        else:
            sample = matmul_peak(dt)
            peaks[dt] = {'flops': sample, 'samples': [sample], 'source': f'measured: the fastest {dt} matmul of '
                         f'2048x2048 (CPU) or 8192x8192 (GPU), at the start and at the end, '
                         f'{machine["threads"]} thread(s)'
                         + (f'; {device_name} is not in the table, set --peak_flops' if device_type == 'cuda' else '')}
    return peaks[dt]['flops']


peak_of(dtype)
mem_limit = mem_limit_gb * 2**30 if mem_limit_gb > 0 else available_memory()
mem_kind = ('CUDA max allocated, per run' if device_type == 'cuda' else
            'process peak RSS, reset before each run' if reset_peak_memory() else
            'process peak RSS since start (a high-water mark: read it in run order, top to bottom)')
print(f"{device_name} | {machine['threads']} thread(s) | torch {torch.__version__} | {dtype} | "
      f"peak {peaks[dtype]['flops'] / 1e9:.1f} GFLOP/s ({peaks[dtype]['source']}) | "
      f"load {machine['load_avg_start'][0]:.2f}")


# -----------------------------------------------------------------------------
# the cells: CSR (indptr, indices, values) over a panel of genes

def synthetic_cells(n_cells, n_panel, n_expressed, rng):
    """n_cells cells with n_expressed distinct genes each of an n_panel panel, log-normalized values ~ 0.1 +
    Exp(1.5)."""
    ind = np.concatenate([np.sort(rng.choice(n_panel, n_expressed, replace=False)) for _ in range(n_cells)])
    indptr = np.arange(n_cells + 1, dtype=np.int64) * n_expressed
    return indptr, ind.astype(np.int32), (rng.exponential(1.5, len(ind)) + 0.1).astype(np.float32)


def onto_panel(csr, from_genes, to_genes):
    """Cells over the genes from_genes, re-indexed onto the panel to_genes; genes it lacks are dropped."""
    where = {g: i for i, g in enumerate(to_genes)}
    position = np.array([where.get(g, -1) for g in from_genes], dtype=np.int64)
    indptr, indices, values = csr
    rows = []
    for a, b in zip(indptr[:-1], indptr[1:]):
        new = position[indices[a:b]]
        keep = np.flatnonzero(new >= 0)
        order = keep[np.argsort(new[keep], kind='stable')]       # each cell's genes ascending, as prepare_data.py's
        rows.append((new[order], values[a:b][order]))
    return (np.concatenate([[0], np.cumsum([len(r[0]) for r in rows])]).astype(np.int64),
            np.concatenate([r[0] for r in rows]).astype(np.int32),
            np.concatenate([r[1] for r in rows]).astype(np.float32))


def bench_input(mc, cells, batch, max_genes=None, masked=False):
    """The first `batch` cells as the model reads them (data.model_input), on the device, and each cell's token count.
    scBERT: the whole panel binned, (B, n_genes + 1); scBERT 2.0: the expressed genes (evaluation's fixed subsets),
    a dict of (B, 1 + T). masked=True: masked as for pretraining (15% of the expressed genes), and the MLM targets as
    a third value."""
    indptr, indices, values = cells['csr']
    indptr = indptr[:batch + 1]
    indices, values = indices[:indptr[-1]], values[:indptr[-1]]
    expressed = mc.input_genes == 'expressed'
    cfg = replace(mc, max_genes=max_genes) if expressed and max_genes is not None else mc
    x = model_input((indptr, indices, values), cfg, cells['log_base'], seeds=cell_seeds(indptr, indices, seed),
                    mask_prob=0.15 if masked else 0.0)
    x, targets = x if masked else (x, None)
    x, targets = to_device(x), to_device(targets)
    lengths = 1 + (x['genes'] >= 0).sum(1).cpu().numpy() if expressed else np.full(batch, mc.seq_len)
    return (x, lengths, targets) if masked else (x, lengths)


def to_device(x):
    """A tensor or a dict of tensors (or None) on the device."""
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device) if x is not None else None


def sample_cells():
    """The cells every variant reads: the same fixed random sample of the dataset (the default one prepared on first
    use), enough for the biggest batch; or synthetic cells with dataset=''."""
    n_sample = max(batch_list + ([train_batch_size] if train else []))
    if not dataset:
        return {'csr': synthetic_cells(n_sample, n_genes, max(1, int(expressed_frac * n_genes)),
                                       np.random.default_rng(seed)),
                'genes': None, 'n_genes': n_genes, 'log_base': 2.0,
                'source': f'{n_sample} synthetic cells, {expressed_frac:.0%} of {n_genes} genes expressed'}
    prepare_default_dataset(dataset)
    source = Dataset(dataset, preload=False)   # read only the sampled cells
    sample = np.sort(np.random.default_rng(seed).choice(source.n_cells, min(n_sample, source.n_cells), replace=False))
    sample = np.resize(sample, n_sample)                     # a small dataset repeats cells for the biggest batch
    n_distinct = min(n_sample, source.n_cells)
    return {'csr': source.rows(sample), 'genes': source.vocab, 'log_base': source.log_base,
            'source': f'{n_sample} cells of {dataset}' if n_distinct == n_sample else
            f'{n_distinct} cells of {dataset}, repeated to {n_sample}'}


dataset_cells = sample_cells() if not scaling else None


# -----------------------------------------------------------------------------
# the measurements

def timed(fn):
    """Seconds of each of `repeats` runs of fn, after `warmup` untimed runs (the first one's time is kept too), and
    the minor page faults per timed run: the pages the allocator took fresh from the kernel (on CPU, each costs kernel
    time, and a model that allocates and frees big temporaries in every layer pays it in every pass)."""
    times, first, faults = [], None, 0
    for i in range(warmup + repeats):
        sync()
        faults_before, t0 = minor_faults(), time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            faults += minor_faults() - faults_before
    return times, first, faults / repeats


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def spread(values, scale=1.0):
    return {'median': statistics.median(values) * scale, 'min': min(values) * scale, 'max': max(values) * scale}


def print_profile(label, fn):
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync()
    sort_by = 'self_device_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    print(f'\nprofile: {label}\n' + prof.key_averages().table(sort_by=sort_by, row_limit=12))


def build(spec, cells):
    """The variant's model and the cells it reads (a checkpoint's: mapped onto its genes), and notes about them."""
    if spec['ckpt']:
        ckpt = load_checkpoint(spec['ckpt'], 'variants')
        try:
            model = ScBERT.from_checkpoint(ckpt)
            genes = list(ckpt['vocab']) if 'model_args' in ckpt else None   # an original has no gene names
        except Exception as e:
            raise UserError(f"checkpoint {spec['ckpt']} is not a model of ours or an original scBERT one "
                            f"({type(e).__name__}: {str(e)[:160]}); give a ckpt.pt of train.py or a .pth") from None
        mc, notes = model.config, ['the checkpoint brings its own architecture'] if OVERRIDES else []
        if genes is None or cells['genes'] is None:                   # no names to match: synthetic cells on its panel
            n_cells, n_expr = len(cells['csr'][0]) - 1, max(1, int(expressed_frac * mc.n_genes))
            cells = {'csr': synthetic_cells(n_cells, mc.n_genes, n_expr, np.random.default_rng(seed)), 'genes': None,
                     'log_base': 2.0,
                     'source': f'{n_cells} synthetic cells, {n_expr} of its {mc.n_genes} genes expressed'}
            notes.append('synthetic cells: ' + ('an original checkpoint has no gene names' if genes is None else
                                                'dataset is empty, so there are no real cells to map onto its genes'))
        elif list(cells['genes']) != genes:
            mapped = onto_panel(cells['csr'], cells['genes'], genes)
            cells = dict(cells, csr=mapped, genes=genes,
                         source=cells['source'] + f", on the checkpoint's {len(genes)} genes")
            if len(mapped[1]) == 0:
                raise UserError(f"the sampled cells of {dataset} express none of {spec['ckpt']}'s genes; bench it on "
                                f"the data it was trained for")
        return quantized(model, spec, notes), cells, notes
    arch, defining = VARIANTS[spec['base']]
    panel = len(cells['genes']) if cells['genes'] is not None else cells['n_genes']
    try:
        overrides = {k: v for k, v in OVERRIDES.items() if k != 'n_kv_head' or arch.get('n_kv_head')}  # GQA only
        fields = {**arch, **overrides, **defining}
        if spec['base'].endswith('_distilled'):   # the architecture of distill.py's student: every other block
            fields['n_layer'] = (fields['n_layer'] + 1) // 2
        mc = ModelConfig(**fields, n_genes=panel, n_classes=n_classes, seed=seed)
    except AssertionError as e:
        raise UserError(f"variant {spec['name']} with these settings is not a valid model ({e}); check n_head, "
                        f"n_kv_head ...") from None
    torch.manual_seed(seed)
    if spec['base'] == 'performer_pytorch':
        return reference_performer(mc), cells, [REFERENCE_NOTE]
    notes = []
    return quantized(ScBERT(mc), spec, notes), cells, notes


# -----------------------------------------------------------------------------
# the reference: lucidrains' performer-pytorch, the library the original scBERT's Performer was copied from

REFERENCE_NOTE = ("lucidrains' performer-pytorch 1.1.4 (PyPI) at scBERT's size, our classifier head on its encodings; "
                  "its key stabiliser is a max per cell and head (the original scBERT's: one max over the batch), "
                  "it scales the features by m^-1/2 and sums phi(k) for the denominator: the same matmuls as ours "
                  "but a (1, m) one per query, and as many full-size elementwise passes")


class ReferenceScBERT(torch.nn.Module):
    """performer_pytorch.PerformerLM's encoder with our scBERT head: the interface of ScBERT that bench.py uses."""
    quantization = None

    def __init__(self, encoder, config):
        super().__init__()
        self.encoder, self.config, self.cls_head = encoder, config, Classifier(config)

    def forward(self, x, targets=None):                         # x (B, L) bins -> logits (B, n_classes)
        logits = self.cls_head(self.encoder(x, return_encodings=True), x)
        return logits, (F.cross_entropy(logits, targets) if targets is not None else None)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self, embeddings=True):
        skip = () if embeddings else ('encoder.token_emb', 'encoder.pos_emb')
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(skip))

    def aux_losses(self):
        return torch.zeros(()), {}

    def configure_optimizer(self, name, lr, weight_decay):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)


def reference_performer(mc):
    """PerformerLM as the original scBERT built it (6 layers of width 200, 10 heads of 64, 266 random features, GELU
    MLP x4, no local heads), with a learned position embedding for gene2vec's (both a lookup) and no rotary one."""
    if mc.n_classes == 0:
        raise UserError('the performer_pytorch variant has a classifier head only: set --n_classes=10 (or more)')
    try:
        from performer_pytorch import PerformerLM
    except ImportError:
        raise UserError("the performer_pytorch variant needs lucidrains' performer-pytorch: "
                        "pip install performer-pytorch==1.1.4") from None
    encoder = PerformerLM(num_tokens=mc.n_bins + 2, max_seq_len=mc.seq_len, dim=mc.n_embd, depth=mc.n_layer,
                          heads=mc.n_head, dim_head=mc.dim_head, nb_features=mc.nb_features, ff_mult=mc.ff_mult,
                          rotary_position_emb=False, attn_out_bias=mc.bias)
    return ReferenceScBERT(encoder, mc)


def quantized(model, spec, notes):
    """The model quantized as the +int8 / +ternary modifier asks (a float model gets BitLinear's norms for ternary)."""
    if not spec['quant']:
        return model
    if model.quantization:
        raise UserError(f"{spec['ckpt']} is quantized already ({model.quantization}): drop +{spec['quant']}")
    if spec['quant'] == 'ternary' and not model.config.bitlinear:
        model = as_bitlinear(model)
        notes.append('ternary after training, norm gains left at 1 (its speed; quantize.py calibrates and scores it)')
    return quantize(model, spec['quant'])


def train_step_fn(model, raw_model, x, targets, dt):
    """One training step: classification (random labels), or masked modelling for a model without a classifier."""
    optim = raw_model.configure_optimizer('adamw', lr=1e-4, weight_decay=0.01)

    def step():
        with autocast(dt):
            _, loss = model(x, targets)
            aux, _ = raw_model.aux_losses()                     # MoE load balancing, as train.py
        (loss + 0.01 * aux).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    return step


def variant_row(spec, raw_model, cells, notes, batch, max_genes, first_batch):
    """The row of a variant before its measurements: its size, tokens and FLOPs per cell (over the first `batch`
    cells), SDPA's kernel at the first batch size, its config; and prints its header line."""
    mc, dt = raw_model.config, spec['dtype']
    _, lengths = bench_input(mc, cells, batch, max_genes)
    flops = forward_flops_per_cell(mc, lengths)
    fwd = sum(flops.values())
    backend = sdpa_backend(mc, first_batch, dt) if mc.attention == 'sdpa' else None
    row = {'variant': spec['name'], 'attention': mc.attention, 'dtype': dt, 'compiled': spec['compile'],
           'checkpoint': spec['ckpt'], 'params': raw_model.num_params(), 'params_active': raw_model.num_active_params(),
           'params_active_no_embeddings': raw_model.num_active_params(embeddings=False), 'cells': cells['source'],
           'tokens_per_cell': float(np.mean(lengths)),
           'flops_per_cell': {'forward': fwd, 'train': 3 * fwd, 'by_module': flops},
           'model_config': asdict(mc), 'sdpa_backend': backend, 'inference': [], 'train': None, 'notes': notes,
           'quantization': raw_model.quantization,     # the bytes of its weights as a checkpoint stores them
           'weights_mb': weights_mb(raw_model)}
    print(f"\n{spec['name']}: {row['params'] / 1e6:.2f}M parameters ({row['params_active'] / 1e6:.2f}M active per "
          f"token), {row['tokens_per_cell']:.0f} tokens and {fwd / 1e9:.3g} GFLOP per cell forward; {row['cells']}; "
          f"{dt}{', compiled' if spec['compile'] else ''}{', SDPA ' + backend if backend else ''}")
    return row


def weights_mb(model):
    """The megabytes of a model's weights as a checkpoint stores them, each shared tensor once."""
    unique = {t.data_ptr(): t for t in packed_state_dict(model).values()}
    return sum(t.numel() * t.element_size() for t in unique.values()) / 2**20


def check_flops(row, raw_model, cells, max_genes):
    """Cross-check the analytic FLOPs of one cell with torch.utils.flop_counter (row['flop_check']), or say why not."""
    mc = raw_model.config
    if raw_model.quantization:
        row['notes'].append("FLOPs not cross-checked: torch.utils.flop_counter does not see PyTorch's int8 kernels")
        return
    x1, _ = bench_input(mc, cells, 1, max_genes)
    # the input's full length: a cell without genes still has one padding column, which the counter sees
    length = 1 + x1['genes'].shape[1] if mc.input_genes == 'expressed' else mc.seq_len
    if memory_estimate(mc, row['params'], 1, False, 'MATH', length) > mem_limit:
        row['notes'].append('FLOPs not cross-checked: the math kernel would not fit in memory at this length')
        return
    raw_model.eval()
    check = row['flop_check'] = count_flops(raw_model, mc, x1, length)
    ratios = ', '.join(f"{k} x{v['counted'] / v['analytic']:.4f}" for k, v in check['by_module'].items()
                       if v['analytic']) or f"in all x{check['counted'] / check['analytic']:.4f}"
    label = ('match' if isinstance(raw_model, ScBERT) else 'within 1%') if check['match'] else 'MISMATCH'
    print(f"  FLOPs of one cell: torch.utils.flop_counter {check['counted'] / 1e9:.4g} G, ours "
          f"{check['analytic'] / 1e9:.4g} G: {label} ({ratios})")


def inference_step(model, x, dt):
    @torch.no_grad()
    def step():
        with autocast(dt):
            model(x)
    return step


def measure(kind, batch, model, raw_model, cells, max_genes, row, spec):
    """One run: inference or a training step at this batch size -> (its result dict, the step run; None when the
    run was skipped as too big for memory)."""
    mc, dt, backend = raw_model.config, spec['dtype'], row['sdpa_backend']
    pretraining = kind == 'train' and mc.n_classes == 0        # a pretrained model trains by masked modelling
    x, batch_lengths, *targets = bench_input(mc, cells, batch, max_genes, masked=pretraining)
    needed = memory_estimate(mc, row['params'], batch, kind == 'train', backend, int(max(batch_lengths)))
    run_flops = sum(forward_flops_per_cell(mc, batch_lengths).values()) * (3 if kind == 'train' else 1)
    result = {'batch_size': batch, 'flops_per_cell': run_flops}
    if needed > mem_limit:
        note = (f"{kind} at batch {batch} skipped: needs ~{needed / 2**30:.1f} GB"
                f"{' (L² scores: SDPA uses its math kernel)' if backend == 'MATH' else ''}, "
                f"{mem_limit / 2**30:.3g} GB available")
        row['notes'].append(note)
        print(f'  {note}')
        result['skipped'] = note
        return result, None
    if kind == 'inference':
        raw_model.eval()
        step = inference_step(model, x, dt)
    else:
        raw_model.train()
        if not pretraining:                                 # random labels
            g = torch.Generator().manual_seed(seed)
            targets = [torch.randint(0, mc.n_classes, (batch,), generator=g).to(device)]
        step = train_step_fn(model, raw_model, x, targets[0], dt)
    gc.collect()
    reset_peak_memory()
    times, first, faults = timed(step)
    median = statistics.median(times)
    result.update({'time_s': spread(times), 'first_run_s': first, 'cells_per_s': batch / median,
                   'latency_ms_per_cell': spread(times, 1e3 / batch), 'flops_per_s': run_flops * batch / median,
                   'mfu': None, 'peak_mem_mb': peak_memory_mb(), 'mem_estimate_mb': needed / 2**20,
                   'minor_faults_per_pass': faults})
    print(f"  {kind} batch {batch}: {result['cells_per_s']:.3g} cells/s, "
          f"{result['latency_ms_per_cell']['median']:.3g} ms per cell, {result['flops_per_s'] / 1e9:.3g} GFLOP/s, "
          f"{faults:.3g} minor page faults per pass"
          + (f" (first run {first:.1f} s, with compilation)" if spec['compile'] else ''))
    return result, step


def measure_mask_cost(model, raw_model, cells, batch, max_genes, dt):
    """The padding mask's cost: the same (B, 1 + T) shape twice, the real batch, whose padding needs a mask, and the
    batch with its padding turned into real tokens (gene 0, value 0), which needs none. (With MoE the unmasked run
    also sends those tokens through the experts, so its ratio understates the mask's cost.)"""
    mc = raw_model.config
    x, _ = bench_input(mc, cells, batch, max_genes)
    x = {k: F.pad(v, (0, 1), value=-1 if k == 'genes' else 0) for k, v in x.items()}   # at least one padding column
    padded, full = x, dict(x, genes=x['genes'].clamp(min=0))
    raw_model.eval()
    cost = {'batch_size': batch, 'tokens': 1 + x['genes'].shape[1],
            'padding_share': float((x['genes'] < 0).float().mean())}
    for label, inputs, has_mask in (('masked', padded, True), ('unmasked', full, None)):
        cost[f'{label}_s'] = statistics.median(timed(inference_step(model, inputs, dt))[0])
        cost[f'{label}_kernel'] = sdpa_backend(mc, batch, dt, has_mask)
    cost['ratio'] = cost['masked_s'] / cost['unmasked_s']
    print(f"  padding mask: {cost['masked_s'] * 1e3:.1f} ms with it ({cost['masked_kernel']}) vs "
          f"{cost['unmasked_s'] * 1e3:.1f} ms without ({cost['unmasked_kernel']}) at batch {cost['batch_size']} x "
          f"{cost['tokens']} tokens ({cost['padding_share']:.0%} padding): x{cost['ratio']:.2f}")
    return cost


def bench_variant(spec, cells, batches, train_batch, max_genes=None, extras=True):
    """Every measurement of one variant on `cells`. max_genes overrides the config's cap (the sweep reads all genes);
    extras: the FLOP-counter check, the padding mask's cost and the profile."""
    name, dt = spec['name'], spec['dtype']
    raw_model, cells, notes = build(spec, cells)
    mc = raw_model.config
    if raw_model.quantization and device_type == 'cpu' and dt != 'float32':
        raise UserError(f"{name}: a quantized model runs PyTorch's int8 GEMM on CPU, which takes fp32 activations; "
                        f"drop +{ {v: k for k, v in DTYPES.items()}[dt]} or set --dtype=float32")
    if raw_model.quantization:
        notes.append('quantized: inference only; its int8 multiply-adds count as FLOPs, against the fp32 peak')
        train_batch = 0
    raw_model.to(device)
    model = torch.compile(raw_model) if spec['compile'] else raw_model
    expressed = mc.input_genes == 'expressed'
    if cells['csr'][0][-1] == 0 and expressed:
        raise UserError(f"the cells express none of the model's genes; bench {name} on another dataset")
    row = variant_row(spec, raw_model, cells, notes, max(batches + [train_batch]), max_genes, batches[0])
    if extras and flop_check:
        check_flops(row, raw_model, cells, max_genes)
    profiled = None
    jobs = [('inference', b) for b in batches] + ([('train', train_batch)] if train_batch else [])
    for kind, batch in jobs:
        result, step = measure(kind, batch, model, raw_model, cells, max_genes, row, spec)
        if kind == 'inference':
            row['inference'].append(result)
            if step:
                profiled = (f'{name} inference, batch {batch}', step)    # the biggest inference batch that ran
        else:
            row['train'] = result
    if extras and profile and profiled:
        raw_model.eval()                                            # (the training step left it in train mode)
        print_profile(*profiled)
    if extras and expressed and mask_cost and not any('skipped' in r for r in row['inference']):
        row['mask_cost'] = measure_mask_cost(model, raw_model, cells, batches[-1], max_genes, dt)
    peak_of(dt)                         # a bf16 variant on CPU measures the bf16 matmul peak
    return row


def runs_of(row):
    """(kind, result) of each run of a row: inference at each batch size, then training."""
    return [('inference', r) for r in row.get('inference', [])] + ([('train', row['train'])] if row.get('train')
                                                                    else [])


# -----------------------------------------------------------------------------
# the variants, side by side

def run_variants():
    """Every variant on the dataset's (or synthetic) cells -> their rows."""
    results = []
    for spec in specs:
        results.append(bench_variant(spec, dataset_cells, batch_list, train_batch_size if train else 0))
        if spec['compile']:
            torch._dynamo.reset()             # dynamo's caches hold the compiled model: free it for the next variant
        gc.collect()
        if device_type == 'cuda':
            torch.cuda.empty_cache()
    return results


def run_sweep():
    """The sweep: synthetic cells, more genes per cell at each point -> a row per variant and size."""
    rng, sweep = np.random.default_rng(seed), []
    for spec in specs:
        if spec['ckpt']:
            print(f"\n{spec['name']}: not swept (a checkpoint has a fixed panel)")
            continue
        panel_model = VARIANTS[spec['base']][0].get('input_genes', 'all') == 'all'
        for size in (sweep_panels if panel_model else sweep_genes):
            # scBERT: a panel of `size` genes, expressed_frac expressed; scBERT 2.0: `size` of n_genes expressed
            panel, n_expr = (size, max(1, int(expressed_frac * size))) if panel_model else (max(n_genes, size), size)
            cells = {'csr': synthetic_cells(scaling_batch, panel, n_expr, rng), 'genes': None, 'n_genes': panel,
                     'log_base': 2.0, 'source': f'synthetic, {n_expr} of {panel} genes expressed'}
            row = bench_variant(spec, cells, [scaling_batch], 0, max_genes=0, extras=False)
            row.update(sweep_size=size, sweep_axis='panel genes' if panel_model else 'expressed genes')
            sweep.append(row)
            gc.collect()
    return sweep


# -----------------------------------------------------------------------------
# MFU, the tables, the plots and the JSON

def set_mfu(rows):
    """The peak again at the end (the faster of the two counts), then each run's MFU against it."""
    for dt, p in peaks.items():
        if p['samples']:
            p['samples'].append(matmul_peak(dt))
            p['flops'] = max(p['samples'])
    for row in rows:
        for _, r in runs_of(row):
            if 'flops_per_s' in r:
                r['mfu'] = r['flops_per_s'] / peaks[row['dtype']]['flops']
    machine['load_avg_end'] = os.getloadavg()


def fmt(v, digits=3):
    return f'{v:.{digits}g}' if v is not None else ''


def print_variant_table(results):
    """One row per variant: size, work per cell, cells/s, MFU, speed-up, weights and memory; then each quantized
    variant against its float twin."""
    base = next((r for r in results if r.get('inference') and 'cells_per_s' in r['inference'][-1]), None)
    print(f"\n| variant | params (active) | tokens per cell | GFLOP per cell | cells/s, inference b{batch_list[0]} | "
          f"cells/s, inference b{batch_list[-1]} | cells/s, training b{train_batch_size if train else '-'} | "
          f"inference MFU | vs {base['variant'] if base else 'the first'} (inference b{batch_list[-1]}) | "
          f"weights MB | peak MB |")
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for row in results:
        inf = {r['batch_size']: r for r in row['inference']}
        first, last, tr = inf[batch_list[0]], inf[batch_list[-1]], row['train'] or {}
        speedup = (last['cells_per_s'] / base['inference'][-1]['cells_per_s']
                   if base and 'cells_per_s' in last else None)
        mfu = max((r['mfu'] for r in row['inference'] if r.get('mfu')), default=None)
        print(f"| {row['variant']} | {row['params'] / 1e6:.2f}M ({row['params_active'] / 1e6:.2f}M) | "
              f"{row['tokens_per_cell']:.0f} | {row['flops_per_cell']['forward'] / 1e9:.3g} | "
              f"{fmt(first.get('cells_per_s'))} | {fmt(last.get('cells_per_s'))} | {fmt(tr.get('cells_per_s'))} | "
              f"{f'{mfu:.0%}' if mfu else ''} | {f'{speedup:.2f}x' if speedup else ''} | {row['weights_mb']:.3g} | "
              f"{max((r.get('peak_mem_mb', 0) for _, r in runs_of(row)), default=0):.0f} |")
    float_rows = {row['variant']: row for row in results if not row['quantization']}
    for row in results:                 # a quantized variant against the same variant in float, when both ran
        twin = float_rows.get(re.sub(r'\+(int8|ternary)', '', row['variant']))
        if row['quantization'] and twin:
            ratios = ' / '.join(f"{q.get('cells_per_s', 0) / f['cells_per_s']:.2f}x" for q, f in
                                zip(row['inference'], twin['inference']) if 'cells_per_s' in f)
            print(f"{row['variant']}: {ratios} the inference cells/s of {twin['variant']} (batch "
                  f"{' / '.join(str(b) for b in batch_list)}); weights "
                  f"{twin['weights_mb'] / row['weights_mb']:.1f}x smaller")


def print_runs_table(results):
    """One row per run (inference at each batch size, training)."""
    print('\n| variant | run | batch | cells/s | ms per cell (min-max) | GFLOP per cell | GFLOP/s | MFU | peak MB | '
          'page faults per pass |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for row in results:
        for kind, r in runs_of(row):
            gflop = r['flops_per_cell'] / 1e9
            if 'skipped' in r:
                print(f"| {row['variant']} | {kind} | {r['batch_size']} | skipped: too big for memory | | "
                      f"{gflop:.3g} | | | | |")
                continue
            lat = r['latency_ms_per_cell']
            print(f"| {row['variant']} | {kind} | {r['batch_size']} | {r['cells_per_s']:.3g} | {lat['median']:.3g} "
                  f"({lat['min']:.3g}-{lat['max']:.3g}) | {gflop:.3g} | {r['flops_per_s'] / 1e9:.3g} | "
                  f"{r['mfu']:.1%} | {r['peak_mem_mb']:.0f} | {r['minor_faults_per_pass']:.3g} |")


def print_sweep_table(sweep):
    print('\n| variant | axis | size | tokens per cell | GFLOP per cell | ms per cell (min-max) | GFLOP/s | MFU | '
          'page faults per pass |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
    for row in sweep:
        r = row['inference'][0]
        if 'skipped' in r:
            print(f"| {row['variant']} | {row['sweep_axis']} | {row['sweep_size']} | {row['tokens_per_cell']:.0f} | "
                  f"{r['flops_per_cell'] / 1e9:.3g} | skipped: too big for memory | | | |")
            continue
        lat = r['latency_ms_per_cell']
        print(f"| {row['variant']} | {row['sweep_axis']} | {row['sweep_size']} | {row['tokens_per_cell']:.0f} | "
              f"{r['flops_per_cell'] / 1e9:.3g} | {lat['median']:.4g} ({lat['min']:.4g}-{lat['max']:.4g}) | "
              f"{r['flops_per_s'] / 1e9:.3g} | {r['mfu']:.1%} | {r['minor_faults_per_pass']:.3g} |")


def print_notes(rows):
    print('\npeak: ' + '; '.join(f"{dt} {p['flops'] / 1e9:.1f} GFLOP/s ({p['source']})" for dt, p in peaks.items())
          + f". Memory: {mem_kind}. Load average {machine['load_avg_start'][0]:.2f} at start, "
          f"{machine['load_avg_end'][0]:.2f} at end.")
    for variant, note in dict.fromkeys((row['variant'], note) for row in rows for note in row['notes']):
        print(f"note: {variant}: {note}")       # once each: the sweep's rows repeat their variant's notes
    for row in rows:
        if row.get('flop_check') and not row['flop_check']['match']:
            print(f"note: {row['variant']}: the analytic FLOPs differ from torch.utils.flop_counter's: "
                  f"{row['flop_check']}")


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110, bbox_inches='tight')
    print(f'wrote {path}')


def plot_variants(results, path, title):
    """cells/s (inference at the biggest batch that ran, and training) and inference MFU, a bar per variant."""
    biggest = {r['variant']: [i for i in r['inference'] if 'cells_per_s' in i][-1] for r in results
               if any('cells_per_s' in i for i in r.get('inference', []))}     # each one's biggest batch that ran
    measured = [r for r in results if r['variant'] in biggest]
    if not measured:
        return
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(measured) + 2.5))
    labels, ys = [r['variant'] for r in measured], np.arange(len(measured))
    series = [('inference, biggest batch', [biggest[r['variant']]['cells_per_s'] for r in measured]),
              (f'training b{train_batch_size}', [(r['train'] or {}).get('cells_per_s', 0) for r in measured])]
    for i, (label, values) in enumerate(series):
        ax1.barh(ys + 0.4 * i - 0.2, values, height=0.4, label=label)
    ax1.set_xscale('log')
    ax1.set_xlabel('cells per second (log)')
    ax1.legend()
    mfus = [biggest[r['variant']]['mfu'] * 100 for r in measured]
    ax2.barh(ys, mfus, color='tab:green')
    ax2.set_xlabel('inference MFU, % of the peak')
    for ax in (ax1, ax2):
        ax.set_yticks(ys, labels)
        ax.invert_yaxis()
    fig.suptitle(f"{title}; {dataset_cells['source']}")
    save_figure(fig, path)
    plt.close(fig)


def plot_sweep(sweep, path, title):
    """Time per cell and MFU against the tokens per cell, a line per variant."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r['variant'] for r in sweep):
        pts = [(r['tokens_per_cell'], r['inference'][0]) for r in sweep if r['variant'] == name
               and 'cells_per_s' in r['inference'][0]]
        if pts:
            ax1.plot([t for t, _ in pts], [r['latency_ms_per_cell']['median'] for _, r in pts], 'o-', label=name)
            ax2.plot([t for t, _ in pts], [r['mfu'] * 100 for _, r in pts], 'o-', label=name)
    ax1.set(xscale='log', yscale='log', xlabel='tokens per cell',
            ylabel=f'ms per cell (inference, batch {scaling_batch})')
    ax2.set(xscale='log', xlabel='tokens per cell', ylabel='MFU, % of the peak')
    ax1.legend()
    fig.suptitle(f'{title}: cost against the work per cell (scBERT: panel size; scBERT 2.0: expressed genes)')
    save_figure(fig, path)
    plt.close(fig)


def against_reference(rows):
    """Each FAVOR+ variant of ours ÷ performer_pytorch, inference cells/s at each batch size (at each size of the
    sweep): row['vs_performer_pytorch'] {batch: ratio}, and a line each. Same cells, same process, same run."""
    refs = {r.get('sweep_size'): r for r in rows if r['variant'].split('+')[0] == 'performer_pytorch'}
    for row in rows:
        ref = refs.get(row.get('sweep_size'))
        if not ref or row is ref or row['attention'] != 'performer':
            continue
        theirs = {r['batch_size']: r['cells_per_s'] for r in ref['inference'] if 'cells_per_s' in r}
        row['vs_performer_pytorch'] = {r['batch_size']: r['cells_per_s'] / theirs[r['batch_size']]
                                       for r in row['inference'] if r['batch_size'] in theirs and 'cells_per_s' in r}
        at = f" at {row['sweep_size']} genes" if 'sweep_size' in row else ''
        print(f"{row['variant']}{at}: " + ', '.join(f'{v:.2f}x at batch {b}' for b, v in
                                                     row['vs_performer_pytorch'].items())
              + f" the inference cells/s of {ref['variant']}")


results = run_variants() if not scaling else []
sweep = run_sweep() if scaling else []
set_mfu(results + sweep)
if results:
    print_variant_table(results)
    print_runs_table(results)
if sweep:
    print_sweep_table(sweep)
print()
against_reference(results + sweep)
print_notes(results + sweep)
title = f"{device_name}, {machine['threads']} thread(s)"
if plot and results:
    plot_variants(results, plot, title)
if scaling_plot and sweep:
    plot_sweep(sweep, scaling_plot, title)
if out:
    report = {'settings': config, 'machine': machine, 'peaks': peaks, 'memory_kind': mem_kind, 'variants': results,
              'scaling': sweep}
    with atomic_write(out) as tmp:
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=1)
    print(f'wrote {out}')
