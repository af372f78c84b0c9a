"""int8 weights, per output channel, quantized at load by rounding to nearest (formats.INT8).

On the GPU the matmul is strata's Triton W8A16 kernel, reading the int8 codes. On the CPU the
quantized values are kept dequantized for now (same outputs, no memory saving): torch's packed
CPU kernel (``_weight_int8pack_mm``) measured 25-50x slower than an fp32 matmul on this 2-core
machine (SmolLM2's [1536 x 576] at 1 and 512 rows), and strata's own CPU kernels are the
CPU-speed issue's work. Activations stay in the model
dtype; the weight's bytes are halved against bf16/fp16 and quartered against fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.distributed import parallel_state as ps
from strata.kernels import use_triton
from strata.quant.base import QuantMethod, UnquantizedLinearMethod


def quantize_int8(w: torch.Tensor, row_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes [N, K] int8 in -127..127, scales [N] float32), w ~ codes * scale.
    ``row_amax`` [N]: max |w| of each whole row when w holds only some of its columns."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1) if row_amax is None else row_amax
    scales = (amax / 127).clamp(min=torch.finfo(torch.float32).tiny)
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
        row_amax = None
        if getattr(layer, "shards_input", False):
            # Row parallel: each rank holds some columns of every output channel. The channel's
            # scale comes from its whole row, so every tensor-parallel size stores the same codes.
            row_amax = ps.tensor_model_parallel_all_reduce_max(weight.data.float().abs().amax(dim=1))
        codes, scales = quantize_int8(weight.data, row_amax)
        del layer.weight
        self.store(layer, codes, scales, weight.dtype)

    def store(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        """codes [N, K] int8, scales [N] float32 -> what ``apply`` reads (also used by methods
        that arrive at such codes from a checkpoint: GPTQ, strata's own format)."""
        if self.reference or not use_triton(codes):   # see the module docstring for the CPU
            layer.weight = nn.Parameter(dequantize_int8(codes, scales, dtype), requires_grad=False)
            return
        layer.qweight = nn.Parameter(codes, requires_grad=False)      # [N, K] int8
        layer.scales = nn.Parameter(scales, requires_grad=False)      # [N] float32

    def apply(self, layer, x, bias):
        if getattr(layer, "weight", None) is not None:      # reference, or the CPU for now
            return F.linear(x, layer.weight, bias)
        from strata.kernels.quant_matmul import w8a16_matmul
        return w8a16_matmul(x, layer.qweight, layer.scales, bias)

    def lm_head_method(self) -> QuantMethod:
        return self


class Int8GroupedLinearMethod(QuantMethod):
    """int8 codes with a scale and an offset per group of G input features: ``c * scale + offset``.

    Not a format strata quantizes to; it holds 8-bit GPTQ checkpoints exactly (groups, zero
    points). Where Triton runs (CUDA) the grouped W8A16 kernel reads the codes
    (strata.kernels.w8_grouped_matmul); the CPU matmul runs torch's packed int8 kernel once per
    group and adds the offsets' share as one small matmul of the per-group sums of x."""

    name = "int8-grouped"

    def __init__(self, group_size: int, reference: bool = False):
        self.group_size = group_size
        self.reference = reference

    def store(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor,
              offsets: torch.Tensor | None, dtype: torch.dtype) -> None:
        """codes [N, Kp] int8 (Kp: in_features rounded up to whole groups), scales and offsets
        [N, Kp/G] float32; offsets None when all are zero."""
        n, k = codes.shape
        layer.input_pad = k - layer.in_features
        groups = k // self.group_size
        if self.reference:
            dense = codes.float().view(n, groups, self.group_size) * scales[..., None]
            if offsets is not None:
                dense = dense + offsets[..., None]
            dense = dense.view(n, k)[:, : layer.in_features].to(dtype).contiguous()
            layer.weight = nn.Parameter(dense, requires_grad=False)
            return
        if use_triton(codes):
            from strata.kernels.w8_grouped_matmul import GROUP_SIZES
            if self.group_size in GROUP_SIZES:
                layer.qweight = nn.Parameter(codes.contiguous(), requires_grad=False)        # [N, Kp] int8
                layer.scales = nn.Parameter(scales.float().contiguous(), requires_grad=False)   # [N, groups]
                layer.offsets = None if offsets is None else nn.Parameter(offsets.float().contiguous(),
                                                                          requires_grad=False)
                layer.on_triton = True
                return
        # [G groups, N, group]: each group's codes contiguous, as the per-group kernel wants them.
        grouped = codes.view(n, groups, self.group_size).transpose(0, 1).contiguous()
        layer.qweight = nn.Parameter(grouped, requires_grad=False)
        layer.scales = nn.Parameter(scales.t().contiguous(), requires_grad=False)     # [groups, N]
        layer.offsets = None if offsets is None else nn.Parameter(offsets.t().contiguous(), requires_grad=False)

    def apply(self, layer, x, bias):
        if self.reference:
            return F.linear(x, layer.weight, bias)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if layer.input_pad:
            x = F.pad(x, (0, layer.input_pad))
        if getattr(layer, "on_triton", False):
            from strata.kernels.w8_grouped_matmul import w8g_matmul
            y = w8g_matmul(x, layer.qweight, layer.scales, layer.offsets, self.group_size, bias)
            return y.reshape(*shape[:-1], y.shape[-1])
        xg = x.view(x.shape[0], -1, self.group_size)          # [M, groups, group]
        if x.device.type == "cpu":
            y = torch.zeros(x.shape[0], layer.qweight.shape[1], dtype=x.dtype)
            for g in range(layer.qweight.shape[0]):
                y += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), layer.qweight[g],
                                                        layer.scales[g].to(x.dtype))
        else:
            w = layer.qweight.to(x.dtype) * layer.scales.to(x.dtype)[..., None]   # [groups, N, group]
            y = x @ w.transpose(0, 1).reshape(w.shape[1], -1).t()
        if layer.offsets is not None:
            y = y + xg.sum(-1) @ layer.offsets.to(x.dtype)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y
