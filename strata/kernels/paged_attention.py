"""Paged attention in Triton: single-token decode and varlen causal prefill, with torch references.

The KV cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K at 0,
V at 1). Token ``p`` of a sequence lives in block ``block_tables[row, p // block_size]`` at offset
``p % block_size``. Keys and values of this step's tokens are already in the cache.

A quantized cache (``kv_cache_dtype`` int8 or fp8, strata.quant.kv) holds 8-bit codes and comes
with ``kv_scales [2, num_blocks, block_size, num_kv_heads]`` float32. The kernels' ``KV_QUANT``
switch then loads codes (half the bytes of bf16), converts them to q's dtype (exact), multiplies
each score column by its key's scale and dequantizes V in registers; products still accumulate
in fp32. Off, the switch compiles away: the plain kernels' PTX is what it was before it existed.

``paged_decode`` (one query token per row) is flash-decoding in one launch:

1. ``_decode_kernel``, grid ``(batch, num_kv_heads, num_splits)``. A program owns one KV head of
   one row and a contiguous range of that row's context (the context is cut into ``num_splits``
   ranges of whole ``BLOCK_N`` tiles, computed in the kernel from the row's own ``seq_len``, so
   the grid depends only on shapes). All ``G = H / num_kv_heads`` query heads of the KV head are
   packed into the M dimension of ``tl.dot`` (padded to 16), so K and V are read from memory once
   per KV head. Each tile gathers ``BLOCK_N`` tokens through the block table (one physical slot
   per token), so a 16-token cache block does not force 16-token tiles. Online softmax in fp32.
   With one split the program normalises and writes ``out`` itself; otherwise it writes its
   unnormalised accumulator, running max and sum of exponentials to a fp32 workspace, and the
   last split of a (row, KV head) to finish (a counter per pair, back to zero after) rescales
   the splits to a common max and sums, for each of the G query heads.
2. ``_decode_reduce_kernel``, grid ``(batch, H)``: the same merge as a second launch, only where
   the counters are missing (more pairs than they cover, or a first call inside a CUDA-graph
   capture). At batch 1 the second launch cost as long as the attention itself (~5 us a layer).

Rows with ``seq_len == 0`` (padding in a CUDA-graph batch) load no K/V and write zeros. Nothing
syncs with the host: the launch is safe to capture in a CUDA graph.

``paged_prefill`` is FlashAttention-2 over the block table, grid
``(cdiv(max_query_len, BLOCK_Q), num_seqs, num_kv_heads)``. A program takes ``BLOCK_Q`` query
tokens of one sequence times the ``G`` query heads of one KV head (``BLOCK_M = BLOCK_Q * G_pad``
rows, token-major), so each K/V tile feeds all query heads that share it. A sequence's new tokens
are the last ``query_len`` of its context; the key loop first runs the tiles every query row sees
in full (no causal mask), then the diagonal tiles with the mask, and stops at the tile holding the
block's last query position. Rows with ``query_len == 1`` (decodes in a chunked-prefill step) are
just short sequences.

The number of splits (``choose_num_splits``) depends only on batch, num_kv_heads and the block
table's width: enough programs to cover the SMs ~4 times, at least 128 tokens of the table's width
per split, at most 64 splits, one split (no reduction launch) for short tables or large batches.
Under a CUDA graph the table is as wide as the longest allowed context, so a short row leaves its
late splits empty: those programs exit after one load.

Tile sizes and warps (``_decode_meta`` / ``_prefill_meta``) are starting points for an
H100/H200, to be autotuned. Decode: BLOCK_N=64 tokens (32 for head_dim 256 and for fp32), 4 warps,
3 stages, so a program keeps two or three 16 KB K/V tiles in flight (cp.async) and ~4 programs fit
an SM; the G query heads ride in a 16-row MMA, wasted compute that costs nothing in a memory-bound
kernel. Prefill (bf16/fp16): the FlashAttention-2 shape BLOCK_M=128 x BLOCK_N=64 (64 x 32 for
head_dim 256), 8 warps for head_dim > 64, 2 stages; fp32: 32 x 32 tiles. Compiled for sm_90
without a GPU (triton.compile on a GPUTarget): decode bf16 d128 uses 126 registers and 39 KB of
shared memory, prefill bf16 d128 184 registers, 96 KB and wgmma, no spills; the fp32 prefill spills
~300 B a thread (its products run on the FMA units; it is the accuracy path, not the serving one).
Loads are contiguous along head_dim (the innermost dimension) and compile to 16-byte cp.async;
the head_dim mask of the K/V loads exists only when head_dim is not a power of two.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from strata.kernels import pdl
from strata.kernels.paged_attention_checks import check_decode, check_prefill

_LOG2E = 1.4426950408889634
# Running-max start value: finite, so a row that has seen only masked keys yields exp2(-inf) = 0
# rather than exp2(-inf - -inf) = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)
_MIN_TOKENS_PER_SPLIT = 128
_MAX_SPLITS = 64


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, kv_mask, score_mask, m_i, l_i, acc, qk_scale,
                 ks_ptrs, vs_ptrs, scale_mask, DOT_PRECISION: tl.constexpr, KV_QUANT: tl.constexpr):
    """One online-softmax step of FlashAttention-2 (log2 domain) over one gathered K/V tile.

    q [M, D]; k_ptrs/v_ptrs [N, D]; kv_mask broadcasts to [N, D]; score_mask to [M, N].
    KV_QUANT: K/V are 8-bit codes with a float32 scale per token at ks_ptrs/vs_ptrs [N]
    (scale_mask [N]); otherwise those are not touched.
    """
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if KV_QUANT:
        # Codes are exact in q's dtype; K's scale is one per key, so it scales the score columns.
        k_scale = tl.load(ks_ptrs, mask=scale_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        s = s * (k_scale * qk_scale)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale    # [M, N] fp32
    s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if KV_QUANT:
        # V dequantized to q's dtype (not its scale folded into p: p * scale could fall below
        # fp16's normal range).
        v_scale = tl.load(vs_ptrs, mask=scale_mask, other=0.0)
        v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, out_ptr, ws_acc_ptr, ws_m_ptr, ws_l_ptr, s_ptr, count_ptr,
    qk_scale, stride_qb, stride_qh, stride_kv, stride_kb, stride_kt, stride_kh, stride_btb,
    stride_ob, stride_oh, stride_sv, stride_sb, stride_st,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr, MERGE: tl.constexpr = False, BLOCK_S: tl.constexpr = 1,
    USE_PDL: tl.constexpr = False,
):
    pdl.trigger(USE_PDL)
    pdl.wait(USE_PDL)
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    # Whole tiles per split, from this row's own length: short rows leave late splits empty.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    gd_mask = (g < GROUP)[:, None] & d_mask[None, :]
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gd_mask, other=0.0)                                      # [G, D]

    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = kv_ptr + kv_head * stride_kh + d[None, :]
    s_base = s_ptr + kv_head          # scales [2, blocks, block_size, kv_heads], contiguous
    bt_row = bt_ptr + row * stride_btb
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < end
        # One physical slot per token (int64: a cache may pass 2**31 elements).
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0)
        slots = (block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None]
        s_slots = block.to(tl.int64) * stride_sb + (pos % BLOCK_SIZE) * stride_st   # unused unless KV_QUANT
        if HEAD_DIM == BLOCK_D:
            kv_mask = valid[:, None]    # keeps the loads 16-byte vectors along head_dim
        else:
            kv_mask = valid[:, None] & d_mask[None, :]
        m_i, l_i, acc = _attend_tile(q, k_base + slots, k_base + stride_kv + slots, kv_mask,
                                     valid[None, :], m_i, l_i, acc, qk_scale, s_base + s_slots,
                                     s_base + stride_sv + s_slots, valid, DOT_PRECISION, KV_QUANT)

    if NUM_SPLITS == 1:
        # l_i == 0 only for padding rows (seq_len 0): write zeros, never 0/0.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        # Workspace [batch, heads, splits] (+ [head_dim] for acc), contiguous.
        ml_off = (row * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(ws_m_ptr + ml_off, m_i, mask=g < GROUP)
        tl.store(ws_l_ptr + ml_off, l_i, mask=g < GROUP)
        tl.store(ws_acc_ptr + ml_off[:, None] * HEAD_DIM + d[None, :], acc, mask=gd_mask)
        if MERGE:
            # The last of this (row, KV head)'s splits to finish merges them all, in place of a
            # second launch: every program publishes its workspace (block barrier, then a
            # release by one thread) before counting itself in, and the last one acquires all.
            tl.debug_barrier()
            count = count_ptr + row * (NUM_HEADS // GROUP) + kv_head
            if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                tl.debug_barrier()
                # Unrolled for the usual groups: the heads' loads are independent, and a loop
                # waits for each head's round trips to memory before starting the next.
                if GROUP <= 8:
                    for gi in tl.static_range(GROUP):
                        _merge_splits(ws_acc_ptr, ws_m_ptr, ws_l_ptr, out_ptr, row, kv_head * GROUP + gi,
                                      stride_ob, stride_oh, NUM_HEADS, HEAD_DIM, BLOCK_D, NUM_SPLITS,
                                      BLOCK_S, True)
                else:
                    for gi in range(GROUP):
                        _merge_splits(ws_acc_ptr, ws_m_ptr, ws_l_ptr, out_ptr, row, kv_head * GROUP + gi,
                                      stride_ob, stride_oh, NUM_HEADS, HEAD_DIM, BLOCK_D, NUM_SPLITS,
                                      BLOCK_S, True)
                tl.store(count, 0)   # back to zero for the next launch (and graph replay)


@triton.jit
def _merge_splits(ws_acc_ptr, ws_m_ptr, ws_l_ptr, out_ptr, row, head, stride_ob, stride_oh,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, FRESH: tl.constexpr):
    """One query head of one row: rescale the splits to a common max and sum. FRESH: the
    workspace was written by other programs of the running kernel (read past the L1 cache)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    ml_off = (row * NUM_HEADS + head) * NUM_SPLITS + s
    m = tl.load(ws_m_ptr + ml_off, mask=s_mask, other=_NEG_BIG, volatile=FRESH)
    l = tl.load(ws_l_ptr + ml_off, mask=s_mask, other=0.0, volatile=FRESH)
    # Empty splits carry m = _NEG_BIG and l = 0: their weight vanishes beside any real split.
    w = tl.where(s_mask, tl.exp2(m - tl.max(m, 0)), 0.0)
    denom = tl.sum(w * l, 0)
    # Only the splits that saw a key are read: under a CUDA graph the splits cover the longest
    # allowed context, and a short row leaves most of them empty.
    acc = tl.load(ws_acc_ptr + ml_off[:, None] * HEAD_DIM + d[None, :],
                  mask=(s_mask & (l > 0))[:, None] & (d[None, :] < HEAD_DIM), other=0.0, volatile=FRESH)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _decode_reduce_kernel(
    ws_acc_ptr, ws_m_ptr, ws_l_ptr, out_ptr, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl.trigger(USE_PDL)
    pdl.wait(USE_PDL)
    _merge_splits(ws_acc_ptr, ws_m_ptr, ws_l_ptr, out_ptr, tl.program_id(0), tl.program_id(1),
                  stride_ob, stride_oh, NUM_HEADS, HEAD_DIM, BLOCK_D, NUM_SPLITS, BLOCK_S, False)


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, s_ptr, qk_scale,
    stride_qt, stride_qh, stride_kv, stride_kb, stride_kt, stride_kh, stride_btb,
    stride_ot, stride_oh, stride_sv, stride_sb, stride_st,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_QUANT: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD     # query tokens per program
    # Last query tiles first: they see the most keys, so the longest programs start earliest.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    q_first = q_tile * BLOCK_Q
    if q_first >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq)

    # Row r of the tile is query token q_first + r // GROUP_PAD, head r % GROUP_PAD of the group.
    r = tl.arange(0, BLOCK_M)
    tok = q_first + r // GROUP_PAD
    g = r % GROUP_PAD
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    io_mask = ((tok < q_len) & (g < GROUP))[:, None] & d_mask[None, :]
    q_pos = ctx_len - q_len + tok                    # position of each query in its context
    q_off = (q_begin + tok)[:, None] * stride_qt + (kv_head * GROUP + g)[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + d[None, :], mask=io_mask, other=0.0)          # [M, D]

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = kv_ptr + kv_head * stride_kh + d[None, :]
    s_base = s_ptr + kv_head          # scales [2, blocks, block_size, kv_heads], contiguous
    bt_row = bt_ptr + seq * stride_btb
    first_pos = ctx_len - q_len + q_first
    # Keys past the tile's last query position are masked for every row: stop there.
    hi = tl.minimum(first_pos + BLOCK_Q, ctx_len)
    # Keys before `lo` are visible to every query of the tile: whole tiles, no causal mask.
    lo = (first_pos + 1) // BLOCK_N * BLOCK_N
    if HEAD_DIM == BLOCK_D:
        full_mask = tl.full([BLOCK_N, 1], 1, tl.int1)   # constant: compiles to unmasked loads
    else:
        full_mask = tl.full([BLOCK_N, 1], 1, tl.int1) & d_mask[None, :]
    all_keys = tl.full([1, BLOCK_N], 1, tl.int1)
    all_scales = tl.full([BLOCK_N], 1, tl.int1)
    for tile_start in range(0, lo, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        block = tl.load(bt_row + pos // BLOCK_SIZE)
        slots = (block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None]
        s_slots = block.to(tl.int64) * stride_sb + (pos % BLOCK_SIZE) * stride_st   # unused unless KV_QUANT
        m_i, l_i, acc = _attend_tile(q, k_base + slots, k_base + stride_kv + slots, full_mask,
                                     all_keys, m_i, l_i, acc, qk_scale, s_base + s_slots,
                                     s_base + stride_sv + s_slots, all_scales, DOT_PRECISION, KV_QUANT)
    for tile_start in range(lo, hi, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0)
        slots = (block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None]
        s_slots = block.to(tl.int64) * stride_sb + (pos % BLOCK_SIZE) * stride_st
        causal = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_tile(q, k_base + slots, k_base + stride_kv + slots,
                                     full_mask & valid[:, None], causal, m_i, l_i, acc,
                                     qk_scale, s_base + s_slots, s_base + stride_sv + s_slots,
                                     valid, DOT_PRECISION, KV_QUANT)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_begin + tok)[:, None] * stride_ot + (kv_head * GROUP + g)[:, None] * stride_oh
    tl.store(out_ptr + o_off + d[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the accuracy reference: keep full-precision products, not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _decode_meta(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, num_splits: int, kv_quant: bool = False) -> dict:
    """Compile-time parameters and launch options of _decode_kernel."""
    group = num_heads // num_kv_heads
    # fp32 products run on the FMA units with fp32 operand tiles: halve the tile to stay in
    # registers (fp32 is the accuracy path, not the serving one).
    block_n = 32 if head_dim > 128 or dtype == torch.float32 else 64
    return dict(NUM_HEADS=num_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size,
                BLOCK_N=block_n, NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(dtype),
                KV_QUANT=kv_quant, num_warps=4, num_stages=3)


def _reduce_meta(num_heads: int, head_dim: int, num_splits: int) -> dict:
    return dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
                num_warps=4 if head_dim > 64 else 2, num_stages=1)   # no loop to pipeline


def _prefill_meta(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, kv_quant: bool = False) -> dict:
    """Compile-time parameters and launch options of _prefill_kernel."""
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    if dtype == torch.float32:
        # FMA-unit products; the sm_90 build still spills ~300 B a thread (fp32 is the
        # accuracy path, not the serving one).
        block_m, block_n, num_warps = 32, 32, 8
    elif head_dim > 128:
        block_m, block_n, num_warps = 64, 32, 8
    else:
        block_m, block_n, num_warps = 128, 64, 8 if head_dim > 64 else 4
    return dict(GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                BLOCK_SIZE=block_size, BLOCK_M=max(block_m, group_pad),  # >= 1 query token
                BLOCK_N=block_n, DOT_PRECISION=_dot_precision(dtype), KV_QUANT=kv_quant,
                num_warps=num_warps, num_stages=2)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM: the interpreter has no SMs, keep its choices the GPU's


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      num_sms: int = 132) -> int:
    """Splits of the context per (row, KV head) so the grid fills the GPU ~4 times over.

    Only shapes are used (``max_blocks * block_size`` bounds every row's context), so the choice
    is the same for every replay of a captured graph. Each split gets at least
    ``_MIN_TOKENS_PER_SPLIT`` tokens of that bound, so short contexts use one split and skip the
    reduction launch; a row much shorter than the bound simply leaves its late splits empty.
    """
    programs = batch * num_kv_heads
    max_tokens = max_blocks * block_size
    splits = min(triton.cdiv(4 * num_sms, max(programs, 1)),
                 max_tokens // _MIN_TOKENS_PER_SPLIT, _MAX_SPLITS)
    return max(1, splits)


_COUNTERS = 1 << 16      # (row, KV head) pairs of a split decode merged in the kernel itself
_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The zeroed per-(row, KV head) split counters of in-kernel merging on ``device`` (they
    return to zero after each launch), or None: more pairs than they cover, or none allocated
    yet while a CUDA graph is being captured (a buffer made inside a capture would belong to
    that graph's memory); then a second launch merges. One set per device serves every layer:
    strata's decode attention runs on one stream per device, one launch after another."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return counters if needed <= counters.numel() else None


# --------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------

def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                 num_splits: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row over its paged context.

    q [batch, heads, head_dim]; block_tables [batch, max_blocks] int32; seq_lens [batch] int32,
    the context length including this token (0 marks a padding row: its output is zeros).
    ``kv_scales`` [2, num_blocks, block_size, kv_heads] float32: the cache holds 8-bit codes
    (strata.quant.kv), dequantized as they are loaded.
    Returns ``out`` ([batch, heads, head_dim], q's dtype). No host sync: CUDA-graph safe.
    """
    num_kv_heads, block_size, _ = check_decode(q, kv_cache, block_tables, seq_lens, scale, out,
                                                num_splits, kv_scales)
    batch, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size,
                                       _num_sms(q.device))
    if num_splits > 1:
        ws_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32,
                             device=q.device)
        ws_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
    else:
        ws_acc = ws_m = ws_l = out   # unused by the single-split path
    scales, s_strides = _scale_args(kv_cache, kv_scales)
    counts = _split_counters(q.device, batch * num_kv_heads) if num_splits > 1 else None
    merge = dict(MERGE=True, BLOCK_S=triton.next_power_of_2(num_splits)) if counts is not None else {}
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, ws_acc, ws_m, ws_l, scales,
        out if counts is None else counts, scale * _LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), block_tables.stride(0), out.stride(0), out.stride(1), *s_strides,
        **_decode_meta(num_heads, num_kv_heads, head_dim, block_size, q.dtype, num_splits,
                       kv_scales is not None), **merge, **pdl.launch_options(q))
    if num_splits > 1 and counts is None:
        _decode_reduce_kernel[(batch, num_heads)](
            ws_acc, ws_m, ws_l, out, out.stride(0), out.stride(1),
            **_reduce_meta(num_heads, head_dim, num_splits), **pdl.launch_options(q))
    return out


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                  scale: float, out: torch.Tensor | None = None,
                  kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for a varlen batch whose new tokens follow a cached prefix.

    q [tokens, heads, head_dim]; sequence i's queries are q[query_start_loc[i]:query_start_loc[i+1]]
    and are the last query_len of its seq_lens[i] context tokens. ``max_query_len`` (host int,
    >= every query_len) sizes the grid only. Tokens outside query_start_loc's range are not written.
    ``kv_scales``: as for paged_decode.
    """
    num_kv_heads, block_size, _ = check_prefill(q, kv_cache, block_tables, seq_lens,
                                                 query_start_loc, max_query_len, scale, out, kv_scales)
    num_heads, head_dim = q.shape[1], q.shape[2]
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out
    meta = _prefill_meta(num_heads, num_kv_heads, head_dim, block_size, q.dtype, kv_scales is not None)
    block_q = meta["BLOCK_M"] // meta["GROUP_PAD"]
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    scales, s_strides = _scale_args(kv_cache, kv_scales)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out, scales, scale * _LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), block_tables.stride(0), out.stride(0), out.stride(1), *s_strides, **meta)
    return out


def _scale_args(kv_cache, kv_scales):
    """The kernels' scale pointer and its (plane, block, token) strides; a plain cache passes
    itself and zeros, never read (KV_QUANT is off)."""
    if kv_scales is None:
        return kv_cache, (0, 0, 0)
    return kv_scales, (kv_scales.stride(0), kv_scales.stride(1), kv_scales.stride(2))


# --------------------------------------------------------------------------------------------
# Torch references: float32, one sequence at a time, explicit masks
# --------------------------------------------------------------------------------------------

def _gather_ref(kv_cache, kv_scales, table_row, ctx_len, group):
    """K, V of a sequence's first ctx_len tokens, repeated per query head: [ctx, heads, d] fp32
    (codes times their scales for a quantized cache)."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(ctx_len, device=kv_cache.device)
    blocks = table_row.long()[pos // block_size]
    kv = kv_cache[:, blocks, pos % block_size].float()                        # [2, ctx, kvh, d]
    if kv_scales is not None:
        kv = kv * kv_scales[:, blocks, pos % block_size][..., None]
    return kv[0].repeat_interleave(group, dim=1), kv[1].repeat_interleave(group, dim=1)


def _attend_ref(q, k, v, mask, scale):
    """q [t, h, d], k/v [n, h, d], mask [t, n] (True = visible) -> [t, h, d] fp32."""
    scores = torch.einsum("thd,nhd->htn", q.float(), k) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("htn,nhd->thd", torch.softmax(scores, dim=-1), v)


def paged_decode_ref(q, kv_cache, block_tables, seq_lens, scale, out=None, num_splits=None,
                     kv_scales=None):
    """Reference for paged_decode (num_splits is accepted and ignored)."""
    _, _, group = check_decode(q, kv_cache, block_tables, seq_lens, scale, out, num_splits, kv_scales)
    result = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for row, ctx_len in enumerate(seq_lens.tolist()):
        if ctx_len == 0:
            continue
        k, v = _gather_ref(kv_cache, kv_scales, block_tables[row], ctx_len, group)
        mask = torch.ones(1, ctx_len, dtype=torch.bool, device=q.device)
        result[row] = _attend_ref(q[row:row + 1], k, v, mask, scale)[0]
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)


def paged_prefill_ref(q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale,
                      out=None, kv_scales=None):
    """Reference for paged_prefill."""
    _, _, group = check_prefill(q, kv_cache, block_tables, seq_lens, query_start_loc,
                                 max_query_len, scale, out, kv_scales)
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for seq, ctx_len in enumerate(seq_lens.tolist()):
        start, end = starts[seq], starts[seq + 1]
        if end == start:
            continue
        k, v = _gather_ref(kv_cache, kv_scales, block_tables[seq], ctx_len, group)
        q_pos = torch.arange(ctx_len - (end - start), ctx_len, device=q.device)
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        out[start:end] = _attend_ref(q[start:end], k, v, mask, scale).to(q.dtype)
    return out
