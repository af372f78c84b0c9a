"""The seam for quantization: a linear layer owns its weights through a QuantMethod.

``create_weights`` registers the parameters a format needs, ``process_after_loading`` repacks
them once the checkpoint is in, and ``apply`` computes ``x @ W^T (+ b)``. Models never see which
method is in use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import use_triton


class QuantMethod:
    name = "base"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        raise NotImplementedError

    def process_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_pushing(self, layer: nn.Module, x: torch.Tensor, push) -> torch.Tensor | None:
        """``x @ W^T`` for a row-parallel projection whose kernel also sends each tile of the
        result to the tensor-parallel peers (``push``: a strata.kernels.all_reduce_norm
        PushTarget), or None where this method has no such kernel for x (then the caller uses
        ``apply`` and the sum sends)."""
        return None

    def lm_head_method(self) -> QuantMethod | None:
        """The method an untied LM head is quantized with at load, or None to keep it float.
        Formats strata quantizes to itself say yes: at batch 1 the head is the largest single
        weight read per token (Llama-3.1-8B: 1 GB of bf16, an eighth of the bf16 model)."""
        return None


class UnquantizedLinearMethod(QuantMethod):
    name = "none"

    def create_weights(self, layer, in_features, out_features, dtype):
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias):
        if _skinny(x):   # decode steps: a weight stream
            from strata.kernels.skinny_matmul import skinny_matmul
            return skinny_matmul(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)

    def apply_pushing(self, layer, x, push):
        if _skinny(x):
            from strata.kernels.skinny_matmul import skinny_matmul
            return skinny_matmul(x, layer.weight, push=push)
        return None


def _skinny(x: torch.Tensor) -> bool:
    """Whether x's product goes to strata's skinny matmul (a few rows, on the Triton path)."""
    if not (use_triton(x) and x.dim() == 2):
        return False
    from strata.kernels.skinny_matmul import MAX_ROWS
    return x.shape[0] <= MAX_ROWS and x.stride(1) == 1
