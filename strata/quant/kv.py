"""Quantized KV cache (``kv_cache_dtype``): K and V stored as 8-bit codes with one scale per
(token slot, KV head), symmetric.

A cache of one layer is then two tensors: the codes ``[2, num_blocks, block_size, kv_heads,
head_dim]`` (int8 or float8_e4m3fn) and the scales ``[2, num_blocks, block_size, kv_heads]``
float32, both written when a token's K and V are and read by the same slot index. Each new
token's head vector x is stored as ``codes = round(x * qmax / max|x|)``, ``scale = max|x| / qmax``
and read back as ``codes * scale``; the code format is implied by the cache's dtype, so the
attention functions need no flag besides the scales tensor.

Scales are float32, not the model dtype: a bf16 scale carries 8 significant bits, and its
rounding alone would move the largest values of a head by up to half a code step (doubling the
worst error); an fp16 scale is subnormal for heads whose max|x| is below ~8e-3. At head_dim 128
the scale costs 4 bytes beside 128 of codes (3%), so a bf16 model's cache holds 1.94x the tokens
(3.88x against fp32).

The Triton writer (strata.kernels.rotary) computes exactly this (the same float32 operations in
the same order, round half away from zero), so both paths store the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheFormat:
    name: str                 # the kv_cache_dtype value
    dtype: torch.dtype        # of the codes
    qmax: float               # largest code magnitude: scale = max|x| / qmax
    min_capability: tuple[int, int] | None   # CUDA compute capability needed; None: any device


SCALE_DTYPE = torch.float32
KV_FORMATS = {
    "int8": KVCacheFormat("int8", torch.int8, 127.0, None),
    # e4m3fn's largest finite value is 448. Its conversions need Ada/Hopper (sm_89+) in Triton.
    "fp8": KVCacheFormat("fp8", torch.float8_e4m3fn, 448.0, (8, 9)),
}
_QMAX = {f.dtype: f.qmax for f in KV_FORMATS.values()}


def resolve_kv_format(kv_cache_dtype: str, device: torch.device) -> KVCacheFormat | None:
    """The format for a (validated) kv_cache_dtype on device; None for "auto" (the model dtype).
    Raises ValueError where the device cannot run it."""
    if kv_cache_dtype == "auto":
        return None
    fmt = KV_FORMATS[kv_cache_dtype]
    if fmt.min_capability is None:
        return fmt
    need = ".".join(map(str, fmt.min_capability))
    if device.type != "cuda":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs a CUDA GPU of compute capability "
                         f">= {need} (Ada, Hopper or newer); this engine runs on {device}. "
                         "Use kv_cache_dtype='int8' there")
    have = torch.cuda.get_device_capability(device)
    if have < fmt.min_capability:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs compute capability >= {need}; "
                         f"{device} has {have[0]}.{have[1]}. Use kv_cache_dtype='int8'")
    return fmt


def is_quantized_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype in _QMAX


def qmax_of(code_dtype: torch.dtype) -> float:
    try:
        return _QMAX[code_dtype]
    except KeyError:
        raise ValueError(f"no KV-cache code format has dtype {code_dtype}; "
                         f"known: {', '.join(map(str, _QMAX))}") from None


def quantize_kv(x: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim] of code_dtype, scales [...] float32)."""
    qmax = qmax_of(code_dtype)
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    # An all-zero head stores zeros with scale 0 (no 0/0). A tensor divided, not `qmax / t`:
    # torch computes that as qmax * (1 / t), which rounds differently from the kernel's division.
    inv = torch.where(amax > 0, torch.full_like(amax, qmax) / torch.where(amax > 0, amax, 1.0), 0.0)
    y = (x32 * inv[..., None]).clamp(-qmax, qmax)
    if not code_dtype.is_floating_point:
        # Round half away from zero, as the kernel does (it has no rint in the interpreter).
        y = (y + torch.where(y >= 0, 0.5, -0.5)).trunc()
    return y.to(code_dtype), amax / qmax


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., head_dim], scales [...] -> values [..., head_dim] in dtype."""
    return (codes.float() * scales[..., None]).to(dtype)


def kv_cache_bytes_per_slot(num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                            fmt: KVCacheFormat | None) -> int:
    """Bytes of K and V of one token in one layer: codes plus scales, or plain values."""
    if fmt is None:
        return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    code_bytes = torch.empty((), dtype=fmt.dtype).element_size()
    scale_bytes = torch.empty((), dtype=SCALE_DTYPE).element_size()
    return 2 * num_kv_heads * (head_dim * code_bytes + scale_bytes)
