import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the repo root holds the modules under test (model.py, data.py, ...), as in nanoGPT: no package to install
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


@pytest.fixture(scope='module')
def baron(tmp_path_factory):
    """78 real Baron cells x 385 genes, prepared (counts -> log2 CPM-style values, 5 stratified folds), with their
    two donors as batches (mouse1 32 cells, mouse2 46)."""
    root = Path(__file__).resolve().parents[1]
    fixtures = root.parent / 'shared' / 'data' / 'fixtures'
    if not fixtures.exists():
        pytest.skip('shared data not available')
    out = tmp_path_factory.mktemp('data') / 'baron'
    result = subprocess.run([sys.executable, str(root / 'prepare_data.py'), f'--input={fixtures / "counts_csr.h5ad"}',
                             f'--out_dir={out}', '--label_key=cell_type', '--batch_key=donor', '--min_genes=10'],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
