"""``x @ W^T`` for weight-only quantized linears: int8 per output channel, and packed int4 with a
scale and a min per group of K.

Formats (what the loaders produce and the torch references below define):

* w8a16: ``qweight`` [N, K] int8, ``scales`` [N]: ``W[n, k] = qweight[n, k] * scales[n]``.
* w4a16: ``qweight`` [N, K/2] uint8, element k of row n in byte k/2, the low nibble for even k
  and the high one for odd k (``pack_int4``); ``scales``, ``mins`` [N, K/G] for groups of G
  (32-256) along K: ``W[n, k] = q[n, k] * scales[n, k/G] + mins[n, k/G]``, q in 0..15.

One kernel per format, three ways to run it, chosen by the config (``default_config``):

* decode, one row (``USE_DOT=False``, ``BLOCK_M=1``): the products ``x[m, k] * W[n, k]``
  accumulate elementwise in an fp32 [BLOCK_N, BLOCK_K] register tile on CUDA cores, reduced over
  k after the loop; the time is the packed weight bytes over the memory bandwidth. The tile has
  the weight loads' own layout: with skinny_matmul's [BLOCK_M, BLOCK_N, BLOCK_K] tile, Triton
  3.6 moves the (here fp32, dequantized) weights through shared memory to match x's layout (seen
  in the PTX), 8 bytes written and 8 read per int4 byte streamed: more than an SM's shared memory
  can take at full DRAM bandwidth.
* int4 decode, one row, by default: the word-wise kernel of strata.kernels.int4_gemv (config
  ``GEMV4``, ``int4_gemv.gemv_config``; ``int4_decode="fma"`` / ``INT4_DECODE`` keep the tile
  above): each nibble masked in place is already an fp32 (a denormal, q * 2**(4J - 149)), x
  carries the powers of two, the group scale and min apply per 32-weight chunk, 512 bytes of a
  row a step; 15-27% faster than the tile above on each 8B matrix (H200), batch-1 decode of the
  8B shape on an H100 333 against 275 tok/s (bench/gpu_quant.py, 2026-11-21 21:40 UTC).
* decode, up to 16 rows (``USE_DOT=True``, ``BLOCK_M=16``): ``tl.dot`` on the dequantized tile,
  the packed weight loads pipelined over ``num_stages`` buffers.
* prefill (``USE_DOT=True``, ``BLOCK_M`` 64/128): the same loop as a tiled GEMM; the programs
  walk the output in groups of ``GROUP_M`` row blocks so that a weight tile is reused from L2 by
  the row blocks that need it before it is evicted.

Weights are dequantized in registers inside the K loop: int8 to exact integers (the per-channel
scale commutes with the sum over k, so it multiplies the fp32 accumulator once, after the loop);
int4 to ``q * scale + min`` in fp32, per group, then rounded to x's dtype for the tensor cores
(``BLOCK_K`` may cover part of a group or several whole ones). Accumulation is fp32 whatever the
dtype; fp32 activations use exact fp32 products (no TF32).

int4 decode, fp16/bf16 rows (``FAST_INT4``, ``_w4_magic_kernel``). Streaming int4 is 2x the
elements per byte of int8, and the paths above spend ~7.4 SASS instructions per weight (the
one-row loop, counted in the sm_90 build: shift/and per nibble, the int->fp32 add/sub, the
scale-and-min FMA, the product FMA, and the reductions), mostly on the integer pipe that runs
at half the FP32 rate: about 2/3 of what 3.35 TB/s needs, 44-48% measured. This path takes the
per-element work down to what the tensor cores cannot do:

* scale after the dot: a step is one ``tl.dot`` inside one group (``BLOCK_K`` divides G), so
  ``y += scale_g * sum_k x_k q_k + min_g * sum_k x_k`` is one [BLOCK_M, BLOCK_N] FMA pair a
  step, not a multiply-add per weight;
* no int->float conversion: a nibble or-ed into the mantissa of 128.0 (bf16 0x4300) or 1024.0
  (fp16 0x6400) is exactly MAGIC + q, and ``x * (MAGIC + q)`` is exact on the tensor cores, so
  ``c_g = min_g - MAGIC * scale_g`` absorbs the offset: ``y += scale_g * dot + c_g * xsum``,
  all fp32 (more exact than the old dot path, which rounds ``q * scale + min`` to x's dtype);
* tensor cores even for one row (a 16-row tile, 15 rows masked): at full bandwidth that is
  ~1/3 of the H100's mma.sync rate, and the products cost one HMMA per 4 weights a lane;
* ``xsum = sum_k x_k`` in the accumulator's own layout comes from a second dot with a tile of
  ones (8 HMMA per warp a step, x reused from shared memory): a reduction of x on CUDA cores
  costs more (each warp holds all of x in the dot layout) and would need a layout conversion;
* ``USE_ASM``: one 32-bit word of 4 packed bytes becomes four bf16x2/fp16x2 registers in 8
  instructions (2 prmt to spread the bytes into 16-bit halves, 2 shifts, 4 lop3 doing
  ``(t & 0x000F000F) | MAGIC``), then Triton pairs (low, high) nibbles for the mma operand (4
  prmt): 1.5 integer ops a weight. The plain Triton version of the same arithmetic (what the
  interpreter runs) compiles to ~2.3. Output element j of the asm depends only on byte j, so
  the storage layout stays pack_int4's: a layout with the bytes of a word reordered would save
  1 op in 12 (3 shifts + 4 lop3, no prmt), not worth moving a format other code reads.

Counted in the sm_90 SASS of the K loop (bf16, 128-deep steps, 4 warps), per weight a lane:
[16 x 32] tiles 6.0 instructions, [16 x 64] 4.6, [16 x 128] 3.6 (the fixed per-step costs: x
from shared memory, the ones dot, the scale loads, amortised over wider tiles) against ~4.9
that the issue rate allows at 3.35 TB/s; wide tiles leave narrow matrices few programs (4096
outputs / 64 = 64 programs on 132 SMs), which the sweep weighs. Groups of 32 make 32-deep
steps (13.6 instructions a weight): default_config keeps them on the old path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from strata.kernels import int4_gemv, pdl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_SIZES = (32, 64, 128, 256)
# Rows of x up to which default_config streams the weights (decode); beyond, it tiles a GEMM.
MAX_DECODE_ROWS = 16


@triton.jit
def _int_to_f32(v, OFFSET: tl.constexpr):
    """int32 v, -OFFSET <= v < 2**23 - OFFSET, as fp32, exactly: the bits 0x4B000000 + OFFSET + v
    are the float 2**23 + OFFSET + v. An integer add and a float subtract instead of a conversion
    instruction, which the CUDA guide's throughput table lists at 16 a clock per SM on sm_80 and
    sm_90 (integer adds 64, float adds 128): fewer than the 25-30 int4 weights a clock that an
    H100's memory delivers to each SM."""
    return (v + (0x4B000000 + OFFSET)).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile, column blocks fastest within groups
    of GROUP_M row blocks (one row block when decoding: a plain walk over the columns)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % rows_in_group
    pid_n = (pid % pids_per_group) // rows_in_group
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _load_weight(ptrs, n_mask, k_mask, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 EVICT: tl.constexpr):
    # Unmasked when the tile divides the matrix: masks would split the 16-byte loads.
    if EVEN_N and EVEN_K:
        return tl.load(ptrs, eviction_policy=EVICT)
    elif EVEN_K:
        return tl.load(ptrs, mask=n_mask[:, None], other=0, eviction_policy=EVICT)
    else:
        return tl.load(ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0,
                       eviction_policy=EVICT)


@triton.jit
def _load_scales(ptrs, n_mask, g_mask, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_N and EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    elif EVEN_K:
        return tl.load(ptrs, mask=n_mask[:, None], other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs, mask=n_mask[:, None] & g_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _multiply_add(acc, x, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x @ w^T for an x tile [BLOCK_M, BLOCK_K] and a dequantized fp32 w [BLOCK_N, BLOCK_K]:
    on tensor cores in x's dtype, or (one row) elementwise into acc [BLOCK_N, BLOCK_K]."""
    if USE_DOT:
        return tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    else:
        return acc + tl.reshape(x, (x.shape[1],)).to(tl.float32)[None, :] * w


@triton.jit
def _accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)


@triton.jit
def _reduced(acc, USE_DOT: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] result of the accumulator after the K loop."""
    if USE_DOT:
        return acc
    else:
        return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _store(acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, out_stride,
           HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w8_step(acc, q, x_rows, offs_k, m_mask, K, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """acc += x[:, offs_k] @ dequantized(q)^T (without the per-row scale, applied at the end)."""
    w = _int_to_f32(q.to(tl.int32), 128)
    x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
    return _multiply_add(acc, x, w, USE_DOT, DOT_PRECISION)


@triton.jit
def _w8_kernel(x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, x_stride, q_stride, s_stride,
               out_stride, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, EVEN_N: tl.constexpr,
               EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EVICT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl.trigger(USE_PDL)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride
    acc = _accumulator(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT)
    k_start = 0
    if USE_PDL:
        # The first weight tile is loaded before waiting for the kernel that wrote x (strata.
        # kernels.pdl), so its fetch overlaps that kernel's tail. Only then: peeled off, the step
        # would no longer be in the loop that Triton software-pipelines for the tensor-core tiles.
        offs_k = tl.arange(0, BLOCK_K)
        q = _load_weight(q_rows + offs_k[None, :], n_mask, offs_k < K, EVEN_N, EVEN_K, EVICT)
        pdl.wait(USE_PDL)
        acc = _w8_step(acc, q, x_rows, offs_k, m_mask, K, USE_DOT, EVEN_K, DOT_PRECISION)
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = _load_weight(q_rows + offs_k[None, :], n_mask, offs_k < K, EVEN_N, EVEN_K, EVICT)
        acc = _w8_step(acc, q, x_rows, offs_k, m_mask, K, USE_DOT, EVEN_K, DOT_PRECISION)
    acc = _reduced(acc, USE_DOT)
    scales = tl.load(s_ptr + offs_n * s_stride, mask=n_mask, other=0.0).to(tl.float32)
    _store(acc * scales[None, :], bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, out_stride,
           HAS_BIAS)


@triton.jit
def _dequant_int4(packed, s_rows, mn_rows, s_stride_g, mn_stride_g, k0, K, n_mask,
                  EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K // 2] tile of packed bytes -> [BLOCK_N, BLOCK_K] fp32 weights."""
    b = packed.to(tl.int32)
    # join puts each byte's two nibbles side by side: even k (low nibble), then odd k (high).
    q = _int_to_f32(tl.join(b & 15, b >> 4).reshape(BLOCK_N, BLOCK_K), 0)
    if BLOCK_K <= GROUP_SIZE:           # the tile lies in one group (both are powers of two)
        g = k0 // GROUP_SIZE
        s = tl.load(s_rows + g * s_stride_g, mask=n_mask, other=0.0).to(tl.float32)
        mn = tl.load(mn_rows + g * mn_stride_g, mask=n_mask, other=0.0).to(tl.float32)
        return q * s[:, None] + mn[:, None]
    else:                               # several whole groups: scale [BLOCK_N, groups, G] views
        NUM_G: tl.constexpr = BLOCK_K // GROUP_SIZE
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NUM_G)
        g_mask = offs_g < K // GROUP_SIZE
        s = _load_scales(s_rows[:, None] + offs_g[None, :] * s_stride_g, n_mask, g_mask,
                         EVEN_N, EVEN_K)
        mn = _load_scales(mn_rows[:, None] + offs_g[None, :] * mn_stride_g, n_mask, g_mask,
                          EVEN_N, EVEN_K)
        w = q.reshape(BLOCK_N, NUM_G, GROUP_SIZE) * s[:, :, None] + mn[:, :, None]
        return w.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _w4_kernel(x_ptr, q_ptr, s_ptr, mn_ptr, bias_ptr, out_ptr, M, N, K, x_stride, q_stride,
               s_stride_n, s_stride_g, mn_stride_n, mn_stride_g, out_stride,
               GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
               EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
               EVICT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride
    s_rows = s_ptr + offs_n.to(tl.int64) * s_stride_n
    mn_rows = mn_ptr + offs_n.to(tl.int64) * mn_stride_n
    acc = _accumulator(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        k_mask = offs_k < K
        packed = _load_weight(q_rows + offs_b[None, :], n_mask, offs_b < K // 2, EVEN_N, EVEN_K,
                              EVICT)
        w = _dequant_int4(packed, s_rows, mn_rows, s_stride_g, mn_stride_g, k0, K, n_mask,
                          EVEN_N, EVEN_K, GROUP_SIZE, BLOCK_N, BLOCK_K)
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        acc = _multiply_add(acc, x, w, USE_DOT, DOT_PRECISION)
    acc = _reduced(acc, USE_DOT)
    _store(acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, out_stride, HAS_BIAS)


# One 32-bit word of 4 packed bytes -> 4 bf16x2 (fp16x2) registers, each half MAGIC + q:
# $0 = (lo nibble of byte 0, lo of byte 1), $1 = (lo 2, lo 3), $2 = (hi 0, hi 1), $3 = (hi 2, hi 3).
# prmt spreads bytes 0/1 (2/3) into the two 16-bit halves; lop3 is (t & 0x000F000F) | MAGIC.
_MAGIC_ASM = """
{
.reg .b32 t<4>;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shr.b32 t2, t0, 4;
shr.b32 t3, t1, 4;
lop3.b32 $0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $2, t2, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $3, t3, 0x000F000F, MAGIC, 0xEA;
}
"""
_MAGIC_ASM_BF16 = tl.constexpr(_MAGIC_ASM.replace("MAGIC", "0x43004300"))
_MAGIC_ASM_FP16 = tl.constexpr(_MAGIC_ASM.replace("MAGIC", "0x64006400"))


@triton.jit
def _int4_magic(packed, X_BF16: tl.constexpr, USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Packed bytes [BLOCK_N, BLOCK_K // 2] -> [BLOCK_N, BLOCK_K] ``MAGIC + q`` in x's dtype
    (128 + q in bf16, 1024 + q in fp16: the nibble or-ed into the mantissa of MAGIC, exact, no
    conversion instruction). USE_ASM does it on whole 32-bit words (two values per instruction);
    the plain version is the same arithmetic per element, for the interpreter."""
    if USE_ASM:
        if X_BF16:
            lo, hi = tl.inline_asm_elementwise(_MAGIC_ASM_BF16, "=r,=r,=r,=r,r", [packed],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                               pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_MAGIC_ASM_FP16, "=r,=r,=r,=r,r", [packed],
                                               dtype=(tl.float16, tl.float16), is_pure=True,
                                               pack=4)
    else:
        b = packed.to(tl.int16)
        if X_BF16:
            lo = ((b & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
            hi = ((b >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        else:
            lo = ((b & 15) | 0x6400).to(tl.float16, bitcast=True)
            hi = ((b >> 4) | 0x6400).to(tl.float16, bitcast=True)
    # even k (low nibbles) and odd k (high) side by side: pack_int4's order
    return tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _group_coefs(s_rows, mn_rows, s_stride_g, mn_stride_g, g, n_mask, MAGIC: tl.constexpr):
    """(scale, min - MAGIC * scale) [BLOCK_N] in fp32 of group g."""
    s = tl.load(s_rows + g * s_stride_g, mask=n_mask, other=0.0).to(tl.float32)
    mn = tl.load(mn_rows + g * mn_stride_g, mask=n_mask, other=0.0).to(tl.float32)
    return s, mn - MAGIC * s


@triton.jit
def _w4_magic_kernel(x_ptr, q_ptr, s_ptr, mn_ptr, bias_ptr, out_ptr, M, N, K, x_stride, q_stride,
                     s_stride_n, s_stride_g, mn_stride_n, mn_stride_g, out_stride,
                     GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
                     EVICT: tl.constexpr, X_BF16: tl.constexpr, USE_ASM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """The int4 decode path on tensor cores with the scales after the dot (module docstring):
    BLOCK_K divides GROUP_SIZE, so each step is one dot inside one group."""
    MAGIC: tl.constexpr = 128.0 if X_BF16 else 1024.0
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride
    s_rows = s_ptr + offs_n.to(tl.int64) * s_stride_n
    mn_rows = mn_ptr + offs_n.to(tl.int64) * mn_stride_n
    ones = tl.full((BLOCK_K, BLOCK_N), 1.0, tl.float32).to(x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The scales feed no dot, so the pipeliner would leave their latency in every step: each
    # step loads the next step's.
    s, c = _group_coefs(s_rows, mn_rows, s_stride_g, mn_stride_g, 0, n_mask, MAGIC)
    last_g = K // GROUP_SIZE - 1
    for k0 in range(0, K, BLOCK_K):
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = _load_weight(q_rows + offs_b[None, :], n_mask, n_mask, EVEN_N, True, EVICT)
        x = tl.load(x_rows + k0 + tl.arange(0, BLOCK_K)[None, :], mask=m_mask[:, None], other=0.0)
        s_next, c_next = _group_coefs(s_rows, mn_rows, s_stride_g, mn_stride_g,
                                      tl.minimum((k0 + BLOCK_K) // GROUP_SIZE, last_g), n_mask,
                                      MAGIC)
        w = _int4_magic(packed, X_BF16, USE_ASM, BLOCK_N, BLOCK_K)     # MAGIC + q
        dot = tl.dot(x, tl.trans(w))                 # sum_k x (MAGIC + q), exact products
        xsum = tl.dot(x, ones)                       # sum_k x, in every column
        acc += dot * s[None, :] + xsum * c[None, :]
        s, c = s_next, c_next
    _store(acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, out_stride, HAS_BIAS)


@functools.lru_cache(maxsize=None)
def default_config(m: int, n: int, k: int, bits: int = 8, dtype: torch.dtype | None = None,
                   group_size: int | None = None, int4_decode: str = "fma") -> dict:
    """Tile shape and launch settings for an [m, k] x [n, k]^T product with ``bits``-bit weights
    (int4: in groups of ``group_size``) and activations of ``dtype``.

    int4, one row: ``int4_decode`` "gemv" (what w4a16_matmul passes: ``INT4_DECODE``) takes the word-wise
    kernel of strata.kernels.int4_gemv (``int4_gemv.gemv_config``): batch-1 decode of the 8B shape
    on an H100 333.0 tok/s against 275.1 for "fma", the element-wise tile below (same run,
    bench/gpu_quant.py --int4-decode, 2026-11-21 21:40 UTC).

    One row streams 4 KiB weight tiles through CUDA-core FMAs; the tile shape is what
    bench/gpu_quant_sweep.py measured fastest on an H100 (2026-11-21, Llama-3.1-8B shapes):
    int8 wants tall-thin tiles for narrow matrices (o_proj, down: [4 x 1024], 86-66% of the
    bandwidth floor) and wide-short ones for gate/up ([16 x 256], 92%), int4 [16 x 512] for
    q/k/v and [8 x 1024] elsewhere (44-48%: the unpacking makes int4 compute-bound there).
    The magic-number int4 tile (``FAST_INT4``, ``magic_int4_config``) is not the default: with
    it, batch-1 decode of the 8B shape on an H100 ran at 137 tok/s against 263 on the one-row
    path (bench/gpu_quant.py, 2026-11-21 15:52), so it waits for bench/gpu_quant_sweep.py to
    find tiles where it wins.
    Up to 16 rows take a 16-row tensor-core tile with the weight loads pipelined; more rows
    tile a GEMM, 64 or 128 rows by 128 columns (64 for narrow matrices), 64 deep (guesses).
    """
    def depth(cap):                     # a power of two, >= 16 for tl.dot, no deeper than K
        return min(cap, triton.next_power_of_2(max(k, 16)))
    if m == 1 and bits == 4 and int4_decode == "gemv":
        return int4_gemv.gemv_config(n, k)
    if m == 1:
        if bits == 8:
            block_n = 4 if n <= 4096 else 16 if n >= 16384 else 8
        else:
            block_n = 16 if 6144 <= n < 16384 else 8
        return dict(BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=depth(4096 * 8 // bits // block_n),
                    USE_DOT=False, num_warps=4, num_stages=1, GROUP_M=1)
    if m <= MAX_DECODE_ROWS:
        return dict(BLOCK_M=16, BLOCK_N=64 if n >= 6144 else 32, BLOCK_K=depth(256),
                    USE_DOT=True, num_warps=4, num_stages=4, GROUP_M=1)
    block_m = 64 if m <= 64 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128 if n >= 2048 else 64, BLOCK_K=depth(64),
                USE_DOT=True, num_warps=4 if block_m == 64 else 8, num_stages=3, GROUP_M=8)


# The int4 one-row kernel default_config picks: "gemv" (strata.kernels.int4_gemv, faster on the
# H100 and H200) or "fma" (the element-wise tile of _w4_kernel), for A/B runs
# (bench/gpu_quant.py --int4-decode).
INT4_DECODE = "gemv"


def magic_int4_config(n: int, group_size: int) -> dict:
    """The magic-number int4 decode tile (fp16/bf16 rows, groups of 64 or more): one group (at
    most 128 deep) a step, 64 columns for wide matrices, else 32."""
    return dict(BLOCK_M=16, BLOCK_N=64 if n >= 6144 else 32, BLOCK_K=min(128, group_size),
                USE_DOT=True, FAST_INT4=True, USE_ASM=True, num_warps=4, num_stages=4, GROUP_M=1)


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "USE_DOT", "num_warps", "num_stages"}


def _require(ok: bool, op: str, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{op}: {name} {msg}")


def _check_config(op: str, meta: dict) -> None:
    _require(_CONFIG_KEYS <= meta.keys(), op, "config", f"needs the keys {sorted(_CONFIG_KEYS)}, "
             f"got {sorted(meta)}")
    blocks = [meta[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]
    _require(all(b >= 1 and b & (b - 1) == 0 for b in blocks) and meta["BLOCK_K"] >= 2, op,
             "config", f"needs power-of-two blocks (BLOCK_K >= 2), got {blocks}")
    if meta["USE_DOT"]:
        _require(min(blocks) >= 16, op, "config", f"with USE_DOT needs blocks of at least 16, "
                 f"got {blocks}")
    else:
        _require(meta["BLOCK_M"] == 1, op, "config", "without USE_DOT needs BLOCK_M=1")


def _check_fast_int4(op: str, meta: dict, x: torch.Tensor, group_size: int | None) -> None:
    """FAST_INT4 (the magic-number tensor-core tile) takes int4 weights, fp16/bf16 rows and
    steps that stay inside one group."""
    _require(group_size is not None, op, "config", "FAST_INT4 is for int4 weights")
    _require(x.dtype in (torch.float16, torch.bfloat16), op, "config",
             f"FAST_INT4 needs fp16/bf16 x, got {x.dtype}")
    _require(meta["USE_DOT"] and meta["BLOCK_K"] <= group_size, op, "config",
             f"FAST_INT4 needs USE_DOT and BLOCK_K <= group_size {group_size}, got "
             f"USE_DOT={meta['USE_DOT']} BLOCK_K={meta['BLOCK_K']}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_float(op: str, name: str, t: torch.Tensor, shape: tuple, device) -> None:
    _require(t.dtype in _DTYPES and tuple(t.shape) == shape and t.device == device, op, name,
             f"must be a {list(shape)} fp32/fp16/bf16 tensor on {device}, got {t.dtype} "
             f"{tuple(t.shape)} on {t.device}")


def _columns(qweight):
    return qweight.shape[-1] if qweight.dim() else -1


def _check_common(op, x, qweight, qdtype, k, bias, out):
    """Checks shared by both formats; returns (m, n)."""
    _require(x.dtype in _DTYPES and x.dim() == 2, op, "x", f"must be a 2-D fp32/fp16/bf16 tensor, "
             f"got {x.dtype} of shape {tuple(x.shape)}")
    _require(x.stride(1) == 1, op, "x", "needs a contiguous last dim")
    _require(qweight.dtype == qdtype and qweight.dim() == 2 and qweight.is_contiguous()
             and qweight.device == x.device, op, "qweight", f"must be a contiguous 2-D {qdtype} "
             f"tensor on {x.device}, got {qweight.dtype} {tuple(qweight.shape)} on {qweight.device}")
    m, n = x.shape[0], qweight.shape[0]
    _require(x.shape[1] == k, op, "x", f"has {x.shape[1]} columns, the weight needs {k}")
    if bias is not None:
        _check_float(op, "bias", bias, (n,), x.device)
        _require(bias.is_contiguous(), op, "bias", "must be contiguous")
    if out is not None:
        _require(out.shape == (m, n) and out.dtype == x.dtype and out.device == x.device
                 and out.stride(1) == 1, op, "out",
                 f"must be a [{m}, {n}] {x.dtype} tensor on {x.device} with a contiguous last dim")
    return m, n


def _check_int4(op, qweight, scales, mins, group_size, device=None):
    """Checks of an int4 weight (shape of its scales and mins); returns (n, k)."""
    _require(qweight.dtype == torch.uint8 and qweight.dim() == 2, op, "qweight",
             f"must be a 2-D uint8 tensor of packed nibbles, got {qweight.dtype} "
             f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _require(group_size in GROUP_SIZES, op, "group_size", f"must be one of {GROUP_SIZES}, "
             f"got {group_size}")
    _require(k % group_size == 0, op, "group_size", f"{group_size} must divide K = {k}")
    device = device or qweight.device
    _check_float(op, "scales", scales, (n, k // group_size), device)
    _check_float(op, "mins", mins, (n, k // group_size), device)
    return n, k


def _launch(op, kernel, x, out, n, k, config, bits, tensors, strides, **constexprs):
    """Pick the tile config, allocate ``out`` and launch ``kernel`` over the output tiles:
    ``tensors`` are its pointer arguments before ``out``, ``strides`` its weight strides."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    group_size = constexprs.get("GROUP_SIZE")
    meta = {"GROUP_M": 1, **(config or default_config(m, n, k, bits, x.dtype, group_size))}
    _check_config(op, meta)
    if meta.pop("FAST_INT4", False):
        _check_fast_int4(op, meta, x, group_size)
        del meta["USE_DOT"]
        kernel = _w4_magic_kernel
        # The interpreter cannot run inline PTX; it runs the same arithmetic in plain Triton.
        constexprs.update(X_BF16=x.dtype == torch.bfloat16,
                          USE_ASM=meta.pop("USE_ASM", True) and not _interpreting())
    else:
        meta.pop("USE_ASM", None)
        constexprs.update(EVEN_K=k % meta["BLOCK_K"] == 0,
                          DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    num_row_blocks = triton.cdiv(m, meta["BLOCK_M"])
    grid = (num_row_blocks * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel[grid](
        *tensors, out, m, n, k, x.stride(0), *strides, out.stride(0),
        EVEN_N=n % meta["BLOCK_N"] == 0,
        # A weight tile read by one row block is not read again: keep it out of L2's way.
        EVICT="evict_first" if num_row_blocks == 1 else "", **constexprs, **meta)
    return out


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """``x @ (qweight * scales[:, None])^T + bias``: x [M, K], int8 qweight [N, K] -> [M, N]."""
    op = "w8a16_matmul"
    _, n = _check_common(op, x, qweight, torch.int8, _columns(qweight), bias, out)
    _check_float(op, "scales", scales, (n,), x.device)
    return _launch(op, _w8_kernel, x, out, n, x.shape[1], config, 8,
                   (x, qweight, scales, bias if bias is not None else scales),
                   (qweight.stride(0), scales.stride(0)), HAS_BIAS=bias is not None,
                   **pdl.launch_options(x))


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 mins: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x @ dequantize_int4(...)^T + bias``: x [M, K], packed qweight [N, K/2] -> [M, N]."""
    op = "w4a16_matmul"
    n, k = _check_int4(op, qweight, scales, mins, group_size, x.device)
    m, _ = _check_common(op, x, qweight, torch.uint8, k, bias, out)
    if config is None and m > 0 and n > 0:
        config = default_config(m, n, k, 4, x.dtype, group_size, INT4_DECODE)
    if config is not None and config.get("GEMV4"):
        int4_gemv.check_config(op, config, m)
        if out is None:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        if qweight.data_ptr() % 4 == 0 and x.data_ptr() % 4 == 0:   # it reads 32-bit words
            int4_gemv.w4_gemv(x, qweight, scales, mins, group_size, bias, out, config)
            return out
        config = default_config(m, n, k, 4, x.dtype, group_size, "fma")
    return _launch(op, _w4_kernel, x, out, n, k, config, 4,
                   (x, qweight, scales, mins, bias if bias is not None else scales),
                   (qweight.stride(0), *scales.stride(), *mins.stride()),
                   GROUP_SIZE=group_size, HAS_BIAS=bias is not None)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] -> bytes [..., K/2]: even k in the low nibble, odd k high."""
    if q.dtype != torch.uint8 or q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: q must be a uint8 tensor with an even last dim, got "
                         f"{q.dtype} {tuple(q.shape)}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4: q values must be 0..15, got up to {int(q.max())}")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: bytes [..., K/2] -> uint8 values 0..15 [..., K]."""
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError(f"unpack_int4: packed must be a uint8 tensor, got {packed.dtype}")
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(qweight, scales, mins, group_size, dtype=torch.float32) -> torch.Tensor:
    """Packed qweight [N, K/2] -> weights [N, K] in ``dtype``, computed in fp32."""
    n, k = _check_int4("dequantize_int4", qweight, scales, mins, group_size)
    q = unpack_int4(qweight).float().view(n, k // group_size, group_size)
    w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.view(n, k).to(dtype)


def w8a16_matmul_ref(x, qweight, scales, bias=None, out=None, config=None):
    """Reference: dequantize to fp32, F.linear in fp32, round to x's dtype."""
    op = "w8a16_matmul"
    _, n = _check_common(op, x, qweight, torch.int8, _columns(qweight), bias, out)
    _check_float(op, "scales", scales, (n,), x.device)
    w = qweight.float() * scales.float()[:, None]
    return _finish_ref(x, w, bias, out)


def w4a16_matmul_ref(x, qweight, scales, mins, group_size, bias=None, out=None, config=None):
    """Reference: dequantize to fp32, F.linear in fp32, round to x's dtype."""
    op = "w4a16_matmul"
    _, k = _check_int4(op, qweight, scales, mins, group_size, x.device)
    _check_common(op, x, qweight, torch.uint8, k, bias, out)
    return _finish_ref(x, dequantize_int4(qweight, scales, mins, group_size), bias, out)


def _finish_ref(x, w, bias, out):
    y = F.linear(x.float(), w, bias.float() if bias is not None else None).to(x.dtype)
    return out.copy_(y) if out is not None else y
