"""What the scripts share by importing it: data.prepare_dataset / prepare_default_dataset (prepare_data.py's work),
the CSR/CSC checks of .h5ad reading, configurator.read_config and --help's whole descriptions."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import data
from configurator import ConfigError, configure, read_config
from data import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared' / 'data'
FIXTURES = SHARED / 'fixtures'
needs_shared = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f'test data not found at {SHARED}')


# ----------------------------------------------------------------------------------------------------------------
# damaged sparse matrices: a one-line UserError naming the file, the problem and the fix

def damaged(tmp_path, fixture, change):
    path = tmp_path / fixture
    shutil.copy(FIXTURES / fixture, path)
    with h5py.File(path, 'r+') as f:
        change(f['X'])
    return path


def read_all(path):
    cells = data.process_h5ad(str(path), progress=False)
    return [c for c in cells]


def assert_one_line(error, *fragments):
    message = str(error.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    for fragment in fragments:
        assert fragment in message, message


def replace(node, key, values):
    del node[key]
    node[key] = values


@needs_shared
def test_csr_indptr_shorter_than_the_cells(tmp_path):
    path = damaged(tmp_path, 'counts_csr.h5ad', lambda x: replace(x, 'indptr', x['indptr'][:-10]))
    with pytest.raises(UserError) as e:
        read_all(path)
    assert_one_line(e, str(path), 'CSR', 'indptr has 69 entries for 78 cells', 'write_h5ad')


@needs_shared
def test_csr_indices_past_the_last_gene(tmp_path):
    def change(x):
        indices = x['indices'][:]
        indices[5] = 385 + 3
        replace(x, 'indices', indices)
    path = damaged(tmp_path, 'counts_csr.h5ad', change)
    with pytest.raises(UserError) as e:
        read_all(path)
    assert_one_line(e, str(path), 'column index is 388, outside 0..384', 'write_h5ad')


@needs_shared
def test_csr_indptr_that_does_not_end_at_the_values(tmp_path):
    path = damaged(tmp_path, 'counts_csr.h5ad', lambda x: replace(x, 'indptr', x['indptr'][:] // 2))
    with pytest.raises(UserError) as e:
        read_all(path)
    assert_one_line(e, str(path), 'indptr ends at')


@needs_shared
def test_csc_checked_too(tmp_path):
    def change(x):
        rows = x['indices'][:]
        rows[0] = 78
        replace(x, 'indices', rows)
    with pytest.raises(UserError) as e:
        read_all(damaged(tmp_path, 'counts_csc.h5ad', change))
    assert_one_line(e, 'CSC', 'row index is 78, outside 0..77')
    (tmp_path / 'counts_csc.h5ad').unlink()
    with pytest.raises(UserError) as e:
        read_all(damaged(tmp_path, 'counts_csc.h5ad', lambda x: replace(x, 'indptr', x['indptr'][:-1])))
    assert_one_line(e, 'CSC', 'indptr has 385 entries for 385 genes in var')


@needs_shared
def test_prepare_data_py_reports_a_damaged_file_in_one_line(tmp_path):
    path = damaged(tmp_path, 'counts_csr.h5ad', lambda x: replace(x, 'indptr', x['indptr'][:-10]))
    result = subprocess.run([sys.executable, 'prepare_data.py', f'--input={path}', f'--out_dir={tmp_path / "out"}',
                             '--label_key=cell_type'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.returncode != 0 and 'Traceback' not in result.stderr and len(errors) == 1, result.stderr
    assert 'indptr has 69 entries' in errors[0] and not (tmp_path / 'out').exists()


@needs_shared
@pytest.mark.parametrize('fixture', ['counts_csr.h5ad', 'counts_csc.h5ad', 'counts_dense.h5ad'])
def test_intact_files_read_the_same_in_every_encoding(fixture):
    reference = read_all(FIXTURES / 'counts_csr.h5ad')
    for a, b in zip(reference, read_all(FIXTURES / fixture)):
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        assert np.allclose(a.values, b.values)


# ----------------------------------------------------------------------------------------------------------------
# preparing datasets by import: data.prepare_dataset and the default dataset

def prepare_data_defaults():
    """prepare_data.py's settings, as its source assigns them (literal values, before configure)."""
    tree = ast.parse((ROOT / 'prepare_data.py').read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == 'config':
                break
            if not name.startswith('_'):
                found[name] = ast.literal_eval(node.value)
    return found


def test_default_settings_are_prepare_data_pys():
    assert data.DEFAULT_PREPARE_SETTINGS == prepare_data_defaults()


def test_prepare_default_dataset_leaves_other_paths_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data.prepare_default_dataset('data/baron')
    data.prepare_default_dataset(str(tmp_path / 'pbmc68k'))
    assert capsys.readouterr().out == '' and not (tmp_path / 'data').exists()


def test_prepare_default_dataset_is_prepare_data_py(tmp_path, monkeypatch, capsys):
    """The embedded PBMC data prepared by import is what `python prepare_data.py --out_dir=data/pbmc68k
    --input=<repo>/data/pbmc68k_reduced.h5ad` writes, byte for byte in its arrays and settings."""
    reference = tmp_path / 'ref' / 'data' / 'pbmc68k'
    reference.parent.mkdir(parents=True)
    result = subprocess.run([sys.executable, str(ROOT / 'prepare_data.py'), '--out_dir=data/pbmc68k',
                             f'--input={ROOT / "data" / "pbmc68k_reduced.h5ad"}'], cwd=reference.parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (tmp_path / 'new').mkdir()
    monkeypatch.chdir(tmp_path / 'new')
    data.prepare_default_dataset('data/pbmc68k')
    out = capsys.readouterr().out
    assert out.startswith('data/pbmc68k is missing: preparing it from the embedded data/pbmc68k_reduced.h5ad\n')
    assert out.split('\n', 1)[1] == result.stdout
    made = tmp_path / 'new' / 'data' / 'pbmc68k'
    assert json.loads((made / 'meta.json').read_text()) == json.loads((reference / 'meta.json').read_text())
    with h5py.File(made / 'data.h5') as a, h5py.File(reference / 'data.h5') as b:
        assert set(a) == set(b) and all(np.array_equal(a[k][:], b[k][:]) for k in a)
    assert (made / 'vocab.txt').read_text() == (reference / 'vocab.txt').read_text()
    data.prepare_default_dataset('data/pbmc68k/')           # prepared: nothing to do
    assert capsys.readouterr().out == ''


# ----------------------------------------------------------------------------------------------------------------
# configurator: read_config and --help

def test_read_config_returns_the_settings_without_a_scope(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("import math\n_helper = 3\nn_embd = 64\nattention = 'sdpa'  # comment\nwidth = n_embd * 2\n")
    assert read_config(str(path)) == {'n_embd': 64, 'attention': 'sdpa', 'width': 128}
    assert read_config(str(path), {'other': 1})['other'] == 1
    for name in ('scbert2.py', 'scbert2_small.py'):
        settings = read_config(str(ROOT / 'config' / name))
        assert settings['input_genes'] == 'expressed' and settings['attention'] == 'sdpa'
    with pytest.raises(ConfigError, match='not found'):
        read_config(str(tmp_path / 'missing.py'))
    path.write_text('n_embd = 1 / 0\n')
    with pytest.raises(ConfigError, match='line 1: ZeroDivisionError'):
        read_config(str(path))


def help_of(tmp_path, source, capsys):
    path = tmp_path / 'script.py'
    path.write_text(source)
    scope = {'__file__': str(path), '__doc__': 'A script.'}
    exec(source, scope)
    with pytest.raises(SystemExit):
        configure(scope, ['--help'])
    return capsys.readouterr().out


def test_help_joins_continued_descriptions_and_wraps_long_ones(tmp_path, capsys):
    source = ("short = 1                 # a short one\n"
              "masking = 'nonzero'       # which genes are masked: 'random' (any token) |\n"
              "                          # 'nonzero' (expressed genes only)\n"
              "x = 2                     # an ordinary one\n"
              "# a comment about what follows, not a continuation\n"
              "long_default = '" + 'a' * 150 + "'  # described below its default\n"
              "wordy = 0                 # " + ' '.join(['word'] * 40) + "\n")
    out = help_of(tmp_path, source, capsys)
    lines = out.splitlines()
    assert "  masking = 'nonzero'  # which genes are masked: 'random' (any token) | 'nonzero' (expressed genes only)" \
        in lines
    assert '  x = 2                # an ordinary one' in lines and 'a comment about' not in out
    i = lines.index(f"  long_default = '{'a' * 150}'")
    assert lines[i + 1] == '      # described below its default'
    j = lines.index('  wordy = 0')
    assert lines[j + 1].startswith('      # word word') and lines[j + 2].startswith('      # word')
    assert all(len(line) <= 120 for line in lines if 'aaaa' not in line)


def test_bench_help_lines_are_not_padded_to_the_longest_default():
    result = subprocess.run([sys.executable, str(ROOT / 'bench.py'), '--help'], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    settings = result.stdout.split('settings (default  # description):\n')[1].splitlines()
    assert all(len(line) <= 120 for line in settings if not line.startswith('  variants ='))
    assert "  dataset = 'data/pbmc68k'  # prepared dataset whose real cells are measured ('' = synthetic cells)" \
        in settings


# ----------------------------------------------------------------------------------------------------------------
# pathway masking of a cell none of whose expressed genes is in a gene set

def test_pathway_masking_of_a_cell_in_no_gene_set():
    annotation = {'chrom': np.ones(6, np.int64), 'start': np.arange(1, 7), 'pathway_names': ['s0'],
                  'pathway_ptr': np.array([0, 1, 2, 3, 3, 3, 3]), 'pathway_idx': np.zeros(3, np.int64)}
    units = data.gene_units(annotation, 6)
    picked, chosen = data.mask_by_units(np.random.default_rng(0), [3, 4, 5], 2, units, 'pathway')
    assert len(picked) == 0 and chosen == []                 # nothing to mask by sets: nothing masked, no error
    picked, chosen = data.mask_by_units(np.random.default_rng(0), [0, 1, 2, 5], 1, units, 'pathway')
    assert chosen == [] and len(picked) == 0                  # its one set has 3 candidates: over twice the budget 1
    picked, chosen = data.mask_by_units(np.random.default_rng(0), [0, 1, 2, 5], 2, units, 'pathway')
    assert picked.tolist() == [0, 1, 2] and chosen == [('pathway', 0)]
