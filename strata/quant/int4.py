"""int4 weights in groups along the input dimension, asymmetric, quantized at load by rounding to
nearest (formats.INT4): per group of G input features, scale = (max - min) / 15 and codes
q = round((w - min) / scale) in 0..15, so w ~ q * scale + min.

Storage depends on the device: on the GPU two codes per byte in strata's layout (see
strata.kernels.quant_matmul) with float32 scales and mins, computed by the Triton W4A16 kernel;
on the CPU torch's own int4 packing, computed by ``_weight_int4pack_mm_for_cpu`` (its formula is
(q - 8) * scale + zero, so zero = min + 8 * scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import use_triton
from strata.quant.base import QuantMethod, UnquantizedLinearMethod
from strata.quant.formats import INT4

_CPU_INNER_K_TILES = 2   # torch's int4 CPU packing parameter


def padded_size(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, Kp] uint8 in 0..15, scales [N, Kp/G] f32, mins [N, Kp/G] f32).

    Kp is K rounded up to whole groups (SmolLM2's 576 inputs are 4.5 groups of 128): the last
    group is padded with copies of its last column, so its range is that of its real weights,
    and the matmul pads x with zeros to match."""
    n, k = w.shape
    w = w.float()
    pad = padded_size(k, group_size) - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
        k += pad
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), scales, lo


def dequantize_int4_codes(codes, scales, mins, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    n, k = codes.shape
    groups = codes.float().reshape(n, k // group_size, group_size)
    return (groups * scales[..., None] + mins[..., None]).reshape(n, k).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] uint8 0..15 -> bytes [..., K/2], even k in the low nibble: the layout of
    strata.kernels.quant_matmul.pack_int4, written here so that checkpoints can be packed and
    read without Triton."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


class Int4LinearMethod(QuantMethod):
    """``store`` and ``apply`` also serve methods that arrive at the same codes another way
    (GPTQ checkpoints, strata's own quantized checkpoints)."""

    name = "int4"

    def __init__(self, group_size: int | None = None, reference: bool = False):
        self.group_size = INT4.check_group(group_size)
        self.reference = reference

    def create_weights(self, layer, in_features, out_features, dtype):
        UnquantizedLinearMethod().create_weights(layer, in_features, out_features, dtype)

    def process_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        codes, scales, mins = quantize_int4(weight.data, self.group_size)
        del layer.weight
        self.store(layer, codes, scales, mins, weight.dtype)

    def store(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
              dtype: torch.dtype) -> None:
        """codes [N, Kp] uint8 0..15 (Kp: in_features rounded up to whole groups), scales and mins
        [N, Kp/G] float32 -> the parameters ``apply`` reads on this device."""
        layer.input_pad = codes.shape[1] - layer.in_features
        if self.reference:
            dense = dequantize_int4_codes(codes, scales, mins, self.group_size, dtype)
            layer.weight = nn.Parameter(dense[:, : layer.in_features].contiguous(), requires_grad=False)
            return
        if use_triton(codes):
            layer.qweight = nn.Parameter(pack_nibbles(codes), requires_grad=False)   # [N, K/2] uint8
            layer.scales = nn.Parameter(scales, requires_grad=False)                 # [N, K/G] f32
            layer.mins = nn.Parameter(mins, requires_grad=False)
            return
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), _CPU_INNER_K_TILES)
        zeros = mins + 8 * scales
        layer.qweight = nn.Parameter(packed, requires_grad=False)
        # [K/G, N, 2]: torch's layout of (scale, zero) pairs, in the activation dtype.
        layer.scales_and_zeros = nn.Parameter(torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                                              .contiguous().to(dtype), requires_grad=False)

    def apply(self, layer, x, bias):
        if self.reference:
            return F.linear(x, layer.weight, bias)
        if layer.input_pad:
            x = F.pad(x, (0, layer.input_pad))
        if use_triton(x):
            from strata.kernels.quant_matmul import w4a16_matmul
            return w4a16_matmul(x, layer.qweight, layer.scales, layer.mins, self.group_size, bias)
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), layer.qweight,
                                                       self.group_size, layer.scales_and_zeros)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y
