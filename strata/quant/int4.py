"""int4 weights in groups along the input dimension, asymmetric, quantized at load by rounding to
nearest (formats.INT4): per group of G input features, scale = (max - min) / 15 and codes
q = round((w - min) / scale) in 0..15, so w ~ q * scale + min.

On the GPU: two codes per byte in strata's layout (see strata.kernels.quant_matmul) with float32
scales and mins, computed by the Triton W4A16 kernel. On the CPU the quantized values are kept
dequantized for now (same outputs, no memory saving): torch's int4 CPU kernel
(``_weight_int4pack_mm_for_cpu``) measured 40-50x slower than an fp32 matmul on this 2-core
machine, and strata's own CPU kernels are the CPU-speed issue's work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import use_triton
from strata.quant.base import QuantMethod, UnquantizedLinearMethod
from strata.quant.formats import INT4



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
        if getattr(layer, "shards_input", False) and in_features % self.group_size:
            # A group straddling two ranks' columns would get other scales than with one rank.
            raise ValueError(f"int4 groups of {self.group_size} do not tile this rank's {in_features} "
                             "inputs of a row-parallel layer (tensor parallelism): use a "
                             "quantization_group_size that divides it")
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
        if self.reference or not use_triton(codes):   # see the module docstring for the CPU
            dense = dequantize_int4_codes(codes, scales, mins, self.group_size, dtype)
            layer.weight = nn.Parameter(dense[:, : layer.in_features].contiguous(), requires_grad=False)
            return
        layer.qweight = nn.Parameter(pack_nibbles(codes), requires_grad=False)   # [N, K/2] uint8
        layer.scales = nn.Parameter(scales, requires_grad=False)                 # [N, K/G] f32
        layer.mins = nn.Parameter(mins, requires_grad=False)

    def apply(self, layer, x, bias):
        if getattr(layer, "weight", None) is not None:      # reference, or the CPU for now
            return F.linear(x, layer.weight, bias)
        if layer.input_pad:
            x = F.pad(x, (0, layer.input_pad))
        from strata.kernels.quant_matmul import w4a16_matmul
        return w4a16_matmul(x, layer.qweight, layer.scales, layer.mins, self.group_size, bias)

    def lm_head_method(self) -> QuantMethod:
        return self
