"""The tensor-parallel sum of a row-parallel projection, the residual add and RMSNorm, as one kernel.

At TP>1 every decoder layer ends its attention and its MLP with a row-parallel projection whose
partial results the ranks sum, and an RMSNorm follows each sum. Done apart, that is an all-reduce
kernel (with barriers of its own) and then a norm kernel per sum: 64 of each per decode step of
an 8B model, each a few microseconds at batch 1. Here one program per row does all of it:

1. write its rank's partial row straight into every peer's buffer, in the slot of that row and
   this sender (every rank's buffer is mapped into its peers' address space:
   strata.distributed.symm_all_reduce),
2. wait until every peer's row has arrived in its own buffer, then put the slots back,
3. sum the rows in rank order in float32 (so every rank gets the same bits), round to the model
   dtype as the all-reduce would, add the residual (rounded as the separate norm does) and
   normalise exactly as ``strata.kernels.norm.rms_norm``.

The result is bit-identical to the all-reduce followed by ``rms_norm`` wherever the all-reduce
sums in the same order (always at two ranks: one float32 add rounded once to bf16 is the
correctly rounded sum), up to the sign of zeros: a partial -0.0 is sent as +0.0.

No flags and no fences: the data is its own signal (as in Lamport's scheme for shared buffers).
An empty slot holds -0.0 in every element, a value no sender writes, so a receiver polls its
slot until no element is -0.0; each element arrives whole, in any order. Having read its slots,
the receiver writes -0.0 back. Each row slot has two halves that successive calls alternate
between, counted per slot on the device (``uses``), so the alternation holds across CUDA-graph
replays whatever graphs run: a sender can be at most one call ahead of a receiver (it cannot
finish a call without the receiver's row of that call), so it writes the other half, and it
comes back to this half only after the receiver has started its next call, that is, after the
receiver's reset.

The row-parallel GEMV before the kernel may send the rows itself (``push_share`` in its
epilogue, strata.kernels.skinny_matmul's ``push``; the kernel is then called with
``pushed=True`` and only receives): each output tile goes to the peers as soon as its program has
it, so the rows travel while the rest of the GEMV, its completion and this kernel's launch go
by. The GEMV reads ``uses`` after its PDL wait, when the previous call has counted itself, and
the call counts after reading it, so both pick the same half.

The kernel also runs under Triton's interpreter, where the "peers" are other processes whose
buffers are shared memory: that is how the tests check it without GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from strata.kernels import pdl

MAX_COLS = 16384   # the widest row kept whole in registers (norm.py's single pass)


@triton.jit
def _bits(v, WIDE: tl.constexpr):
    # (One return: Triton's compiler also builds what follows a return under a constexpr if,
    # and the 16-bit cast of a float32 row fails to compile.)
    if WIDE:
        bits = v.to(tl.int32, bitcast=True)
    else:
        bits = v.to(tl.int16, bitcast=True)
    return bits


@triton.jit
def _receive(ptr, mask, EMPTY: tl.constexpr, WIDE: tl.constexpr):
    """A peer's row from this rank's own buffer, once all of it has arrived; the slot is then
    emptied for the call after next."""
    v = tl.load(ptr, mask=mask, other=0.0, volatile=True)
    pending = tl.sum((mask & (_bits(v, WIDE) == EMPTY)).to(tl.int32), axis=0)
    while pending > 0:
        v = tl.load(ptr, mask=mask, other=0.0, volatile=True)
        pending = tl.sum((mask & (_bits(v, WIDE) == EMPTY)).to(tl.int32), axis=0)
    tl.store(ptr, tl.full(v.shape, EMPTY, _bits(v, WIDE).dtype).to(v.dtype, bitcast=True), mask=mask)
    return v


@triton.jit
def _sendable(x, EMPTY: tl.constexpr, WIDE: tl.constexpr):
    """x with -0.0 (the empty slot's value, never sent) as +0.0."""
    bits = _bits(x, WIDE)
    return tl.where(bits == EMPTY, tl.zeros_like(bits), bits).to(x.dtype, bitcast=True)


@triton.jit
def _slot(use, row, max_rows, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """Element offset of (the half of a row's call number ``use``, the row, sender 0) in every
    rank's buffer."""
    return ((use % 2) * max_rows + row).to(tl.int64) * (WORLD * BLOCK)


@triton.jit
def _send(x, slot, cols, mask, bases_ptr, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """x (sendable) into this sender's slot of every peer's buffer."""
    for i in tl.static_range(1, WORLD):
        peer = (RANK + i) % WORLD
        theirs = tl.multiple_of(tl.load(bases_ptr + peer).to(tl.pointer_type(x.dtype)), 16)
        tl.store(theirs + slot + RANK * BLOCK + cols, x, mask=mask)


@triton.jit
def push_share(y, rows, cols, row_mask, col_mask, bases_ptr, uses_ptr, max_rows,
               RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, EMPTY: tl.constexpr,
               WIDE: tl.constexpr):
    """Send the tile y [R, C] (rows ``rows``, columns ``cols``, in the row's dtype) of this
    rank's partial rows to every peer, for the all-reduce + norm call that follows (made with
    ``pushed=True``). Call it after the PDL wait: it reads the rows' call counts."""
    slot = _slot(tl.load(uses_ptr + rows, mask=row_mask, other=0), rows, max_rows, WORLD, BLOCK)
    _send(_sendable(y, EMPTY, WIDE), slot[:, None], cols[None, :], row_mask[:, None] & col_mask[None, :],
          bases_ptr, RANK, WORLD, BLOCK)


@triton.jit
def _all_reduce_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, bases_ptr, uses_ptr,
                                max_rows, n_cols, eps, xs, rs, os, ros,
                                RANK: tl.constexpr, WORLD: tl.constexpr, HAS_RES: tl.constexpr,
                                BLOCK: tl.constexpr, EMPTY: tl.constexpr, WIDE: tl.constexpr,
                                PUSHED: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    pdl.trigger(USE_PDL)
    pdl.wait(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    use = tl.load(uses_ptr + row)
    slot = _slot(use, row, max_rows, WORLD, BLOCK)

    # This rank's share, summed as it was sent (-0.0 as +0.0).
    x = _sendable(tl.load(x_ptr + row * xs + cols, mask=mask, other=0.0), EMPTY, WIDE)
    if not PUSHED:   # else the GEMV that computed x has sent it (push_share)
        _send(x, slot, cols, mask, bases_ptr, RANK, WORLD, BLOCK)

    # (Buffers start 16-byte aligned, and slots are whole rows: 16-byte vector stores and polls.)
    dtype = out_ptr.dtype.element_ty
    mine = tl.multiple_of(tl.load(bases_ptr + RANK).to(tl.pointer_type(dtype)), 16) + slot
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == RANK:
            total += x.to(tl.float32)
        else:
            total += _receive(mine + src * BLOCK + cols, mask, EMPTY, WIDE).to(tl.float32)
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
    """The width in elements of one sender's slot for a row of n_cols."""
    return triton.next_power_of_2(n_cols)


def buffer_numel(max_rows: int, world: int, n_cols: int) -> int:
    """Elements of each rank's buffer: two halves of max_rows rows of one slot per sender. It
    must be filled with -0.0 (``EMPTY_FILL``) on every rank before the first call."""
    return 2 * max_rows * world * block_for(n_cols)


EMPTY_FILL = -0.0


def _empty_bits(wide: bool) -> int:
    """-0.0's bits as the kernel compares them (int32 for float32 rows, int16 for 16-bit ones)."""
    return -2**31 if wide else -2**15


@dataclass(frozen=True)
class PushTarget:
    """Where a row-parallel GEMV sends its share of ``n_cols``-wide rows (``push_share``) for the
    ``all_reduce_rms_norm(..., pushed=True)`` call after it: the same buffers and counters."""
    bases: torch.Tensor
    uses: torch.Tensor
    max_rows: int
    rank: int
    world: int
    n_cols: int
    dtype: torch.dtype

    def kernel_args(self) -> tuple[tuple, dict]:
        """(bases, uses, max_rows) and the constexprs of a kernel calling push_share."""
        wide = self.dtype.itemsize == 4
        return (self.bases, self.uses, self.max_rows), dict(
            PUSH=True, RANK=self.rank, WORLD=self.world, SLOT=block_for(self.n_cols),
            EMPTY=_empty_bits(wide), WIDE=wide)


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        *, bases: torch.Tensor, uses: torch.Tensor, max_rows: int, rank: int, world: int,
                        out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                        pushed: bool = False):
    """``rms_norm(sum over ranks of x, weight, eps, residual)``, returning ``(out, new_residual)``
    (with no residual, new_residual is the sum itself).

    x, residual: [rows, n_cols] with a contiguous last dim, rows <= max_rows, n_cols <= MAX_COLS.
    bases: int64 [world], every rank's buffer address in this process, each buffer of
    ``buffer_numel`` elements of x's dtype filled with ``EMPTY_FILL``. uses: int32 [max_rows],
    zeroed, this rank's own. Every rank must make the same calls with the same number of rows.
    pushed: the kernel that computed x has already sent it to the peers (``PushTarget``); every
    rank must then have done so.
    """
    rows, n_cols = x.shape
    if rows > max_rows or n_cols > MAX_COLS:
        raise ValueError(f"all_reduce_rms_norm takes up to {max_rows} rows of up to {MAX_COLS}, got {tuple(x.shape)}")
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    block = block_for(n_cols)
    res = x if residual is None else residual
    wide = x.element_size() == 4
    if rows:
        _all_reduce_rms_norm_kernel[(rows,)](
            x, res, weight, out, residual_out, bases, uses, max_rows, n_cols, float(eps),
            x.stride(0), res.stride(0), out.stride(0), residual_out.stride(0),
            RANK=rank, WORLD=world, HAS_RES=residual is not None, BLOCK=block,
            EMPTY=_empty_bits(wide), WIDE=wide, PUSHED=pushed,
            num_warps=min(max(block // 256, 1), 16), **pdl.launch_options(x))
    return out, residual_out
