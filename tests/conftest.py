import os
import sys
from pathlib import Path

import torch

# Test helpers (tiny HF model builders) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent / "models"))

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when kernels are decorated, so it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
