"""Shared test helpers and session-scoped fixtures.

Scripts run in this process (run_script: runpy, argv patched, output captured), so no test pays a torch import per
command; only what needs its own processes runs as one (run_process: DDP under torchrun). The models that several
test modules use are trained once per session (baron, scbert_model, scbert_pretrained, scbert2_model): read them, or
copy them into tmp_path before writing next to them.

Helpers (import them: `from conftest import run_script, user_error, ...`):
    run_script(script, *args, cwd=None, check=True)   a script of the repo (or an absolute path) in-process
    run_distill(*args, check=True)                    distill.py, in-process
    run_process(argv, cwd=None, check=True)           any command, in a real process (OMP_NUM_THREADS=1)
    torchrun(script, *args, nproc=2, check=True)      a script under torch.distributed.run, --standalone
    user_error(result, pattern)                       one 'error:' line matching pattern, no traceback, exit != 0
    state(path)                                       torch.load(path, weights_only=True)
    dense, lognorm_reference, write_h5ad              numpy references and a tiny .h5ad writer (data.py tests)
    small(**kw)                                       a 10-gene annotated scBERT 2.0 model in eval mode
"""
import contextlib
import io
import math
import os
import random
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared' / 'data'
FIXTURES = SHARED / 'fixtures'
# the repo root holds the modules under test (model.py, data.py, ...), as in nanoGPT: no package to install
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


# ------------------------------------------------------------------------------------------------ running scripts
def _failed(what, result):
    return AssertionError(f'{what} failed (exit {result.returncode}):\n'
                          f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')


def run_script(script, *args, cwd=None, check=True):
    """Run <repo>/<script> (or an absolute path) as `python script args...` would, but in this process: runpy with
    run_name='__main__', sys.argv patched, stdout/stderr captured. SystemExit gives the exit code (a message, as
    data.UserError carries, goes to stderr with code 1); any other exception propagates: a traceback is a test
    failure. The working directory, torch's thread count, flush-denormal and TF32 modes, the RNGs, os.environ and
    the warning filters are restored afterwards. Returns .returncode, .stdout, .stderr like subprocess.CompletedProcess;
    with check=True a non-zero exit fails the test."""
    path = str(ROOT / script)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    code = 0
    try:
        sys.argv = [path, *map(str, args)]
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name='__main__')
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if 'matplotlib.pyplot' in sys.modules:          # the scripts' figures, which a process would free on exit
            sys.modules['matplotlib.pyplot'].close('all')
    result = SimpleNamespace(args=[script, *map(str, args)], returncode=code, stdout=out.getvalue(),
                             stderr=err.getvalue())
    if check and code != 0:
        raise _failed(script, result)
    return result


def run_process(argv, cwd=None, check=True, timeout=600):
    """A command in its own process (one thread per process, as CI runs), output captured."""
    result = subprocess.run([str(a) for a in argv], cwd=cwd or ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise _failed(' '.join(map(str, argv[:3])), result)
    return result


def torchrun(script, *args, nproc=2, check=True):
    """DDP needs real processes: `torchrun --standalone --nproc_per_node=nproc script args...`."""
    return run_process([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                        ROOT / script, *args], check=check)


def run_distill(*args, check=True):
    """distill.py, in-process."""
    return run_script('distill.py', *args, check=check)


def user_error(result, pattern):
    """A bad input: non-zero exit, one 'error:' line matching pattern (a regex), no traceback."""
    assert result.returncode != 0, (result.returncode, result.stdout[-2000:])
    assert 'Traceback' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


def state(path):
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------------ numpy references
def dense(h5, matrix, chunk=4096):
    """Densify a matrix through iter_rows -> float32 [n_obs, n_vars]."""
    blocks = []
    for start, indptr, indices, values in h5.iter_rows(matrix, chunk):
        block = np.zeros((len(indptr) - 1, len(h5.var_names(matrix))), np.float32)
        block[np.repeat(np.arange(len(block)), np.diff(indptr)), indices] = values
        blocks.append(block)
    return np.concatenate(blocks)


def lognorm_reference(counts, log_base=2.0):
    """normalize each cell to 1e4 counts over all its genes, then log1p in log_base (float64)."""
    counts = counts.astype(np.float64)
    total = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.where(total > 0, total, 1) * 1e4) / math.log(log_base)


def write_h5ad(path, X, genes, obs=None):
    """A small anndata-0.8-style .h5ad: dense X, obs/var dataframes with _index, categorical obs columns."""
    text = h5py.string_dtype('utf-8')
    with h5py.File(path, 'w') as f:
        f.attrs.update({'encoding-type': 'anndata', 'encoding-version': '0.1.0'})
        f.create_dataset('X', data=X).attrs.update({'encoding-type': 'array', 'encoding-version': '0.2.0'})
        for name, index, columns in [('obs', [f'cell{i}' for i in range(len(X))], obs or {}), ('var', genes, {})]:
            frame = f.create_group(name)
            frame.attrs.update({'_index': '_index', 'encoding-type': 'dataframe', 'encoding-version': '0.2.0'})
            frame.attrs.create('column-order', list(columns), dtype=text)
            frame.create_dataset('_index', data=np.array(index, dtype=object), dtype=text)
            for key, values in columns.items():
                categories = sorted(set(values))
                column = frame.create_group(key)
                column.attrs.update({'encoding-type': 'categorical', 'encoding-version': '0.2.0', 'ordered': False})
                column['codes'] = np.array([categories.index(v) for v in values], dtype=np.int8)
                column.create_dataset('categories', data=np.array(categories, dtype=object), dtype=text)


# ------------------------------------------------------------------------------------------------ a small model
# ten genes: three on chr1, three on chr2, one unknown, two on chr3, one more on chr1 at its far end
CHROM = torch.tensor([1, 1, 1, 2, 2, 0, 3, 3, 1, 2])
START = torch.tensor([100., 5_000., 2e6, 10., 1e8, -1., 3., 4., 2.4e8, 7.])
# gene -> gene sets (CSR): gene 0 in sets 0 and 1, gene 1 in set 1, gene 3 in sets 2 and 3, gene 4 in set 4, ...
PTR = torch.tensor([0, 2, 3, 3, 5, 6, 6, 7, 7, 7, 7])
IDX = torch.tensor([0, 1, 1, 2, 3, 4, 0])


def small(**kw):
    """A 10-gene scBERT 2.0 (expressed input, sdpa, 3 blocks) with the gene annotation above, in eval mode."""
    from model import ModelConfig, ScBERT
    args = dict(n_genes=10, n_embd=32, n_layer=3, n_head=4, dim_head=8, attention='sdpa', input_genes='expressed',
                value_emb='continuous', n_classes=3, head='pooled', norm='rmsnorm', mlp='swiglu', bias=False)
    args.update(kw)
    torch.manual_seed(0)
    model = ScBERT(ModelConfig(**args))
    model.set_gene_annotation(CHROM, START, PTR, IDX)
    return model.eval()


# ------------------------------------------------------------------------------------------------ shared fixtures
# model settings of the shared trained models, reused by the tests that train their own variants
TINY = ['--n_embd=16', '--n_layer=1', '--n_head=2', '--dim_head=8', '--head_hidden=16', '--num_threads=1',
        '--batch_size=8']
V2_SMALL = ['--n_embd=16', '--n_head=4', '--dim_head=4', '--head_hidden=16', '--num_threads=1', '--batch_size=8',
            '--baseline=False']
V2 = ['--input_genes=expressed', '--attention=sdpa', '--head=pooled', '--n_kv_head=2', '--norm=rmsnorm',
      '--mlp=swiglu', '--n_expert=4', '--n_expert_active=2', '--value_emb=continuous', '--n_bins=7']


@pytest.fixture(scope='session')
def baron(tmp_path_factory):
    """78 real Baron cells x 385 genes, prepared (counts -> log2 CPM-style values, 5 stratified folds), with their
    two donors as batches (mouse1 32 cells, mouse2 46). Read-only: copy it before annotating."""
    if not FIXTURES.exists():
        pytest.skip('shared data not available')
    out = tmp_path_factory.mktemp('data') / 'baron'
    run_script('prepare_data.py', f'--input={FIXTURES / "counts_csr.h5ad"}', f'--out_dir={out}',
               '--label_key=cell_type', '--batch_key=donor', '--min_genes=10')
    return out


@pytest.fixture(scope='session')
def scbert_model(baron, tmp_path_factory):
    """A tiny scBERT (performer, 1 block of width 16) fine-tuned on baron for 60 steps, with the logistic-regression
    baseline: (out_dir, train.py's result). out_dir holds ckpt.pt, best.pt, metrics.json and the plots."""
    out = tmp_path_factory.mktemp('scbert') / 'out'
    result = run_script('train.py', f'--dataset={baron}', f'--out_dir={out}', *TINY, '--max_iters=60',
                        '--eval_interval=20', '--learning_rate=3e-3', '--warmup_iters=5', '--log_interval=5')
    return out, result


@pytest.fixture(scope='session')
def scbert_pretrained(baron, tmp_path_factory):
    """The same tiny scBERT pretrained (masked modelling) on baron for 60 steps: (out_dir, train.py's result)."""
    out = tmp_path_factory.mktemp('scbert_pretrained') / 'out'
    result = run_script('train.py', '--mode=pretrain', f'--dataset={baron}', f'--out_dir={out}', *TINY,
                        '--max_iters=60', '--eval_interval=59', '--learning_rate=3e-3', '--warmup_iters=5')
    return out, result


@pytest.fixture(scope='session')
def scbert2_model(baron, tmp_path_factory):
    """A small scBERT 2.0 (2 blocks, GQA, SwiGLU top-2 MoE, continuous values) fine-tuned on baron for 40 steps:
    the path of its best.pt (the teacher of the distillation tests, the source of the quantization tests)."""
    out = tmp_path_factory.mktemp('scbert2') / 'out'
    run_script('train.py', f'--dataset={baron}', f'--out_dir={out}', *V2_SMALL, *V2, '--n_layer=2', '--max_iters=40',
               '--eval_interval=20', '--learning_rate=3e-3', '--warmup_iters=2')
    return out / 'best.pt'

