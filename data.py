"""
Single-cell data for nanoscBERT: reading .h5ad files with h5py, the normalization/vocab alignment shared by
prepare_data.py and predict.py, the prepared dataset format, model_input (the one way cells become a model's input),
scBERT's tokens and MLM masking, gene annotations, and preparing datasets (prepare_dataset, annotate_dataset,
prepare_default_dataset: what prepare_data.py runs, and what train.py and bench.py call for the default dataset).

A prepared dataset is a directory (written by prepare_data.py) holding
    data.h5    indptr int64 [n_cells+1], indices int32 [nnz] (vocab positions, ascending per cell), values float32 [nnz]
               (log_b(1 + counts/total*1e4), all > 0), labels int64, folds int8, batch int64, cell_ids str  [n_cells]
    vocab.txt  one gene symbol per line, in vocab order
    meta.json  counts, label/batch names, settings and sources
torch is imported only inside the functions that need it, so that prepare_data.py starts fast.
"""
import errno
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import h5py
import numpy as np
from tqdm import tqdm


class UserError(SystemExit):
    """A mistake in the user's input: exits non-zero with one line, no traceback."""
    def __init__(self, msg): super().__init__(f"error: {msg}")


@contextmanager
def atomic_write(path):
    """Yield a temporary path next to `path` ('<path>.tmp-<pid>'). The caller writes a file or creates a directory
    there; on success it replaces `path`, on any failure (UserError included) it is removed: nothing half-written.
    A failed write (a full disk, a read-only folder) is a UserError that says why and how much space is left."""
    path = os.path.normpath(path)  # a trailing '/' would put the temporary path inside the target
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):  # os.replace can't overwrite a non-empty directory
            old = f'{path}.old-{os.getpid()}'
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(write_failure(path, e)) from None
        raise


def write_failure(path, error, needed=0):
    """Why `path` could not be written, in words, with the free space of its disk (and what it needed) and the fix."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f'; {shutil.disk_usage(folder).free / 2**20:,.0f} MiB free on its disk'
    except OSError:
        free = ''
    free += f', about {needed / 2**20:,.1f} MiB needed' if needed else ''
    reason = {errno.ENOSPC: 'the disk is full', errno.EROFS: 'the file system is read-only',
              errno.EACCES: 'permission denied', errno.EDQUOT: 'the disk quota is exceeded'}.get(
        error.errno, error.strerror or str(error))
    return f'cannot write {path}: {reason}{free}; free some space, or choose another output folder'


def check_writable(folder, setting='out_dir'):
    """Fail early, before any work, if files cannot be written in `folder` (or, when it does not exist yet, in the
    nearest folder above it, where it would be made): a probe file is written and removed. Nothing is created."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise UserError(f'--{setting}={folder}: {existing} is a file, not a folder; choose another --{setting}')
        existing = os.path.dirname(existing)
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.write-probe-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = write_failure(os.path.join(existing, '<file>'), e).split(': ', 1)[1].split(';')[0]
        raise UserError(f'cannot write in {existing} ({reason}), where --{setting}={folder} goes; choose a writable '
                        f'--{setting}') from None


def remove_stale_temporaries(folder):
    """Remove atomic_write's temporaries ('<name>.tmp-<pid>') that processes no longer running left in folder (a
    kill -9 during a write). Returns their names."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = re.fullmatch(r'.+\.(tmp|old)-(\d+)', name)
        if not match or pid_alive(int(match[2])):
            continue
        target = os.path.join(folder, name)
        shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
        removed.append(name)
    return removed


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # someone else's process: alive
        return True
    return True


def load_checkpoint(path, setting='ckpt'):
    """A checkpoint file: our dict or an original scBERT state dict, read with weights_only=True (tensors and plain
    types only: nothing is unpickled). A missing or unreadable file, or one that holds Python objects (which
    unpickling could run as code), is a UserError naming the setting to fix."""
    import torch
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} not found (check --{setting})')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if re.search(r'Unsupported global|not an allowed global', str(e)):   # a pickled object, not corruption
            raise UserError(f"checkpoint {path} holds Python objects besides tensors, and is refused for safety "
                            f"(unpickling them could run code). If you trust its source, load it once with "
                            f"torch.load(path, weights_only=False) and torch.save its state dict (tensors, numbers, "
                            f"strings) to a new file for --{setting}") from None
        raise UserError(f'cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not a PyTorch '
                        f'checkpoint') from None


def read_gene_list(path):
    """Genes of a vocab file, one symbol per line (line i = vocab index i) -> list[str]."""
    if not os.path.isfile(path):
        raise UserError(f"gene list {path} not found (set --vocab=<file with one gene symbol per line>)")
    with open(path) as f:
        genes = [line.strip() for line in f.read().splitlines()]
    if not any(genes):
        raise UserError(f"gene list {path} is empty (it needs one gene symbol per line)")
    return genes


# ----------------------------------------------------------------------------------------------------------------
# .h5ad reading with h5py. anndata >= 0.7 writes 'encoding-type' attributes (dataframe, categorical, csr_matrix, ...);
# the legacy pre-0.7 layout has structured 'obs'/'var' datasets, 'raw.X'/'raw.var' and uns/<col>_categories.

def as_objects(values):
    """1-D array from h5py (bytes, str or numbers) -> np object array of str, None where missing (NaN)."""
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    if values.dtype.kind == 'f':
        out[np.isnan(values)] = None
    return out


def categorical(codes, categories):
    """pandas categorical (codes, -1 = missing) -> np object array of str / None."""
    return np.append(as_objects(categories), None)[codes]  # code -1 picks the appended None


class H5AD:
    """A lazy .h5ad reader on h5py. Matrices are named 'X', 'raw' or 'layers/<name>'."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise UserError(f"{path} is not a file (set --input=<an existing .h5ad file>)")
        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an HDF5 file (an .h5ad file written by anndata is expected)")
        try:
            self.path, self.file = path, h5py.File(path, 'r')
            if 'obs' not in self.file or 'var' not in self.file or not self.matrices():
                raise UserError(f"{path} is HDF5 but not AnnData (no obs/var/X); write it with anndata's "
                                f"adata.write_h5ad()")
            self.n_obs = len(self.obs_names)
            self.n_vars = len(self.var_names())
        except (OSError, KeyError, ValueError, TypeError) as e:   # truncated file, missing _index, odd encodings
            raise UserError(f"{path} is not a readable AnnData file ({type(e).__name__}: {e}); "
                            f"write it again with anndata's adata.write_h5ad()") from None

    def matrices(self):
        found = ['X'] if 'X' in self.file else []
        found += ['raw'] if 'raw/X' in self.file or 'raw.X' in self.file else []
        return found + [f'layers/{name}' for name in self.file.get('layers', {})]

    def _matrix(self, matrix):
        return self.file['raw/X' if 'raw/X' in self.file else 'raw.X'] if matrix == 'raw' else self.file[matrix]

    def _frame(self, which, matrix='X'):  # the obs or var dataframe node; raw has its own var
        if matrix == 'raw' and which == 'var':
            return self.file['raw/var' if 'raw/var' in self.file else 'raw.var']
        return self.file[which]

    def _index(self, frame):  # legacy frames are structured arrays with an 'index' field
        legacy = isinstance(frame, h5py.Dataset)
        return as_objects(frame.fields('index')[:] if legacy else frame[frame.attrs['_index']][:]).astype(str)

    def _keys(self, frame):
        if isinstance(frame, h5py.Dataset):
            return [name for name in frame.dtype.names if name != 'index']
        if 'column-order' in frame.attrs:
            return [str(k) for k in np.atleast_1d(frame.attrs['column-order'])]
        return [k for k in frame if k not in (frame.attrs.get('_index'), '__categories')]

    def _column(self, frame, key, which, setting):
        if key not in self._keys(frame):
            raise UserError(f"{setting} '{key}' not in {which} of {self.path}; available: "
                            f"{', '.join(self._keys(frame)) or '(none)'} (set --{setting}=...)")
        if isinstance(frame, h5py.Dataset):  # legacy: categorical columns hold codes, categories live in uns
            values = frame.fields(key)[:]
            categories = self.file.get(f'uns/{key}_categories')
            return as_objects(values) if categories is None else categorical(values, categories[:])
        node = frame[key]
        if isinstance(node, h5py.Group):
            if node.attrs.get('encoding-type') == 'categorical':
                return categorical(node['codes'][:], node['categories'][:])
            out = as_objects(node['values'][:])  # nullable-integer/-boolean/-string-array: mask True = missing
            out[node['mask'][:].astype(bool)] = None
            return out
        if 'categories' in node.attrs:  # anndata 0.7: codes, with an object reference to __categories/<key>
            return categorical(node[:], self.file[node.attrs['categories']][:])
        return as_objects(node[:])

    @property
    def obs_names(self):
        return self._index(self.file['obs'])

    def obs_keys(self):
        return self._keys(self.file['obs'])

    def obs_column(self, key, setting='label_key'):
        """-> np object array of str, None = missing. UserError naming `setting` and listing the keys if absent."""
        return self._column(self.file['obs'], key, 'obs', setting)

    def var_names(self, matrix='X'):
        return self._index(self._frame('var', matrix))

    def var_keys(self, matrix='X'):
        return self._keys(self._frame('var', matrix))

    def var_column(self, key, matrix='X', setting='gene_key'):
        return self._column(self._frame('var', matrix), key, 'raw.var' if matrix == 'raw' else 'var', setting)

    def sample(self, matrix, n=1 << 20):
        """Up to ~n stored values of a matrix (its first cells) -> float32, to tell counts from log-normalized data."""
        node = self._matrix(matrix)
        if isinstance(node, h5py.Dataset):
            return node[:max(1, n // max(1, node.shape[1]))].astype(np.float32).ravel()
        return node['data'][:n].astype(np.float32)

    def iter_rows(self, matrix, chunk=4096):
        """Yield (row_start, indptr int64 [rows+1] from 0, indices int32 [nnz], values float32 [nnz]): CSR chunks of
        up to `chunk` cells, from dense, CSR or CSC storage. Dense and CSR are read chunk by chunk (memory bounded);
        CSC is converted to CSR in memory (its rows are scattered over the whole file)."""
        node = self._matrix(matrix)
        if isinstance(node, h5py.Dataset):  # dense [n_obs, n_vars]: cap a chunk at 16M elements (64 MB)
            n_rows = node.shape[0]
            if n_rows != self.n_obs:
                raise UserError(f"{self.path}: {matrix} has {n_rows} rows for {self.n_obs} cells in obs; write it "
                                f"again with anndata's adata.write_h5ad()")
            step = max(1, min(chunk, (1 << 24) // max(1, node.shape[1])))
            for start in range(0, n_rows, step):
                block = node[start:start + step].astype(np.float32)
                rows, cols = np.nonzero(block)
                indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(block)))])
                yield start, indptr, cols.astype(np.int32), block[rows, cols]
            return
        fmt = node.attrs.get('encoding-type', node.attrs.get('h5sparse_format', ''))
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        n_obs = self.n_obs
        ptr_all = self.check_sparse(node, matrix, fmt.startswith('csc'))
        if fmt.startswith('csc'):  # CSR = CSC sorted by row (stable: columns stay ascending within a row)
            col_ptr, rows = ptr_all, node['indices'][:]
            self.check_indices(rows, matrix, 'row', self.n_obs)
            order = np.argsort(rows, kind='stable')
            cols = np.repeat(np.arange(len(col_ptr) - 1, dtype=np.int32), np.diff(col_ptr))[order]
            data = node['data'][:][order]
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_obs))])
            for start in range(0, n_obs, chunk):
                a, b = indptr[start], indptr[min(start + chunk, n_obs)]
                yield start, indptr[start:start + chunk + 1] - a, cols[a:b], data[a:b].astype(np.float32)
            return
        n_vars = len(self.var_names(matrix))
        for start in range(0, len(ptr_all) - 1, chunk):
            ptr = ptr_all[start:start + chunk + 1]
            a, b = ptr[0], ptr[-1]
            cols = self.check_indices(node['indices'][a:b], matrix, 'column', n_vars)
            yield start, ptr - a, cols.astype(np.int32), node['data'][a:b].astype(np.float32)

    def check_sparse(self, node, matrix, csc=False):
        """The indptr of a CSR (or CSC) matrix, int64, after checking its structure against obs and var: one entry per
        cell (gene) + 1, from 0, never decreasing, ending at the number of stored values. UserError otherwise: such a
        file would be read wrongly or fail deep inside numpy."""
        n_lines = len(self.var_names(matrix)) if csc else self.n_obs
        what = f"{'genes in var' if csc else 'cells in obs'}"
        indptr = node['indptr'][:].astype(np.int64)
        n_indices, n_data = node['indices'].shape[0], node['data'].shape[0]
        problems = [len(indptr) != n_lines + 1 and f"indptr has {len(indptr)} entries for {n_lines} {what} (needs "
                    f"{n_lines + 1})",
                    n_indices != n_data and f"{n_indices} indices for {n_data} values",
                    len(indptr) and indptr[0] != 0 and f"indptr starts at {indptr[0]}, not 0",
                    len(indptr) and (np.diff(indptr) < 0).any() and "indptr decreases",
                    len(indptr) and indptr[-1] != n_data
                    and f"indptr ends at {indptr[-1]}, with {n_data} values stored"]
        self.check_problem(next((p for p in problems if p), None), matrix, csc)
        return indptr

    def check_indices(self, indices, matrix, what, n):
        """indices (of a CSR chunk: columns; of a CSC matrix: rows) -> themselves, after checking they are in 0..n-1."""
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            bad = indices.max() if indices.max() >= n else indices.min()
            self.check_problem(f"a {what} index is {bad}, outside 0..{n - 1}", matrix, what == 'row')
        return indices

    def check_problem(self, problem, matrix, csc):
        if problem:
            raise UserError(f"{self.path}: {matrix} is a damaged {'CSC' if csc else 'CSR'} matrix ({problem}); "
                            f"write it again with anndata's adata.write_h5ad()")


read_h5ad = H5AD


# ----------------------------------------------------------------------------------------------------------------
# Processing shared by prepare_data.py and predict.py: choose the matrix, normalize, align genes to a vocab.

def matrix_kind(values):
    """Sampled values -> 'scaled' (negative values), 'counts' or 'lognorm' (non-negative, not integers, <= 14).
    log1p of per-cell normalized data stays below ln(1 + 1e6) = 13.8 even for CPM, so larger non-integer values are
    counts (e.g. ambient-corrected) or unlogged normalized values: normalizing those to 1e4 again is right."""
    values = values[np.isfinite(values)]  # NaN/Inf are reported while streaming, with the cells they are in
    if (values < 0).any():
        return 'scaled'
    is_log = values.size and not np.array_equal(values, np.round(values)) and values.max() <= 14
    return 'lognorm' if is_log else 'counts'


def choose_matrix(h5, layer='auto'):
    """-> (matrix, kind). 'auto' prefers counts in X, then raw, then layers/counts; else log-normalized values."""
    present = h5.matrices()
    if layer == 'auto':
        kinds = {m: matrix_kind(h5.sample(m)) for m in ('X', 'raw', 'layers/counts') if m in present}
        for want in ('counts', 'lognorm'):
            for m, kind in kinds.items():
                if kind == want:
                    return m, kind
        raise UserError(f"{h5.path} holds negative numbers in {negatives(h5, kinds)}: scaled values, not counts? "
                        f"Save the raw counts in .raw or layers['counts'], or set --layer=<matrix with counts> "
                        f"(present: {', '.join(present)}); if only a few entries are negative, fix those values")
    matrix = layer if layer in ('X', 'raw') or layer.startswith('layers/') else f'layers/{layer}'
    if matrix not in present:
        raise UserError(f"layer '{layer}' not in {h5.path}; available: {', '.join(present)} "
                        f"(set --layer=auto|X|raw|<layer name>)")
    kind = matrix_kind(h5.sample(matrix))
    if kind == 'scaled':
        others = ', '.join(m for m in present if m != matrix) or 'none'
        raise UserError(f"{matrix} of {h5.path} holds negative values ({negatives(h5, [matrix])}: scaled data, not "
                        f"counts?); set --layer=<matrix with counts> (other matrices: {others}) or --layer=auto, or "
                        f"fix those values if only a few are negative")
    return matrix, kind


def negatives(h5, matrices):
    """'X: 3 of 100,000 sampled values negative (min -1.2), raw: ...' for the matrices' samples."""
    parts = []
    for m in matrices:
        values = h5.sample(m)
        values = values[np.isfinite(values)]
        parts.append(f'{m}: {int((values < 0).sum()):,} of {values.size:,} sampled values negative (min '
                     f'{values.min():.3g})')
    return '; '.join(parts)


def gene_symbols(h5, matrix, gene_key=''):
    """Gene symbols of a matrix's columns: the var index, or var[gene_key] -> np object array (None = missing)."""
    return h5.var_column(gene_key, matrix) if gene_key else h5.var_names(matrix).astype(object)


class Chunk(NamedTuple):
    row_start: int            # first cell of the chunk in the file
    indptr: np.ndarray        # int64 [rows+1], from 0
    indices: np.ndarray       # int32 [nnz], vocab positions, ascending within a cell
    values: np.ndarray        # float32 [nnz], log_b(1 + counts/total*1e4), > 0
    n_expressed: np.ndarray   # int64 [rows], expressed genes over ALL the cell's genes (before alignment)
    passed_qc: np.ndarray     # bool [rows], n_expressed >= min_genes


@dataclass
class ProcessedH5AD:
    """An .h5ad file set up by process_h5ad, aligned to a vocab. Iterating yields Chunks covering every cell."""
    path: str
    h5: H5AD
    matrix: str               # 'X' | 'raw' | 'layers/<name>'
    kind: str                 # 'counts' | 'lognorm'
    n_cells: int
    genes: np.ndarray         # object [n_genes_in], symbol of each column (None = missing)
    vocab: list               # list[str]
    col_to_vocab: np.ndarray  # int64 [n_genes_in], vocab position of each column, -1 = dropped
    n_matched: int            # vocab genes found in the data
    n_data_genes: int         # distinct symbols in the data
    n_duplicated: int         # columns whose symbol repeats an earlier one
    cell_ids: np.ndarray      # str [n_cells]
    labels: np.ndarray        # object [n_cells] str/None, or None without label_key
    batch: np.ndarray         # object [n_cells] str/None, or None without batch_key
    log_base: float
    min_genes: int
    chunk: int
    progress: bool

    def summary(self):
        what = {'counts': 'counts', 'lognorm': 'log-normalized values (as they are, assumed ln(1+x) and converted to '
                f'log base {self.log_base:g})'}[self.kind]
        merged = ('summed into one gene each (' if self.kind == 'counts'
                  else 'dropped, the first column of each kept (log values cannot be summed; ')
        seen, repeated = set(), []
        for g in self.genes.tolist():
            if g and g in seen and g not in repeated:
                repeated.append(g)
            seen.add(g)
        dup = f"; {self.n_duplicated} duplicated gene symbols {merged}e.g. {', '.join(repeated[:3])})"
        return (f"{self.path}: {self.n_cells} cells x {len(self.genes)} genes, using {what} from {self.matrix}; "
                f"genes: matched {self.n_matched} / vocab {len(self.vocab)} / data {self.n_data_genes}"
                f"{dup if self.n_duplicated else ''}")

    def __iter__(self):
        # a closed bar (also on errors) keeps the one-line error message on its own line
        with tqdm(total=self.n_cells, unit='cells', desc=os.path.basename(self.path), disable=not self.progress) as bar:
            for start, indptr, cols, vals in self.h5.iter_rows(self.matrix, self.chunk):
                bar.update(len(indptr) - 1)
                yield self.process_chunk(start, indptr, cols, vals)

    def process_chunk(self, start, indptr, cols, vals):
        """One CSR chunk of the file (columns = its genes, raw values) -> Chunk, normalized and aligned to the vocab."""
        n, n_vocab = len(indptr) - 1, len(self.vocab)
        where = f"{self.matrix} of {self.path} (cells {start}..{start + n - 1})"
        if not np.isfinite(vals).all():
            raise UserError(f"NaN or Inf values in {where}; fix or remove those cells before preparing")
        if (vals < 0).any():
            raise UserError(f"{int((vals < 0).sum()):,} negative values in {where} (min {vals.min():.3g}): counts or "
                            f"log-normalized values expected, not scaled data (set --layer= to a matrix of counts; "
                            f"present: {', '.join(self.h5.matrices())}), or fix those values")
        rows = np.repeat(np.arange(n), np.diff(indptr))
        nonzero = vals > 0  # sparse files may store explicit zeros
        rows, cols, vals = rows[nonzero], cols[nonzero], vals[nonzero].astype(np.float64)
        n_expressed = np.bincount(rows, minlength=n)
        if self.kind == 'counts':  # normalize over ALL the cell's genes, before the alignment drops any
            vals = vals / np.bincount(rows, weights=vals, minlength=n)[rows] * 1e4
        genes = self.col_to_vocab[cols]
        mapped = genes >= 0
        key = rows[mapped] * n_vocab + genes[mapped]  # (cell, vocab position) as one sortable int64
        order = np.argsort(key, kind='stable')
        key, vals = key[order], vals[mapped][order]
        if key.size:  # duplicated symbols share a key: counts are summed (log-normalized: only the first is mapped)
            first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            vals, key = np.add.reduceat(vals, first), key[first]
        vals = (np.log1p(vals) if self.kind == 'counts' else vals) / math.log(self.log_base)  # lognorm: ln -> log_base
        out_ptr = np.concatenate([[0], np.cumsum(np.bincount(key // n_vocab, minlength=n))])
        return Chunk(start, out_ptr, (key % n_vocab).astype(np.int32), vals.astype(np.float32),
                     n_expressed, n_expressed >= self.min_genes)


def process_h5ad(path, layer='auto', gene_key='', log_base=2.0, vocab=None, min_genes=0, label_key='', batch_key='',
                 chunk=4096, progress=True):
    """Open an .h5ad file and set up its processing, exactly as prepare_data.py does it -> ProcessedH5AD.

    Reads only metadata now (cell ids, labels, batch, gene symbols, a sample of the matrix); raises UserError for
    bad input (not a file/HDF5/AnnData, missing label_key/batch_key/gene_key, scaled data, zero gene overlap).
    vocab: list[str], or None = the data's own genes (first occurrence order, duplicates merged).
    Iterating the result streams the matrix and yields, for EVERY cell in file order, Chunk(row_start, indptr int64
    [rows+1], indices int32 [nnz] into vocab, values float32 [nnz] = log_{log_base}(1 + counts/total*1e4),
    n_expressed int64 [rows], passed_qc bool [rows] = n_expressed >= min_genes); cells are never dropped here.
    NaN/Inf or negative values raise UserError while streaming. .summary() is a one-line report."""
    h5 = read_h5ad(path)
    matrix, kind = choose_matrix(h5, layer)
    genes = gene_symbols(h5, matrix, gene_key)
    first = {}  # symbol -> first column (missing symbols match nothing)
    for col, g in enumerate(genes.tolist()):
        if g:
            first.setdefault(g, col)
    vocab = list(first) if vocab is None else list(vocab)
    position = {}  # symbol -> first vocab index (blank lines of a vocab file match nothing)
    for i, g in enumerate(vocab):
        if g:
            position.setdefault(g, i)
    col_to_vocab = np.array([position.get(g, -1) for g in genes.tolist()], dtype=np.int64)
    if kind == 'lognorm':  # log values can't be summed: keep the first column of a duplicated symbol
        col_to_vocab[[col for col, g in enumerate(genes.tolist()) if first.get(g, col) != col]] = -1
    n_matched = len(set(vocab) & set(first))
    if n_matched == 0:
        raise UserError(f"no gene overlap between {path} (genes like {', '.join(list(first)[:3])}) and the vocab "
                        f"(genes like {', '.join(vocab[:3])}); set --gene_key=<var column of symbols> (var columns: "
                        f"{', '.join(h5.var_keys(matrix)) or 'none'}) or another --vocab")
    return ProcessedH5AD(
        path=path, h5=h5, matrix=matrix, kind=kind, n_cells=h5.n_obs, genes=genes, vocab=vocab,
        col_to_vocab=col_to_vocab, n_matched=n_matched, n_data_genes=len(first),
        n_duplicated=sum(1 for g in genes.tolist() if g) - len(first),
        cell_ids=h5.obs_names, labels=h5.obs_column(label_key, 'label_key') if label_key else None,
        batch=h5.obs_column(batch_key, 'batch_key') if batch_key else None,
        log_base=log_base, min_genes=min_genes, chunk=chunk, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# The prepared dataset

def take_rows(indptr, indices, values, idx):
    """CSR rows idx (any order, repeats allowed) -> (indptr int64 [len(idx)+1], indices, values), in idx's order."""
    idx = np.asarray(idx, dtype=np.int64)
    starts, lengths = indptr[idx], indptr[idx + 1] - indptr[idx]
    out_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # position j of output row r comes from starts[r] + (j - out_ptr[r])
    src = np.repeat(starts - out_ptr[:-1], lengths) + np.arange(out_ptr[-1])
    return out_ptr, indices[src], values[src]


def available_memory():
    """Bytes of memory available to this process (Linux: MemAvailable; elsewhere the physical memory)."""
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration):
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


class Dataset:
    """A prepared dataset directory (see the module docstring), read lazily."""

    def __init__(self, path, preload=True):
        """preload: hold the expression (indices, values) in memory when it fits in half the available memory;
        otherwise, or with preload=False, each rows() call reads its cells from data.h5 (streaming)."""
        self.path = path
        fix = f"create it with: python prepare_data.py --input=<file.h5ad> --out_dir={path}"
        files = [os.path.join(path, f) for f in ('meta.json', 'data.h5', 'vocab.txt')]
        if not all(os.path.isfile(f) for f in files):
            raise UserError(f"{path} is not a prepared dataset (needs meta.json, data.h5, vocab.txt); {fix}")
        try:
            with open(files[0]) as f:
                self.meta = json.load(f)
            with h5py.File(files[1], 'r') as f:
                self.indptr = f['indptr'][:]
                self.labels, self.folds, self.batch = f['labels'][:], f['folds'][:], f['batch'][:]
                self.cell_ids = f['cell_ids'].asstr()[:].astype(str)
                nbytes = int(self.indptr[-1]) * 8                           # int32 index + float32 value
                in_memory = preload and nbytes < 0.5 * available_memory()
                self.indices = f['indices'][:] if in_memory else None
                self.values = f['values'][:] if in_memory else None
                self.preloaded = bool(in_memory)
            self.vocab = read_gene_list(files[2])
            if (len(self.vocab), len(self.labels)) != (self.meta['n_genes'], self.meta['n_cells']):
                raise ValueError(f"{len(self.vocab)} genes x {len(self.labels)} cells, meta.json says "
                                 f"{self.meta['n_genes']} x {self.meta['n_cells']}")
            self.n_cells, self.n_genes = self.meta['n_cells'], self.meta['n_genes']
            self.log_base, self.label_names = self.meta['log_base'], self.meta['label_names']
            self.n_folds = int(self.meta['n_folds'])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}); re-{fix}") from None

    def rows(self, idx):
        """CSR (indptr int64 [len(idx)+1], indices int32, values float32) of cells idx, in idx's order."""
        if self.indices is not None:
            return take_rows(self.indptr, self.indices, self.values, idx)
        # from disk: read each run of consecutive cells (sorted, unique) in one slice, then reorder in memory
        idx = np.asarray(idx, dtype=np.int64)
        cells = np.unique(idx)
        if cells.size == 0:
            return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        runs = np.split(cells, np.flatnonzero(np.diff(cells) != 1) + 1)
        with h5py.File(os.path.join(self.path, 'data.h5'), 'r') as f:
            parts = [(f['indices'][self.indptr[r[0]]:self.indptr[r[-1] + 1]],
                      f['values'][self.indptr[r[0]]:self.indptr[r[-1] + 1]]) for r in runs]
        local_ptr = np.concatenate([[0], np.cumsum(self.indptr[cells + 1] - self.indptr[cells])])
        return take_rows(local_ptr, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                         np.searchsorted(cells, idx))

    def dense(self, idx):
        """-> np.float32 [len(idx), n_genes]"""
        return to_dense(*self.rows(idx), self.n_genes)

    def annotation(self):
        """The genes' annotation.h5 (see read_annotation, under "gene annotations" below), read once and cached."""
        if getattr(self, '_annotation', None) is None:
            self._annotation = read_annotation(self.path, self.n_genes)
        return self._annotation


def fold_split(data, k, test_batch='', labelled_only=False):
    """-> (train_idx, val_idx, test_idx) of a prepared Dataset for test fold k (split_indices), or, with test_batch,
    test = that batch's labelled cells (e.g. a donor) and train/validation = the other batches' cells of those folds.
    labelled_only: leave out every cell whose label is -1 (with leave_out_type: the held-out type)."""
    train_idx, val_idx, test_idx = split_indices(data.folds, k, data.n_folds)
    if test_batch:
        names = data.meta.get('batch_names') or []
        if test_batch not in names:
            raise UserError(f"test_batch '{test_batch}' is not a batch of {data.path} (its batches: "
                            f"{', '.join(names) or 'none; prepare it with --batch_key=<obs column>'})")
        held_out = data.batch == names.index(test_batch)
        train_idx = np.sort(np.concatenate([train_idx, test_idx]))
        train_idx, val_idx, test_idx = (train_idx[~held_out[train_idx]], val_idx[~held_out[val_idx]],
                                        np.flatnonzero(held_out & (data.labels >= 0)))
    if labelled_only:
        train_idx, val_idx, test_idx = (i[data.labels[i] >= 0] for i in (train_idx, val_idx, test_idx))
    return train_idx, val_idx, test_idx


def leave_out_type(labels, label_names, held_out):
    """Leave-one-cell-type-out: -> (labels, label_names, novel_idx). The held-out type's cells (novel_idx) get label
    -1, as unlabelled cells have, and the classes after it move down one, so the classifier never has a slot for it."""
    c = list(label_names).index(held_out)
    labels = np.asarray(labels)
    return (np.where(labels == c, -1, labels - (labels > c)), [*label_names[:c], *label_names[c + 1:]],
            np.flatnonzero(labels == c))


def to_dense(indptr, indices, values, n_genes):
    """CSR cells -> np.float32 (n_cells, n_genes)."""
    out = np.zeros((len(indptr) - 1, n_genes), dtype=np.float32)
    out[np.repeat(np.arange(len(out)), np.diff(indptr)), indices] = values
    return out


def model_input(csr, cfg, log_base, seeds=None, mask_prob=0.0, replace_prob=0.9, masking='nonzero', units=None,
                weights=(1.0, 1.0, 1.0)):
    """Cells -> the model's input: the one place every script turns cells into what a ModelConfig cfg reads.

    csr = (indptr, indices, values) of log-normalized cells over the model's genes. Returns
      scBERT (cfg.input_genes == 'all'):  tokens (B, n_genes + 1), the whole panel binned (scbert_tokens);
      scBERT 2.0 ('expressed'):          expressed_batch's dict of (B, T) tensors: CLS is added by the model.
    seeds: one per cell. Expressed input: they pick each cell's max_genes subset (None = cell_seeds: a fixed subset
    per cell, as evaluation and predict.py use). Panel input: they seed the masks (None = cell_seeds).
    mask_prob > 0: masked for pretraining (see mask_panel / mask_expressed) -> (input, targets), targets being the
    masked bins (-100 elsewhere), or for expressed input {'bins': ..., 'values': ...}."""
    import torch
    indptr, indices, values = csr
    if seeds is None:
        seeds = cell_seeds(indptr, indices, cfg.seed)
    if cfg.input_genes == 'expressed':
        x = expressed_batch(indptr, indices, values, seeds, cfg, log_base, mask_prob, replace_prob, masking, units,
                            weights)
        if mask_prob > 0:
            return x, {'bins': x.pop('target_bins'), 'values': x.pop('target_values')}
        return x
    tokens = scbert_tokens(torch.from_numpy(to_dense(indptr, indices, values, cfg.n_genes)), log_base, cfg.n_bins)
    if mask_prob > 0:
        return mask_panel(tokens, seeds, cfg.mask_id, mask_prob, replace_prob, masking, units, weights)
    return tokens


def dataset_input(data, idx, cfg):
    """model_input of cells idx of a prepared Dataset, unmasked, as training.py evaluates them."""
    return model_input(data.rows(idx), cfg, data.log_base)


def split_indices(folds, fold, n_folds):
    """-> (train_idx, val_idx, test_idx): test = fold `fold`, val = the next fold, train = the rest; fold -1 in none."""
    if not 0 <= fold < n_folds:
        raise UserError(f"fold {fold} is out of range: the dataset has folds 0..{n_folds - 1} (set --fold=...)")
    val_fold = (fold + 1) % n_folds
    train = np.flatnonzero((folds >= 0) & (folds != fold) & (folds != val_fold))
    return train, np.flatnonzero(folds == val_fold), np.flatnonzero(folds == fold)


# ----------------------------------------------------------------------------------------------------------------
# scBERT's tokens and masking (TencentAILabHealthcare/scBERT: preprocess.py, finetune.py, pretrain.py)

def expression_to_bins(values, log_base, n_bins):
    """values = log_b(1 + x) (x = counts per 1e4) -> int64 bins min(floor(log2(1 + x)), n_bins), same shape and type
    (np or torch). scBERT stored log2 values and truncated them with .long(); here log2(1 + x) = values * log2(b)."""
    scaled = values * math.log2(log_base)  # exact for base 2 (times 1.0)
    if isinstance(values, np.ndarray):
        return np.minimum(np.floor(scaled), n_bins).astype(np.int64)
    return scaled.floor().clamp(max=n_bins).long()


def scbert_tokens(dense_values, log_base, n_bins):
    """dense_values float [B, n_genes] -> LongTensor [B, n_genes + 1]: bins with a 0 token appended, as scBERT does
    (finetune.py's SCDataset appends it; its gene2vec row is zero)."""
    import torch
    bins = expression_to_bins(dense_values, log_base, n_bins)
    return torch.cat([bins, bins.new_zeros(len(bins), 1)], dim=1)


def mask_tokens(tokens, mask_prob=0.15, replace_prob=0.9, mask_id=6, generator=None):
    """scBERT's MLM masking (pretrain.py data_mask, get_mask_subset_with_prob), vectorised over cells.
    tokens LongTensor [B, L] -> (masked_tokens [B, L], labels [B, L]). Per cell, exactly ceil(mask_prob * n) of its
    n candidates (tokens != 0 and != mask_id: zeros are never masked) are chosen uniformly at random; each chosen one
    becomes mask_id with probability replace_prob (else stays). labels: the original token where chosen, else -100."""
    import torch
    candidates = (tokens != 0) & (tokens != mask_id)
    # computed like the original: a long count times a python float gives float32, then ceil
    n_mask = (candidates.sum(dim=1, keepdim=True) * mask_prob).ceil().long()  # [B, 1]
    # rank candidates by random keys; non-candidates get -1 so they rank last (only n_mask <= n are taken)
    keys = torch.rand(tokens.shape, generator=generator, device=tokens.device).masked_fill(~candidates, -1.0)
    order = keys.argsort(dim=1, descending=True)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, order[b, j]] = j
    chosen = rank < n_mask
    replace = chosen & (torch.rand(tokens.shape, generator=generator, device=tokens.device) < replace_prob)
    return tokens.masked_fill(replace, mask_id), tokens.masked_fill(~chosen, -100)


# ----------------------------------------------------------------------------------------------------------------
# Masking strategies for pretraining (the masking= setting), for scBERT's panel tokens (mask_panel) and for scBERT 2.0's
# expressed-gene input (mask_expressed). Per cell, choose_masked picks the tokens to predict from the cell's own random
# stream; each chosen token is then replaced by the mask token with probability replace_prob (scBERT's rule: the rest
# stay visible but are still predicted), and the targets are -100 elsewhere. The "non-zero" tokens are the expressed
# genes: for scBERT's panel a non-zero bin (as scBERT), for the expressed input a value > 0 (not the n_zero_genes).
#   random      ceil(mask_prob × n) of all n tokens of the cell, zeros included (BERT's rule, every token a candidate)
#   nonzero     ceil(mask_prob × n) of its n non-zero tokens, zeros never (scBERT's; on the panel exactly mask_tokens)
#   dynamic     nonzero, at a rate that falls as the model's masked accuracy grows (dynamic_mask_rate); a fresh mask
#               every step, as RoBERTa's dynamic masking (Liu et al. 2019)
#   pathway     whole gene sets: every non-zero token of each chosen set (mask_by_units)
#   multiscale  single genes, gene sets and chromosome regions, mixed (mask_by_units), as ERNIE masks words,
#               phrases and entities (Sun et al. 2019) and SpanBERT contiguous spans (Joshi et al. 2020)
# pathway and multiscale read the dataset's gene annotation (Dataset.annotation), indexed once per run by gene_units.

MASKING = ('random', 'nonzero', 'pathway', 'dynamic', 'multiscale')


def n_to_mask(mask_prob, n):
    """ceil(mask_prob * n), blind to float round-off (0.07 * 100 is 7.000000000000001 in float64: 7 are masked)."""
    return min(n, math.ceil(mask_prob * n - 1e-9))


def parse_multiscale_weights(text):
    """'1,1,1' -> (single gene, pathway, region) weights, floats; UserError unless three numbers >= 0, sum > 0."""
    try:
        weights = tuple(float(v) for v in str(text).split(','))
    except ValueError:
        weights = ()
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"multiscale_weights must be three numbers >= 0 with a positive sum (single genes, pathways, "
                        f"regions), like '1,1,1', not '{text}' (set --multiscale_weights=...)")
    return weights


def dynamic_mask_rate(acc, lo=0.1, hi=0.3):
    """Dynamic masking's rate: clip(hi - (hi - lo) * acc, lo, hi), acc being the exponential moving average of the
    training steps' masked-bin accuracy (training.py: 0 at the start, so the first rate is hi). While the model cannot
    fill in masked bins, many masked genes give it many targets per cell; as it learns to, fewer masked genes leave it
    more of each cell to read them from, nearer the unmasked cells it will later classify. A masking rate that decays
    from high to low helped BERT-style pretraining (Yang et al. 2023, "masking ratio decay"; Wettig et al. 2023 found
    rates above 15% as good or better); here it follows the accuracy instead of the step."""
    return float(min(hi, max(lo, hi - (hi - lo) * acc)))


class GeneUnits(NamedTuple):
    """A gene annotation indexed for masking (gene_units): gene sets both ways, and the genes in genomic order."""
    n_genes: int
    gene_ptr: np.ndarray      # int64 [n_genes + 1] CSR: gene i's sets are gene_sets[gene_ptr[i]:gene_ptr[i + 1]]
    gene_sets: np.ndarray     # int64 [links]
    set_ptr: np.ndarray       # int64 [n_sets + 1] CSR: set s's genes are set_genes[set_ptr[s]:set_ptr[s + 1]]
    set_genes: np.ndarray     # int64 [links], ascending within a set
    order: np.ndarray         # int64 [n_placed] the genes with known coordinates by chromosome code, start, vocab index
    rank: np.ndarray          # int64 [n_genes] place of each gene in order, -1 = unknown coordinates
    region_end: np.ndarray    # int64 [n_placed] the region that starts at order[r] is order[r:region_end[r]]

    @property
    def n_sets(self):
        return len(self.set_ptr) - 1


def gene_units(annotation, n_genes, region_genes=16):
    """Dataset.annotation()'s dict (chrom, start, pathway_ptr, pathway_idx, pathway_names) -> GeneUnits, built once
    per run so that masking a batch does no indexing. A region is region_genes consecutive vocab genes in genomic
    order from its start gene on, fewer where its chromosome ends first."""
    chrom, start = np.asarray(annotation['chrom'], np.int64), np.asarray(annotation['start'], np.int64)
    gene_ptr = np.asarray(annotation['pathway_ptr'], np.int64)
    gene_sets = np.asarray(annotation['pathway_idx'], np.int64)
    n_sets = len(annotation['pathway_names'])
    if len(chrom) != n_genes or len(gene_ptr) != n_genes + 1:
        raise UserError(f"the gene annotation covers {len(chrom)} genes, the dataset {n_genes}: annotate it again "
                        f"({ANNOTATION_FIX.format('<dataset>')})")
    owner = np.repeat(np.arange(n_genes, dtype=np.int64), np.diff(gene_ptr))     # the gene of each (gene, set) link
    by_set = np.lexsort((owner, gene_sets))
    set_ptr = np.concatenate([[0], np.cumsum(np.bincount(gene_sets, minlength=n_sets))]).astype(np.int64)
    placed = np.flatnonzero((chrom > 0) & (start >= 0))
    order = placed[np.lexsort((placed, start[placed], chrom[placed]))]
    rank = np.full(n_genes, -1, np.int64)
    rank[order] = np.arange(len(order))
    chrom_end = np.searchsorted(chrom[order], chrom[order], side='right')          # where each one's chromosome ends
    region_end = np.minimum(np.arange(len(order)) + max(1, region_genes), chrom_end)
    return GeneUnits(n_genes, gene_ptr, gene_sets, set_ptr, owner[by_set], order, rank, region_end)


def masking_units(dataset, masking, region_genes=16):
    """What a masking strategy needs from a prepared Dataset: None (random, nonzero, dynamic), or its gene annotation
    indexed by gene_units (pathway, multiscale). dataset None (no pretraining) only checks the strategy's name.
    UserError for an unknown strategy, a dataset without annotation.h5, or pathway masking where no gene is in a set."""
    if masking not in MASKING:
        raise UserError(f"masking must be one of {', '.join(MASKING)}, not '{masking}' (set --masking=...)")
    if dataset is None or masking not in ('pathway', 'multiscale'):
        return None
    if not os.path.isfile(os.path.join(dataset.path, 'annotation.h5')):
        raise UserError(f"masking={masking} needs the genes' gene sets and coordinates, and {dataset.path} has no "
                        f"annotation.h5: {ANNOTATION_FIX.format(dataset.path)}")
    units = gene_units(dataset.annotation(), dataset.n_genes, region_genes)
    if masking == 'pathway' and not len(units.gene_sets):
        raise UserError(f"masking=pathway masks whole gene sets, and no gene of {dataset.path} is in one: annotate it "
                        f"with --gene_sets=<GMT files of this species' gene symbols>")
    return units


def gather_runs(values, starts, lengths):
    """values[starts[i]:starts[i] + lengths[i]] for every i, concatenated."""
    total = int(lengths.sum())
    return values[np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)]


class CellUnits:
    """One cell's state while mask_by_units masks it: its candidates (vocab genes), which are masked, the budget left
    and the units chosen; with gene sets, the sets holding a candidate, in a random ranking, and each one's new
    (not yet masked) candidates. Plain Python lists: a unit is a few list operations (numpy sets the cell up)."""

    def __init__(self, rng, genes, n_target, units, use_sets):
        self.n, self.genes = len(genes), np.asarray(genes, np.int64)
        self.masked, self.chosen, self.left = bytearray(self.n), [], n_target
        self.use_sets, self.next_set = use_sets, 0
        if use_sets:
            self.index_sets(rng, units)

    def index_sets(self, rng, units):
        """The cell's sets: (candidate, set) links by candidate, and each set's candidates."""
        genes = self.genes
        starts, lengths = units.gene_ptr[genes], units.gene_ptr[genes + 1] - units.gene_ptr[genes]
        link_set = gather_runs(units.gene_sets, starts, lengths)
        links_of_set = np.bincount(link_set, minlength=units.n_sets)
        self.sets = sets = np.flatnonzero(links_of_set)                 # the sets holding a candidate, by id
        local = np.zeros(units.n_sets, np.int64)
        local[sets] = np.arange(len(sets))
        link_set = local[link_set].astype(np.int16 if len(sets) < 1 << 15 else np.int32)   # -> indices into sets
        self.members = np.repeat(np.arange(self.n), lengths)[np.argsort(link_set, kind='stable')].tolist()  # radix
        self.member_ptr = np.concatenate([[0], np.cumsum(links_of_set[sets])]).tolist()
        self.link_ptr = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        self.count = links_of_set[sets].tolist()                        # the new genes of each set
        self.link_set = link_set.tolist()
        self.ranking = rng.permutation(len(sets)).tolist()

    def mask(self, c):
        self.masked[c] = 1
        if self.use_sets:
            count, link_set = self.count, self.link_set
            for t in link_set[self.link_ptr[c]:self.link_ptr[c + 1]]:
                count[t] -= 1

    def mask_set(self, t):
        new = [c for c in self.members[self.member_ptr[t]:self.member_ptr[t + 1]] if not self.masked[c]]
        for c in new:
            self.mask(c)
        self.left -= len(new)
        self.chosen.append(('pathway', int(self.sets[t])))

    def fitting_set(self):
        """The next set of the ranking that fits, or None."""
        ranking, count, left = self.ranking, self.count, self.left
        while self.next_set < len(ranking) and not 0 < count[ranking[self.next_set]] <= left:
            self.next_set += 1
        return ranking[self.next_set] if self.next_set < len(ranking) else None

    def result(self):
        return np.flatnonzero(np.frombuffer(self.masked, np.uint8)), self.chosen


def mask_by_units(rng, genes, n_target, units, masking='pathway', weights=(1.0, 1.0, 1.0)):
    """pathway and multiscale masking of one cell, whose candidates (its non-zero tokens) are the vocab genes `genes`
    -> (indices into genes, each once; the units masked, as (scale, id) pairs). A unit masks its candidates not
    masked yet (its new genes); genes in no unit are never masked. The gene sets holding a candidate are ranked at
    random, and a set fits when its new genes fit in the budget left (1 <= new <= n_target - masked). A set that does
    not fit never fits later (masking k genes takes k from the budget and at most k from a set's new genes), so
    walking the ranking once visits each set when it is its turn.

    pathway: walk the ranking, masking every set that fits (all of its new genes), until the budget is met. If it is
    not met, the set with the fewest new genes is masked too when that ends nearer the budget (new < 2 x the budget
    left; ties: the first ranked), and masking stops: no set bigger than about twice the budget is ever masked, and
    the count ends within one set of n_target. Units: ('pathway', set id).

    multiscale: until n_target genes are masked, a scale is drawn with probability proportional to weights (single
    gene, pathway, region) among those available now: a gene while any candidate is left, a pathway while a set in
    the ranking fits, a region while a candidate with known coordinates is left. Then a unit of it: a random
    candidate left, ('gene', its vocab gene); the next set of the ranking that fits, ('pathway', set id); or the
    region that starts at a random candidate left with known coordinates (the region_genes vocab genes from it on in
    genomic order, on its chromosome: gene_units), its new genes masked in genomic order up to the budget, ('region',
    its start gene). Single genes always fit: with weights[0] > 0 exactly n_target genes are masked.

    Each unit is plain Python over lists (CellUnits): exact, but about 10x nonzero's cost (README)."""
    use_sets = units.n_sets > 0 and (masking == 'pathway' or weights[1] > 0)
    cell = CellUnits(rng, genes, n_target, units, use_sets)
    if masking == 'pathway':
        return mask_pathways(cell)
    return mask_multiscale(cell, rng, units, weights)


def mask_pathways(cell):
    """mask_by_units' pathway masking of a CellUnits."""
    while cell.use_sets and cell.left > 0 and (t := cell.fitting_set()) is not None:
        cell.mask_set(t)
    if cell.use_sets and cell.left > 0 and cell.ranking:      # (no ranking: no candidate is in a set)
        new = np.array(cell.count)[cell.ranking]
        new[new <= 0] = cell.n + 1
        k = int(np.argmin(new))                               # the fewest new genes, first ranked
        if new[k] <= cell.n and new[k] < 2 * cell.left:
            cell.mask_set(cell.ranking[k])
    return cell.result()


def candidate_regions(cell, units, weights):
    """The candidates with known coordinates (none when regions weigh 0), and each one's region as (first, last):
    region of candidate c = by_rank[first[c]:last[c]], by_rank being the placed candidates in genomic order."""
    rank = units.rank[cell.genes]
    placed = np.flatnonzero(rank >= 0) if weights[2] > 0 else np.zeros(0, np.int64)
    if not len(placed):
        return placed, None, None, None
    by_rank = placed[np.argsort(rank[placed])]
    first, last = np.zeros(cell.n, np.int64), np.zeros(cell.n, np.int64)
    first[placed] = np.searchsorted(rank[by_rank], rank[placed])
    last[placed] = np.searchsorted(rank[by_rank], units.region_end[rank[placed]])
    return placed, first.tolist(), last.tolist(), by_rank.tolist()


def draw_scale(u, available):
    """The scale whose share of [0, sum(available)) holds u (the last available one if round-off overshoots)."""
    end, scale = 0.0, None
    for k, share in enumerate(available):
        end += share
        if share > 0 and (u < end or scale is None):
            scale = k
            if u < end:
                break
    return scale


def mask_multiscale(cell, rng, units, weights):
    """mask_by_units' multiscale masking of a CellUnits: genes, gene sets and regions, mixed."""
    n, gene_list, masked = cell.n, cell.genes.tolist(), cell.masked
    shuffled, next_gene = rng.permutation(n).tolist(), 0          # single genes: the candidates in random order
    placed, first, last, by_rank = candidate_regions(cell, units, weights)
    starts_left, next_start = rng.permutation(placed).tolist(), 0  # region starts, in random order
    draws = rng.random(cell.left).tolist()                        # one per unit at most: a unit masks >= 1 gene
    while cell.left > 0:
        while next_gene < n and masked[shuffled[next_gene]]:
            next_gene += 1
        while next_start < len(starts_left) and masked[starts_left[next_start]]:
            next_start += 1
        t = cell.fitting_set() if cell.use_sets else None
        available = (weights[0] * (next_gene < n), weights[1] * (t is not None),
                     weights[2] * (next_start < len(starts_left)))
        total = sum(available)
        if total <= 0:
            break
        scale = draw_scale(draws.pop() * total, available)
        if scale == 0:
            c = shuffled[next_gene]
            cell.mask(c)
            cell.left -= 1
            cell.chosen.append(('gene', gene_list[c]))
        elif scale == 1:
            cell.mask_set(t)
        else:
            c = starts_left[next_start]
            new = [r for r in by_rank[first[c]:last[c]] if not masked[r]][:cell.left]
            for r in new:
                cell.mask(r)
            cell.left -= len(new)
            cell.chosen.append(('region', gene_list[c]))
    return cell.result()


def choose_masked(rng, nonzero, mask_prob, masking='nonzero', genes=None, units=None, weights=(1.0, 1.0, 1.0)):
    """The tokens of one cell to mask -> (positions int64, each once; units). rng: the cell's np.random.Generator;
    nonzero: bool [L], its non-zero (expressed) tokens; genes: int [L], each token's vocab gene, and units, GeneUnits
    (pathway, multiscale); weights: multiscale's (single gene, pathway, region) weights.
    random: ceil(mask_prob * L) of the L tokens, uniformly; nonzero and dynamic (its rate is mask_prob):
    ceil(mask_prob * n) of the n non-zero tokens, uniformly; pathway, multiscale: mask_by_units with the budget
    ceil(mask_prob * n), whose units (('pathway', set id), ...) are returned too ([] for the others)."""
    if masking not in MASKING:
        raise UserError(f"masking must be one of {', '.join(MASKING)}, not '{masking}' (set --masking=...)")
    if masking == 'random':                                     # as expressed_batch always drew them
        n_mask = n_to_mask(mask_prob, len(nonzero))
        return (rng.choice(len(nonzero), n_mask, replace=False) if n_mask else np.zeros(0, np.int64)), []
    candidates = np.flatnonzero(nonzero)
    n_mask = n_to_mask(mask_prob, len(candidates))
    if masking in ('nonzero', 'dynamic'):
        return (candidates[rng.choice(len(candidates), n_mask, replace=False)] if n_mask else candidates[:0]), []
    if units is None:
        raise UserError(f"masking={masking} needs the dataset's gene annotation: {ANNOTATION_FIX.format('<dataset>')}")
    if not n_mask:
        return candidates[:0], []
    picked, chosen_units = mask_by_units(rng, np.asarray(genes, np.int64)[candidates], n_mask, units, masking, weights)
    return candidates[picked], chosen_units


def mask_panel(tokens, seeds, mask_id, mask_prob=0.15, replace_prob=0.9, masking='nonzero', units=None,
               weights=(1.0, 1.0, 1.0)):
    """scBERT's tokens LongTensor [B, n_genes + 1] (the appended last token is no gene: never masked) -> (masked
    tokens, labels: the token where chosen, else -100), cell i masked from seeds[i] (anything np.random.SeedSequence
    takes). nonzero and dynamic are scBERT's mask_tokens, bit for bit, with a torch generator seeded from the seed;
    the other strategies are choose_masked with np.random.default_rng(seed), a token's panel position being its
    vocab gene, each chosen token replaced by mask_id with probability replace_prob."""
    import torch
    if masking in ('nonzero', 'dynamic'):
        masked = []
        for s, row in zip(seeds, tokens):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(s).generate_state(1)[0]))
            masked.append(mask_tokens(row[None], mask_prob, replace_prob, mask_id=mask_id, generator=g))
        return tuple(torch.cat(t) for t in zip(*masked))
    bins = tokens.numpy()
    masked, labels = bins.copy(), np.full_like(bins, -100)
    genes = np.arange(bins.shape[1] - 1)
    for i, s in enumerate(seeds):
        rng, row = np.random.default_rng(s), bins[i, :-1]
        chosen, _ = choose_masked(rng, (row != 0) & (row != mask_id), mask_prob, masking, genes, units, weights)
        labels[i, chosen] = row[chosen]
        masked[i, chosen[rng.random(len(chosen)) < replace_prob]] = mask_id
    return torch.from_numpy(masked), torch.from_numpy(labels)


def mask_expressed(x, rngs, mask_id, mask_prob=0.15, replace_prob=0.9, masking='nonzero', units=None,
                   weights=(1.0, 1.0, 1.0)):
    """An expressed_batch dict (genes, values, bins: (B, T) CPU tensors or arrays; genes -1 = padding) masked for
    pretraining -> a new dict of tensors (x is not changed). Cell i is masked from rngs[i] (an np.random.Generator, or
    a seed for one): choose_masked over its real tokens, non-zero = value > 0 (its n_zero_genes are the zeros). A
    chosen token gets 'target_bins' = its bin (-100 elsewhere) and, with probability replace_prob, bin mask_id and
    value 0; 'target_values' holds every value before masking."""
    import torch
    genes, values, bins = (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                           for v in (x['genes'], x['values'], x['bins']))
    values, bins = values.copy(), bins.copy()
    target_bins, target_values = np.full(bins.shape, -100, np.int64), values.copy()
    for i, rng in enumerate(rngs):
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        n = int((genes[i] >= 0).sum())                              # padding comes last
        chosen, _ = choose_masked(rng, values[i, :n] > 0, mask_prob, masking, genes[i, :n], units, weights)
        target_bins[i, chosen] = bins[i, chosen]
        replaced = chosen[rng.random(len(chosen)) < replace_prob]
        bins[i, replaced], values[i, replaced] = mask_id, 0.0
    return {**x, 'values': torch.from_numpy(values), 'bins': torch.from_numpy(bins),
            'target_bins': torch.from_numpy(target_bins), 'target_values': torch.from_numpy(target_values)}


# ----------------------------------------------------------------------------------------------------------------
# scBERT 2.0's input: a CLS token (added by the model) and one (gene, value) token per expressed gene

def quantile_bins(indptr, values, n_bins):
    """Per-cell quantile bins of expressed values (scGPT, Cui et al. 2024): each cell's non-zero values are split at
    the n_bins - 1 inner quantiles of that cell's own non-zero values, so bin b in 1..n_bins holds about a 1/n_bins
    share of the cell's expressed genes whatever its sequencing depth; 0 stays 0 (prepared data stores no zeros; an
    explicitly stored zero would count in the edges). Vectorised over a CSR batch:
    indptr int64 [B+1], values float [nnz] -> int64 [nnz]. The edges are np.quantile's (linear interpolation) and a
    value goes above every edge it equals (np.digitize, right=False): bin = 1 + #(edges <= value)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.diff(indptr)
    row = np.repeat(np.arange(len(lengths)), lengths)
    order = np.lexsort((values, row))                          # sorted by cell, then value
    sorted_vals = values[order]
    q = np.arange(1, n_bins) / n_bins                          # (n_bins - 1,) inner quantile levels
    pos = q[None, :] * (np.maximum(lengths, 1) - 1)[:, None]   # (B, n_bins - 1) fractional positions within a cell
    lo, frac = np.floor(pos).astype(np.int64), pos - np.floor(pos)
    hi = np.minimum(lo + 1, np.maximum(lengths, 1)[:, None] - 1)
    start = indptr[:-1, None]

    def at(i):
        return sorted_vals[np.minimum(start + i, len(sorted_vals) - 1)]
    edges = at(lo) + frac * (at(hi) - at(lo))                  # (B, n_bins - 1)
    bins = 1 + (edges[row] <= values[:, None]).sum(1)
    return np.where(values > 0, bins, 0).astype(np.int64)


def value_bins(indptr, values, log_base, value_emb, n_bins):
    """The bin of each stored value (int64 [nnz]): per-cell quantiles for value_emb 'quantile', else scBERT's
    log2 bins (the 'continuous' embedding reads the values themselves; its bins are the MLM targets)."""
    if value_emb == 'quantile':
        return quantile_bins(indptr, values, n_bins)
    return expression_to_bins(values, log_base, n_bins)


def cell_seeds(indptr, indices, seed=0):
    """A seed per cell computed from its content (its expressed genes): evaluation and predict.py then pick the same
    genes of a cell whatever batch, file order or process it comes in."""
    return [[seed, zlib.crc32(indices[indptr[i]:indptr[i + 1]].astype(np.int32).tobytes())]
            for i in range(len(indptr) - 1)]


def expressed_batch(indptr, indices, values, seeds, cfg, log_base, mask_prob=0.0, replace_prob=0.9, masking='nonzero',
                    units=None, weights=(1.0, 1.0, 1.0)):
    """CSR cells -> the model's expressed-gene input, padded to the longest cell: dict of torch tensors (B, T)
    'genes' (vocab index, -1 = padding), 'values' (log-normalized), 'bins' (value bins; n_bins + 1 where masked).

    cfg (a ModelConfig) gives n_genes, n_bins, value_emb, max_genes, n_zero_genes and mask_id. seeds (one per cell:
    anything np.random.default_rng takes) choose, per cell, which max_genes expressed genes to keep when it has more
    (training passes fresh seeds per step; evaluation passes cell_seeds: a fixed subset), the n_zero_genes
    unexpressed genes to add (value 0, bin 0), and with mask_prob > 0 the masked tokens for pretraining, drawn by
    mask_expressed from the same per-cell stream: by default (masking='nonzero', scBERT's rule) ceil(mask_prob * n)
    of each cell's n expressed genes and never its zero genes; masking='random' takes them from all its tokens, zero
    genes too (this function's only rule before the masking strategies); pathway and multiscale need units
    (GeneUnits) and weights. Then 'target_bins' (-100 where not masked) and 'target_values' are added too.
    Bins are computed over all of a cell's expressed genes, before any are dropped."""
    import torch
    bins_all = value_bins(indptr, values, log_base, cfg.value_emb, cfg.n_bins)
    cells, rngs = [], [np.random.default_rng(s) for s in seeds]
    for i in range(len(indptr) - 1):
        rng = rngs[i]
        a, b = indptr[i], indptr[i + 1]
        genes, vals, bins = indices[a:b].astype(np.int64), values[a:b], bins_all[a:b]
        if cfg.max_genes and len(genes) > cfg.max_genes:
            keep = np.sort(rng.choice(len(genes), cfg.max_genes, replace=False))
            genes, vals, bins = genes[keep], vals[keep], bins[keep]
        if cfg.n_zero_genes:
            unexpressed = np.setdiff1d(np.arange(cfg.n_genes), indices[a:b], assume_unique=True)
            zeros = rng.choice(unexpressed, min(cfg.n_zero_genes, len(unexpressed)), replace=False)
            genes = np.concatenate([genes, zeros])
            vals = np.concatenate([vals, np.zeros(len(zeros), vals.dtype)])
            bins = np.concatenate([bins, np.zeros(len(zeros), bins.dtype)])
        cells.append((genes, vals, bins))
    T = max([len(c[0]) for c in cells] + [1])
    out = {'genes': np.full((len(cells), T), -1, np.int64), 'values': np.zeros((len(cells), T), np.float32),
           'bins': np.zeros((len(cells), T), np.int64)}
    for i, (genes, vals, bins) in enumerate(cells):
        n = len(genes)
        out['genes'][i, :n], out['values'][i, :n], out['bins'][i, :n] = genes, vals, bins
    out = {k: torch.from_numpy(v) for k, v in out.items()}
    if mask_prob > 0:          # each cell's stream goes on where its gene subset left it
        out = mask_expressed(out, rngs, cfg.mask_id, mask_prob, replace_prob, masking, units, weights)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Gene annotations: where each vocab gene lies on the genome (a GENCODE-style gene table) and which gene sets
# (pathways, GMT files) hold it. prepare_data.py writes them as annotation.h5 in a prepared dataset:
#     chrom          int16 [n_genes]     0 = unknown (not in the gene table), else 1..n_chrom
#     chrom_names    str [n_chrom]       chrom code c is chrom_names[c - 1]: chr1..chr22 in numeric order, chrX, chrY,
#                                        chrM, then any others sorted; only chromosomes some vocab gene is on
#     start, end     int64 [n_genes]     1-based coordinates as in the table, -1 = unknown
#     pathway_ptr    int64 [n_genes + 1] CSR: gene i's kept gene sets, ascending, are
#     pathway_idx    int32 [nnz]         pathway_idx[pathway_ptr[i]:pathway_ptr[i + 1]]
#     pathway_names  str [n_pathways]    in the order of the --gene_sets files, then of their lines
# and meta.json's 'annotation' entry (provenance and coverage). Without a gene table every gene is unknown; without
# gene sets there are no pathways: both parts are always present.

GENOME_COLUMNS = ('gene_id', 'gene_name', 'biotype', 'chromosome', 'start', 'end')
ANNOTATION_FIX = "run python prepare_data.py --annotate={} --genome=<gene table> --gene_sets=<a.gmt,b.gmt>"


class GeneTable(NamedTuple):
    """A gene table, one entry per row in file order."""
    gene_id: list       # str, e.g. 'ENSG00000141510.20'
    gene_name: list     # str symbol, e.g. 'TP53' ('' = none)
    biotype: list       # str, e.g. 'protein_coding'
    chromosome: list    # str, e.g. 'chr17'
    start: np.ndarray   # int64, 1-based
    end: np.ndarray     # int64, inclusive


def open_text(path):
    """A text file for reading, gzip-compressed (told by its first bytes, whatever its name) or plain."""
    import gzip
    with open(path, 'rb') as f:
        compressed = f.read(2) == b'\x1f\x8b'
    opener = gzip.open if compressed else open
    return opener(path, 'rt', encoding='utf-8-sig', newline='')  # utf-8-sig: a byte-order mark is not a column name


def file_sha256(path):
    """The sha256 hex digest of a file, read in 1 MB blocks."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_genome_table(path):
    """A gene table, .csv or .csv.gz, with (at least) the columns gene_id, gene_name, biotype, chromosome, start, end
    in any order -> GeneTable. csv + numpy: GENCODE's 78k human genes take about 0.2 s."""
    import csv
    fix = f"set --genome=<a .csv or .csv.gz gene table with columns {','.join(GENOME_COLUMNS)}>"
    if not os.path.isfile(path):
        raise UserError(f"gene table {path} not found ({fix})")
    try:
        with open_text(path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in GENOME_COLUMNS if c not in header]
            if missing:
                raise UserError(f"gene table {path} has no column {', '.join(missing)} (its header: "
                                f"{','.join(header)[:80] or 'none'}); {fix}")
            rows = [row for row in reader if row]  # blank lines are skipped
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:  # not gzip/utf-8 text, truncated
        raise UserError(f"cannot read gene table {path} ({type(e).__name__}: {e}); {fix}") from None
    if not rows:
        raise UserError(f"gene table {path} has a header but no genes; {fix}")
    wrong = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
    if wrong is not None:
        raise UserError(f"gene table {path}: row {wrong + 1} has {len(rows[wrong])} fields, the header "
                        f"{len(header)}; fix that row")
    columns = dict(zip(header, zip(*rows)))
    gene_id = [g.strip() for g in columns['gene_id']]
    coordinates = {}
    for key in ('start', 'end'):
        try:
            coordinates[key] = np.fromiter(map(int, columns[key]), np.int64, len(rows))
        except ValueError:
            def whole(v):
                try:
                    int(v)
                    return True
                except ValueError:
                    return False
            i = next(i for i, v in enumerate(columns[key]) if not whole(v))
            raise UserError(f"gene table {path}: {key} '{columns[key][i]}' of gene {gene_id[i]} (row {i + 1}) is not "
                            f"an integer; coordinates must be whole 1-based positions") from None
    blank = next((i for i, c in enumerate(columns['chromosome']) if not c.strip()), None)
    if blank is not None:
        raise UserError(f"gene table {path}: gene {gene_id[blank]} (row {blank + 1}) has no chromosome; fill it in or "
                        f"drop that row")
    bad = np.flatnonzero((coordinates['start'] < 1) | (coordinates['end'] < coordinates['start']))
    if bad.size:
        i = bad[0]
        raise UserError(f"gene table {path}: gene {gene_id[i]} (row {i + 1}) has start {coordinates['start'][i]}, end "
                        f"{coordinates['end'][i]}; coordinates must be 1-based with start <= end")
    return GeneTable(gene_id, [g.strip() for g in columns['gene_name']], [b.strip() for b in columns['biotype']],
                     [c.strip() for c in columns['chromosome']], coordinates['start'], coordinates['end'])


def read_gmt(path):
    """A GMT file (tab-separated lines: set name, description or URL, genes...) -> list of (name, genes list[str]),
    in file order; a gene listed twice in a set counts once, blank lines are skipped."""
    fix = "set --gene_sets=<a.gmt,b.gmt>: GMT files, comma-separated"
    if not os.path.isfile(path):
        raise UserError(f"gene set file {path} not found ({fix})")
    sets, line_of = [], {}
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip('\r\n').split('\t')
                if len(fields) < 2 or not fields[0].strip():
                    what = f"{len(fields)} tab-separated field" if len(fields) < 2 else "no set name"
                    raise UserError(f"gene set file {path} line {n} has {what}; a GMT line is name<TAB>description"
                                    f"<TAB>gene<TAB>gene...")
                name = fields[0].strip()
                if name in line_of:
                    raise UserError(f"gene set file {path} holds set '{name}' twice (lines {line_of[name]} and {n}); "
                                    f"set names must be unique within a file")
                line_of[name] = n
                sets.append((name, list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read gene set file {path} ({type(e).__name__}: {e}); {fix}") from None
    if not sets:
        raise UserError(f"gene set file {path} holds no gene sets ({fix})")
    return sets


def read_gene_sets(paths):
    """Several GMT files -> (list of (name, genes) in file order, number of sets per file). Every set is kept; a set
    name found in more than one file becomes '<file name without .gmt>:<name>' in each of them."""
    if len(set(paths)) < len(paths):
        raise UserError(f"--gene_sets lists a file twice ({','.join(paths)}); list each GMT file once")
    per_file = [read_gmt(p) for p in paths]
    files_of = {}
    for p, sets in zip(paths, per_file):
        for name, _ in sets:
            files_of.setdefault(name, []).append(p)
    out = []
    for p, sets in zip(paths, per_file):
        stem = os.path.basename(p).removesuffix('.gz').removesuffix('.gmt')
        out += [(f'{stem}:{name}' if len(files_of[name]) > 1 else name, genes) for name, genes in sets]
    seen = set()
    for name, _ in out:
        if name in seen:  # prefixed, and still the same: two files with the same name
            raise UserError(f"gene set '{name}' is in {' and '.join(files_of[name.partition(':')[2]])}, files of the "
                            f"same name; rename one of them")
        seen.add(name)
    return out, [len(sets) for sets in per_file]


def version_free(gene_id):
    """An Ensembl id without its version: ENSG00000223972.6 -> ENSG00000223972 (GENCODE's older
    ENSG00000182378.14_PAR_Y keeps its _PAR_Y: it is the chrY copy, a gene of its own)."""
    base, dot, version = gene_id.rpartition('.')
    par = '_PAR_Y' if version.endswith('_PAR_Y') else ''
    return base + par if dot and version.removesuffix(par).isdigit() else gene_id


def first_rows(keys, biotype):
    """{key: row} over the rows with a non-empty key. A key that several rows share (a symbol duplicated in the
    table, the chrX and chrY copies of a pseudoautosomal gene) gets its first protein_coding row, or else its first
    row, in file order: deterministic, and the coding gene is the one expression data measure."""
    chosen = {}
    for i, (key, kind) in enumerate(zip(keys, biotype)):
        if key:
            j = chosen.setdefault(key, i)
            if kind == 'protein_coding' and biotype[j] != 'protein_coding':
                chosen[key] = i
    return chosen


def chromosome_order(name):
    """Sort key: chr1..chr22 (numeric order), chrX, chrY, chrM (or chrMT), then other names sorted ('chr' optional)."""
    core = name[3:] if name.lower().startswith('chr') else name
    if core.isdigit():
        return 0, int(core), name
    if core.upper() in ('X', 'Y', 'M', 'MT'):
        return 1, 'XYM'.index(core.upper()[0]), name
    return 2, 0, name


def annotate_genes(vocab, table=None, gene_sets=(), min_set_genes=3, max_set_genes=500):
    """Annotate vocab genes (list[str]) from a GeneTable (or None) and gene sets (list of (name, genes)) ->
    (annotation: dict of annotation.h5's arrays, coverage: dict of counts).

    A vocab gene is found in the table by its Ensembl id (versions ignored on both sides), else by its exact
    gene_name, else by its gene_name ignoring case when only one of the table's names matches that way; duplicated
    ids or names take their first protein_coding row, else their first row (first_rows). A gene is in a gene set when
    the set lists its symbol (the table's gene_name for a gene found by id, else the vocab entry): each symbol a set
    lists stands for the vocab genes of exactly that symbol, or, when there are none, for those of the one vocab
    symbol equal to it ignoring case (none when several are). Only sets with min_set_genes to
    max_set_genes vocab genes (inclusive) are kept: one or two genes say nothing about a set, and near-universal ones
    (e.g. Reactome's 'Metabolism') say nothing about a gene."""
    n = len(vocab)
    row, how = np.full(n, -1, np.int64), np.zeros(n, np.int8)  # how: 0 unknown, 1 id, 2 symbol, 3 case-insensitive
    if table is not None:
        by_id = first_rows([version_free(g) for g in table.gene_id], table.biotype)
        by_name = first_rows(table.gene_name, table.biotype)
        folded = {}
        for name in by_name:
            folded.setdefault(name.lower(), []).append(name)
        for i, gene in enumerate(vocab):
            if not gene:
                continue
            if version_free(gene) in by_id:
                row[i], how[i] = by_id[version_free(gene)], 1
            elif gene in by_name:
                row[i], how[i] = by_name[gene], 2
            elif len(folded.get(gene.lower(), ())) == 1:
                row[i], how[i] = by_name[folded[gene.lower()][0]], 3
    found = np.flatnonzero(row >= 0)
    chromosomes = [table.chromosome[r] for r in row[found]] if table is not None else []
    chrom_names = sorted(set(chromosomes), key=chromosome_order)
    code = {c: k + 1 for k, c in enumerate(chrom_names)}
    chrom, start, end = np.zeros(n, np.int16), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if found.size:
        chrom[found] = [code[c] for c in chromosomes]
        start[found], end[found] = table.start[row[found]], table.end[row[found]]

    symbols = [table.gene_name[row[i]] if how[i] == 1 else gene for i, gene in enumerate(vocab)]
    exact, folded = {}, {}  # symbol -> its vocab genes; lower-case symbol -> the distinct symbols
    for i, s in enumerate(symbols):
        if s:
            exact.setdefault(s, []).append(i)
    for s in exact:
        folded.setdefault(s.lower(), []).append(s)
    members = {}  # a symbol a set lists -> the vocab genes it stands for
    for g in {g for _, genes in gene_sets for g in genes}:
        match = g if g in exact else folded[g.lower()][0] if len(folded.get(g.lower(), ())) == 1 else None
        members[g] = exact[match] if match else []
    gene_of, set_of, pathway_names = [], [], []
    for name, genes in gene_sets:
        in_vocab = sorted({i for g in genes for i in members[g]})
        if min_set_genes <= len(in_vocab) <= max_set_genes:
            gene_of += in_vocab
            set_of += [len(pathway_names)] * len(in_vocab)
            pathway_names.append(name)
    gene_of, set_of = np.array(gene_of, np.int64), np.array(set_of, np.int32)
    order = np.lexsort((set_of, gene_of))  # by gene, then set id
    pathway_ptr = np.concatenate([[0], np.cumsum(np.bincount(gene_of, minlength=n))]).astype(np.int64)
    annotation = {'chrom': chrom, 'chrom_names': chrom_names, 'start': start, 'end': end, 'pathway_ptr': pathway_ptr,
                  'pathway_idx': set_of[order], 'pathway_names': pathway_names}
    in_a_set = int((np.diff(pathway_ptr) > 0).sum())
    coverage = {'n_genes': n, 'by_id': int((how == 1).sum()), 'by_symbol': int((how == 2).sum()),
                'case_insensitive': int((how == 3).sum()), 'unknown': int((how == 0).sum()),
                'n_chrom': len(chrom_names), 'sets_read': len(gene_sets), 'sets_kept': len(pathway_names),
                'genes_in_a_set': in_a_set, 'mean_sets_per_gene': len(gene_of) / in_a_set if in_a_set else 0.0}
    return annotation, coverage


def write_annotation(path, annotation):
    """annotate_genes' arrays -> an annotation.h5 file at path."""
    text = h5py.string_dtype('utf-8')
    with h5py.File(path, 'w') as f:
        for key, dtype in (('chrom', np.int16), ('start', np.int64), ('end', np.int64), ('pathway_ptr', np.int64),
                           ('pathway_idx', np.int32)):
            f.create_dataset(key, data=np.asarray(annotation[key], dtype=dtype))
        for key in ('chrom_names', 'pathway_names'):
            f.create_dataset(key, shape=(len(annotation[key]),), dtype=text)
            if annotation[key]:
                f[key][:] = np.array(annotation[key], dtype=object)


def read_annotation(path, n_genes):
    """A prepared dataset's annotation.h5 -> dict: chrom, start, end, pathway_ptr, pathway_idx (np.int64 arrays),
    chrom_names, pathway_names (list[str]). UserError when it is missing or inconsistent."""
    file = os.path.join(path, 'annotation.h5')
    if not os.path.isfile(file):
        raise UserError(f"{path} has no gene annotation: {ANNOTATION_FIX.format(path)}")
    try:
        with h5py.File(file, 'r') as f:
            out = {k: f[k][:].astype(np.int64) for k in ('chrom', 'start', 'end', 'pathway_ptr', 'pathway_idx')}
            out.update({k: f[k].asstr()[:].tolist() for k in ('chrom_names', 'pathway_names')})
        ptr, idx = out['pathway_ptr'], out['pathway_idx']
        problems = [
            (len(out['chrom']), len(out['start']), len(out['end']), len(ptr)) != (n_genes,) * 3 + (n_genes + 1,)
            and f"arrays of {len(out['chrom'])} genes, the dataset has {n_genes}",
            not 0 <= out['chrom'].min(initial=0) <= out['chrom'].max(initial=0) <= len(out['chrom_names'])
            and "chrom codes out of range",
            (ptr[0] != 0 or (np.diff(ptr) < 0).any() or ptr[-1] != len(idx)) and "pathway_ptr is not a CSR pointer",
            idx.size and not 0 <= idx.min() <= idx.max() < len(out['pathway_names']) and "pathway ids out of range"]
        problem = next((p for p in problems if p), None)
        if problem:
            raise ValueError(problem)
    except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"{file} is corrupt ({type(e).__name__}: {e}); {ANNOTATION_FIX.format(path)}") from None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Preparing a dataset: what prepare_data.py runs (and train.py / bench.py, for the embedded default dataset).
# Every step streams the .h5ad files chunk by chunk; the output directory is written next to its place and renamed.

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASET = os.path.join('data', 'pbmc68k')
DEFAULT_INPUT = os.path.join(REPO, 'data', 'pbmc68k_reduced.h5ad')


def comma_list(text):
    """'a.h5ad, b.h5ad' (or a list of them) -> ['a.h5ad', 'b.h5ad']; blanks are dropped."""
    items = text.split(',') if isinstance(text, str) else (text or [])
    return [p.strip() for p in items if p.strip()]


class AnnotationSources(NamedTuple):
    """The gene table and gene sets an annotation.h5 is made from (read_annotation_sources)."""
    genome: str               # the gene table's path ('' = none)
    table: GeneTable          # or None
    gene_set_paths: list      # GMT files
    gene_sets: list           # (name, genes) of every file, in order
    sets_per_file: list       # int per GMT file
    min_set_genes: int
    max_set_genes: int


def read_annotation_sources(genome='', gene_sets=(), min_set_genes=3, max_set_genes=500):
    """Read the gene table and the GMT files (comma-separated or a list) -> AnnotationSources, or None when neither
    is given. Read before any .h5ad, so that a bad one stops the run early."""
    paths = comma_list(gene_sets)
    if not (genome or paths):
        return None
    table = read_genome_table(genome) if genome else None
    sets, per_file = read_gene_sets(paths) if paths else ([], [])
    return AnnotationSources(genome, table, paths, sets, per_file, min_set_genes, max_set_genes)


def annotation_of(genes, sources):
    """-> (annotation.h5's arrays, meta.json's 'annotation' entry) of vocab genes; prints the coverage."""
    s = sources
    annotation, c = annotate_genes(genes, s.table, s.gene_sets, s.min_set_genes, s.max_set_genes)
    entry = {'genome': {'path': s.genome, 'sha256': file_sha256(s.genome), 'n_rows': len(s.table.gene_id)}
             if s.genome else None,  # None: no gene table given, every gene's chromosome is unknown
             'gene_sets': [{'path': p, 'sha256': file_sha256(p), 'n_sets': n}
                           for p, n in zip(s.gene_set_paths, s.sets_per_file)],  # []: no GMT file, no pathways
             'min_set_genes': s.min_set_genes, 'max_set_genes': s.max_set_genes, **c}
    print(f"genome: {c['n_genes'] - c['unknown']} / {c['n_genes']} genes located on {c['n_chrom']} chromosomes (by "
          f"id {c['by_id']}, by symbol {c['by_symbol']}, case-insensitive {c['case_insensitive']}; unknown "
          f"{c['unknown']})" if s.genome else "genome: no --genome given: every gene's location is unknown")
    print(f"pathways: {c['sets_kept']} of {c['sets_read']} gene sets kept ({s.min_set_genes}..{s.max_set_genes} "
          f"vocab genes); {c['genes_in_a_set']} / {c['n_genes']} genes in a kept set, {c['mean_sets_per_gene']:.1f} "
          f"sets per such gene" if s.gene_set_paths else "pathways: no --gene_sets given: no gene is in a set")
    return annotation, entry


def annotate_dataset(path, genome='', gene_sets=(), min_set_genes=3, max_set_genes=500):
    """prepare_data.py --annotate: (re)write only the annotation of the prepared dataset at path (annotation.h5 and
    meta.json's 'annotation' entry, each written then renamed), reading no .h5ad."""
    sources = read_annotation_sources(genome, gene_sets, min_set_genes, max_set_genes)
    if sources is None:
        raise UserError(f"--annotate={path} needs --genome=<gene table .csv[.gz]> and/or --gene_sets=<a.gmt,b.gmt>")
    meta_file = os.path.join(path, 'meta.json')
    try:
        with open(meta_file) as fh:
            meta = json.load(fh)
        with open(os.path.join(path, 'vocab.txt')) as fh:
            genes = [line.strip() for line in fh.read().splitlines()]  # as read_gene_list reads it
        if not isinstance(meta, dict) or len(genes) != meta['n_genes']:
            raise ValueError(f"{len(genes)} genes in vocab.txt, meta.json says {meta['n_genes']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}); prepare it again with python "
                        f"prepare_data.py --input=<file.h5ad> --out_dir={path}") from None
    annotation, meta['annotation'] = annotation_of(genes, sources)
    # meta.json is renamed last: it never describes an annotation.h5 that is not there yet
    with atomic_write(meta_file) as tmp_meta, atomic_write(os.path.join(path, 'annotation.h5')) as tmp_h5:
        write_annotation(tmp_h5, annotation)
        with open(tmp_meta, 'w') as fh:
            json.dump(meta, fh, indent=1)
    print(f"wrote {os.path.join(path, 'annotation.h5')} and the annotation entry of {meta_file}")


def most_variable(paths, genes, n_top_genes, layer, gene_key, log_base, min_genes, chunk):
    """The n_top_genes genes (of the vocab `genes`) whose log-normalized expression varies most over the cells that
    pass QC, in vocab order: one extra streaming pass summing each gene's values and squares (float64). Zeros add
    nothing to either sum but count in n (the variance includes them)."""
    total, total_sq, n = np.zeros(len(genes)), np.zeros(len(genes)), 0
    for p in paths:
        for c in process_h5ad(p, layer, gene_key, log_base, genes, min_genes, chunk=chunk):
            passed = np.repeat(c.passed_qc, np.diff(c.indptr))  # bool [nnz]: the entry's cell passes QC
            vals = c.values[passed].astype(np.float64)
            total += np.bincount(c.indices[passed], weights=vals, minlength=len(genes))
            total_sq += np.bincount(c.indices[passed], weights=vals * vals, minlength=len(genes))
            n += int(c.passed_qc.sum())
    mean = total / max(n, 1)  # n == 0: no cells after QC, reported by the main pass
    variance = total_sq / max(n, 1) - mean * mean  # population variance, as np.var
    # highest variance first; the stable sort breaks ties by vocab order; then back to vocab order
    top = np.sort(np.argsort(-variance, kind='stable')[:n_top_genes])
    print(f"kept the {n_top_genes} most variable of {len(genes)} genes (variance of log-normalized expression "
          f"over {n} cells passing QC)")
    return [genes[i] for i in top]


def dataset_vocab(paths, vocab, n_top_genes, layer, gene_key, log_base, min_genes, chunk):
    """The vocab: a gene list file, or the union of the inputs' genes in first-seen order (optionally only the
    n_top_genes most variable: a scBERT forward pass costs time linear in the number of genes)."""
    if vocab:
        genes = read_gene_list(vocab)
        if n_top_genes:
            print(f"n_top_genes={n_top_genes} ignored: the vocab is given by --vocab={vocab}")
        return genes
    genes = list(dict.fromkeys(g for p in paths for g in process_h5ad(p, layer, gene_key, progress=False).vocab))
    if n_top_genes and n_top_genes >= len(genes):
        print(f"n_top_genes={n_top_genes} >= {len(genes)} genes: keeping all of them")
    elif n_top_genes:
        genes = most_variable(paths, genes, n_top_genes, layer, gene_key, log_base, min_genes, chunk)
    return genes


def category_codes(columns, kept):
    """Per-file object arrays of str/None (or None: no such column) and kept masks -> (int64 codes of the kept
    cells, -1 = missing; names sorted for determinism). An empty (or blank) name is missing too, as NaN is: it is
    not a class of its own."""
    cells = np.concatenate([c[k] if c is not None else np.full(k.sum(), None, object) for c, k in zip(columns, kept)])
    names = sorted({v for v in cells.tolist() if v is not None and v.strip()})
    lookup = {v: i for i, v in enumerate(names)}
    return np.array([lookup.get(v, -1) for v in cells.tolist()], dtype=np.int64), names


def stratified_folds(labels, labelled, n_folds, seed):
    """int8 fold per cell: shuffle, group by class (a stable sort keeps the shuffle within a class), then deal 0, 1, ..,
    k-1 in that order: each class, and the total, is spread over the folds as evenly as possible (sizes differ <= 1).
    labelled False (unlabeled data): every cell gets a random fold; else cells with label -1 get fold -1."""
    folds = np.full(len(labels), -1, dtype=np.int8)
    eligible = np.flatnonzero(labels >= 0) if labelled else np.arange(len(labels))
    order = eligible[np.random.default_rng(seed).permutation(len(eligible))]
    order = order[np.argsort(labels[order], kind='stable')]
    folds[order] = np.arange(len(order)) % n_folds
    return folds


def check_fold_sizes(labels, label_key, n_folds, min_genes, n_dropped):
    """UserError unless every fold gets a cell: stratified_folds deals the eligible cells (the labelled ones, or every
    cell without label_key) over the folds one by one, class after class, so that needs n_folds of them in all (a
    class with fewer cells than folds is just absent from some folds)."""
    n = int((labels >= 0).sum()) if label_key else len(labels)
    if n >= n_folds:
        return
    if label_key and n == 0:
        raise UserError(f"no cell left after QC has a label in obs '{label_key}' (every one is missing or empty): set "
                        f"--label_key= to prepare unlabelled (pretraining) data, or another --label_key")
    what = f"{n} labelled cells" if label_key else f"{n} cells"
    n_missing = len(labels) - n if label_key else 0
    why = [f"{n_missing} more with a missing label"] * bool(n_missing)
    why += [f"{n_dropped} dropped by QC"] * bool(n_dropped)
    why = f" ({'; '.join(why)})" if why else ""
    fix = (f"set --n_folds={n} or fewer, or " if n >= 2 else "") + "give more cells" + (
        f" (or lower --min_genes={min_genes})" if n_dropped else "")
    raise UserError(f"only {what} after QC{why} for n_folds={n_folds}: every fold needs at least one; {fix}")


def duplicated_ids(ids):
    """-> (number of ids that repeat an earlier one, up to 3 such ids)."""
    values, counts = np.unique(np.asarray(ids, dtype=str), return_counts=True)
    return len(ids) - len(values), values[counts > 1][:3].tolist()


def duplicated_ids_warning(ids, where, consequence):
    """The one 'warning:' line on cell ids that occur more than once (None when they are unique)."""
    n, examples = duplicated_ids(ids)
    if n:
        return (f"warning: {n} cell ids in {where} repeat an earlier one (e.g. {', '.join(examples)}): {consequence}; "
                f"make them unique (anndata: adata.obs_names_make_unique()) to tell those cells apart")
    return None


def write_kept_cells(f, sources, min_genes):
    """Stream every file's cells that pass QC into the data.h5 file f (resizable indices and values; nothing is kept
    in memory but per-cell arrays) -> (kept mask per file, row_nnz arrays, meta.json's 'source' entries)."""
    indices = f.create_dataset('indices', (0,), np.int32, maxshape=(None,), chunks=(1 << 18,))
    values = f.create_dataset('values', (0,), np.float32, maxshape=(None,), chunks=(1 << 18,))
    row_nnz, kept, source_info = [], [], []  # per kept cell: nnz; per file: kept mask [n_cells]
    for s in sources:
        passed = np.zeros(s.n_cells, dtype=bool)
        for c in s:
            keep = np.flatnonzero(c.passed_qc)
            passed[c.row_start + keep] = True
            ptr, ind, val = take_rows(c.indptr, c.indices, c.values, keep)
            nnz = len(indices)
            indices.resize((nnz + len(ind),))
            values.resize((nnz + len(val),))
            indices[nnz:], values[nnz:] = ind, val
            row_nnz.append(np.diff(ptr))
        kept.append(passed)
        source_info.append({'path': s.path, 'sha256': file_sha256(s.path), 'matrix': s.matrix, 'kind': s.kind,
                            'n_cells_in': s.n_cells, 'n_cells_kept': int(passed.sum()), 'n_genes_in': len(s.genes)})
        print(f"{s.path}: QC kept {passed.sum()} / {s.n_cells} cells ({s.n_cells - passed.sum()} with fewer "
              f"than {min_genes} expressed genes dropped)")
    return kept, row_nnz, source_info


def write_data_h5(file, sources, label_key, min_genes, n_folds, seed):
    """data.h5 of the cells that pass QC -> dict of what meta.json and the report need."""
    with h5py.File(file, 'w') as f:
        kept, row_nnz, source_info = write_kept_cells(f, sources, min_genes)
        n_cells = int(sum(k.sum() for k in kept))
        if n_cells == 0:
            raise UserError(f"no cells left after QC: every cell has fewer than min_genes={min_genes} expressed genes "
                            f"(lower --min_genes, or check --layer)")
        labels, label_names = category_codes([s.labels for s in sources], kept)
        check_fold_sizes(labels, label_key, n_folds, min_genes, int(sum(s.n_cells for s in sources)) - n_cells)
        batch, batch_names = category_codes([s.batch for s in sources], kept)
        f['indptr'] = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))]).astype(np.int64)
        f['labels'], f['folds'], f['batch'] = labels, stratified_folds(labels, bool(label_key), n_folds, seed), batch
        cell_ids = np.concatenate([s.cell_ids[k] for s, k in zip(sources, kept)])
        f.create_dataset('cell_ids', data=cell_ids.astype(object), dtype=h5py.string_dtype('utf-8'))
        return dict(n_cells=n_cells, nnz=len(f['indices']), labels=labels, label_names=label_names,
                    batch_names=batch_names, source_info=source_info, cell_ids=cell_ids)


def prepare_dataset(paths, out, label_key='bulk_labels', batch_key='', layer='auto', gene_key='', vocab='',
                    n_top_genes=0, min_genes=200, n_folds=5, log_base=2.0, seed=0, chunk=4096, genome='', gene_sets=(),
                    min_set_genes=3, max_set_genes=500, settings=None):
    """Prepare .h5ad files (a list of paths) into the dataset directory out, as prepare_data.py does (its docstring
    and settings tell what each argument does; '' and None both mean "none" for the keys and the vocab). settings:
    the dict stored as meta.json's 'settings' (prepare_data.py's config; None = these arguments). Prints the report;
    bad input is a UserError, and leaves no output behind."""
    if settings is None:
        settings = {k: v for k, v in locals().items() if k != 'settings'}
    label_key, batch_key, gene_key, vocab = (v if v not in (None, 'None') else ''  # '' and None both mean "none"
                                             for v in (label_key, batch_key, gene_key, vocab))
    sources_of_annotation = read_annotation_sources(genome, gene_sets, min_set_genes, max_set_genes)
    genes = dataset_vocab(paths, vocab, n_top_genes, layer, gene_key, log_base, min_genes, chunk)
    sources = [process_h5ad(p, layer, gene_key, log_base, genes, min_genes, label_key, batch_key, chunk=chunk)
               for p in paths]
    for s in sources:
        print(s.summary())
    with atomic_write(out) as tmp:
        os.makedirs(tmp)
        d = write_data_h5(os.path.join(tmp, 'data.h5'), sources, label_key, min_genes, n_folds, seed)
        with open(os.path.join(tmp, 'vocab.txt'), 'w') as fh:
            fh.write(''.join(f'{g}\n' for g in genes))
        data_genes = set(g for s in sources for g in s.genes.tolist() if g)
        meta = {'format': 1, 'n_cells': d['n_cells'], 'n_genes': len(genes), 'nnz': d['nnz'], 'log_base': log_base,
                'label_key': label_key, 'label_names': d['label_names'], 'batch_key': batch_key,
                'batch_names': d['batch_names'], 'n_folds': n_folds, 'seed': seed, 'source': d['source_info'],
                'settings': settings,
                'overlap': {'matched': len(data_genes & set(genes)), 'vocab': len(genes), 'data': len(data_genes)},
                'n_cells_dropped_qc': int(sum(s.n_cells for s in sources)) - d['n_cells'], 'min_genes': min_genes}
        if sources_of_annotation:
            annotation, meta['annotation'] = annotation_of(genes, sources_of_annotation)
            write_annotation(os.path.join(tmp, 'annotation.h5'), annotation)
        with open(os.path.join(tmp, 'meta.json'), 'w') as fh:
            json.dump(meta, fh, indent=1)
    n_missing = int((d['labels'] < 0).sum()) if label_key else 0
    print(f"wrote {out}: {d['n_cells']} cells x {len(genes)} genes, {d['nnz']} non-zeros, log base {log_base:g}; "
          + (f"{len(d['label_names'])} labels" if label_key else "no labels")
          + (f" ({n_missing} cells with a missing label: fold -1)" if n_missing else "")
          + (f", {len(d['batch_names'])} batches" if batch_key else "") + f", {n_folds} folds")
    if label_key and len(d['label_names']) == 1:
        print(f"warning: every labelled cell is of one cell type ('{d['label_names'][0]}' in obs '{label_key}'): a "
              f"single cell type cannot be fine-tuned on (train.py --mode=finetune needs 2 or more); the dataset is "
              f"fine for pretraining")
    duplicates = duplicated_ids_warning(d['cell_ids'], out, "every cell is kept, by position")
    if duplicates:
        print(duplicates)
    return meta


# prepare_data.py's settings as `python prepare_data.py --out_dir=data/pbmc68k` runs it (tests check they agree)
DEFAULT_PREPARE_SETTINGS = dict(
    input='data/pbmc68k_reduced.h5ad', name='pbmc68k', out_dir='', label_key='bulk_labels', batch_key='',
    layer='auto', gene_key='', vocab='', n_top_genes=0, min_genes=200, n_folds=5, log_base=2.0, seed=0, chunk=4096,
    genome='', gene_sets='', min_set_genes=3, max_set_genes=500, annotate='')


def prepare_default_dataset(path):
    """The embedded default dataset, prepared on first use: if path is data/pbmc68k and has no meta.json, prepare it
    from <repo>/data/pbmc68k_reduced.h5ad exactly as `python prepare_data.py --out_dir=data/pbmc68k
    --input=<repo>/data/pbmc68k_reduced.h5ad` does; any other path, or a prepared one, is left alone."""
    if os.path.normpath(path) != DEFAULT_DATASET or os.path.exists(os.path.join(path, 'meta.json')):
        return
    print(f'{path} is missing: preparing it from the embedded data/pbmc68k_reduced.h5ad')
    settings = dict(DEFAULT_PREPARE_SETTINGS, input=DEFAULT_INPUT, out_dir=path)
    arguments = {k: v for k, v in settings.items() if k not in ('input', 'name', 'out_dir', 'annotate')}
    prepare_dataset([DEFAULT_INPUT], path, **arguments, settings=settings)
