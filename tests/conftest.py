"""Puts the repository root on sys.path so the tests import vit, head, loss, train, eval_knn as the scripts do."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)  # tiny tensors: a thread pool only adds overhead (tests ran 2x slower on 2 busy cores)
