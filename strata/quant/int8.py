"""int8 weights, per output channel, quantized at load by rounding to nearest (formats.INT8).

On the GPU the matmul is strata's Triton W8A16 kernel; on the CPU torch's packed int8 matmul
(``_weight_int8pack_mm``, which reads the int8 codes directly). Activations stay in the model
dtype; the weight's bytes are halved against bf16/fp16 and quartered against fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import use_triton
from strata.quant.base import QuantMethod, UnquantizedLinearMethod


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes [N, K] int8 in -127..127, scales [N] float32), w ~ codes * scale."""
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scales[:, None]).to(dtype)


class Int8LinearMethod(QuantMethod):
    """``reference=True`` stores the dequantized int8 values and uses F.linear: the same numbers
    as the packed path, computed the plain way (what the tests compare against)."""

    name = "int8"

    def __init__(self, reference: bool = False):
        self.reference = reference

    def create_weights(self, layer, in_features, out_features, dtype):
        # A float weight receives the checkpoint; process_after_loading quantizes it.
        UnquantizedLinearMethod().create_weights(layer, in_features, out_features, dtype)

    def process_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        codes, scales = quantize_int8(weight.data)
        del layer.weight
        if self.reference:
            layer.weight = nn.Parameter(dequantize_int8(codes, scales, weight.dtype), requires_grad=False)
            return
        layer.qweight = nn.Parameter(codes, requires_grad=False)      # [N, K] int8
        layer.scales = nn.Parameter(scales, requires_grad=False)      # [N] float32

    def apply(self, layer, x, bias):
        if self.reference:
            return F.linear(x, layer.weight, bias)
        if use_triton(x):
            from strata.kernels.quant_matmul import w8a16_matmul
            return w8a16_matmul(x, layer.qweight, layer.scales, bias)
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), layer.qweight,
                                               layer.scales.to(x.dtype))
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y
