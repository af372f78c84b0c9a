"""torch's intra-op thread count, narrowed for a block of work."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch thread. For many small ops on a busy machine: OpenMP threads
    spin-wait on each other at every op (dequantizing GGUF blocks took 2.5-17 s on 2 shared
    cores vs ~1 s on one; GPTQ's column loop 10-25x slower on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
