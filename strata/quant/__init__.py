"""Weight quantization: one QuantMethod per format behind every linear layer (see base.py).

``make_quant_method(config)`` turns the engine's QuantConfig into the method the model's linear
layers are built with; ``finish_loading(model)`` lets each layer repack its weights once the
checkpoint is in.
"""

from __future__ import annotations

import os

from torch import nn

from strata.config import QuantConfig
from strata.quant.base import QuantMethod


def make_quant_method(config: QuantConfig) -> QuantMethod | None:
    """The method for config; ``STRATA_QUANT_REFERENCE=1`` asks for its reference form (the same
    quantized values, stored dequantized and multiplied by plain matmuls), which is what the
    packed kernels are compared against."""
    if config.method is None:
        return None
    reference = config.reference or os.environ.get("STRATA_QUANT_REFERENCE") == "1"
    if config.method == "int8":
        from strata.quant.int8 import Int8LinearMethod
        return Int8LinearMethod(reference=reference)
    if config.method == "int4":
        from strata.quant.int4 import Int4LinearMethod
        return Int4LinearMethod(config.group_size, reference=reference)
    raise ValueError(f"quantization {config.method!r} is not implemented")


def finish_loading(model: nn.Module) -> None:
    """Run every linear layer's process_after_loading (quantize, repack, free the originals)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_after_loading(module)
