"""Putting checkpoint tensors into a model: name mapping, fused parameters, tied weights."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from strata.distributed.pipeline import on_other_stage


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked: list[tuple[str, str, object]],
                       rename: Callable[[str], str | None],
                       on_loaded: Callable[[str, object], None] | None = None) -> set[str]:
    """Load (checkpoint name, tensor) pairs through each parameter's weight_loader.

    Returns the set of parameter names that were filled; raises if a parameter stays empty.
    on_loaded(name, shard id or None) is told of each as it is filled (loader/layer_stream.py).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for ckpt_name, tensor in weights:
        target = checkpoint_target(ckpt_name, stacked, rename)
        if target is None:
            continue
        name, shard_id = target
        if tied and name.startswith("lm_head."):
            continue   # the head shares the embedding's storage
        param = params.get(name)
        if param is None and on_other_stage(model, name):
            continue   # a layer another pipeline stage holds
        if param is None:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in {type(model).__name__}")
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
        loaded.add(name if shard_id is None else f"{name}#{shard_id}")
        if on_loaded is not None:
            on_loaded(name, shard_id)
    _check_complete(model, params, loaded, stacked, tied)
    return loaded


def checkpoint_target(ckpt_name: str, stacked: list[tuple[str, str, object]],
                      rename: Callable[[str], str | None]) -> tuple[str, object] | None:
    """Checkpoint name -> (strata parameter name, shard id within a fused parameter or None),
    or None for a tensor the model skips."""
    name = rename(ckpt_name)
    if name is None:
        return None
    for fused, part, sid in stacked:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), sid
    return name, None


def _check_complete(model, params, loaded, stacked, tied) -> None:
    shards: dict[str, list] = {}
    for fused, _, sid in stacked:
        shards.setdefault(fused, []).append(sid)
    missing = []
    for name, param in params.items():
        if tied and name.startswith("lm_head."):
            continue
        if getattr(param, "optional_in_checkpoint", False):   # has a default (GPTQ's g_idx)
            continue
        fused = next((f for f in shards if f".{f}." in name), None)
        if fused is not None and name not in loaded:
            need = [f"{name}#{sid}" for sid in shards[fused]]
            if not all(n in loaded for n in need):
                missing.append(name)
        elif fused is None and name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"the checkpoint does not provide {len(missing)} weights of "
                         f"{type(model).__name__}, e.g. {missing[:5]}")
