"""Attention over the paged KV cache in plain torch: the reference every kernel is checked
against, and the path the CPU takes.

The cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``. New keys and
values are written to their slots first, then each sequence attends to its whole context
(cached prefix included) through its block table. A quantized cache (strata.quant.kv) holds codes
there plus ``kv_scales [2, num_blocks, block_size, num_kv_heads]``: writes quantize each token's
heads, reads dequantize the gathered context to the query's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.attention.backend import AttentionMetadata
from strata.quant.kv import dequantize_kv, quantize_kv


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """key/value [num_tokens, kv_heads, head_dim] into their slots (quantized where the cache
    holds codes: then kv_scales receives each token's scale per head)."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    if not kv_cache.is_contiguous():   # the host tier's head-major blocks: by (block, key) instead
        at = (slot_mapping // block_size, slot_mapping % block_size)
        for plane, x in enumerate((key, value)):
            if kv_scales is None:
                kv_cache[plane].index_put_(at, x)
            else:
                codes, scales = quantize_kv(x, kv_cache.dtype)
                kv_cache[plane].view(torch.uint8).index_put_(at, codes.view(torch.uint8))
                kv_scales[plane].index_put_(at, scales)
        return
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    if kv_scales is None:
        flat[0].index_copy_(0, slot_mapping, key)
        flat[1].index_copy_(0, slot_mapping, value)
        return
    flat_scales = kv_scales.view(2, num_blocks * block_size, kv_heads)
    for plane, x in enumerate((key, value)):
        codes, scales = quantize_kv(x, kv_cache.dtype)
        # As bytes: the CPU has no index_copy_ for float8.
        flat[plane].view(torch.uint8).index_copy_(0, slot_mapping, codes.view(torch.uint8))
        flat_scales[plane].index_copy_(0, slot_mapping, scales)


def _gather(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, blocks: torch.Tensor,
            dtype: torch.dtype, workspace: Workspace | None = None) -> torch.Tensor:
    """kv_cache[:, blocks] -> [2, *blocks.shape, block_size, kv_heads, head_dim] values in dtype.
    With a workspace the blocks are gathered into its reused buffer (the same values and layout):
    a fresh buffer per call costs page faults that, on the CPU, took 10x the copy itself."""
    if kv_scales is None:
        if workspace is None or not kv_cache.is_contiguous():
            return kv_cache[:, blocks]
        num_blocks = kv_cache.shape[1]
        out = workspace.get(2 * blocks.numel() * kv_cache[0, 0].numel(), kv_cache.dtype)
        out = out.view(2, blocks.numel(), -1)
        torch.index_select(kv_cache.view(2, num_blocks, -1), 1, blocks.reshape(-1), out=out)
        return out.view(2, *blocks.shape, *kv_cache.shape[2:])
    return dequantize_kv(kv_cache[:, blocks], kv_scales[:, blocks], dtype)


class Workspace:
    """A buffer reused from call to call, grown when a call needs more."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes].view(dtype)


def _gather_context(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, block_table: torch.Tensor,
                    ctx_len: int, dtype: torch.dtype):
    """K and V of one sequence's first ctx_len tokens: [ctx_len, kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-ctx_len // block_size)
    blocks = _gather(kv_cache, kv_scales, block_table[:num_blocks], dtype)   # [2, nb, bs, kvh, d]
    blocks = blocks.flatten(1, 2)[:, :ctx_len]
    return blocks[0], blocks[1]


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, kv_scales: torch.Tensor | None = None,
                    workspace: Workspace | None = None) -> torch.Tensor:
    """query [num_tokens, heads, head_dim] -> output of the same shape. workspace: a reused
    buffer for the decode rows' gathered context (CPU)."""
    out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    groups = num_heads // num_kv_heads
    if meta.decode_rows:
        _decode_batch(query, kv_cache, kv_scales, meta, scale, groups, out, workspace)
    for row in meta.prefill_rows:
        start, end = meta.query_start_loc_cpu[row], meta.query_start_loc_cpu[row + 1]
        ctx_len = meta.seq_lens_cpu[row]
        k, v = _gather_context(kv_cache, kv_scales, meta.block_tables[row], ctx_len, query.dtype)
        q_len = end - start
        if q_len == ctx_len:
            # A whole prompt: torch's causal flag lets its flash kernel skip the blocks above the
            # diagonal (half the work at 512 tokens) where a mask tensor makes it compute them.
            mask = None
        else:
            # Query i sits at position ctx_len - q_len + i and sees keys up to that position.
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)
            mask = torch.arange(ctx_len, device=query.device)[None, :] <= q_pos[:, None]
        out[start:end] = _sdpa(query[start:end], k, v, mask, scale, groups)
    return out


def _decode_batch(query, kv_cache, kv_scales, meta, scale, groups, out, workspace=None):
    """All single-token rows at once, keys padded to the longest context and masked."""
    rows = meta.decode_rows
    token_idx = torch.tensor([meta.query_start_loc_cpu[r] for r in rows], device=query.device)
    ctx_lens = [meta.seq_lens_cpu[r] for r in rows]
    max_ctx = max(ctx_lens)
    block_size = kv_cache.shape[2]
    max_blocks = -(-max_ctx // block_size)
    tables = meta.block_tables[rows][:, :max_blocks]           # [b, nb]
    kv = _gather(kv_cache, kv_scales, tables, query.dtype, workspace).flatten(2, 3)[:, :, :max_ctx]   # [2, b, max_ctx, kvh, d]
    lens = torch.tensor(ctx_lens, device=query.device)
    mask = torch.arange(max_ctx, device=query.device)[None, :] < lens[:, None]   # [b, max_ctx]
    b, kvh, d = len(rows), kv.shape[3], kv.shape[4]
    # The query heads sharing a KV head ride along as that head's "query positions", so GQA
    # needs no copy of K and V per query head.
    q = query[token_idx].view(b, kvh, groups, d)
    k = kv[0].transpose(1, 2)                                  # [b, kvh, max_ctx, d]
    v = kv[1].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    out[token_idx] = o.reshape(b, kvh * groups, d)


def _sdpa(q, k, v, mask, scale, groups):
    """q [q_len, h, d], k/v [ctx, kvh, d], mask [q_len, ctx] -> [q_len, h, d]; mask None: causal
    with q_len == ctx (query i sees keys 0..i).

    4-D inputs with a boolean mask let torch pick its fused CPU kernel (3x faster than a 3-D
    call); enable_gqa spares a copy of K and V per query head.
    """
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                       is_causal=mask is None, enable_gqa=groups > 1)
    return o[0].transpose(0, 1)
