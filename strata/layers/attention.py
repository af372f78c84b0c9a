"""The attention layer: rotates q and k (when the model uses rotary embeddings), writes this
step's keys and values into the paged cache, then attends over each sequence's whole context.

On CUDA the rotation and the cache write are one Triton kernel and attention is the Triton
paged kernels (decode-only steps take the split-sequence decode kernel, any step with a prompt
chunk the varlen prefill kernel). On the CPU with a float32 cache both are C kernels
(strata.kernels.cpu_ops: one call rotates and writes, one attends for every row of the step);
elsewhere the torch references run. The runner binds
``kv_cache`` (this layer's slice of the cache) after allocating memory, and ``kv_scales`` when the
cache is quantized (kv_cache_dtype int8/fp8: codes in kv_cache, see strata.quant.kv); the attention
metadata comes from the forward context.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.attention import torch_ref
from strata.forward_context import get_attn_metadata
from strata.kernels import cpu_ops, use_triton
from strata.layers.rotary import RotaryEmbedding

# Query tokens of the longest sequence in a step from which the CPU attends as GEMM tiles
# (cpu_ops.tiled_attention, head_dim a multiple of 16), and up to which, without those, its
# row-by-row kernel beats torch's flash SDPA (measured on SmolLM2's shapes, docs/cpu_speed.md).
TILED_ATTENTION_MIN_QUERY = 16
C_ATTENTION_MAX_QUERY = 64


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, layer_idx: int,
                 rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.rotary_emb = rotary_emb
        self.kv_cache: torch.Tensor | None = None   # [2, num_blocks, block_size, kv_heads, head_dim]
        self.kv_scales: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads] float32
        # Offloading's KV tier: the cache is in host RAM and decode rows attend on the CPU.
        self.kv_on_host = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """q [n, heads*head_dim], k/v [n, kv_heads*head_dim] (row-strided views of a fused qkv
        output are fine) -> [n, heads*head_dim]."""
        meta = get_attn_metadata()
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.kv_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no KV cache bound")
        if self.kv_on_host:
            return self.start(q, k, v, positions).result().view(n, -1)
        if use_triton(q):
            return self._forward_triton(q, k, v, positions, meta).view(n, -1)
        if self.kv_scales is None and self.kv_cache.dtype == torch.float32 and cpu_ops.available(q):
            return self._forward_cpu(q, k, v, positions, meta).view(n, -1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        torch_ref.write_kv(self.kv_cache, k, v, meta.slot_mapping, self.kv_scales)
        out = torch_ref.paged_attention(q, self.kv_cache, meta, self.scale, self.kv_scales)
        return out.reshape(n, self.num_heads * self.head_dim)

    def start(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None):
        """A layer with its KV cache in host RAM: rotate on the device, then queue the host side
        (attention/host_tier.py) and return at once; ``.result()`` -> [n, heads, head_dim] once
        the CPU's rows are back (the offload loop overlaps the wait with other micro-batches)."""
        from strata.attention import host_tier
        if not self.kv_on_host or self.kv_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx}: start() is for a KV cache bound in host RAM")
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        rope = self.rotary_emb
        if rope is not None and use_triton(q):   # one kernel, as the device-cache layers rotate
            from strata.kernels.rotary import rotary_write_kv
            q = q.contiguous() if q.stride(-1) != 1 else q
            q, k = rotary_write_kv(positions, q, k, v, rope.cos_cached, rope.sin_cached, None, None)
        elif rope is not None:
            q, k = rope(positions, q, k)
        return host_tier.worker().start(q, k, v, self.kv_cache, get_attn_metadata(), self.scale, self.kv_scales)

    def _forward_cpu(self, q, k, v, positions, meta) -> torch.Tensor:
        rope = self.rotary_emb
        q = cpu_ops.rope_write_kv(q, k, v, positions, rope.cos_cached if rope else None,
                                  rope.sin_cached if rope else None, self.kv_cache, meta.slot_mapping)
        if meta.max_query_len >= TILED_ATTENTION_MIN_QUERY and self.head_dim % 16 == 0:
            # Prompt chunks: GEMM tiles over keys gathered once (a 512-token prompt of SmolLM2:
            # 4.1 ms a layer, against 7.4 for torch's flash SDPA and 8.4 for the row kernel).
            return cpu_ops.tiled_attention(q, self.kv_cache, meta.block_tables, meta.seq_lens,
                                           meta.query_start_loc, self.scale)
        if meta.max_query_len > C_ATTENTION_MAX_QUERY:
            return torch_ref.paged_attention(q, self.kv_cache, meta, self.scale)
        return cpu_ops.paged_attention(q, self.kv_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, self.scale)

    def _forward_triton(self, q, k, v, positions, meta) -> torch.Tensor:
        from strata.kernels.paged_attention import paged_decode, paged_prefill
        from strata.kernels.rotary import rotary_write_kv
        rope = self.rotary_emb
        if rope is not None:
            q = q.contiguous() if q.stride(-1) != 1 else q
            rotary_write_kv(positions, q, k, v, rope.cos_cached, rope.sin_cached, self.kv_cache,
                            meta.slot_mapping, self.kv_scales)
        else:
            torch_ref.write_kv(self.kv_cache, k, v, meta.slot_mapping, self.kv_scales)
        if meta.max_query_len == 1:
            # The kernel picks its sequence splits from the shapes alone, so a captured graph
            # replays with the same split.
            return paged_decode(q, self.kv_cache, meta.block_tables, meta.seq_lens, self.scale,
                                kv_scales=self.kv_scales)
        return paged_prefill(q, self.kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                             meta.max_query_len, self.scale, kv_scales=self.kv_scales)
