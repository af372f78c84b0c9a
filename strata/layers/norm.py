"""Normalisation layers. ``RMSNorm(x, residual)`` adds the residual first and returns the new
residual too; on CUDA the add and the norm run as one fused Triton kernel, on the CPU (float32)
as one C kernel (strata.kernels.cpu_ops). ``RMSNorm(x, residual, partial=True)`` first sums x
over the tensor-parallel ranks (x is a row-parallel projection's unreduced share): in the same
kernel where symmetric memory allows it (strata.kernels.all_reduce_norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.distributed import parallel_state as ps
from strata.kernels import cpu_ops, use_triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the model dtype, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, partial: bool = False):
        if partial:
            fused = ps.all_reduce_rms_norm(x, residual, self.weight, self.eps)
            if fused is not None:
                return fused if residual is not None else fused[0]
            x = ps.tensor_model_parallel_all_reduce(x)
        if use_triton(x):
            from strata.kernels.norm import rms_norm
            return rms_norm(x, self.weight, self.eps, residual)
        if cpu_ops.available(x) and self.weight.dtype == torch.float32:
            return cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype = torch.float32,
                 elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = self.bias = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_triton(x):
            from strata.kernels.norm import layer_norm
            return layer_norm(x, self.weight, self.bias, self.eps, residual)
        if residual is None:
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        residual = x + residual
        return F.layer_norm(residual, (self.hidden_size,), self.weight, self.bias, self.eps), residual
