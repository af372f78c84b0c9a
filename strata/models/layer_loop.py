"""The one loop every model runs its decoder layers through, and the seam the runner hooks.

A model splits its forward pass into ``embed(input_ids, positions) -> carry``,
``layer_forward(layer, positions, carry) -> carry`` and ``finish(carry) -> hidden``, where the
carry is a tuple of [num_tokens, ...] tensors (or None) handed from layer to layer (Llama's
hidden state and residual). ``LayerLoop`` runs them plainly; the offload mover puts in its own
loop (runner/offload_mover.py), which fetches layer i+1's weights while layer i computes and
runs several micro-batches through each layer (FlexGen's block schedule).
"""

from __future__ import annotations

import torch
from torch import nn

Carry = tuple[torch.Tensor | None, ...]


class LayerLoop:
    def run(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
            intermediate: Carry | None = None) -> torch.Tensor | Carry:
        """With pipeline stages the model holds layers [start_layer, end_layer): a later stage
        starts from the carry the stage before returned, a stage before the last returns its own."""
        start, end = getattr(model, "start_layer", 0), getattr(model, "end_layer", len(model.layers))
        whole = getattr(model, "fused_forward", None)
        if whole is not None and intermediate is None and start == 0 and end == len(model.layers):
            hidden = whole(input_ids, positions)   # Llama's CPU decode steps: ids to final norm in C
            if hidden is not None:
                return hidden
        carry = model.embed(input_ids, positions) if intermediate is None else intermediate
        # A model may run all its layers at once (one C call on the CPU).
        # (Slicing a ModuleList builds a new one, module by module: skipped for the whole list.)
        layers = model.layers if start == 0 and end == len(model.layers) else model.layers[start:end]
        fused = getattr(model, "fused_layers_forward", None)
        fused_carry = fused(layers, positions, carry) if fused is not None else None
        if fused_carry is not None:
            carry = fused_carry
        else:
            for layer in layers:
                carry = model.layer_forward(layer, positions, carry)
        if end < len(model.layers):
            return carry
        return model.finish(carry)
