"""Activations. Gated MLPs get ``SiluAndMul`` over the fused gate/up output. On CUDA each is one
Triton kernel, on the CPU (float32) SiluAndMul is one C kernel (strata.kernels.cpu_ops); elsewhere
torch's ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import cpu_ops, use_triton


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [n, 2*d] -> [n, d]
        if use_triton(x):
            from strata.kernels.activation import silu_and_mul
            return silu_and_mul(x)
        if cpu_ops.available(x):
            return cpu_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from strata.kernels.activation import gelu
            return gelu(x, self.approximate)
        return F.gelu(x, approximate=self.approximate)


class ReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from strata.kernels.activation import relu
            return relu(x)
        return F.relu(x)


_ACTIVATIONS = {
    "relu": ReLU,
    "gelu": GELU,
    "gelu_new": lambda: GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


def get_act_fn(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None
