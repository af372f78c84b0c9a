"""Random weights of the configured shape, for benchmarks without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, init_device: torch.device | None = None,
                       on_filled=None) -> None:
    """init_device: draw there and copy into the parameter (for a model built on the host that
    will run on a GPU: the same values as when built there). on_filled(name, None) is told of
    each parameter once drawn (loader/layer_stream.py)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.dim() == 1 and "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            _draw(param, seed, init_device, generators)
        if on_filled is not None:
            on_filled(name, None)


def _draw(param: torch.Tensor, seed: int, init_device, generators: dict) -> None:
    where = torch.device(init_device) if init_device is not None else param.device
    gen = generators.get(where)
    if gen is None:
        gen = generators[where] = torch.Generator(device=where).manual_seed(seed)
    # Drawn where the weight lives (no host round trip for large models); small values keep
    # activations finite through many layers at any dtype.
    if where == param.device:
        param.uniform_(-0.02, 0.02, generator=gen)
    else:
        param.copy_(torch.empty(param.shape, dtype=param.dtype, device=where).uniform_(-0.02, 0.02, generator=gen))
