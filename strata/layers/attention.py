"""The attention layer: writes this step's keys and values into the paged cache, then attends.

The runner binds ``kv_cache`` (this layer's slice of the cache) after allocating memory; the
attention metadata comes from the forward context.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.attention import torch_ref
from strata.forward_context import get_attn_metadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.kv_cache: torch.Tensor | None = None   # [2, num_blocks, block_size, kv_heads, head_dim]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [n, heads*head_dim], k/v [n, kv_heads*head_dim] -> [n, heads*head_dim]."""
        meta = get_attn_metadata()
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.kv_cache is None:
            raise RuntimeError(f"attention layer {self.layer_idx} has no KV cache bound")
        torch_ref.write_kv(self.kv_cache, k, v, meta.slot_mapping)
        out = torch_ref.paged_attention(q, self.kv_cache, meta, self.scale)
        return out.reshape(n, self.num_heads * self.head_dim)
