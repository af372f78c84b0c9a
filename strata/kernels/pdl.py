"""Programmatic dependent launch (PDL, sm_90 and later) for the kernels of a captured step.

In a CUDA graph each kernel still starts only when the one before it has finished: its programs
are scheduled, fetch their first data and ramp up while the SMs idle in the previous kernel's
tail. At batch 1 a decode step is ~300 kernels of 2-30 us, and those joins are a large part of
what is not weight streaming. A kernel launched with PDL may start as soon as every program of
the kernel before it has signalled (``trigger``); it then runs up to ``wait``, which returns once
that kernel has completed and its writes are visible. What a kernel does before its wait
overlaps the previous kernel's tail: at least its launch, and for the int4 GEMV the loads of its
first weights (they depend on nothing computed in the step).

The rules every kernel taking part follows (a ``USE_PDL`` constexpr, default False, and
``**launch_options(t)`` in its launch):

* ``trigger`` first: the next kernel may launch once every program of this one is running.
  The bf16 and int4 GEMVs (skinny_matmul, int4_gemv) trigger last instead, after their stores:
  with the trigger first, the kernels after them launched and waited ahead, and decode steps
  measured 7-9% slower than no PDL (bf16) or 3% slower than the trigger last (int4), on an H200.
* Before ``wait``: reads of constant data only (weights, scales) and no writes at all: the
  previous kernel may still be reading what this one would overwrite.
* ``wait`` in every program, even one with nothing to do: kernel N's completion must imply kernel
  N-1's, or kernel N+1 (which waits only for N) could read what N-1 has not written yet.

It is used only while a CUDA graph is being captured (``enabled``), where the edges become the
graph's programmatic dependencies, on sm_90+, and not under Triton's interpreter; ``ENABLED =
False`` (or ``STRATA_PDL=0`` in the environment) launches every kernel the plain way.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:          # a Triton without grid dependency control: never enabled
    gdc_launch_dependents = gdc_wait = None

ENABLED = os.environ.get("STRATA_PDL", "1") != "0" and gdc_wait is not None


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels working on ``t`` now should launch with PDL (a CUDA graph is being
    captured on an sm_90+ device and PDL is on)."""
    return (ENABLED and t.is_cuda and torch.cuda.is_current_stream_capturing()
            and _supported(t.device.index if t.device.index is not None else torch.cuda.current_device()))


def launch_options(t: torch.Tensor) -> dict:
    """The extra launch arguments of a kernel with a ``USE_PDL`` constexpr working on ``t``: none
    (the plain launch) unless ``enabled(t)``."""
    return dict(USE_PDL=True, launch_pdl=True) if enabled(t) else {}


@triton.jit
def trigger(USE_PDL: tl.constexpr):
    """Let the next kernel launch once every program of this one has got here."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Return once the previous kernel has completed and its writes are visible."""
    if USE_PDL:
        gdc_wait()
