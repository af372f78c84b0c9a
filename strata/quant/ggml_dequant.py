"""Dequantize GGML blocks to float32 with torch, vectorised over all blocks of a tensor.

Each dequantizer sees the raw bytes as a [num_blocks, type_size] uint8 matrix and slices the
block fields by name from quant/ggml_formats.py. The arithmetic follows ggml's reference
dequantize_row_* (and gguf-py) operation by operation, in float32 and without fused
multiply-adds, so results are bit-identical to llama.cpp's CPU reference.
"""

import warnings
from collections.abc import Callable

import numpy as np
import torch

from strata.quant import ggml_formats as fmt
from strata.quant.ggml_formats import GGMLType


def dequantize(
    raw: np.ndarray | torch.Tensor, ggml_type: GGMLType | int, num_elements: int
) -> torch.Tensor:
    """Dequantize `num_elements` values stored as `ggml_type` in the uint8 buffer `raw`.

    Returns a new 1-D float32 tensor (never a view of `raw`, so it outlives a memory map).
    Raises ValueError for unsupported types and for buffers of the wrong size.
    """
    if isinstance(ggml_type, int):
        ggml_type = fmt.type_by_id(ggml_type)
    if ggml_type not in fmt.SUPPORTED:
        raise ValueError(
            f"GGML type {ggml_type.name} cannot be dequantized; supported: {fmt.supported_names()}"
        )
    if num_elements % ggml_type.block_size:
        raise ValueError(
            f"{num_elements} elements is not a whole number of {ggml_type.name} blocks "
            f"({ggml_type.block_size} elements each)"
        )
    data = _as_uint8_tensor(raw)  # [nbytes]
    expected = ggml_type.nbytes(num_elements)
    if data.numel() != expected:
        raise ValueError(
            f"{num_elements} {ggml_type.name} elements need {expected} bytes, got {data.numel()}"
        )
    blocks = data.view(-1, ggml_type.type_size)  # [num_blocks, type_size]
    return _DEQUANTIZERS[ggml_type.name](blocks, ggml_type).reshape(-1)


def _as_uint8_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        tensor = raw
    else:
        array = np.ascontiguousarray(raw).reshape(-1)
        # Memory-mapped GGUF data is read-only; torch warns because it cannot mark tensors
        # read-only, but nothing below writes to its input.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(array)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"raw GGML data must be uint8, got {tensor.dtype}")
    return tensor.reshape(-1).contiguous()


def _field(blocks: torch.Tensor, ggml_type: GGMLType, name: str) -> torch.Tensor:
    start, end = ggml_type.field_range(name)
    return blocks[:, start:end]  # [num_blocks, field bytes]


def _f16_field(blocks: torch.Tensor, ggml_type: GGMLType, name: str) -> torch.Tensor:
    # contiguous() first: a column slice of the block matrix cannot be reinterpreted in place
    half = _field(blocks, ggml_type, name).contiguous().view(torch.float16)  # [num_blocks, 1]
    return half.float()


def _nibbles_into(out: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Unpack bytes [..., n] into float `out` [..., 2, n]: low nibbles first, then high.

    Writing into one preallocated float buffer (and scaling it in place afterwards) keeps every
    large tensor to a single allocation; chains of temporaries made this several times slower.
    """
    out.select(-2, 0).copy_(qs & 0x0F)
    out.select(-2, 1).copy_(qs >> 4)
    return out


def _scalar(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml_type.name]
    # copy: a float32 view would still point into the caller's (often memory-mapped) buffer
    return blocks.reshape(-1).view(dtype).to(torch.float32, copy=True)


def _q8_0(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    d = _f16_field(blocks, ggml_type, "d")  # [num_blocks, 1]
    qs = _field(blocks, ggml_type, "qs").view(torch.int8).float()  # [num_blocks, 32]
    return qs.mul_(d)


def _q4_0(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    num_blocks = blocks.shape[0]
    d = _f16_field(blocks, ggml_type, "d")  # [num_blocks, 1]
    # element j is the low nibble of byte j, element j + 16 its high nibble
    q = _nibbles_into(torch.empty(num_blocks, 2, 16), _field(blocks, ggml_type, "qs"))
    return q.view(num_blocks, 32).sub_(8.0).mul_(d)


def _q4_1(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    num_blocks = blocks.shape[0]
    d = _f16_field(blocks, ggml_type, "d")  # [num_blocks, 1]
    m = _f16_field(blocks, ggml_type, "m")  # [num_blocks, 1]
    q = _nibbles_into(torch.empty(num_blocks, 2, 16), _field(blocks, ggml_type, "qs"))
    return q.view(num_blocks, 32).mul_(d).add_(m)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (get_scale_min_k4).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 keep
    their low 4 bits in bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7.
    """
    num_blocks = scales.shape[0]
    groups = scales.reshape(num_blocks, 3, 4)
    lo_sc, lo_m, hi = groups[:, 0], groups[:, 1], groups[:, 2]  # [num_blocks, 4] each
    sc = torch.cat((lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)), dim=1)  # [num_blocks, 8]
    mins = torch.cat((lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)), dim=1)  # [num_blocks, 8]
    return sc.float(), mins.float()


def _k_scale_offset(blocks: torch.Tensor, ggml_type: GGMLType) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block (d * scale, dmin * min) of Q4_K / Q5_K, each [num_blocks, 8, 1]."""
    d = _f16_field(blocks, ggml_type, "d")  # [num_blocks, 1]
    dmin = _f16_field(blocks, ggml_type, "dmin")
    sc, mins = _k_scales_mins(_field(blocks, ggml_type, "scales"))
    return (d * sc).unsqueeze(-1), (dmin * mins).unsqueeze(-1)


def _q4_k(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    num_blocks = blocks.shape[0]
    scale, offset = _k_scale_offset(blocks, ggml_type)
    # 4 chunks of 32 bytes; in each, low nibbles are sub-block 2i and high nibbles 2i + 1
    qs = _field(blocks, ggml_type, "qs").reshape(num_blocks, 4, 32)
    q = _nibbles_into(torch.empty(num_blocks, 4, 2, 32), qs).view(num_blocks, 8, 32)
    return q.mul_(scale).sub_(offset)


def _q5_k(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    num_blocks = blocks.shape[0]
    scale, offset = _k_scale_offset(blocks, ggml_type)
    qs = _field(blocks, ggml_type, "qs").reshape(num_blocks, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).view(num_blocks, 8, 32)  # uint8, low 4 bits
    # bit i of qh[l] is the fifth bit of element l of sub-block i
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    qh = _field(blocks, ggml_type, "qh").unsqueeze(1)  # [num_blocks, 1, 32]
    q |= ((qh >> shifts) & 0x01) << 4
    return q.float().mul_(scale).sub_(offset)


def _q6_k(blocks: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    num_blocks = blocks.shape[0]
    d = _f16_field(blocks, ggml_type, "d")  # [num_blocks, 1]
    sc = _field(blocks, ggml_type, "scales").view(torch.int8).float()  # [num_blocks, 16]
    scale = (d * sc).unsqueeze(-1)  # [num_blocks, 16, 1]
    # Two halves of 128 elements. In a half, ql's 64 bytes give elements 0-63 as low nibbles and
    # 64-127 as high nibbles; qh's 32 bytes give the top 2 bits of elements l, l+32, l+64, l+96
    # at bit offsets 0, 2, 4, 6.
    ql = _field(blocks, ggml_type, "ql").reshape(num_blocks, 2, 1, 64)
    q = torch.cat((ql & 0x0F, ql >> 4), dim=2).view(num_blocks, 2, 4, 32)  # uint8, low 4 bits
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = _field(blocks, ggml_type, "qh").reshape(num_blocks, 2, 1, 32)
    q |= ((qh >> shifts) & 0x03) << 4
    return q.view(num_blocks, 16, 16).float().sub_(32.0).mul_(scale)


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor, GGMLType], torch.Tensor]] = {
    "F32": _scalar,
    "F16": _scalar,
    "BF16": _scalar,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
assert set(_DEQUANTIZERS) == {t.name for t in fmt.SUPPORTED}
