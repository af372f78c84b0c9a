"""One-row int4 matmul (decode): ``y = x @ W^T`` for strata's packed int4 weights, fp32 products
on CUDA cores, weights unpacked without conversions, split over K when the matrix is too narrow
to give every SM work.

Format (``strata.kernels.quant_matmul``): ``qweight`` [N, K/2] uint8, element k of row n in
nibble k % 8 of 32-bit word k / 8 (pack_int4's order: byte j holds k = 2j low, 2j + 1 high);
``W[n, k] = q * scales[n, k/G] + mins[n, k/G]``.

Unpacking without conversions or shifts: the fp32 whose bit pattern is an integer p < 2**24 is
p * 2**-149 exactly (a denormal, or for 2**23 <= p the smallest binade, which continues it
evenly). So nibble J of a word w, masked in place (``w & (15 << 4J)``, one LOP3), *is* the float
``q * 2**(4J - 149)`` for J = 0..5; nibbles 6 and 7 share one shift (``w >> 8``) and then lie at
bits 16-23 the same way. x carries the compensating powers of two:
``x'_J = x_J * 2**(149 - E - SHIFT_J)``, so one FFMA ``p += x'_J * f_J`` adds ``x_J * q * 2**-E``
(exact for bf16/fp16 x, one rounding for fp32; no offset to cancel, so no precision is lost
whatever J). E = 85 keeps ``x'`` finite for |x| < 2**64 and the products normal for
|x q| >= 2**-41 (smaller ones lose bits below 2**-64 absolute). Per word of 8 weights: 8 LOP3 +
1 shift on the integer pipe (half the FP32 rate on sm_80/sm_90) and 8 FFMA.

Scales per chunk: a step is a [BLOCK_N, C, 4] tile of words (C = KW / 4 chunks of 4 words = 32
weights, always inside one group since G is a multiple of 32), loaded through [BLOCK_N, KW]
pointers and reshaped: so built, Triton's layout runs the threads along the chunks and gives each
thread the same chunk of BLOCK_N / num_warps rows, whose x it converts, pre-scales and sums once
for all of them (built as [BLOCK_N, C, 4], the threads ran along the rows and every row converted
x again). x is loaded in the same layout, one address down the rows (lanes that share an address
share the transaction), so it never changes threads. Each word's 8 products go into their own
FFMA chain (four independent chains a chunk), then ``s * p`` and ``min * sum(x)`` per chunk. The
next step's words, scales and mins are loaded before this step's arithmetic (registers double
buffered), so a warp does not wait a whole DRAM latency each step.

How it got here (bench/gpu_int4_profile.py, H100 and H200, 2026-11-21; docs/benchmarks.md): the
first version (512 rows x 8 words a step on 2 warps, 2.74 SASS instructions a weight) ran at 18-26%
of the bandwidth floor. Nsight Compute showed 3-5% of the warp slots active and each warp's load
covering 16 rows x 32 bytes: DRAM serves short scattered runs slowly, and every tile with 32-64
bytes of a row a step stopped at the same ~36% whatever its warps or split. Runs of 512 bytes
(KW = 128) brought it level with the element-wise tile of quant_matmul; x loaded in the weights'
layout (it had gone through shared memory: 8 conversions and 18 barriers a step), the prefetch
and the chains made it 15-27% faster than that tile; x converted once for the rows a thread holds
(6.4 -> 4.95 SASS instructions a weight at 2 rows x 128 words on one warp) took the 8B matrices on
an H100 to 51-94% of the floor (gemv_config has the tiles) and batch-1 decode from 333 to 382 tok/s.

Split-K, one launch: a grid of (row blocks, SPLIT_K) programs, each a slice of K. Each stores its
fp32 partial row to a workspace [SPLIT_K, N]; after a barrier one thread increments the row
block's counter with acq_rel semantics at GPU scope (CUTLASS's serial split-K semaphore
pattern); the program that sees SPLIT_K - 1 (the last) sums the partials in split order (so the
result does not depend on which program is last), adds the bias, writes y in x's dtype and resets
the counter to 0, so the buffers are reusable by the next launch and inside CUDA graphs. The
workspace is one per device (``workspace``), so kernels that use it must run one after another
(one stream, as the engine does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels import pdl

# log2 of the scale that the products carry (module docstring).
E_LOG2 = tl.constexpr(85)
OUT_SCALE = tl.constexpr(2.0 ** 85)

# The split-K workspace: partial sums (fp32) and one counter a row block, per device.
WORKSPACE_FLOATS = 1 << 20
WORKSPACE_COUNTERS = 1 << 12
_workspaces: dict = {}


def workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [WORKSPACE_FLOATS] fp32, counters [WORKSPACE_COUNTERS] int32, zeroed) of this
    device, allocated on first use. Not during a CUDA graph capture: the zeroing would happen
    only when the graph replays (the engine runs every shape once eagerly before capturing)."""
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device()
           if device.type == "cuda" else 0)
    if key not in _workspaces:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("int4 split-K workspace: first use inside a CUDA graph capture; "
                               "run the model once eagerly before capturing")
        _workspaces[key] = (torch.zeros(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                            torch.zeros(WORKSPACE_COUNTERS, dtype=torch.int32, device=device))
    return _workspaces[key]


# x's prescale 2**(149 - E - SHIFT_J) = 2**(64 - SHIFT_J) for nibble J (E = E_LOG2 = 85).
XS0, XS1, XS2, XS3, XS4, XS5, XS6, XS7 = [tl.constexpr(2.0 ** (64 - shift))
                                          for shift in (0, 4, 8, 12, 16, 20, 16, 20)]


@triton.jit
def _split4(t, A: tl.constexpr, B: tl.constexpr):
    """[A, B, 4] -> its 4 slices along the last dim, each [A, B] (in-thread: no data moves)."""
    a, b = tl.split(tl.reshape(t, (A, B, 2, 2)))        # even, odd index
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _f16_to_f32(h):
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_word(ptrs, mask, R: tl.constexpr, C: tl.constexpr, X_KIND: tl.constexpr,
            EVEN_K: tl.constexpr):
    """The 8 x values of one word a chunk, each [1, C] fp32, and their sum [1, C, 4]. ptrs
    [1, C, 4] point to the first 16 bytes of them in x as int32 (two bf16/fp16, X_KIND 0/1, or one
    fp32, X_KIND 2)."""
    if X_KIND == 2:
        if EVEN_K:
            a = tl.load(ptrs).to(tl.float32, bitcast=True)
            b = tl.load(ptrs + 4).to(tl.float32, bitcast=True)
        else:
            a = tl.load(ptrs, mask=mask, other=0).to(tl.float32, bitcast=True)
            b = tl.load(ptrs + 4, mask=mask, other=0).to(tl.float32, bitcast=True)
        a = tl.reshape(a, (R, C, 4))
        b = tl.reshape(b, (R, C, 4))
        x0, x1, x2, x3 = _split4(a, R, C)
        x4, x5, x6, x7 = _split4(b, R, C)
        return x0, x1, x2, x3, x4, x5, x6, x7, a + b
    if EVEN_K:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0)
    v = tl.reshape(v, (R, C, 4))
    if X_KIND == 0:                     # bf16: the high half of an fp32
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    else:
        lo = _f16_to_f32(v & 0xFFFF)
        hi = _f16_to_f32(v >> 16)
    x0, x2, x4, x6 = _split4(lo, R, C)
    x1, x3, x5, x7 = _split4(hi, R, C)
    return x0, x1, x2, x3, x4, x5, x6, x7, lo + hi


@triton.jit
def _nib(w, MASK: tl.constexpr):
    """Nibble(s) of int32 w under MASK, read as the fp32 q * 2**(shift - 149)."""
    return (w & MASK).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot(p, w, x_ptrs, mask, R: tl.constexpr, C: tl.constexpr, X_KIND: tl.constexpr,
              EVEN_K: tl.constexpr):
    """p + sum_J x'_J * nibble_J(w) for one word of each chunk, w [BLOCK_N, C]: 8 LOP3, one
    shift and 8 FFMA a word a row. Also returns the x sum of the word [1, C, 4]."""
    x0, x1, x2, x3, x4, x5, x6, x7, xsum = _x_word(x_ptrs, mask, R, C, X_KIND, EVEN_K)
    hi = w >> 8                          # nibbles 6 and 7 at bits 16-23
    p += _nib(w, 0xF) * (x0 * XS0)
    p += _nib(w, 0xF0) * (x1 * XS1)
    p += _nib(w, 0xF00) * (x2 * XS2)
    p += _nib(w, 0xF000) * (x3 * XS3)
    p += _nib(w, 0xF0000) * (x4 * XS4)
    p += _nib(w, 0xF00000) * (x5 * XS5)
    p += _nib(hi, 0xF0000) * (x6 * XS6)
    p += _nib(hi, 0xF00000) * (x7 * XS7)
    return p, xsum


@triton.jit
def _step_loads(q_tile, s_rows, mn_rows, w0, n_mask, word_ct, offs_c, K, s_stride_g, mn_stride_g,
                in_slice, GROUP_SIZE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                EVICT: tl.constexpr):
    """The packed words [BLOCK_N, C, 4] of the step at word w0 (q_tile: [BLOCK_N, KW] pointers)
    and the scales and mins [BLOCK_N, C] of its chunks; nothing is read where in_slice (a scalar)
    is false (the step after the last; a [1] tensor: Triton 3.9's interpreter keeps a scalar
    comparison of plain ints a Python bool, which then makes the masks integers)."""
    g = (w0 * 8 + offs_c * 32) // GROUP_SIZE
    if EVEN_N and EVEN_K:
        # The condition as boolean tensors of the loads' shapes (Triton 3.9's interpreter takes no
        # scalar mask); ``>= 0`` holds everywhere.
        w_ok = (word_ct >= 0) & in_slice
        g_ok = (offs_c >= 0)[None, :] & in_slice
        w = tl.load(q_tile + w0, mask=w_ok, other=0, eviction_policy=EVICT)
        s = tl.load(s_rows + g[None, :] * s_stride_g, mask=g_ok, other=0.0).to(tl.float32)
        mn = tl.load(mn_rows + g[None, :] * mn_stride_g, mask=g_ok, other=0.0).to(tl.float32)
    else:
        word_ok = (w0 + word_ct < K // 8) & in_slice                          # [1, KW]
        w = tl.load(q_tile + w0, mask=n_mask[:, None] & word_ok, other=0,
                    eviction_policy=EVICT)
        g_mask = n_mask[:, None] & ((w0 * 8 + offs_c * 32 < K)[None, :] & in_slice)
        s = tl.load(s_rows + g[None, :] * s_stride_g, mask=g_mask, other=0.0).to(tl.float32)
        mn = tl.load(mn_rows + g[None, :] * mn_stride_g, mask=g_mask, other=0.0).to(tl.float32)
    return tl.reshape(w, (w.shape[0], offs_c.shape[0], 4)), s, mn


@triton.jit(do_not_specialize=["split_k"])
def _w4_gemv_kernel(x_ptr, q_ptr, s_ptr, mn_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, N, K,
                    split_k, words_per_split, q_stride, s_stride_n, s_stride_g, mn_stride_n,
                    mn_stride_g, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                    X_KIND: tl.constexpr, EVICT: tl.constexpr, BLOCK_N: tl.constexpr,
                    KW: tl.constexpr, USE_PDL: tl.constexpr = False):
    """y[n] for BLOCK_N rows over K slice program_id(1) of split_k (SPLIT: split_k > 1; a runtime
    value so that one build serves every slice count); steps of KW words (8 * KW weights) as a
    [BLOCK_N, C, 4] tile, C = KW / 4 chunks of 32 weights. x_ptr: x's row as int32. USE_PDL
    (strata.kernels.pdl): the first step's weights are loaded before waiting for the kernel that
    wrote x; the next kernel may launch once every program has stored its results."""
    C: tl.constexpr = KW // 4
    X_PER_WORD: tl.constexpr = 8 if X_KIND == 2 else 4        # int32 of x a word of weights
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = tl.arange(0, C)
    # Pointers are [BLOCK_N, KW] (the loaded values are reshaped to [BLOCK_N, C, 4]): so built,
    # the words are the fastest dim and then the chunks, not the rows, and a thread holds the
    # same chunk of BLOCK_N / num_warps rows, converting its x once for all of them.
    offs_w = tl.arange(0, KW)
    word_ct = offs_w[None, :]                                                   # [1, KW]
    q_tile = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride + word_ct
    # x's words are loaded in the weight tile's own layout, [BLOCK_N, C, 4] with the same address
    # down the rows (lanes of a warp that share an address share the transaction): loaded as
    # [1, C, 4], x went through shared memory each word to meet the weights (8 layout
    # conversions and 18 barriers a step in the sm_90 build).
    x_ct = ((offs_w // 4) * (4 * X_PER_WORD) + offs_w % 4)[None, :] + tl.zeros((BLOCK_N, 1),
                                                                               dtype=tl.int32)
    s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * s_stride_n
    mn_rows = mn_ptr + offs_n.to(tl.int64)[:, None] * mn_stride_n
    acc_s = tl.zeros((BLOCK_N, C), dtype=tl.float32)      # sum of s * p (scaled by 2**-E)
    acc_m = tl.zeros((BLOCK_N, C), dtype=tl.float32)      # sum of min * sum(x)
    w_start = pid_k * words_per_split          # in words: the launcher's divisibility hints
    # The step's weights, scales and mins are loaded one step ahead (registers double-buffered):
    # without that a warp waits a whole DRAM latency each step, and with the few warps an SM
    # holds (registers) the kernel ran at ~40-50% of the bandwidth floor whatever the tile.
    w, s, mn = _step_loads(q_tile, s_rows, mn_rows, w_start, n_mask, word_ct, offs_c, K,
                           s_stride_g, mn_stride_g, tl.arange(0, 1) < words_per_split, GROUP_SIZE,
                           EVEN_N, EVEN_K, EVICT)
    pdl.wait(USE_PDL)                          # x, the workspace and out from here on
    for w_step in range(0, words_per_split, KW):         # make the 16-byte alignment visible;
        w0 = w_start + w_step                            # the masks stop the last slice at K
        w_next, s_next, mn_next = _step_loads(q_tile, s_rows, mn_rows, w0 + KW, n_mask, word_ct,
                                              offs_c, K, s_stride_g, mn_stride_g,
                                              tl.arange(0, 1) + (w_step + KW) < words_per_split,
                                              GROUP_SIZE, EVEN_N, EVEN_K, EVICT)
        w_0, w_1, w_2, w_3 = _split4(w, BLOCK_N, C)
        x_word = x_ptr + w0 * X_PER_WORD + x_ct
        zero = tl.zeros((BLOCK_N, C), dtype=tl.float32)
        chunk_w = w0 + (offs_w // 4)[None, :] * 4 - K // 8          # < -i: word i in K
        # One FFMA chain a word, summed after: four independent chains a (row, chunk) instead of
        # one 32 deep, so that a warp is not waiting on the FMA latency (4 cycles) each product.
        p0, xs0 = _word_dot(zero, w_0, x_word, chunk_w < 0, BLOCK_N, C, X_KIND, EVEN_K)
        p1, xs1 = _word_dot(zero, w_1, x_word + X_PER_WORD, chunk_w < -1, BLOCK_N, C, X_KIND, EVEN_K)
        p2, xs2 = _word_dot(zero, w_2, x_word + 2 * X_PER_WORD, chunk_w < -2, BLOCK_N, C, X_KIND, EVEN_K)
        p3, xs3 = _word_dot(zero, w_3, x_word + 3 * X_PER_WORD, chunk_w < -3, BLOCK_N, C, X_KIND, EVEN_K)
        p = (p0 + p1) + (p2 + p3)
        xs = tl.sum((xs0 + xs1) + (xs2 + xs3), axis=2)                   # [BLOCK_N, C]
        acc_s += s * p
        acc_m += mn * xs
        w, s, mn = w_next, s_next, mn_next
    y = tl.sum(acc_s * OUT_SCALE + acc_m, axis=1)             # [BLOCK_N]
    if not SPLIT:
        _finish(y, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS)
    else:
        tl.store(ws_ptr + pid_k * N + offs_n, y, mask=n_mask)
        tl.debug_barrier()                  # every thread's partial is written before the count
        count = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if count == split_k - 1:            # the last program of this row block: reduce
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i in range(0, split_k):
                total += tl.load(ws_ptr + i * N + offs_n, mask=n_mask, other=0.0,
                                 cache_modifier=".cg")
            _finish(total, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS)
            tl.store(cnt_ptr + pid_n, 0)
    # Triggered last, as skinny_matmul's: H200, batch-1 decode, 424.1 tok/s with the trigger
    # first, 437.0 here (two alternating pairs of engines). (The int8 kernel measured the other
    # way, 362.4 first against 356.1 last, and keeps its trigger first.)
    pdl.trigger(USE_PDL)


@triton.jit
def _finish(y, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


# Measured best tiles of the Llama-3.1-8B matrices, (N, K): config (bench/gpu_int4_profile.py
# --split-sweep --tuned-out on an H100, 2026-11-21 22:15 UTC; q/k/v and o_proj again on
# 2026-11-22 with wider steps, --tiles up to 512 words: 8.0 -> 7.0 and 6.2 -> 5.7 us, batch-1
# decode 407.2 -> 418.9 tok/s. bench/gpu_quant.py --gemv-tuned replaces them from such a file).
# (rows, words a row a step, split, warps, stages):
GEMV_INT4_TUNED: dict[tuple[int, int], dict] = {
    (n, k): dict(GEMV4=True, BLOCK_N=rows, KW=kw, SPLIT_K=split, num_warps=warps, num_stages=stages)
    for n, k, rows, kw, split, warps, stages in (
        (6144, 4096, 4, 256, 1, 2, 2), (4096, 4096, 4, 512, 1, 4, 2), (28672, 4096, 4, 128, 1, 1, 1),
        (4096, 14336, 4, 128, 2, 1, 1), (128256, 4096, 8, 128, 1, 1, 2))}


def gemv_config(n: int, k: int) -> dict:
    """The tile for an [N, K] weight: one warp a program, 128 words (512 bytes) of each of its
    rows a step, 2 rows for N <= 8192, 4 up to 65536, 8 beyond, and split over K in two where K
    is at least twice N (4 rows then): the rule of what bench/gpu_int4_profile.py --split-sweep
    measured fastest for each Llama-3.1-8B matrix on an H100 (2026-11-21 22:15 UTC: q/k/v 59% of
    the bandwidth floor, o_proj 51%, gate/up 85%, down 68%, LM head 94%)."""
    tuned = GEMV_INT4_TUNED.get((n, k))
    if tuned is not None:
        return dict(tuned)
    split = 2 if k >= 2 * n else 1
    block_n = 4 if split == 2 else 2 if n <= 8192 else 4 if n <= 65536 else 8
    return dict(GEMV4=True, BLOCK_N=block_n, KW=128, SPLIT_K=split, num_warps=1, num_stages=1)


def check_config(op: str, meta: dict, m: int) -> None:
    """A GEMV4 config takes one row of x; BLOCK_N a power of two, KW a power of two >= 4 (whole
    32-weight chunks a thread), SPLIT_K None or >= 1."""
    def require(ok, msg):
        if not ok:
            raise ValueError(f"{op}: config {msg}")
    require({"BLOCK_N", "KW", "num_warps"} <= meta.keys(),
            f"GEMV4 needs the keys BLOCK_N, KW, num_warps, got {sorted(meta)}")
    require(m == 1, f"GEMV4 takes one row of x, got {m}")
    bn, kw = meta["BLOCK_N"], meta["KW"]
    require(bn >= 1 and bn & (bn - 1) == 0 and kw >= 4 and kw & (kw - 1) == 0,
            f"GEMV4 needs a power-of-two BLOCK_N and KW >= 4, got BLOCK_N={bn} KW={kw}")
    split = meta.get("SPLIT_K")
    require(split is None or (isinstance(split, int) and split >= 1),
            f"GEMV4 SPLIT_K must be None or a positive int, got {split!r}")


def _split_k(n: int, k: int, block_n: int, kw: int, device: torch.device) -> int:
    """Enough K slices for about two programs an SM, none shorter than 4 steps."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 132)
    row_blocks = triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), k // (4 * 8 * kw)))


def w4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
            group_size: int, bias: torch.Tensor | None, out: torch.Tensor, config: dict) -> None:
    """out[0] = x[0] @ dequantize(qweight)^T + bias, arguments already checked by
    quant_matmul.w4a16_matmul; config: BLOCK_N rows, KW words of 8 weights a row a step (a power
    of two >= 4), num_warps, num_stages and SPLIT_K (None: from the shape and the SM count;
    capped by the workspace)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    block_n, kw = config["BLOCK_N"], config["KW"]
    words = qweight.view(torch.int32)                   # [N, K/8]: 8 nibbles a word
    split_k = config.get("SPLIT_K") or _split_k(n, k, block_n, kw, x.device)
    if triton.cdiv(n, block_n) > WORKSPACE_COUNTERS:    # as many slices as the workspace holds
        split_k = 1
    split_k = max(1, min(split_k, WORKSPACE_FLOATS // n))
    step = 8 * kw
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), step) * step
    split_k = triton.cdiv(k, k_per_split)
    partials, counters = workspace(x.device) if split_k > 1 else (scales, scales)
    grid = (triton.cdiv(n, block_n), split_k)
    _w4_gemv_kernel[grid](
        x.view(torch.int32), words, scales, mins, bias if bias is not None else scales, out, partials, counters,
        n, k, split_k, k_per_split // 8, words.stride(0), *scales.stride(), *mins.stride(),
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None, EVEN_N=n % block_n == 0,
        EVEN_K=k == split_k * k_per_split, SPLIT=split_k > 1, EVICT="evict_first",
        X_KIND={torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[x.dtype],
        BLOCK_N=block_n, KW=kw, num_warps=config["num_warps"], num_stages=config.get("num_stages", 1),
        **pdl.launch_options(x))
