"""``x @ W^T`` for a few rows of ``x``: the matmuls of a decode step.

At batch 1-16 a linear layer is a stream of its weight matrix past a handful of input rows: the
time is the bytes of W over the memory bandwidth, and what matters is keeping enough loads in
flight on every SM. cuBLAS reaches ~95% of the copy bandwidth on the wide gate/up and down
projections of an 8B model but only ~75% on the narrow q/k/v and o_proj (4-6k output rows), and
adds a split-K reduction launch for some; this kernel streams any of them.

Measured on an H100 (`python bench/gpu_skinny_sweep.py`, CUDA-graph replay over 4 weight copies,
copy bandwidth 2932 GB/s read+write; 2026-11-21), one row, time and fraction of bytes / copy rate:
q/k/v [6144 x 4096] 19.4 us (89%; cuBLAS 20.9), o_proj [4096 x 4096] 13.9 us (82%; cuBLAS
15.9), gate/up [28672 x 4096] 80.5 us (100%; cuBLAS 82.1), down [4096 x 14336] 42.0 us (95%;
cuBLAS 43.8); 2-16 rows within 0.5 us of those. On an H200 (4.2 TB/s): q/k/v 14.9 us (cuBLAS
16.2), o_proj 11.3 (12.8), gate/up 57.5 (57.2), down 30.5 (31.6). (A fused silu-and-mul prologue for the down
projection was tried and dropped: recomputing the activation in every program made it slower
than the separate kernel from 2 rows on, and saved 0.4 us at one.)

Layout: the grid is (output-row blocks of ``BLOCK_N``, input-row blocks of ``BLOCK_M``); each
program walks the whole K dimension in ``BLOCK_K`` steps, so there is no split-K and no second
launch. Two inner products:

* ``USE_DOT=False`` (CUDA cores): the products ``x[m, k] * W[n, k]`` accumulate elementwise into
  an fp32 [BLOCK_M, BLOCK_N, BLOCK_K] register tile, reduced over k once after the loop, so the
  loop body is loads and FMAs only.
* ``USE_DOT=True`` (tensor cores): ``tl.dot`` on a [BLOCK_M >= 16, BLOCK_K] x [BLOCK_K, BLOCK_N]
  pair, padding rows masked; Triton then pipelines the weight loads over ``num_stages`` buffers.

Accumulation is fp32 whatever the dtype; the result is rounded once, as cuBLAS does. fp32
weights use exact fp32 products (no TF32).

Inside a CUDA graph on sm_90+ the kernel launches with PDL (strata.kernels.pdl): its programs
start while the kernel before finishes (a fused all-reduce + norm waiting on its peer, the
attention, the activation), ask L2 for the first lines of their weight rows, wait, and let the
next kernel launch only after their stores. H200, Llama-3.1-8B shape, batch-1 decode, each an
engine of its own: TP=2 344.6 tok/s without PDL, 362.9 with it, 367.4 with the 2 MiB prefetch;
TP=1 217.8 / 219.4 / 217.2. With the trigger first instead: TP=2 313.7, TP=1 204.8.

At tensor parallelism the row-parallel projections (o_proj, down_proj) are called with ``push``:
each program also stores its output tile into the peers' buffers of the fused all-reduce + RMSNorm
that follows (strata.kernels.all_reduce_norm.push_share), which then only receives. Same machine
and model, TP=2: 368.0 tok/s with the norm kernel sending, 376.5 with the GEMV sending (TP=1 220.3).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from strata.kernels import all_reduce_norm as arn
from strata.kernels import pdl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Rows of x up to which matmuls take this kernel (beyond, cuBLAS's GEMMs are compute-efficient).
MAX_ROWS = 16

# Inside a CUDA graph on sm_90+ the kernel launches with PDL (STRATA_GEMV_PDL=0: the plain way)
# and first asks L2 for up to this many MiB of its weights, from the start of each row, while the
# kernel before it finishes (_prefetch_l2). STRATA_GEMV_PREFETCH_MIB overrides it (both are read
# when a graph is captured); 0: no prefetch.
PREFETCH_MIB = 2
_LINE_BYTES = 128


def prefetch_bytes() -> int:
    return int(float(os.environ.get("STRATA_GEMV_PREFETCH_MIB", PREFETCH_MIB)) * 2 ** 20)


@triton.jit
def _prefetch_l2(w_rows, n_mask, K, PREFETCH_K: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the first PREFETCH_K weights of each of this program's rows, one request per
    128-byte line (LINE elements): the loads that follow the PDL wait then find them there."""
    offs = tl.arange(0, PREFETCH_K // LINE) * LINE
    ok = n_mask[:, None] & (offs[None, :] < K)
    ptrs = tl.where(ok, w_rows + offs[None, :], w_rows)   # masked lanes ask for a line of row 0
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, x_stride, w_stride, out_stride,
                   bases_ptr, uses_ptr, max_rows,
                   HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_PDL: tl.constexpr = False, PREFETCH_K: tl.constexpr = 0, LINE: tl.constexpr = 64,
                   PUSH: tl.constexpr = False, RANK: tl.constexpr = 0, WORLD: tl.constexpr = 1,
                   SLOT: tl.constexpr = 1, EMPTY: tl.constexpr = 0, WIDE: tl.constexpr = False):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * w_stride
    if PREFETCH_K > 0:    # the weights depend on nothing the step computes: fetch while waiting
        if tl.program_id(1) == 0:
            _prefetch_l2(w_rows, n_mask, K, PREFETCH_K, LINE)
    pdl.wait(USE_PDL)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
        elif EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None], other=0.0,
                        eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :], mask=x_mask, other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * out_stride + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])
    if PUSH:    # a share of a tensor-parallel sum: to the peers now, not after the whole GEMV
        arn.push_share(y, offs_m, offs_n, m_mask, n_mask, bases_ptr, uses_ptr, max_rows,
                       RANK, WORLD, SLOT, EMPTY, WIDE)
    # Only now may the next kernel launch: triggered first thing, the kernels after a GEMV each
    # launched and waited ahead, and the decode step measured 7-9% slower than without PDL.
    pdl.trigger(USE_PDL)


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"skinny_matmul: {name} {msg}")


@functools.lru_cache(maxsize=None)
def default_config(m: int, n: int, k: int) -> dict:
    """Tile shape and launch settings for an [m, k] x [n, k]^T product.

    bench/gpu_skinny_sweep.py's fastest candidates on an H100 and an H200, as rules: one row
    times a q/k/v-sized matrix streams [8 x 512] tiles through CUDA-core FMAs; everything else
    goes through tensor cores on a 16-row tile with the weight loads pipelined, 64-column tiles
    for wide matrices and 32 for narrow ones (o_proj, down). (FMAs would also win gate/up's one
    row on an H100 by 2%, but lose 5% on an H200, where the tensor-core tile ties cuBLAS.)
    """
    block_k = min(256, triton.next_power_of_2(max(k, 16)))
    wide = n >= 6144
    if m == 1 and wide and n <= 8192 and k <= 4096:
        return dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=2 * block_k, USE_DOT=False, num_warps=4, num_stages=1)
    # One row of the narrower matrices (one rank's q/k/v, o_proj and down at tensor parallel 2,
    # o_proj at 1): [4 x 1024] CUDA-core tiles, twice the programs of the [8 x 512] ones; and a
    # tensor-core tile of 64 columns over short K steps for gate/up's share at TP=2. H200, one
    # row (gpu_skinny_sweep.py's *_tp2 shapes): q/k/v 9.5 -> 8.9 us, o_proj 7.0 -> 6.6, down
    # 16.7 -> 16.3, gate/up 32.0 -> 30.2.
    if m == 1 and n < 6144 and 1024 <= k <= 8192:
        return dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, USE_DOT=False, num_warps=4, num_stages=1)
    if m == 1 and 8192 < n <= 16384:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=min(128, block_k), USE_DOT=True, num_warps=4, num_stages=3)
    if m == 1 or not wide:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, USE_DOT=True, num_warps=4, num_stages=5)
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, USE_DOT=True, num_warps=4, num_stages=3)


def _check(x, weight, bias, out):
    _require(x.dtype in _DTYPES and x.dim() == 2, "x", f"must be a 2-D fp32/fp16/bf16 tensor, got "
             f"{x.dtype} of shape {tuple(x.shape)}")
    _require(weight.dim() == 2 and weight.dtype == x.dtype and weight.device == x.device, "weight",
             f"must be a 2-D {x.dtype} tensor on {x.device}, got {weight.dtype} {tuple(weight.shape)}")
    _require(x.stride(1) == 1 and weight.stride(1) == 1, "x/weight", "need a contiguous last dim")
    n, k = weight.shape
    _require(x.shape[1] == k, "x", f"has {x.shape[1]} columns, the weight needs {k}")
    if bias is not None:
        _require(bias.shape == (n,) and bias.dtype == x.dtype and bias.is_contiguous(), "bias",
                 f"must be a contiguous [{n}] {x.dtype} tensor")
    if out is not None:
        _require(out.shape == (x.shape[0], n) and out.dtype == x.dtype and out.stride(1) == 1,
                 "out", f"must be a [{x.shape[0]}, {n}] {x.dtype} tensor with a contiguous last dim")


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, config: dict | None = None,
                  push: arn.PushTarget | None = None) -> torch.Tensor:
    """``x @ weight^T + bias``: x [M, K], weight [N, K] -> [M, N] (any M; meant for M <= 16).

    push: the result is this rank's share of a tensor-parallel sum that the next kernel,
    ``all_reduce_rms_norm(..., pushed=True)``, completes; each program also sends its tile
    of it to the peers' buffers there (strata.kernels.all_reduce_norm.push_share)."""
    _check(x, weight, bias, out)
    m, (n, k) = x.shape[0], weight.shape
    push_args, push_meta = (weight, weight, 0), {}   # (unused without push)
    if push is not None:
        _require(bias is None and n == push.n_cols and m <= push.max_rows and x.dtype == push.dtype, "push",
                 f"takes up to {push.max_rows} rows of {push.n_cols} {push.dtype} and no bias, got "
                 f"[{m}, {n}] {x.dtype}{' with a bias' if bias is not None else ''}")
        push_args, push_meta = push.kernel_args()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    meta = dict(config or default_config(m, n, k), **push_meta)
    grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))
    if pdl.enabled(x) and os.environ.get("STRATA_GEMV_PDL", "1") != "0":
        meta.update(pdl.launch_options(x), PREFETCH_K=prefetch_k(n, k, weight.element_size(), meta),
                    LINE=_LINE_BYTES // weight.element_size())
    _skinny_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), *push_args,
        HAS_BIAS=bias is not None,
        EVEN_N=n % meta["BLOCK_N"] == 0, EVEN_K=k % meta["BLOCK_K"] == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **meta)
    return out


def prefetch_k(n: int, k: int, element_size: int, meta: dict) -> int:
    """Weights per row to ask L2 for before the PDL wait (0: none).

    ``prefetch_bytes()`` of the matrix at most, the same number of 128-byte lines (a power of
    two) from the start of every row, and at most 16 requests per thread."""
    lines = min(prefetch_bytes() // (n * _LINE_BYTES), triton.cdiv(k * element_size, _LINE_BYTES),
                16 * 32 * meta["num_warps"] // meta["BLOCK_N"])
    if lines < 1:
        return 0
    return (1 << (lines.bit_length() - 1)) * _LINE_BYTES // element_size


def skinny_matmul_ref(x, weight, bias=None, out=None, config=None):
    """Reference: F.linear."""
    _check(x, weight, bias, out)
    y = F.linear(x, weight, bias)
    return out.copy_(y) if out is not None else y
