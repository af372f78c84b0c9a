"""Rotary position embeddings (rotate-half layout, as HF checkpoints store q and k), with the
llama3 frequency scaling and linear scaling. cos/sin are tabulated once per position."""

from __future__ import annotations

import json
import math
import weakref

import torch
from torch import nn

# (rot_dim, max_position, base, scaling, device) -> cos/sin tables, shared by every layer of a
# model: one copy instead of one per layer (32 x 134 MB for Llama-3.1's 131072 positions). Weak
# values, so the tables go when the last model using them does.
_TABLES: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def _inv_freq(rot_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _tables(rot_dim: int, max_position: int, base: float, scaling: dict | None):
    inv_freq = _inv_freq(rot_dim, base)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)                  # [max_position, rot_dim]
    return emb.cos(), emb.sin()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict | None = None, rot_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = rot_dim or head_dim
        key = (self.rot_dim, max_position, base, json.dumps(scaling, sort_keys=True),
               str(torch.empty(0).device))
        cos, sin = _TABLES.get(key + ("cos",)), _TABLES.get(key + ("sin",))
        if cos is None or sin is None:
            cos, sin = _tables(self.rot_dim, max_position, base, scaling)
            _TABLES[key + ("cos",)], _TABLES[key + ("sin",)] = cos, sin
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [n]; q [n, heads, head_dim]; k [n, kv_heads, head_dim]."""
        cos = self.cos_cached[positions].unsqueeze(1).to(q.dtype)   # [n, 1, rot_dim]
        sin = self.sin_cached[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim:]
        half = self.rot_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.numel() else out
