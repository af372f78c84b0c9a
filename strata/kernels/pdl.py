"""Programmatic dependent launch (PDL) for the kernels of a decode step, on Hopper and later.

A decode step is a chain of short kernels; between two of them the GPU normally drains the first
grid, flushes its writes and only then starts scheduling the second, a microsecond or two of
idle SMs each time, hundreds of times per token. Launched with PDL, a kernel's programs may be
placed on SMs as soon as every program of the kernel before it has started (each calls
``gdc_launch_dependents`` right after its own wait); they then block in ``gdc_wait`` until that
kernel has finished and its writes are visible. So each kernel reads its inputs exactly as
before, and the launch of the next overlaps the tail of the current one.

Every kernel here calls ``wait_for_inputs`` first, before touching memory: the wait is what
keeps the chain ordered (a kernel launched early still waits for its predecessor, which waited
for its own), including for writes into buffers an earlier kernel still reads. Kernels from
elsewhere (cuBLAS, torch) are launched normally and order as usual.

Off on the CPU (the interpreter), before sm_90, and with ``STRATA_DISABLE_PDL=1``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_meta(t: torch.Tensor) -> dict:
    """Launch options for a kernel on t's device: ``USE_PDL`` (its constexpr) and, when on,
    ``launch_pdl`` (Triton's launch attribute)."""
    on = (t.is_cuda and os.environ.get("STRATA_DISABLE_PDL") != "1"
          and _device_supports(t.device.index if t.device.index is not None else torch.cuda.current_device()))
    return dict(USE_PDL=True, launch_pdl=True) if on else dict(USE_PDL=False)


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
