"""GGML blocks -> integer codes with one scale (and min) per group, exactly.

Every GGUF type strata computes on packed is, once its block structure is peeled off, a matrix
of small integer codes with a float scale per group of consecutive input features, and for the
asymmetric ones a float min: ``w = q * scale (+ min)``. Unpacking changes no value beyond
widening the block's fp16 fields to fp32, and ``dequantize_codes`` reproduces
quant/ggml_dequant.py bit for bit:

* Q4_0 ``d * (q - 8)``        -> 4-bit q, group 32, scale d, min -8d (q*d and 8d are exact)
* Q4_1 ``d * q + m``          -> 4-bit q, group 32, scale d, min m
* Q4_K ``d*sc * q - dmin*m``  -> 4-bit q, group 32 (8 sub-blocks of a 256 super-block),
                                 scale d*sc, min -(dmin*m) (x - y == x + -y in IEEE)
* Q8_0 ``d * q``              -> 8-bit signed q, group 32, scale d
* Q6_K ``d*sc * (q - 32)``    -> signed q - 32 in -32..31 held in int8, group 16, scale d*sc
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.quant import ggml_formats as fmt
from strata.quant.ggml_dequant import _k_scales_mins
from strata.quant.ggml_formats import GGMLType


@dataclass(frozen=True)
class GroupedCodes:
    codes: torch.Tensor               # [N, K] uint8 0..15 (bits=4) or int8 (bits=8)
    scales: torch.Tensor              # [N, K / group] float32
    mins: torch.Tensor | None         # [N, K / group] float32; None: symmetric
    group: int
    bits: int


def unpack_codes(blocks: torch.Tensor, ggml_type: GGMLType) -> GroupedCodes:
    """blocks [N, row_bytes] uint8, rows of a GGUF weight -> its codes, scales and mins."""
    if ggml_type.name not in _UNPACKERS:
        raise ValueError(f"GGML type {ggml_type.name} has no packed form; packed types: "
                         f"{', '.join(PACKED_TYPE_NAMES)}")
    rows, row_bytes = blocks.shape
    if blocks.dtype != torch.uint8 or row_bytes % ggml_type.type_size:
        raise ValueError(f"{ggml_type.name} rows must be uint8 with a whole number of "
                         f"{ggml_type.type_size}-byte blocks, got {blocks.dtype} rows of {row_bytes} bytes")
    flat = blocks.contiguous().view(-1, ggml_type.type_size)   # [N * blocks per row, type_size]
    codes, scales, mins, group, bits = _UNPACKERS[ggml_type.name](flat, ggml_type)
    k = row_bytes // ggml_type.type_size * ggml_type.block_size
    return GroupedCodes(codes.reshape(rows, k), scales.reshape(rows, k // group),
                        None if mins is None else mins.reshape(rows, k // group), group, bits)


def dequantize_codes(gc: GroupedCodes) -> torch.Tensor:
    """[N, K] float32: ``q * scale + min``, in that order (what the exactness tests compare)."""
    n, k = gc.codes.shape
    w = gc.codes.float().view(n, k // gc.group, gc.group) * gc.scales[..., None]
    if gc.mins is not None:
        w += gc.mins[..., None]
    return w.view(n, k)


def _field(blocks: torch.Tensor, ggml_type: GGMLType, name: str) -> torch.Tensor:
    start, end = ggml_type.field_range(name)
    return blocks[:, start:end]                                  # [num_blocks, field bytes]


def _f16(blocks: torch.Tensor, ggml_type: GGMLType, name: str) -> torch.Tensor:
    return _field(blocks, ggml_type, name).contiguous().view(torch.float16).float()  # [num_blocks, 1]


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """bytes [..., n] -> codes [..., 2, n]: the low nibbles, then the high ones."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _q4_0(blocks, t):
    d = _f16(blocks, t, "d")
    return _low_high(_field(blocks, t, "qs")), d, d * -8.0, 32, 4


def _q4_1(blocks, t):
    return _low_high(_field(blocks, t, "qs")), _f16(blocks, t, "d"), _f16(blocks, t, "m"), 32, 4


def _q4_k(blocks, t):
    num_blocks = blocks.shape[0]
    sc, m = _k_scales_mins(_field(blocks, t, "scales"))          # [num_blocks, 8] each
    # 4 chunks of 32 bytes: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1
    codes = _low_high(_field(blocks, t, "qs").reshape(num_blocks, 4, 32))
    return codes, _f16(blocks, t, "d") * sc, -(_f16(blocks, t, "dmin") * m), 32, 4


def _q8_0(blocks, t):
    return _field(blocks, t, "qs").contiguous().view(torch.int8), _f16(blocks, t, "d"), None, 32, 8


def _q6_k(blocks, t):
    num_blocks = blocks.shape[0]
    sc = _field(blocks, t, "scales").contiguous().view(torch.int8).float()   # [num_blocks, 16]
    # As in ggml_dequant._q6_k: per half of 128, ql gives the low 4 bits (elements 0-63 low
    # nibbles, 64-127 high), qh the top 2 bits of elements l, l+32, l+64, l+96.
    ql = _field(blocks, t, "ql").reshape(num_blocks, 2, 1, 64)
    q = torch.cat((ql & 0x0F, ql >> 4), dim=2).view(num_blocks, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    q |= ((_field(blocks, t, "qh").reshape(num_blocks, 2, 1, 32) >> shifts) & 0x03) << 4
    codes = (q.view(torch.int8) - 32).view(num_blocks, 256)      # 0..63 -> -32..31
    return codes, _f16(blocks, t, "d") * sc, None, 16, 8


_UNPACKERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q8_0": _q8_0, "Q6_K": _q6_k}
PACKED_TYPE_NAMES = tuple(_UNPACKERS)
assert all(name in fmt.BY_NAME for name in PACKED_TYPE_NAMES)
