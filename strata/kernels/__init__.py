"""Triton kernels, one op per file, each beside the torch reference its tests compare it with.

Layers call ``use_triton(tensor)`` to choose: Triton for CUDA tensors when Triton is installed,
the torch reference otherwise (the CPU path, and CUDA machines without Triton). Importing this
package never fails on a machine without Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through the Triton kernels.

    ``STRATA_DISABLE_TRITON=1`` forces the torch references everywhere (debugging, comparisons);
    ``STRATA_FORCE_TRITON=1`` sends CPU tensors to the kernels too, which only makes sense with
    ``TRITON_INTERPRET=1``: that is how the tests run the whole kernel path without a GPU.
    """
    if not HAS_TRITON or os.environ.get("STRATA_DISABLE_TRITON") == "1":
        return False
    return t.is_cuda or os.environ.get("STRATA_FORCE_TRITON") == "1"
