"""The tensor-parallel sum of a row-parallel projection, the residual add and RMSNorm, as one kernel.

At TP>1 every decoder layer ends its attention and its MLP with a row-parallel projection whose
partial results the ranks sum, and an RMSNorm follows each sum. Done apart, that is an all-reduce
kernel (with barriers of its own) and then a norm kernel per sum: 64 of each per decode step of
an 8B model, each a few microseconds at batch 1. Here one program per row does all of it:

1. store its rank's partial row in its own slot of the symmetric buffer (every rank's buffer is
   mapped into its peers' address space: strata.distributed.symm_all_reduce),
2. signal each peer that the row is there and wait for every peer's signal,
3. read the row from every rank in rank order and sum in float32 (so every rank gets the same
   bits), round to the model dtype as the all-reduce would, add the residual (rounded as the
   separate norm does) and normalise exactly as ``strata.kernels.norm.rms_norm``.

The result is bit-identical to the all-reduce followed by ``rms_norm`` wherever the all-reduce
sums in the same order (always at two ranks: one float32 add rounded once to bf16 is the
correctly rounded sum).

Synchronisation, with no barrier at the end of the kernel:

* A signal is a flag in the receiver's pad, one per (row, sender). The sender sets it 0 -> 1 by
  compare-and-swap, spinning while it is still 1 (the receiver has not consumed the last one);
  the receiver waits for 1 and resets it to 0 in one compare-and-swap. The pads return to zero
  by themselves, so nothing needs resetting between CUDA-graph replays.
* The release (before signalling) and acquire (after waiting) are at system scope, one thread
  each, behind a block barrier: the row's stores by every thread are visible to the peers before
  the flag is, and their rows are visible here after it.
* Each row slot has two halves that successive calls alternate between, counted per slot on the
  device (``uses``), so the alternation holds across graph replays whatever graphs run. A rank
  overwrites a half only two calls after it was last read: by then every peer has signalled in
  the call between, which it does only after finishing the read (its kernels run in order).

The kernel also runs under Triton's interpreter, where the "peers" are other processes whose
buffers are shared memory: that is how the tests check it without GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels import pdl

MAX_COLS = 16384   # the widest row kept whole in registers (norm.py's single pass)


@triton.jit
def _signal(flag_ptr):
    """Set the peer's flag once it has consumed the previous signal."""
    while tl.atomic_cas(flag_ptr, 0, 1, sem="release", scope="sys") != 0:
        pass


@triton.jit
def _wait(flag_ptr):
    """Wait for a peer's signal and consume it."""
    while tl.atomic_cas(flag_ptr, 1, 0, sem="acquire", scope="sys") != 1:
        pass


@triton.jit
def _all_reduce_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, bases_ptr, uses_ptr,
                                flags_offset, max_rows, n_cols, eps, xs, rs, os, ros,
                                RANK: tl.constexpr, WORLD: tl.constexpr, HAS_RES: tl.constexpr,
                                BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl.trigger(USE_PDL)
    pdl.wait(USE_PDL)
    row = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    use = tl.load(uses_ptr + row)
    slot = ((use % 2) * max_rows + row).to(tl.int64) * BLOCK   # element offset in every rank's buffer

    x = tl.load(x_ptr + row * xs + cols, mask=mask, other=0.0)
    mine = tl.load(bases_ptr + RANK).to(tl.pointer_type(dtype))
    tl.store(mine + slot + cols, x, mask=mask)
    tl.debug_barrier()
    for i in tl.static_range(1, WORLD):
        peer = (RANK + i) % WORLD
        flags = (tl.load(bases_ptr + peer) + flags_offset).to(tl.pointer_type(tl.int32))
        _signal(flags + row * WORLD + RANK)
    my_flags = (tl.load(bases_ptr + RANK) + flags_offset).to(tl.pointer_type(tl.int32))
    for i in tl.static_range(1, WORLD):
        _wait(my_flags + row * WORLD + (RANK + i) % WORLD)
    tl.debug_barrier()

    total = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == RANK:
            total += x.to(tl.float32)
        else:
            theirs = tl.load(bases_ptr + src).to(tl.pointer_type(dtype))
            total += tl.load(theirs + slot + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
    h = total.to(dtype)                     # what the all-reduce would have returned
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(res_ptr + row * rs + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    tl.store(res_out_ptr + row * ros + cols, h, mask=mask)
    h = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * os + cols, ((h * rstd).to(dtype).to(tl.float32) * w).to(dtype), mask=mask)
    tl.store(uses_ptr + row, use + 1)


def block_for(n_cols: int) -> int:
    """The row slot's width in elements (each rank's buffer holds 2 * max_rows of them)."""
    return triton.next_power_of_2(n_cols)


def flags_bytes(max_rows: int, world: int) -> int:
    return max_rows * world * 4


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        *, bases: torch.Tensor, uses: torch.Tensor, flags_offset: int, max_rows: int,
                        rank: int, world: int, out: torch.Tensor | None = None,
                        residual_out: torch.Tensor | None = None):
    """``rms_norm(sum over ranks of x, weight, eps, residual)``, returning ``(out, new_residual)``
    (with no residual, new_residual is the sum itself).

    x, residual: [rows, n_cols] with a contiguous last dim, rows <= max_rows, n_cols <= MAX_COLS.
    bases: int64 [world], every rank's symmetric buffer address in this process; each buffer
    holds 2 * max_rows * block_for(n_cols) elements of x's dtype, then at byte ``flags_offset``
    max_rows * world int32 flags, zeroed before the first call. uses: int32 [max_rows], zeroed,
    this rank's own. Every rank must make the same calls with the same number of rows.
    """
    rows, n_cols = x.shape
    if rows > max_rows or n_cols > MAX_COLS:
        raise ValueError(f"all_reduce_rms_norm takes up to {max_rows} rows of up to {MAX_COLS}, got {tuple(x.shape)}")
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    block = block_for(n_cols)
    res = x if residual is None else residual
    if rows:
        _all_reduce_rms_norm_kernel[(rows,)](
            x, res, weight, out, residual_out, bases, uses, flags_offset, max_rows, n_cols, float(eps),
            x.stride(0), res.stride(0), out.stride(0), residual_out.stride(0),
            RANK=rank, WORLD=world, HAS_RES=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16), **pdl.launch_options(x))
    return out, residual_out
