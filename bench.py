"""
Benchmark the model variants: inference and training speed, peak memory, FLOPs per cell and MFU, side by side.

    python bench.py                                           # scBERT (FAVOR+) and scBERT with exact attention, full size
    python bench.py --variants=scbert --batch_sizes=1,8,32 --num_threads=2 --out=bench.json
    python bench.py --n_genes=2000 --repeats=5 --profile      # a smaller panel; torch.profiler's top ops
    python bench.py --variants=scbert,scbert2_small,scbert2 --dataset=data/baron --batch_sizes=1,32   # Baron cells

Variants (--variants, comma-separated):
    scbert         ScBERT with Performer attention (FAVOR+), the original's architecture by default
    scbert_exact   the same with exact softmax attention (F.scaled_dot_product_attention)
    scbert2        scBERT 2.0, the flagship of config/scbert2.py: expressed genes only, GQA, RMSNorm, SwiGLU, 8-expert MoE
    scbert2_small  scBERT 2.0 of config/scbert2_small.py, the CPU-sized one
The scBERT 2.0 architectures are read from those config files, so the bench measures what train.py trains.

The scBERT cells are synthetic but shaped like real ones: about expressed_frac of the genes get a bin 1..5, the rest 0,
plus the appended 0 token (these dense models cost the same whatever the tokens are). scBERT 2.0's cost depends on how
many genes each cell expresses: it reads real cells from `dataset` (a prepared dataset: a fixed random sample of its
cells, the same for every variant), or else synthetic ones with expressed_frac of n_genes expressed. Each run is warmed up, then timed
`repeats` times; we report the median with min and max. Inference runs under torch.no_grad; a training step is forward,
backward (classification loss) and an AdamW step.

FLOPs are counted analytically per module, matmuls only (2 per multiply-add), as torch.utils.flop_counter counts them:
the linears, FAVOR+'s feature maps and its two linear-attention matmuls, or exact attention's QKᵀ and AV. Norms, GELU,
exp and softmax are left out. A training step counts as 3x the forward pass. MFU = achieved FLOP/s / peak FLOP/s, where the
peak is the machine's own: on CPU, timed on a large matmul in the run's dtype in this same run (a busy machine lowers it
as it lowers the model); on CUDA, the datasheet's dense bf16/fp16 or TF32 peak of a known GPU, or --peak_flops.

Peak memory is CUDA's max allocated, or on CPU the process's peak RSS (resource.getrusage). RSS is a high-water mark of
the whole process; on Linux we reset it before each run (/proc/self/clear_refs), so each run reports its own peak, which
still includes the model, the libraries and what earlier runs left allocated. Where that reset is refused the numbers are
the process's running maximum, in run order, and the output says so. Before each run the memory it needs is estimated
(exact attention's L² scores dominate when SDPA falls back to its math kernel: 10 heads x 16,907² floats = 11 GB per
cell) and a run that would not fit in the available memory is skipped with a note.
"""
import ctypes
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import numpy as np

from data import Dataset, UserError, atomic_write, cell_seeds, expressed_batch
from model import ModelConfig, ScBERT

# -----------------------------------------------------------------------------
variants = 'scbert,scbert_exact'  # which models to measure, comma-separated (see above)
n_genes = 16906                # genes in the panel (the sequence is n_genes + 1 tokens); the original's panel
n_embd = 200                   # model width (the original's)
n_layer = 6                    # transformer blocks (the original's)
n_head = 10                    # attention heads (the original's)
dim_head = 64                  # width per head (the original's)
n_classes = 10                 # classifier outputs; the head is the original's ('scbert': per-gene projection, then an MLP)
batch_sizes = '1,8'            # inference batch sizes, comma-separated
train_batch_size = 1           # cells per training step
warmup = 1                     # untimed runs before timing (compilation, allocator, caches)
repeats = 3                    # timed runs; we report the median, min and max
train = True                   # also time training steps (forward + backward + AdamW)
expressed_frac = 0.1           # fraction of genes with a non-zero bin in the synthetic cells (real cells: ~5-15%)
dataset = ''                   # prepared dataset whose real cells feed the scBERT 2.0 variants ('' = synthetic cells)
seed = 0                       # seeds the weights and the synthetic cells
device = 'auto'                # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'                 # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False                # torch.compile the model (the warm-up runs then include compilation)
num_threads = 0                # CPU threads (0 = PyTorch's default); the number used is recorded
peak_flops = 0.0               # the machine's peak FLOP/s for MFU (0 = measure a matmul on CPU, a table of GPUs on CUDA)
mem_limit_gb = 0.0             # skip runs estimated to need more memory than this (0 = the memory available at start)
profile = False                # print torch.profiler's top ops for the first variant
mask_cost = True               # scBERT 2.0: time the biggest inference batch with its padding mask against the same
                               # shape with no padding (no mask: the flash kernel on GPU), and name SDPA's kernel for each
out = ''                       # also write every result to this JSON file ('' = no file)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())

HERE = os.path.dirname(os.path.abspath(__file__))


def architecture(config_file):
    """The ModelConfig fields a train.py config file sets (it only assigns settings, so exec'ing it is safe)."""
    scope = {}
    exec(open(os.path.join(HERE, config_file)).read(), scope)
    return {k: v for k, v in scope.items() if k in ModelConfig.__dataclass_fields__}


VARIANTS = {                   # name -> ModelConfig fields that differ from the base architecture above
    'scbert': dict(attention='performer'),
    'scbert_exact': dict(attention='sdpa'),
    'scbert2': architecture('config/scbert2.py'),
    'scbert2_small': architecture('config/scbert2_small.py'),
}
variant_names = [v.strip() for v in variants.split(',') if v.strip()]
for name in variant_names:
    if name not in VARIANTS:
        raise UserError(f"unknown variant '{name}' (known: {', '.join(VARIANTS)}; set --variants=...)")
try:
    batch_list = [int(b) for b in batch_sizes.split(',') if b.strip()]
except ValueError:
    batch_list = []
if not batch_list or min(batch_list) < 1 or train_batch_size < 1 or repeats < 1 or warmup < 0:
    raise UserError(f"batch_sizes must be positive integers like '1,8' (got '{batch_sizes}'), train_batch_size and "
                    f"repeats >= 1, warmup >= 0")

device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
device_type = 'cuda' if 'cuda' in device else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    raise UserError(f'device {device} asked for, but CUDA is not available (use --device=cpu)')
if num_threads:
    torch.set_num_threads(num_threads)
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' else 'float32'     # as train.py: bf16 autocast was far slower on CPU
if dtype not in ('float32', 'bfloat16', 'float16') or (device_type == 'cpu' and dtype == 'float16'):
    raise UserError(f"dtype must be float32, bfloat16 or float16 (float16 needs CUDA), not '{dtype}'")
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.set_flush_denormal(True)  # exp() in FAVOR+ underflows to denormal floats, which slow CPU matmuls many-fold
if device_type == 'cuda':       # as train.py: fp32 matmuls run as TF32 on tensor cores
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# FLOPs and memory, counted from the config

def forward_flops_per_cell(mc, lengths=None):
    """FLOPs of a forward pass by module, per cell on average over cells of `lengths` tokens each (default: scBERT's
    L = n_genes + 1): matmuls only, 2 per multiply-add, the real tokens only (padding is waste, not work)."""
    lengths = np.asarray(lengths if lengths is not None else [mc.seq_len], dtype=np.float64)
    n_cells, L, L2 = len(lengths), lengths.mean(), (lengths ** 2).mean()    # per cell: tokens, and squared for attention
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
    flops = {k: v * mc.n_layer for k, v in per_layer.items()}
    if mc.input_genes == 'expressed' and mc.value_emb == 'continuous':     # auto-discretization of each gene's value
        B = mc.n_bins
        flops['value_emb'] = (L - 1) * 2 * (B + B * B + B * E)
    if mc.head == 'scbert':   # gene_proj (E -> 1 per gene), fc1 (L -> 512), fc2, fc3
        flops['head'] = 2 * (L * E + L * 512 + 512 * mc.head_hidden + mc.head_hidden * mc.n_classes)
    else:
        flops['head'] = 2 * (E * mc.head_hidden + mc.head_hidden * mc.n_classes)
    return {k: float(v) if n_cells > 1 else int(round(v)) for k, v in flops.items()}


def memory_estimate(mc, n_params, batch, training, backend, L=None):
    """Bytes a run may hold at its peak, roughly and on the high side (4 bytes a number): the weights (x4 in training:
    gradients and AdamW's two moments), and the activations of one layer (inference) or of every layer (training keeps
    them for backward). Only a guard against runs that cannot fit; the measured peak is reported beside it."""
    L, H = L or mc.seq_len, mc.n_head
    per_layer = batch * L * (6 * mc.n_embd + 4 * H * mc.dim_head + 2 * mc.ff_mult * mc.n_embd   # residual, norms, q k v, MLP
                             * max(1, mc.n_expert_active if mc.n_expert else 1))
    if mc.attention == 'performer':
        per_layer += batch * H * L * mc.nb_features * 6   # FAVOR+ features (B, H, L, m): w·x, exp, +eps; queries and keys
    elif backend == 'MATH':
        per_layer += batch * H * L * L * 2                # exact scores and their softmax, (B, H, L, L) each
    # (the flash and memory-efficient kernels work in tiles: O(L), not O(L²))
    return 4 * (n_params * (4 if training else 1) + per_layer * (mc.n_layer if training else 1))


def sdpa_backend(mc, batch):
    """The kernel F.scaled_dot_product_attention picks for these shapes and this dtype ('MATH' materialises L² scores).
    The choice does not depend on the sequence length, so 8 tokens stand in for L."""
    q = torch.zeros(batch, 8, mc.n_head, mc.dim_head, device=device, dtype=ptdtype).transpose(1, 2)  # as Attention's
    return SDPBackend(torch._fused_sdp_choice(q, q, q)).name


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
    simd = sorted(set(re.findall(r'\b(avx2|avx512f|avx512_bf16|avx512_fp16|avx512_vnni|amx_\w+|sve|asimd)\b', field('flags'))))
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


def matmul_peak(n, seconds=2.0):
    """FLOP/s of the fastest (n, n) @ (n, n) matmul in the run's dtype, over `seconds` (at least 5 runs, after one
    warm-up): on a busy machine the fastest run is the one least disturbed, the nearest to the machine's own peak."""
    a, b = (torch.randn(n, n, device=device).to(ptdtype) for _ in range(2))
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
# The peak: set, from the datasheet, or measured now and again at the end, keeping the faster (the load may change).
gpu_row = next((r for r in GPU_PEAKS if re.search(r[0], device_name)), None) if device_type == 'cuda' else None
peak_samples = []
if peak_flops > 0:
    peak, peak_source = peak_flops, 'the peak_flops setting'
elif gpu_row:
    peak = gpu_row[1] if ptdtype != torch.float32 else gpu_row[2]
    peak_source = f'datasheet dense {"bf16/fp16" if ptdtype != torch.float32 else "TF32"} peak for {device_name}'
else:
    peak_n = 2048 if device_type == 'cpu' else 8192
    peak_samples.append(matmul_peak(peak_n))
    peak = peak_samples[0]
    peak_source = (f'measured: the fastest {dtype} {peak_n}x{peak_n} matmul, at the start and at the end, '
                   f'{machine["threads"]} thread(s)' + (f'; {device_name} is not in the table, set --peak_flops'
                                                        if device_type == 'cuda' else ''))
mem_limit = mem_limit_gb * 2**30 if mem_limit_gb > 0 else available_memory()
mem_kind = ('CUDA max allocated, per run' if device_type == 'cuda' else
            'process peak RSS, reset before each run' if reset_peak_memory() else
            'process peak RSS since start (a high-water mark: read it in run order, top to bottom)')
print(f"{device_name} | {machine['threads']} thread(s) | torch {torch.__version__} | {dtype} | "
      f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}) | load {machine['load_avg_start'][0]:.2f}")


# -----------------------------------------------------------------------------
# the measurements

def timed(fn):
    """Seconds of each of `repeats` runs of fn, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def spread(values, scale=1.0):
    return {'median': statistics.median(values) * scale, 'min': min(values) * scale, 'max': max(values) * scale}


def synthetic_tokens(batch):
    """(batch, n_genes + 1) bins: ~expressed_frac of the genes get 1..n_bins, the rest 0, and the appended 0 token."""
    g = torch.Generator().manual_seed(seed * 1000 + batch)
    expressed = torch.rand(batch, n_genes, generator=g) < expressed_frac
    bins = torch.randint(1, ModelConfig.n_bins + 1, (batch, n_genes), generator=g)
    return F.pad(torch.where(expressed, bins, 0), (0, 1)).to(device)


def print_profile(label, fn):
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync()
    sort_by = 'self_device_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    print(f'\nprofile: {label}\n' + prof.key_averages().table(sort_by=sort_by, row_limit=15))


def measure(fn, flops, cells, mem_needed):
    """One run: its times, throughput, FLOP/s and peak memory (MFU is filled in at the end, once the peak is final)."""
    gc.collect()
    reset_peak_memory()
    times = timed(fn)
    median = statistics.median(times)
    return {'time_s': spread(times), 'cells_per_s': cells / median, 'latency_ms_per_cell': spread(times, 1e3 / cells),
            'flops_per_s': flops * cells / median, 'mfu': None,
            'peak_mem_mb': peak_memory_mb(), 'mem_estimate_mb': mem_needed / 2**20}


# scBERT 2.0's cells: real ones from `dataset`, or synthetic ones, as CSR (indptr, indices, values)
n_sample = max(batch_list + [train_batch_size])
if dataset:
    cells_data = Dataset(dataset)
    sample = np.sort(np.random.default_rng(seed).choice(cells_data.n_cells, min(n_sample, cells_data.n_cells), replace=False))
    sample = np.resize(sample, n_sample)                     # a small dataset repeats cells for the biggest batch
    cells_csr, cells_genes, log_base = cells_data.rows(sample), cells_data.n_genes, cells_data.log_base
    cells_source = f'{n_sample} cells of {dataset} (median {int(np.median(np.diff(cells_csr[0])))} expressed genes of {cells_genes})'
else:
    rng = np.random.default_rng(seed)
    n_expr = max(1, int(expressed_frac * n_genes))
    ind = np.concatenate([np.sort(rng.choice(n_genes, n_expr, replace=False)) for _ in range(n_sample)]).astype(np.int32)
    cells_csr = (np.arange(n_sample + 1, dtype=np.int64) * n_expr, ind, rng.exponential(1.5, len(ind)).astype(np.float32) + 0.1)
    cells_genes, log_base = n_genes, 2.0
    cells_source = f'{n_sample} synthetic cells, {n_expr} expressed genes of {n_genes} each'


def expressed_cells(mc, batch):
    """The first `batch` sampled cells as scBERT 2.0's input (evaluation's fixed gene subsets) and their token counts."""
    indptr, indices, values = cells_csr
    indptr = indptr[:batch + 1]
    x = expressed_batch(indptr, indices[:indptr[-1]], values[:indptr[-1]], cell_seeds(indptr, indices, seed), mc, log_base)
    return {k: v.to(device) for k, v in x.items()}, 1 + (x['genes'] >= 0).sum(1).numpy()


results = []
for name in variant_names:
    expressed = VARIANTS[name].get('input_genes') == 'expressed'
    base = dict(n_genes=n_genes, n_embd=n_embd, n_layer=n_layer, n_head=n_head, dim_head=dim_head, head='scbert')
    if expressed:                   # its own architecture; the panel is the cells'
        base = dict(n_genes=cells_genes)
    mc = ModelConfig(**{**base, 'n_classes': n_classes, 'seed': seed, **VARIANTS[name]})
    lengths = expressed_cells(mc, n_sample)[1] if expressed else None
    flops = forward_flops_per_cell(mc, lengths)
    fwd = sum(flops.values())
    torch.manual_seed(seed)
    raw_model = ScBERT(mc).to(device)
    n_params = raw_model.num_params()
    model = torch.compile(raw_model) if compile else raw_model
    row = {'variant': name, 'attention': mc.attention, 'params': n_params, 'params_active': raw_model.num_active_params(),
           'params_active_no_embeddings': raw_model.num_active_params(embeddings=False),
           'cells': cells_source if expressed else f'synthetic, {expressed_frac:.0%} of {n_genes} genes expressed',
           'tokens_per_cell': float(np.mean(lengths)) if expressed else mc.seq_len,
           'flops_per_cell': {'forward': fwd, 'train': 3 * fwd, 'by_module': flops}, 'model_config': asdict(mc),
           'sdpa_backend': sdpa_backend(mc, batch_list[0]) if mc.attention == 'sdpa' else None,
           'inference': [], 'train': None, 'notes': []}
    print(f"\n{name}: {n_params / 1e6:.2f}M parameters ({row['params_active'] / 1e6:.2f}M active per token), "
          f"{row['tokens_per_cell']:.0f} tokens and {fwd / 1e9:.3f} GFLOP per cell forward; {row['cells']}; "
          f"(>= {fwd / peak * 1e3:.1f} ms per cell at peak){', SDPA ' + row['sdpa_backend'] if row['sdpa_backend'] else ''}")
    jobs = [('inference', b) for b in batch_list] + ([('train', train_batch_size)] if train else [])
    for kind, batch in jobs:
        x, batch_lengths = expressed_cells(mc, batch) if expressed else (synthetic_tokens(batch), [mc.seq_len] * batch)
        needed = memory_estimate(mc, n_params, batch, kind == 'train', row['sdpa_backend'], max(batch_lengths))
        run_fwd = sum(forward_flops_per_cell(mc, batch_lengths).values())   # these cells' FLOPs per cell
        if needed > mem_limit:
            note = (f"{kind} at batch {batch} skipped: needs ~{needed / 2**30:.1f} GB"
                    f"{' (L² scores: SDPA uses its math kernel)' if row['sdpa_backend'] == 'MATH' else ''}, "
                    f"{mem_limit / 2**30:.3g} GB available")
            row['notes'].append(note)
            print(f'  {note}')
            result = {'batch_size': batch, 'skipped': note}
        else:
            tokens = x
            if kind == 'inference':
                raw_model.eval()

                @torch.no_grad()
                def step():
                    with autocast:
                        model(tokens)
            else:
                raw_model.train()
                optim = raw_model.configure_optimizer('adamw', lr=1e-4, weight_decay=0.01)
                labels = torch.randint(0, n_classes, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)

                def step():
                    with autocast:
                        _, loss = model(tokens, labels)
                        aux, _ = raw_model.aux_losses()                     # MoE load balancing, as train.py
                    (loss + 0.01 * aux).backward()
                    optim.step()
                    optim.zero_grad(set_to_none=True)
            run_flops = run_fwd * (3 if kind == 'train' else 1)
            result = {'batch_size': batch, 'flops_per_cell': run_flops, **measure(step, run_flops, batch, needed)}
            print(f"  {kind} batch {batch}: {result['cells_per_s']:.3g} cells/s, "
                  f"{result['latency_ms_per_cell']['median']:.1f} ms per cell, {result['flops_per_s'] / 1e9:.3g} GFLOP/s")
            if profile and name == variant_names[0] and (kind == 'train' or batch == batch_list[0]):
                print_profile(f'{name} {kind}, batch {batch}', step)
        if kind == 'train':
            row['train'] = result
        else:
            row['inference'].append(result)
    if expressed and mask_cost and not any('skipped' in r for r in row['inference']):
        # The same (B, 1 + T) shape twice: the real batch, whose padding needs a mask, and the batch with its padding
        # turned into real tokens (gene 0, value 0), which needs none. The difference is what the mask costs.
        x, _ = expressed_cells(mc, batch_list[-1])
        x = {k: F.pad(v, (0, 1), value=-1 if k == 'genes' else 0) for k, v in x.items()}   # at least one padding column
        padded, full = x, dict(x, genes=x['genes'].clamp(min=0))
        L = 1 + x['genes'].shape[1]
        q = torch.zeros(len(x['genes']), mc.n_head, L, mc.dim_head, device=device, dtype=ptdtype)
        mask = torch.ones(len(q), 1, 1, L, dtype=torch.bool, device=device)
        raw_model.eval()
        cost = {'batch_size': batch_list[-1], 'tokens': L, 'padding_share': float((x['genes'] < 0).float().mean())}
        for label, inputs, kernel_mask in (('masked', padded, mask), ('unmasked', full, None)):
            @torch.no_grad()
            def step():
                with autocast:
                    model(inputs)
            cost[f'{label}_s'] = statistics.median(timed(step))
            cost[f'{label}_kernel'] = SDPBackend(torch._fused_sdp_choice(q, q, q, kernel_mask)).name
        cost['ratio'] = cost['masked_s'] / cost['unmasked_s']
        row['mask_cost'] = cost
        print(f"  padding mask: {cost['masked_s'] * 1e3:.1f} ms with it ({cost['masked_kernel']}) vs "
              f"{cost['unmasked_s'] * 1e3:.1f} ms without ({cost['unmasked_kernel']}) at batch {cost['batch_size']} x "
              f"{L} tokens ({cost['padding_share']:.0%} padding): x{cost['ratio']:.2f}")
    results.append(row)
    model = raw_model = step = optim = tokens = None   # free the weights, the AdamW state and the cells
    gc.collect()
    if device_type == 'cuda':
        torch.cuda.empty_cache()

# -----------------------------------------------------------------------------
# MFU, the table, and the JSON

if peak_samples:
    peak_samples.append(matmul_peak(peak_n))
    peak = max(peak_samples)
for row in results:
    for r in row['inference'] + [row['train'] or {}]:
        if 'flops_per_s' in r:
            r['mfu'] = r['flops_per_s'] / peak

machine['load_avg_end'] = os.getloadavg()
print('\n| variant | run | batch | cells/s | ms per cell (min-max) | GFLOP per cell | GFLOP/s | MFU | peak MB |')
print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
for row in results:
    runs = [('inference', r) for r in row['inference']] + ([('train', row['train'])] if row['train'] else [])
    for kind, r in runs:
        gflop = r.get('flops_per_cell', row['flops_per_cell']['train' if kind == 'train' else 'forward']) / 1e9
        if 'skipped' in r:
            print(f"| {row['variant']} | {kind} | {r['batch_size']} | skipped: too big for memory | | {gflop:.3g} | | | |")
            continue
        lat = r['latency_ms_per_cell']
        print(f"| {row['variant']} | {kind} | {r['batch_size']} | {r['cells_per_s']:.3g} | {lat['median']:.3g} "
              f"({lat['min']:.3g}-{lat['max']:.3g}) | {gflop:.3g} | {r['flops_per_s'] / 1e9:.3g} | {r['mfu']:.1%} | "
              f"{r['peak_mem_mb']:.0f} |")
print(f"\npeak {peak / 1e9:.1f} GFLOP/s: {peak_source}. Memory: {mem_kind}. "
      f"Load average {machine['load_avg_start'][0]:.2f} at start, {machine['load_avg_end'][0]:.2f} at end.")
for row in results:
    for note in row['notes']:
        print(f"note: {row['variant']}: {note}")

if out:
    report = {'settings': config, 'machine': machine, 'peak_flops': peak, 'peak_flops_source': peak_source,
              'peak_flops_samples': peak_samples, 'memory_kind': mem_kind, 'variants': results}
    with atomic_write(out) as tmp:
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=1)
    print(f'wrote {out}')
