"""``x @ W^T`` for int8 weights with a scale (and optionally an offset) per group of G inputs:
``W[n, k] = q[n, k] * scales[n, k/G] (+ offsets[n, k/G])``.

The formats that need it: GGUF Q8_0 (groups of 32) and Q6_K (6-bit codes, an int8 scale per 16
folded into a float scale per 16, strata.quant.ggml_codes), and 8-bit GPTQ checkpoints with
groups (zero points become offsets). Per-channel int8 (one scale per row) keeps the simpler
kernel in quant_matmul.py, which multiplies the scale once after the K loop; here the scale
changes every G inputs, so the weights are dequantized in registers (exact integer codes, one
FMA with the group's scale and offset) before the product, as the int4 kernel does.

Same three ways to run as quant_matmul (its ``default_config`` picks them): one row on CUDA
cores, up to 16 rows on a 16-row tensor-core tile, a GEMM tile beyond.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.kernels.quant_matmul import (
    _accumulator,
    _check_common,
    _check_config,
    _check_float,
    _int_to_f32,
    _load_scales,
    _load_weight,
    _multiply_add,
    _reduced,
    _require,
    _store,
    _tile_offsets,
    default_config,
)

GROUP_SIZES = (16, 32, 64, 128, 256)


@triton.jit
def _w8g_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K, x_stride, q_stride,
                s_stride_n, s_stride_g, o_stride_n, o_stride_g, out_stride,
                GROUP_SIZE: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
                USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr, EVICT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride
    s_rows = s_ptr + offs_n.to(tl.int64) * s_stride_n
    o_rows = o_ptr + offs_n.to(tl.int64) * o_stride_n
    # A tile inside one group reads one scale per row; a deeper tile a [BLOCK_N, groups] block.
    ONE_GROUP: tl.constexpr = BLOCK_K <= GROUP_SIZE
    NUM_G: tl.constexpr = 1 if ONE_GROUP else BLOCK_K // GROUP_SIZE
    acc = _accumulator(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        q = _load_weight(q_rows + offs_k[None, :], n_mask, k_mask, EVEN_N, EVEN_K, EVICT)
        w = _int_to_f32(q.to(tl.int32), 128)                       # exact codes, [BLOCK_N, BLOCK_K]
        if ONE_GROUP:
            g = k0 // GROUP_SIZE
            w = w * tl.load(s_rows + g * s_stride_g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if HAS_OFFSETS:
                w += tl.load(o_rows + g * o_stride_g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        else:
            offs_g = k0 // GROUP_SIZE + tl.arange(0, NUM_G)
            g_mask = offs_g < tl.cdiv(K, GROUP_SIZE)
            s = _load_scales(s_rows[:, None] + offs_g[None, :] * s_stride_g, n_mask, g_mask, EVEN_N, EVEN_K)
            w3 = w.reshape(BLOCK_N, NUM_G, GROUP_SIZE) * s[:, :, None]
            if HAS_OFFSETS:
                o = _load_scales(o_rows[:, None] + offs_g[None, :] * o_stride_g, n_mask, g_mask,
                                 EVEN_N, EVEN_K)
                w3 += o[:, :, None]
            w = w3.reshape(BLOCK_N, BLOCK_K)
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        acc = _multiply_add(acc, x, w, USE_DOT, DOT_PRECISION)
    _store(_reduced(acc, USE_DOT), bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, out_stride,
           HAS_BIAS)


def _check_groups(op, qweight, scales, offsets, group_size, device):
    _require(group_size in GROUP_SIZES, op, "group_size", f"must be one of {GROUP_SIZES}, got {group_size}")
    n, k = qweight.shape
    _require(k % group_size == 0, op, "group_size", f"{group_size} must divide K = {k}")
    _check_float(op, "scales", scales, (n, k // group_size), device)
    if offsets is not None:
        _check_float(op, "offsets", offsets, (n, k // group_size), device)


def w8g_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offsets: torch.Tensor | None, group_size: int, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x @ dequantize_w8g(...)^T + bias``: x [M, K], int8 qweight [N, K] -> [M, N] in x's dtype."""
    op = "w8g_matmul"
    m, n = _check_common(op, x, qweight, torch.int8, qweight.shape[-1] if qweight.dim() else -1,
                         bias, out)
    _check_groups(op, qweight, scales, offsets, group_size, x.device)
    k = qweight.shape[1]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    meta = {"GROUP_M": 1, **(config or default_config(m, n, k, 8, x.dtype, group_size))}
    _check_config(op, meta)
    _require(meta["BLOCK_K"] <= group_size or meta["BLOCK_K"] % group_size == 0, op, "config",
             f"BLOCK_K {meta['BLOCK_K']} must lie in one group or cover whole groups of {group_size}")
    num_row_blocks = triton.cdiv(m, meta["BLOCK_M"])
    grid = (num_row_blocks * triton.cdiv(n, meta["BLOCK_N"]),)
    o = offsets if offsets is not None else scales
    _w8g_kernel[grid](
        x, qweight, scales, o, bias if bias is not None else scales, out, m, n, k, x.stride(0),
        qweight.stride(0), *scales.stride(), *o.stride(), out.stride(0),
        GROUP_SIZE=group_size, HAS_OFFSETS=offsets is not None, HAS_BIAS=bias is not None,
        EVEN_N=n % meta["BLOCK_N"] == 0, EVEN_K=k % meta["BLOCK_K"] == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        EVICT="evict_first" if num_row_blocks == 1 else "", **meta)
    return out


def dequantize_w8g(qweight, scales, offsets, group_size, dtype=torch.float32) -> torch.Tensor:
    """int8 qweight [N, K] -> weights [N, K] in ``dtype``, computed in fp32."""
    n, k = qweight.shape
    w = qweight.float().view(n, k // group_size, group_size) * scales.float()[..., None]
    if offsets is not None:
        w = w + offsets.float()[..., None]
    return w.view(n, k).to(dtype)


def w8g_matmul_ref(x, qweight, scales, offsets, group_size, bias=None, out=None, config=None):
    """Reference: dequantize to fp32, F.linear in fp32, round to x's dtype."""
    op = "w8g_matmul"
    _check_common(op, x, qweight, torch.int8, qweight.shape[-1] if qweight.dim() else -1, bias, out)
    _check_groups(op, qweight, scales, offsets, group_size, x.device)
    w = dequantize_w8g(qweight, scales, offsets, group_size)
    y = torch.nn.functional.linear(x.float(), w, bias.float() if bias is not None else None).to(x.dtype)
    return out.copy_(y) if out is not None else y
