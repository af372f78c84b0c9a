"""One-row int4 matmul (decode): ``y = x @ W^T`` for strata's packed int4 weights, fp32 products
on CUDA cores at ~3 SASS instructions per weight, split over K when the matrix is too narrow
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

Scales per chunk: each thread holds, per row, one 16-byte vector of 4 words (a 32-weight
chunk, always inside one group since G is a multiple of 32), sums its 32 products in one FFMA
chain, and adds ``s * p`` and ``min * sum(x)`` for the chunk: 2 FFMA per row and 32 weights. The
x work of a chunk (conversion to fp32, the prescale, the sum) is shared by the R rows a thread
holds: R = BLOCK_N * KW / (4 * 32 * num_warps), 4 or more in the useful configs.

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


@triton.jit
def _split8(x):
    """[KW, 8] -> its 8 columns, each [KW] (pure register renaming when a thread holds a row)."""
    a, b = tl.split(tl.reshape(x, (x.shape[0], 2, 2, 2)))      # j = 4 j2 + 2 j1 + j0: j0
    a0, a1 = tl.split(a)                                        # j1
    b0, b1 = tl.split(b)
    x0, x4 = tl.split(a0)                                       # j2
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _nibble_f32(w, MASK: tl.constexpr):
    return (w & MASK).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot(w, x):
    """sum_J x'[:, J] * nibble_J(w) [BLOCK_N, KW] for words w [BLOCK_N, KW] and prescaled x'
    [KW, 8]: one FMUL and 7 FFMA, 8 LOP3 and one shift a word."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x)
    hi = w >> 8                          # nibbles 6 and 7 at bits 16-23
    p = _nibble_f32(w, 0xF) * x0[None, :]
    p += _nibble_f32(w, 0xF0) * x1[None, :]
    p += _nibble_f32(w, 0xF00) * x2[None, :]
    p += _nibble_f32(w, 0xF000) * x3[None, :]
    p += _nibble_f32(w, 0xF0000) * x4[None, :]
    p += _nibble_f32(w, 0xF00000) * x5[None, :]
    p += _nibble_f32(hi, 0xF0000) * x6[None, :]
    p += _nibble_f32(hi, 0xF00000) * x7[None, :]
    return p


@triton.jit
def _x_scale():
    """[8] fp32 2**(149 - E - SHIFT_J) = 2**(64 - SHIFT_J): SHIFT_J = 4J for J < 6, 4J - 8 for 6
    and 7 (E = E_LOG2 = 85)."""
    j = tl.arange(0, 8)
    return tl.exp2(tl.where(j < 6, 64 - 4 * j, 72 - 4 * j).to(tl.float32))


@triton.jit(do_not_specialize=["split_k"])
def _w4_gemv_kernel(x_ptr, q_ptr, s_ptr, mn_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, N, K,
                    split_k, words_per_split, q_stride, s_stride_n, s_stride_g, mn_stride_n,
                    mn_stride_g,
                    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
                    EVEN_K: tl.constexpr, SPLIT: tl.constexpr, EVICT: tl.constexpr,
                    BLOCK_N: tl.constexpr, KW: tl.constexpr):
    """y[n] for BLOCK_N rows over K slice program_id(1) of split_k (SPLIT: split_k > 1; a runtime
    value so that one build serves every slice count); steps of KW words (8 * KW weights), C =
    KW / 4 chunks of 32 weights."""
    C: tl.constexpr = KW // 4
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, KW)
    offs_c = tl.arange(0, C)
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride + offs_w[None, :]
    s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * s_stride_n
    mn_rows = mn_ptr + offs_n.to(tl.int64)[:, None] * mn_stride_n
    acc_s = tl.zeros((BLOCK_N, C), dtype=tl.float32)      # sum of s * p (scaled by 2**-E)
    acc_m = tl.zeros((BLOCK_N, C), dtype=tl.float32)      # sum of min * sum(x)
    w_start = pid_k * words_per_split          # in words: the launcher's divisibility hints
    x_scale = _x_scale()                       # make the 16-byte alignment of the loads visible
    for w_step in range(0, words_per_split, KW):         # the masks stop the last slice at K
        w0 = w_start + w_step
        k0 = w0 * 8
        k_chunk = k0 + offs_c * 32                            # first k of each chunk [C]
        x_offs = k0 + offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]
        g = k_chunk // GROUP_SIZE
        if EVEN_K:
            x = tl.load(x_ptr + x_offs).to(tl.float32)
            w_mask = n_mask[:, None]
            g_mask = n_mask[:, None]
        else:
            x = tl.load(x_ptr + x_offs, mask=x_offs < K, other=0.0).to(tl.float32)
            w_mask = n_mask[:, None] & (w0 + offs_w < K // 8)[None, :]
            g_mask = n_mask[:, None] & (k_chunk < K)[None, :]
        if EVEN_N and EVEN_K:
            w = tl.load(q_rows + w0, eviction_policy=EVICT)
        else:
            w = tl.load(q_rows + w0, mask=w_mask, other=0, eviction_policy=EVICT)
        s = tl.load(s_rows + g[None, :] * s_stride_g, mask=g_mask, other=0.0).to(tl.float32)
        mn = tl.load(mn_rows + g[None, :] * mn_stride_g, mask=g_mask, other=0.0).to(tl.float32)
        xs = tl.sum(tl.reshape(tl.sum(x, axis=1), (C, 4)), axis=1)             # [C]
        p = _word_dot(w, x * x_scale[None, :])                                # [BLOCK_N, KW]
        p = tl.sum(tl.reshape(p, (BLOCK_N, C, 4)), axis=2)                     # [BLOCK_N, C]
        acc_s += s * p
        acc_m += mn * xs[None, :]
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


@triton.jit
def _finish(y, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


# Measured best tiles per (N, K) (bench/gpu_quant_sweep.py --gemv prints this table); shapes not
# listed take the rule in gemv_config.
GEMV_INT4_TUNED: dict[tuple[int, int], dict] = {}


def gemv_config(n: int, k: int) -> dict:
    """The tile for an [N, K] weight: 256 rows x 8 words (64 weights) a step on 2 warps, 8 rows
    and 32 weights a thread (3.1 SASS instructions a weight in the sm_90 build); SPLIT_K None:
    chosen at launch for about two programs an SM."""
    tuned = GEMV_INT4_TUNED.get((n, k))
    if tuned is not None:
        return dict(tuned)
    return dict(GEMV4=True, BLOCK_N=256, KW=8, SPLIT_K=None, num_warps=2, num_stages=1)


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
        x, words, scales, mins, bias if bias is not None else scales, out, partials, counters,
        n, k, split_k, k_per_split // 8, words.stride(0), *scales.stride(), *mins.stride(),
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None, EVEN_N=n % block_n == 0,
        EVEN_K=k == split_k * k_per_split, SPLIT=split_k > 1, EVICT="evict_first",
        BLOCK_N=block_n, KW=kw,
        num_warps=config["num_warps"], num_stages=config.get("num_stages", 1))
