"""Argument checks of strata.kernels.paged_attention, shared by its kernels and its torch
references: dtypes, shapes, strides and devices, each error naming the argument and what it must be.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A quantized cache's codes (strata.quant.kv): int8, or fp8 e4m3 on sm_89+.
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)
MAX_HEAD_DIM = 256


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"paged attention: `{name}` {msg}")


def _check_index(t: torch.Tensor, name: str, shape: tuple, device: torch.device) -> None:
    _require(isinstance(t, torch.Tensor), name, f"must be a torch.Tensor, got {type(t).__name__}")
    _require(t.dtype == torch.int32, name, f"must be int32, got {t.dtype}")
    _require(t.dim() == len(shape) and all(s is None or a == s for a, s in zip(t.shape, shape)),
             name, f"must have shape {tuple('*' if s is None else s for s in shape)}, "
                   f"got {tuple(t.shape)}")
    _require(t.device == device, name, f"must be on {device}, got {t.device}")
    _require(t.numel() == 0 or t.stride(-1) == 1, name, "must be contiguous in its last dimension")


def _check_scales(kv_cache, kv_scales, q):
    """A quantized cache (codes, not q's dtype) comes with its scales; a plain one without."""
    if kv_scales is None:
        _require(kv_cache.dtype == q.dtype, "kv_cache", f"dtype {kv_cache.dtype} must match q ({q.dtype}) "
                 f"(or be one of {CODE_DTYPES} with kv_scales)")
        return
    _require(kv_cache.dtype in CODE_DTYPES, "kv_cache",
             f"dtype {kv_cache.dtype} must be one of {CODE_DTYPES} when kv_scales are given")
    want = tuple(kv_cache.shape[:4])
    _require(isinstance(kv_scales, torch.Tensor) and tuple(kv_scales.shape) == want, "kv_scales",
             f"must have shape {want} (the cache's without head_dim), got {tuple(getattr(kv_scales, 'shape', ()))}")
    _require(kv_scales.dtype == torch.float32, "kv_scales", f"must be float32, got {kv_scales.dtype}")
    _require(kv_scales.is_contiguous(), "kv_scales", "must be contiguous")
    _require(kv_scales.device == q.device, "kv_scales", f"must be on {q.device}, got {kv_scales.device}")


def _check_common(q, kv_cache, block_tables, seq_lens, scale, out, num_seqs, kv_scales=None):
    """Checks shared by decode and prefill; returns (num_kv_heads, block_size, group)."""
    _require(isinstance(q, torch.Tensor) and q.dim() == 3, "q",
             f"must be a 3-D tensor [tokens, heads, head_dim], got {getattr(q, 'shape', q)}")
    _require(q.dtype in SUPPORTED_DTYPES, "q", f"dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    _require(q.stride(-1) == 1, "q", f"must be contiguous along head_dim, strides {q.stride()}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    _require(1 <= head_dim <= MAX_HEAD_DIM, "q", f"head_dim {head_dim} must be in [1, {MAX_HEAD_DIM}]")
    _require(isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
             "kv_cache", "must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(getattr(kv_cache, 'shape', ()))}")
    _check_scales(kv_cache, kv_scales, q)
    _require(kv_cache.is_contiguous(), "kv_cache", "must be contiguous")
    _require(kv_cache.device == q.device, "kv_cache", f"must be on {q.device}, got {kv_cache.device}")
    block_size, num_kv_heads, kv_dim = kv_cache.shape[2:]
    _require(kv_dim == head_dim, "kv_cache", f"head_dim {kv_dim} must match q's {head_dim}")
    _require(num_kv_heads > 0 and num_heads % num_kv_heads == 0, "kv_cache",
             f"num_kv_heads {num_kv_heads} must divide q's {num_heads} heads")
    _require(block_size > 0 and block_size & (block_size - 1) == 0, "kv_cache",
             f"block_size {block_size} must be a power of two")
    _check_index(block_tables, "block_tables", (num_seqs, None), q.device)
    _check_index(seq_lens, "seq_lens", (num_seqs,), q.device)
    _require(isinstance(scale, (int, float)) and math.isfinite(scale), "scale",
             f"must be a finite float, got {scale!r}")
    if out is not None:
        _require(isinstance(out, torch.Tensor) and out.shape == q.shape, "out",
                 f"must have q's shape {tuple(q.shape)}, got {tuple(getattr(out, 'shape', ()))}")
        _require(out.dtype == q.dtype, "out", f"dtype {out.dtype} must match q ({q.dtype})")
        _require(out.device == q.device, "out", f"must be on {q.device}, got {out.device}")
        _require(out.stride(-1) == 1, "out", f"must be contiguous along head_dim, strides {out.stride()}")
    return num_kv_heads, block_size, num_heads // num_kv_heads


def check_decode(q, kv_cache, block_tables, seq_lens, scale, out, num_splits, kv_scales):
    shape = _check_common(q, kv_cache, block_tables, seq_lens, scale, out, q.shape[0] if
                          isinstance(q, torch.Tensor) and q.dim() == 3 else -1, kv_scales)
    _require(num_splits is None or (isinstance(num_splits, int) and num_splits >= 1),
             "num_splits", f"must be None or a positive int, got {num_splits!r}")
    return shape


def check_prefill(q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, out,
                   kv_scales):
    _require(isinstance(seq_lens, torch.Tensor) and seq_lens.dim() == 1, "seq_lens",
             "must be a 1-D tensor [num_seqs]")
    num_seqs = seq_lens.shape[0]
    shape = _check_common(q, kv_cache, block_tables, seq_lens, scale, out, num_seqs, kv_scales)
    _check_index(query_start_loc, "query_start_loc", (num_seqs + 1,), q.device)
    _require(isinstance(max_query_len, int) and max_query_len >= 0, "max_query_len",
             f"must be a non-negative int, got {max_query_len!r}")
    return shape
