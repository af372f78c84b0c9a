"""Rotary position embedding (rotate-half, "neox" layout) fused with the write of K and V into the
paged KV cache.

``rotary_write_kv`` replaces, for one attention layer and one step, what
``strata.layers.rotary.RotaryEmbedding`` followed by ``strata.attention.torch_ref.write_kv`` do:

* q [T, H, D] and k [T, KVH, D] are rotated in place (both may be strided views of the fused qkv
  projection: any row and head stride, the last dim contiguous);
* the rotated k and the untouched v go to ``kv_cache[0 / 1]`` at flat slot ``slot_mapping[t]``
  (``block_id * block_size + offset``); a negative slot marks a padding token whose K/V is not
  written (its q/k are still rotated, harmlessly);
* with ``kv_scales`` the cache holds 8-bit codes (kv_cache_dtype int8/fp8): each token's rotated
  k and its v are quantized per head on the way in, with strata.quant.kv's float32 arithmetic
  (scale = max|x| / qmax, IEEE divisions, round half away from zero), so the torch path stores
  the same codes. Without it the switch compiles away (the plain kernel's PTX is unchanged).

cos/sin are the layer's tables ``[max_position, rot_dim]`` in float32 with duplicated halves, so
only their first halves are read. ``rot_dim <= head_dim``: the tail of each head (partial rotary)
stays as it is, and is copied into the cache as it is. Math is in fp32 with one rounding to the
dtype; the torch layer rounds cos/sin to the dtype first and rounds after each operation, so in
bf16 the two differ by a rounding or two (fp32 agrees to ~1e-7).

Layout and speed: the grid is (tokens, head blocks). Head block ``j`` rotates q heads
``[j*BLOCK_HQ, (j+1)*BLOCK_HQ)`` while ``j < cdiv(H, BLOCK_HQ)``; the remaining blocks rotate k
heads and write k and v of those heads. A block is ~16 heads x head_dim (2048 elements at
head_dim 128: 16 per thread with 4 warps, one 16-byte bf16 vector from each half; smaller tiles, as
with partial rotary, get fewer warps so each thread still loads 16 bytes), large enough to keep
loads in flight and small enough that decode steps of a few tokens still spread over several
SMs (1024- and 4096-element blocks measured the same or slower). Head counts and sizes are
compile-time constants (fixed for a model). The kernel never reads data on the host, so it can be
captured in a CUDA graph.

Measured on an H200 (bf16, 32 q / 8 kv heads of 128, CUDA-graph replay; device copy 4.2 TB/s):
8192 tokens 58 us (3.8 TB/s; the torch layer plus write_kv 550 us), 256 tokens 3.1 us, 1 token
2.2 us (torch 31 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.attention import torch_ref
from strata.kernels import pdl
from strata.quant.kv import qmax_of

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)   # a quantized cache's (strata.quant.kv)
_INDEX_DTYPES = (torch.int32, torch.int64)
_TILE_ELEMS = 2048      # elements of one head block (both halves of the rotated part)
_NUM_WARPS = 4          # at most; smaller tiles get fewer


# ----------------------------------------------------------------------------------- kernel

@triton.jit
def _rotate(ptrs, mask, cos, sin, HALF: tl.constexpr):
    """Rotate the [heads, HALF] tiles at ptrs / ptrs + HALF; returns both halves in the dtype."""
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = ptrs.dtype.element_ty
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _inverse_scale(amax, QMAX: tl.constexpr):
    """qmax / amax per head, 0 for an all-zero head; IEEE division, as torch's (strata.quant.kv)."""
    return tl.where(amax > 0, tl.div_rn(QMAX, tl.where(amax > 0, amax, 1.0)), 0.0)


@triton.jit
def _store_codes(dst, x, inv, mask, QMAX: tl.constexpr, INT_CODES: tl.constexpr):
    """x [heads, n] times inv [heads, 1], stored at dst as the cache's 8-bit codes."""
    y = tl.minimum(tl.maximum(x.to(tl.float32) * inv, -QMAX), QMAX)
    if INT_CODES:
        # Round half away from zero (the cast truncates); rint has no interpreter version.
        y = y + tl.where(y >= 0, 0.5, -0.5)
    tl.store(dst, y.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _write_quantized(k1, k2, k_src, v_src, k_dst, c_plane, s_dst, s_plane, mask,
                     HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, QMAX: tl.constexpr,
                     INT_CODES: tl.constexpr):
    """Quantize one token's rotated k (halves k1, k2 [heads, BLOCK_HALF] and the unrotated
    tail at k_src) and its v (at v_src) per head, store codes at k_dst (+ c_plane for v) and
    the scales at s_dst (+ s_plane). mask [heads, 1]: heads that exist and have a slot."""
    d = tl.arange(0, BLOCK_HALF)[None, :]
    amax = tl.maximum(tl.max(tl.abs(k1.to(tl.float32)), 1), tl.max(tl.abs(k2.to(tl.float32)), 1))
    if BLOCK_TAIL > 0:
        e = 2 * HALF + tl.arange(0, BLOCK_TAIL)[None, :]
        t_mask = mask & (e < HEAD_DIM)
        k_tail = tl.load(k_src + e, mask=t_mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(k_tail.to(tl.float32)), 1))
    inv = _inverse_scale(amax, QMAX)[:, None]
    h_mask = mask & (d < HALF)
    _store_codes(k_dst + d, k1, inv, h_mask, QMAX, INT_CODES)
    _store_codes(k_dst + HALF + d, k2, inv, h_mask, QMAX, INT_CODES)
    if BLOCK_TAIL > 0:
        _store_codes(k_dst + e, k_tail, inv, t_mask, QMAX, INT_CODES)
    tl.store(s_dst, tl.div_rn(amax, QMAX)[:, None], mask=mask)

    dv = tl.arange(0, BLOCK_D)[None, :]
    v_mask = mask & (dv < HEAD_DIM)
    v_vals = tl.load(v_src + dv, mask=v_mask, other=0.0).to(tl.float32)
    amax_v = tl.max(tl.abs(v_vals), 1)
    _store_codes(k_dst + c_plane + dv, v_vals, _inverse_scale(amax_v, QMAX)[:, None], v_mask, QMAX,
                 INT_CODES)
    tl.store(s_dst + s_plane, tl.div_rn(amax_v, QMAX)[:, None], mask=mask)


@triton.jit
def _rotary_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, scale_ptr,
                      pos_s, slot_s, qs0, qs1, ks0, ks1, vs0, vs1, cos_s0, sin_s0,
                      c_plane, c_block, c_off, c_head, block_size, s_plane,
                      NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                      WRITE_KV: tl.constexpr, KV_QUANT: tl.constexpr = False,
                      QMAX: tl.constexpr = 127.0, INT_CODES: tl.constexpr = True,
                      USE_PDL: tl.constexpr = False):
    pdl.trigger(USE_PDL)
    pdl.wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t * pos_s).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * cos_s0 + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * sin_s0 + d, mask=d < HALF, other=0.0)[None, :]
    NUM_Q_BLOCKS: tl.constexpr = (NUM_HEADS + BLOCK_HQ - 1) // BLOCK_HQ

    # The two branches use distinct names: Triton treats a name bound in both as one value.
    if hb < NUM_Q_BLOCKS:
        hq = hb * BLOCK_HQ + tl.arange(0, BLOCK_HQ)[:, None]
        q_mask = (hq < NUM_HEADS) & (d[None, :] < HALF)
        q_ptrs = q_ptr + t * qs0 + hq * qs1 + d[None, :]
        q1, q2 = _rotate(q_ptrs, q_mask, cos, sin, HALF)
        tl.store(q_ptrs, q1, mask=q_mask)
        tl.store(q_ptrs + HALF, q2, mask=q_mask)
    else:
        hk = (hb - NUM_Q_BLOCKS) * BLOCK_HK + tl.arange(0, BLOCK_HK)[:, None]
        head_ok = hk < NUM_KV_HEADS
        k_mask = head_ok & (d[None, :] < HALF)
        k_ptrs = k_ptr + t * ks0 + hk * ks1 + d[None, :]
        k1, k2 = _rotate(k_ptrs, k_mask, cos, sin, HALF)
        tl.store(k_ptrs, k1, mask=k_mask)
        tl.store(k_ptrs + HALF, k2, mask=k_mask)
        if WRITE_KV:
            slot = tl.load(slot_ptr + t * slot_s).to(tl.int64)
            # Padding tokens have no slot. Broadcast to the head column so every mask below is an
            # int1 tensor (newer interpreters refuse a tensor mask and-ed with a scalar).
            in_cache = (hk * 0 + slot) >= 0
            blk = slot // block_size
            k_dst = cache_ptr + blk * c_block + (slot - blk * block_size) * c_off + hk * c_head
            if KV_QUANT:
                # Scales [2, slots, kv_heads], contiguous: slot-major like the cache.
                _write_quantized(k1, k2, k_ptr + t * ks0 + hk * ks1, v_ptr + t * vs0 + hk * vs1, k_dst,
                                 c_plane, scale_ptr + slot * NUM_KV_HEADS + hk, s_plane, head_ok & in_cache,
                                 HALF, HEAD_DIM, BLOCK_HALF, BLOCK_TAIL, BLOCK_D, QMAX, INT_CODES)
            else:
                c_mask = k_mask & in_cache
                tl.store(k_dst + d[None, :], k1, mask=c_mask)
                tl.store(k_dst + HALF + d[None, :], k2, mask=c_mask)
                if BLOCK_TAIL > 0:                   # partial rotary: the tail goes in unrotated
                    e = 2 * HALF + tl.arange(0, BLOCK_TAIL)[None, :]
                    t_mask = head_ok & (e < HEAD_DIM) & in_cache
                    k_tail = tl.load(k_ptr + t * ks0 + hk * ks1 + e, mask=t_mask)
                    tl.store(k_dst + e, k_tail, mask=t_mask)
                dv = tl.arange(0, BLOCK_D)[None, :]
                v_mask = head_ok & (dv < HEAD_DIM) & in_cache
                v_vals = tl.load(v_ptr + t * vs0 + hk * vs1 + dv, mask=v_mask)
                tl.store(k_dst + c_plane + dv, v_vals, mask=v_mask)


# ---------------------------------------------------------------------------------- wrapper

def _check_tokens(t: torch.Tensor, name: str, num_tokens: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor")
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected torch.int32 or torch.int64")
    if t.shape[0] != num_tokens:
        raise ValueError(f"{name} has {t.shape[0]} entries, expected one per token ({num_tokens})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_heads(t: torch.Tensor, name: str, num_tokens: int, head_dim: int, dtype, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim]")
    if t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{num_tokens}, heads, {head_dim}]")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected q's {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected q's device {device}")
    if head_dim > 1 and t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim, got strides {tuple(t.stride())}")


def _check_tables(cos_cache, sin_cache, head_dim, device) -> int:
    for name, t in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a 2-D float32 tensor [max_position, rot_dim]")
        if t.shape != cos_cache.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, "
                             f"expected cos_cache's {tuple(cos_cache.shape)}")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {device}")
    rot_dim = cos_cache.shape[1]
    if rot_dim % 2 or not 2 <= rot_dim <= head_dim:
        raise ValueError(f"rot_dim (cos_cache.shape[1]) is {rot_dim}; "
                         f"it must be even and in [2, head_dim={head_dim}]")
    return rot_dim


def _check_cache(kv_cache, num_kv_heads, head_dim, dtype, device, kv_scales) -> None:
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be a 5-D tensor [2, num_blocks, block_size, kv_heads, head_dim]")
    if kv_cache.shape[3] != num_kv_heads or kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache has shape {tuple(kv_cache.shape)}, expected kv_heads={num_kv_heads} "
                         f"and head_dim={head_dim} in its last two dims")
    if kv_scales is None and kv_cache.dtype != dtype:
        raise ValueError(f"kv_cache has dtype {kv_cache.dtype}, expected k's {dtype} "
                         f"(or 8-bit codes {', '.join(map(str, _CODE_DTYPES))} with kv_scales)")
    if kv_scales is not None:
        _check_scales(kv_cache, kv_scales, device)
    if kv_cache.device != device:
        raise ValueError(f"kv_cache is on {kv_cache.device}, expected q's device {device}")
    if head_dim > 1 and kv_cache.stride(4) != 1:
        raise ValueError(f"kv_cache must be contiguous in head_dim, got strides {tuple(kv_cache.stride())}")


def _check_scales(kv_cache, kv_scales, device) -> None:
    if kv_cache.dtype not in _CODE_DTYPES:
        raise ValueError(f"kv_cache has dtype {kv_cache.dtype}; with kv_scales it must hold codes: "
                         f"{', '.join(map(str, _CODE_DTYPES))}")
    want = tuple(kv_cache.shape[:4])
    if not isinstance(kv_scales, torch.Tensor) or tuple(kv_scales.shape) != want:
        raise ValueError(f"kv_scales has shape {tuple(getattr(kv_scales, 'shape', ()))}, expected {want} "
                         "(the cache's without head_dim)")
    if kv_scales.dtype != torch.float32 or not kv_scales.is_contiguous():
        raise ValueError(f"kv_scales must be contiguous float32, got {kv_scales.dtype} with strides "
                         f"{tuple(kv_scales.stride())}")
    if kv_scales.device != device:
        raise ValueError(f"kv_scales is on {kv_scales.device}, expected q's device {device}")


def _rotary_meta(num_heads: int, num_kv_heads: int, head_dim: int, rot_dim: int,
                 write_kv: bool, code_dtype: torch.dtype | None = None) -> tuple[int, dict]:
    """Head blocks per token (the grid's second dim) and the kernel's meta-parameters."""
    half = rot_dim // 2
    block_half = triton.next_power_of_2(half)
    heads_per_block = max(1, _TILE_ELEMS // (2 * block_half))
    block_hq = min(triton.next_power_of_2(num_heads), heads_per_block)
    block_hk = min(triton.next_power_of_2(num_kv_heads), heads_per_block)
    tail = head_dim - rot_dim
    meta = dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
                BLOCK_HALF=block_half, BLOCK_TAIL=triton.next_power_of_2(tail) if tail else 0,
                BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
                WRITE_KV=write_kv, KV_QUANT=code_dtype is not None,
                QMAX=qmax_of(code_dtype) if code_dtype is not None else 127.0,
                INT_CODES=code_dtype is None or not code_dtype.is_floating_point,
                # ~8 elements of each half-tile a thread (16-byte vectors in bf16), at most 4 warps.
                num_warps=min(max(max(block_hq, block_hk) * block_half // 256, 1), _NUM_WARPS))
    return triton.cdiv(num_heads, block_hq) + triton.cdiv(num_kv_heads, block_hk), meta


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor | None,
                    slot_mapping: torch.Tensor | None,
                    kv_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] in place at ``positions`` [T]; write k and v [T, KVH, D]
    into ``kv_cache`` [2, num_blocks, block_size, KVH, D] at ``slot_mapping`` [T] (negative: skip).
    With ``kv_scales`` [2, num_blocks, block_size, KVH] float32 the cache holds 8-bit codes
    (strata.quant.kv): each token's k and v are quantized per head on the way in.

    positions and slot_mapping are int32 or int64, any stride. ``kv_cache=None`` (with
    ``slot_mapping=None``) only rotates. Returns (q, k).
    Positions must lie in [0, cos_cache.shape[0]); they are not checked on the device.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a 3-D tensor [tokens, heads, head_dim]")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: {', '.join(map(str, _DTYPES))}")
    num_tokens, num_heads, head_dim = q.shape
    _check_heads(q, "q", num_tokens, head_dim, q.dtype, q.device)
    _check_heads(k, "k", num_tokens, head_dim, q.dtype, q.device)
    _check_heads(v, "v", num_tokens, head_dim, q.dtype, q.device)
    num_kv_heads = k.shape[1]
    if v.shape[1] != num_kv_heads:
        raise ValueError(f"v has {v.shape[1]} heads, expected k's {num_kv_heads}")
    _check_tokens(positions, "positions", num_tokens, q.device)
    rot_dim = _check_tables(cos_cache, sin_cache, head_dim, q.device)
    write_kv = kv_cache is not None
    if write_kv:
        _check_cache(kv_cache, num_kv_heads, head_dim, q.dtype, q.device, kv_scales)
        if slot_mapping is None:
            raise ValueError("slot_mapping is required with kv_cache")
        _check_tokens(slot_mapping, "slot_mapping", num_tokens, q.device)
    elif slot_mapping is not None or kv_scales is not None:
        raise ValueError("slot_mapping or kv_scales given without kv_cache")
    if num_tokens == 0:
        return q, k

    blocks, meta = _rotary_meta(num_heads, num_kv_heads, head_dim, rot_dim, write_kv,
                                None if kv_scales is None else kv_cache.dtype)
    if write_kv:
        cache, slots = kv_cache, slot_mapping
        c_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
                     kv_cache.shape[2])
    else:
        cache, slots, c_strides = k, positions, (0, 0, 0, 0, 1)   # never touched: WRITE_KV is False
    # Never touched without KV_QUANT.
    scales, s_plane = (cache, 0) if kv_scales is None else (kv_scales, kv_scales.stride(0))
    _rotary_kv_kernel[(num_tokens, blocks)](
        positions, q, k, v, cos_cache, sin_cache, cache, slots, scales, positions.stride(0),
        slots.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_cache.stride(0), sin_cache.stride(0), *c_strides, s_plane, **meta, **pdl.launch_options(q))
    return q, k


# --------------------------------------------------------------------------------- references

def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """strata.layers.rotary.RotaryEmbedding.forward's math on new tensors (inputs untouched)."""
    rot_dim = cos_cache.shape[-1]
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)   # [n, 1, rot_dim]
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)

    def apply(x):
        rot, rest = x[..., :rot_dim], x[..., rot_dim:]
        half = rot_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.numel() else out

    return apply(q), apply(k)


def write_kv_ref(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """strata.attention.torch_ref.write_kv, skipping tokens whose slot is negative (padding)."""
    keep = slot_mapping >= 0
    torch_ref.write_kv(kv_cache, key[keep], value[keep], slot_mapping[keep], kv_scales)


def rotary_write_kv_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor | None,
                        slot_mapping: torch.Tensor | None,
                        kv_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_write_kv through the torch layer's math (q, k rotated in place, K/V to the cache)."""
    q_rot, k_rot = rotary_ref(positions, q, k, cos_cache, sin_cache)
    q.copy_(q_rot)
    k.copy_(k_rot)
    if kv_cache is not None:
        write_kv_ref(kv_cache, k_rot, v, slot_mapping, kv_scales)
    return q, k
