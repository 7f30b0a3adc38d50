import sys
from pathlib import Path

import torch

# the repo root holds the modules under test (model.py, data.py, ...), as in nanoGPT: no package to install
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
