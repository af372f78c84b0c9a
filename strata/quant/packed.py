"""strata's own quantized checkpoints (written by ``strata quantize``): the codes and scales of
the int8 / int4 round-to-nearest formats, stored so that loading copies them into place.

config.json says ``"quantization_config": {"quant_method": "strata", "format": "int8" | "int4",
"group_size": G | null}``. Each quantized linear ``P`` (its checkpoint name without
``.weight``, e.g. ``model.layers.0.self_attn.q_proj``) is stored as, for N outputs, K inputs
and Kp = K rounded up to whole groups:

* int8: ``P.qweight`` [N, K] int8, ``P.scales`` [N] float32; w = q * scale.
* int4: ``P.qweight`` [N, Kp / 2] uint8, two codes a byte, even k in the low nibble (the GPU
  kernel's own layout); ``P.scales`` and ``P.mins`` [N, Kp / G] float32; w = q * scale + min.

The layout is the same for every device: the CPU repacks int4 codes into torch's tiles at load
(cheap next to reading them), the GPU uses them as they are. Every other tensor keeps the
source's float dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.layers.linear import RowParallelLinear, set_weight_attrs
from strata.quant.base import QuantMethod
from strata.quant.formats import FORMATS
from strata.quant.int4 import Int4LinearMethod, padded_size, unpack_nibbles
from strata.quant.int8 import Int8LinearMethod

QUANT_METHOD = "strata"


def checkpoint_spec(fmt: str, group_size: int | None) -> dict:
    return {"quant_method": QUANT_METHOD, "format": fmt, "group_size": group_size}


def parse_spec(spec: dict) -> tuple[str, int | None]:
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"quantization_config.format = {fmt!r} is not a strata format; "
                         f"supported: {', '.join(FORMATS)}")
    group = spec.get("group_size")
    if FORMATS[fmt].group_sizes is None:
        if group is not None:
            raise ValueError(f"quantization_config.group_size = {group!r}: {fmt} is per channel; "
                             "supported: null")
    elif group not in FORMATS[fmt].group_sizes:
        raise ValueError(f"quantization_config.group_size = {group!r} for {fmt}; supported: "
                         f"{', '.join(map(str, FORMATS[fmt].group_sizes))}")
    return fmt, group


class PackedLinearMethod(QuantMethod):
    """Registers the stored codes instead of a float weight, then hands them to the int8 / int4
    method's ``store``; computes with that method's ``apply``."""

    def __init__(self, fmt: str, group_size: int | None, reference: bool = False):
        self.fmt, self.group_size = fmt, group_size
        self.name = f"{fmt} (packed checkpoint)"
        self.inner = (Int4LinearMethod(group_size, reference) if fmt == "int4"
                      else Int8LinearMethod(reference))

    def create_weights(self, layer, in_features, out_features, dtype):
        empty = lambda *shape, dtype: nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        layer.params_dtype = dtype
        if self.fmt == "int8":
            layer.qweight = empty(out_features, in_features, dtype=torch.int8)
            layer.scales = set_weight_attrs(empty(out_features, dtype=torch.float32), input_dim=None)
            return
        padded = padded_size(in_features, self.group_size)
        if padded != in_features and isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
            raise ValueError(f"int4 groups of {self.group_size} do not tile this rank's {in_features} "
                             "inputs of a row-parallel layer: use a group size that divides it")
        layer.qweight = empty(out_features, padded // 2, dtype=torch.uint8)
        layer.scales = empty(out_features, padded // self.group_size, dtype=torch.float32)
        layer.mins = empty(out_features, padded // self.group_size, dtype=torch.float32)

    def process_after_loading(self, layer: nn.Module) -> None:
        codes, scales = layer.qweight.data, layer.scales.data
        mins = layer.mins.data if self.fmt == "int4" else None
        for name in ("qweight", "scales", "mins"):
            if hasattr(layer, name):
                delattr(layer, name)
        if self.fmt == "int8":
            self.inner.store(layer, codes, scales, layer.params_dtype)
        else:
            self.inner.store(layer, unpack_nibbles(codes), scales, mins, layer.params_dtype)

    def apply(self, layer, x, bias):
        return self.inner.apply(layer, x, bias)

    def lm_head_method(self) -> QuantMethod:
        # The checkpoint keeps the head in float (strata quantize writes linears only): quantized
        # at load the same way, so a saved model computes what quantizing at load computes.
        return self.inner
