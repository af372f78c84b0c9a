"""Random weights of the configured shape, for benchmarks without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.dim() == 1 and "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
            continue
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        # Drawn where the weight lives (no host round trip for large models); small values keep
        # activations finite through many layers at any dtype.
        param.uniform_(-0.02, 0.02, generator=gen)
