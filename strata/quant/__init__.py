"""Weight quantization: one QuantMethod per format behind every linear layer (see base.py).

``make_quant_method(config)`` turns the engine's QuantConfig into the method the model's linear
layers are built with; ``finish_loading(model)`` lets each layer repack its weights once the
checkpoint is in.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from strata.config import QuantConfig
from strata.quant.base import QuantMethod


CHECKPOINT_METHODS = ("gptq", "strata")


def make_quant_method(config: QuantConfig, checkpoint: dict | None = None) -> QuantMethod | None:
    """The method for config, or for a checkpoint that is already quantized (``checkpoint``: its
    quantization_config). ``STRATA_QUANT_REFERENCE=1`` asks for the reference form (the same
    quantized values, stored dequantized and multiplied by plain matmuls), which is what the
    packed kernels are compared against."""
    reference = config.reference or os.environ.get("STRATA_QUANT_REFERENCE") == "1"
    if checkpoint is not None and checkpoint.get("quant_method") == "gguf":
        # GGUF blocks stay packed, unless asked to re-quantize (int8/int4 from the dequantized
        # weights) or for the reference path (every tensor dequantized at load).
        if config.method is None and not reference:
            from strata.quant.gguf import GGUFLinearMethod
            return GGUFLinearMethod()
        checkpoint = None
    if checkpoint is not None:
        return _checkpoint_method(config, checkpoint, reference)
    if config.method is None:
        return None
    if config.method == "int8":
        from strata.quant.int8 import Int8LinearMethod
        return Int8LinearMethod(reference=reference)
    if config.method == "int4":
        from strata.quant.int4 import Int4LinearMethod
        return Int4LinearMethod(config.group_size, reference=reference)
    raise ValueError(f"quantization {config.method!r} is not implemented")


def _checkpoint_method(config: QuantConfig, checkpoint: dict, reference: bool) -> QuantMethod:
    method = checkpoint.get("quant_method")
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization_config.quant_method = {method!r} is not supported; "
                         f"supported: {', '.join(CHECKPOINT_METHODS)}")
    if method == "strata":
        from strata.quant.packed import PackedLinearMethod, parse_spec
        fmt, group = parse_spec(checkpoint)
        # Asking for what the checkpoint already holds is fine (the same codes either way).
        if config.method is not None and (config.method, config.group_size) != (fmt, group):
            raise ValueError(f"the checkpoint is already quantized ({fmt}, group size {group}); "
                             f"quantization={config.method!r} with group size {config.group_size} "
                             "cannot re-quantize it: leave quantization unset")
        return PackedLinearMethod(fmt, group, reference=reference)
    if config.method is not None:
        raise ValueError(f"the checkpoint is already quantized ({method}); quantization="
                         f"{config.method!r} cannot re-quantize it: leave quantization unset")
    from strata.quant.gptq import GPTQConfig, GPTQLinearMethod
    return GPTQLinearMethod(GPTQConfig.from_dict(checkpoint), reference=reference)


def describe_checkpoint(checkpoint: dict | None) -> str | None:
    """For the startup line: what the checkpoint's own quantization is."""
    if not checkpoint:
        return None
    if checkpoint.get("quant_method") == "strata":
        group = checkpoint.get("group_size")
        calibrated = ", GPTQ-calibrated" if (checkpoint.get("calibration") or {}).get("method") == "gptq" else ""
        return (f"strata {checkpoint.get('format')}" + (f", groups of {group}" if group else ", per channel")
                + calibrated)
    if checkpoint.get("quant_method") == "gptq":
        from strata.quant.gptq import GPTQConfig
        try:
            return GPTQConfig.from_dict(checkpoint).describe()
        except ValueError:
            pass   # reported when the model is built
    return str(checkpoint.get("quant_method"))


def finish_loading(model: nn.Module, process_device: torch.device | None = None,
                   skip: nn.Module | None = None) -> None:
    """Run every linear layer's process_after_loading (quantize, repack, free the originals).

    process_device: for a model built in host memory that will compute on a GPU (offloading),
    each int8/int4 layer is quantized there and keeps the form the GPU computes with (packed
    codes and scales, where the CPU keeps dequantized weights), then moves back to the host: its
    offloaded layers then cross PCIe compressed, and the GPU computes straight from the codes.
    skip: a submodule finished already (the decoder layers, finished one by one as they loaded)."""
    on_device = process_device is not None and process_device.type != "cpu"
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    for module in model.modules():
        if id(module) in skipped:
            continue
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        if not on_device or getattr(method, "name", None) not in ("int8", "int4"):
            method.process_after_loading(module)
            continue
        home = module.weight.device
        module.to(process_device)
        method.process_after_loading(module)
        module.to(home)


class _HeadAsLinear(nn.Module):
    """An LM head's weight seen as a linear layer, so that a QuantMethod can quantize and apply it;
    the head then computes its logits through it (VocabParallelEmbedding.use_packed)."""

    def __init__(self, weight: torch.Tensor, method: QuantMethod):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.quant_method = method
        self.weight = nn.Parameter(weight, requires_grad=False)
        method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, None)


def quantize_lm_head(model: nn.Module, quant: QuantMethod | None) -> bool:
    """Quantize an untied LM head with the method's ``lm_head_method`` (int8 / int4, at load or
    from a strata checkpoint). A head tied to the token embedding stays float: the lookup needs
    its rows, and a second, quantized copy would add memory where the format is meant to save
    it. Returns whether the head was quantized."""
    method = quant.lm_head_method() if quant is not None else None
    head, embedding = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    if (method is None or head is None or head.packed is not None
            or (embedding is not None and head.weight is embedding.weight)):
        return False
    head.use_packed(_HeadAsLinear(head.weight.data, method))
    return True
