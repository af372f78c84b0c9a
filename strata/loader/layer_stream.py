"""Hands each decoder layer on as soon as loading has filled it, for a model that must never sit
whole in host memory (offloading: a model larger than RAM, streamed from the disk tier).

The model is built as usual in host memory: its parameters are ``torch.empty``, whose pages the
OS gives only when written, so an unloaded layer costs address space, not RAM. The loaders report
every parameter (or shard of a fused one) they fill; once a layer has all of its own, it is
finished (quantized, where a method asks for it) and passed to the sink, which moves it to its
tier and frees its host copy. RAM then holds the layers in flight (one, for checkpoints stored in
layer order) instead of all of them.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

_LAYER = re.compile(r"layers\.(\d+)\.")

# sink(model, index, layer): the layer is loaded and finished; the sink places it.
LayerSink = Callable[[nn.Module, int, nn.Module], None]


class LayerStream:
    def __init__(self, model: nn.Module, sink: LayerSink, finish_layer: Callable[[nn.Module], None]):
        self.model = model
        self.sink = sink
        self.finish_layer = finish_layer
        # What each layer still waits for: parameter names, "name#shard" for fused ones.
        self.waiting: dict[int, set[str]] = {}
        shards: dict[str, list] = {}
        for fused, _, sid in getattr(model, "stacked_params_mapping", []):
            shards.setdefault(fused, []).append(sid)
        for index, layer in enumerate(model.layers):
            need = set()
            for name, param in layer.named_parameters(prefix=f"layers.{index}"):
                if getattr(param, "optional_in_checkpoint", False):
                    continue
                fused = next((f for f in shards if f".{f}." in name), None)
                need.update([f"{name}#{sid}" for sid in shards[fused]] if fused else [name])
            self.waiting[index] = need
        self.done: set[int] = set()

    def filled(self, name: str, shard_id=None) -> None:
        """A loader wrote parameter ``name`` (model-relative), or shard ``shard_id`` of it."""
        match = _LAYER.match(name)
        if match is None:
            return
        index = int(match.group(1))
        if index in self.done:
            raise ValueError(f"the checkpoint gives {name} again after layer {index} was complete and "
                             "placed (a tensor repeated across checkpoint files?)")
        need = self.waiting.get(index)
        if need is None:
            return
        if shard_id is None:   # the whole parameter (dummy weights; a checkpoint already fused)
            need.difference_update([n for n in need if n == name or n.startswith(name + "#")])
        else:
            need.discard(f"{name}#{shard_id}")
        if not need:
            self._hand_on(index)

    def close(self) -> None:
        """After loading: hand on the layers whose parameters all have a default (none need
        loading), in order. Layers still waiting are left for the loader's completeness check,
        which names what the checkpoint lacks."""
        for index in sorted(self.waiting):
            if not self.waiting[index]:
                self._hand_on(index)
        missing = [i for i, need in self.waiting.items() if need]
        if missing:
            raise ValueError(f"the checkpoint does not provide every weight of layers {missing[:5]}, "
                             f"e.g. {sorted(self.waiting[missing[0]])[:3]}")

    def _hand_on(self, index: int) -> None:
        del self.waiting[index]
        self.done.add(index)
        layer = self.model.layers[index]
        self.finish_layer(layer)
        self.sink(self.model, index, layer)
