"""
Single-cell data for nanoscBERT: reading .h5ad files with h5py, the normalization/vocab alignment shared by
prepare_data.py and predict.py, the prepared dataset format, and scBERT's tokens and MLM masking.

A prepared dataset is a directory (written by prepare_data.py) holding
    data.h5    indptr int64 [n_cells+1], indices int32 [nnz] (vocab positions, ascending per cell), values float32 [nnz]
               (log_b(1 + counts/total*1e4), all > 0), labels int64, folds int8, batch int64, cell_ids str  [n_cells]
    vocab.txt  one gene symbol per line, in vocab order
    meta.json  counts, label/batch names, settings and sources
torch is imported only inside the functions that need it, so that prepare_data.py starts fast.
"""
import json
import math
import os
import shutil
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
    there; on success it replaces `path`, on any failure (UserError included) it is removed: nothing half-written."""
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
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, setting='ckpt'):
    """A checkpoint file: our dict or an original scBERT state dict, read with weights_only=True (tensors and plain
    types only: nothing is unpickled). A missing or unreadable file is a UserError naming the setting to fix."""
    import torch
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} not found (check --{setting})')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not a PyTorch checkpoint') from None


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
            step = max(1, min(chunk, (1 << 24) // max(1, node.shape[1])))
            for start in range(0, n_rows, step):
                block = node[start:start + step].astype(np.float32)
                rows, cols = np.nonzero(block)
                indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(block)))])
                yield start, indptr, cols.astype(np.int32), block[rows, cols]
            return
        fmt = node.attrs.get('encoding-type', node.attrs.get('h5sparse_format', ''))
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        shape = node.attrs.get('shape', node.attrs.get('h5sparse_shape'))
        if fmt.startswith('csc'):  # CSR = CSC sorted by row (stable: columns stay ascending within a row)
            col_ptr, rows = node['indptr'][:], node['indices'][:]
            order = np.argsort(rows, kind='stable')
            cols = np.repeat(np.arange(len(col_ptr) - 1, dtype=np.int32), np.diff(col_ptr))[order]
            data = node['data'][:][order]
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=int(shape[0])))])
            for start in range(0, int(shape[0]), chunk):
                a, b = indptr[start], indptr[min(start + chunk, int(shape[0]))]
                yield start, indptr[start:start + chunk + 1] - a, cols[a:b], data[a:b].astype(np.float32)
            return
        indptr = node['indptr']
        for start in range(0, len(indptr) - 1, chunk):
            ptr = indptr[start:start + chunk + 1].astype(np.int64)
            a, b = ptr[0], ptr[-1]
            yield start, ptr - a, node['indices'][a:b].astype(np.int32), node['data'][a:b].astype(np.float32)


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
        raise UserError(f"{h5.path} holds scaled values (negative numbers) in {', '.join(kinds)}, not counts; save the "
                        f"raw counts in .raw or layers['counts'], or set --layer=<matrix with counts> (present: "
                        f"{', '.join(present)})")
    matrix = layer if layer in ('X', 'raw') or layer.startswith('layers/') else f'layers/{layer}'
    if matrix not in present:
        raise UserError(f"layer '{layer}' not in {h5.path}; available: {', '.join(present)} "
                        f"(set --layer=auto|X|raw|<layer name>)")
    kind = matrix_kind(h5.sample(matrix))
    if kind == 'scaled':
        others = ', '.join(m for m in present if m != matrix) or 'none'
        raise UserError(f"{matrix} of {h5.path} holds negative values (scaled data, not counts); set --layer=<matrix "
                        f"with counts> (other matrices: {others}) or --layer=auto")
    return matrix, kind


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
        merged = 'summed' if self.kind == 'counts' else 'dropped (first kept)'
        dup = f"; {self.n_duplicated} duplicated gene symbols {merged}"
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
            raise UserError(f"negative values in {where}: counts or log-normalized values expected, not scaled data "
                            f"(set --layer= to a matrix of counts; present: {', '.join(self.h5.matrices())})")
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
        indptr, indices, values = self.rows(idx)
        out = np.zeros((len(indptr) - 1, self.n_genes), dtype=np.float32)
        out[np.repeat(np.arange(len(out)), np.diff(indptr)), indices] = values
        return out


def fold_split(data, k, test_batch=''):
    """-> (train_idx, val_idx, test_idx) of a prepared Dataset for test fold k (split_indices), or, with test_batch,
    test = that batch's labelled cells (e.g. a donor) and train/validation = the other batches' cells of those folds."""
    train_idx, val_idx, test_idx = split_indices(data.folds, k, data.n_folds)
    if not test_batch:
        return train_idx, val_idx, test_idx
    names = data.meta.get('batch_names') or []
    if test_batch not in names:
        raise UserError(f"test_batch '{test_batch}' is not a batch of {data.path} (its batches: "
                        f"{', '.join(names) or 'none; prepare it with --batch_key=<obs column>'})")
    held_out = data.batch == names.index(test_batch)
    train_idx = np.sort(np.concatenate([train_idx, test_idx]))
    return train_idx[~held_out[train_idx]], val_idx[~held_out[val_idx]], np.flatnonzero(held_out & (data.labels >= 0))


def classify_input(data, idx, cfg):
    """A model's input for cells idx of a prepared Dataset, as train.py evaluates them (nothing masked): scBERT's
    tokens (B, n_genes + 1), or the expressed-gene dict with each cell's fixed gene subset."""
    import torch
    if cfg.input_genes == 'expressed':
        indptr, indices, values = data.rows(idx)
        return expressed_batch(indptr, indices, values, cell_seeds(indptr, indices, cfg.seed), cfg, data.log_base)
    return scbert_tokens(torch.from_numpy(data.dense(idx)), data.log_base, cfg.n_bins)


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
    at = lambda i: sorted_vals[np.minimum(start + i, len(sorted_vals) - 1)]
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
    return [[seed, zlib.crc32(indices[indptr[i]:indptr[i + 1]].astype(np.int32).tobytes())] for i in range(len(indptr) - 1)]


def expressed_batch(indptr, indices, values, seeds, cfg, log_base, mask_prob=0.0, replace_prob=0.9):
    """CSR cells -> the model's expressed-gene input, padded to the longest cell: dict of torch tensors (B, T)
    'genes' (vocab index, -1 = padding), 'values' (log-normalized), 'bins' (value bins; n_bins + 1 where masked).

    cfg (a ModelConfig) gives n_genes, n_bins, value_emb, max_genes, n_zero_genes and mask_id. seeds (one per cell:
    anything np.random.default_rng takes) choose, per cell, which max_genes expressed genes to keep when it has more
    (training passes fresh seeds per step; evaluation passes cell_seeds: a fixed subset), the n_zero_genes
    unexpressed genes to add (value 0, bin 0), and with mask_prob > 0 the masked tokens for pretraining: exactly
    ceil(mask_prob * n) of each cell's n tokens (the zero genes too), each replaced by the mask with probability
    replace_prob (scBERT's rule). Then 'target_bins' (-100 where not masked) and 'target_values' are added too.
    Bins are computed over all of a cell's expressed genes, before any are dropped."""
    import torch
    bins_all = value_bins(indptr, values, log_base, cfg.value_emb, cfg.n_bins)
    cells = []
    for i in range(len(indptr) - 1):
        rng = np.random.default_rng(seeds[i])
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
        target, true_vals = np.full(len(genes), -100), vals
        if mask_prob > 0 and len(genes):
            n_mask = math.ceil(mask_prob * len(genes))
            chosen = rng.choice(len(genes), n_mask, replace=False)
            target[chosen] = bins[chosen]
            replaced = chosen[rng.random(n_mask) < replace_prob]
            bins, vals = bins.copy(), vals.copy()
            bins[replaced], vals[replaced] = cfg.mask_id, 0.0
        cells.append((genes, vals, bins, target, true_vals))
    T = max([len(c[0]) for c in cells] + [1])
    out = {'genes': np.full((len(cells), T), -1, np.int64), 'values': np.zeros((len(cells), T), np.float32),
           'bins': np.zeros((len(cells), T), np.int64)}
    if mask_prob > 0:
        out.update(target_bins=np.full((len(cells), T), -100, np.int64), target_values=np.zeros((len(cells), T), np.float32))
    for i, (genes, vals, bins, target, true_vals) in enumerate(cells):
        n = len(genes)
        out['genes'][i, :n], out['values'][i, :n], out['bins'][i, :n] = genes, vals, bins
        if mask_prob > 0:
            out['target_bins'][i, :n], out['target_values'][i, :n] = target, true_vals   # values before masking
    return {k: torch.from_numpy(v) for k, v in out.items()}
