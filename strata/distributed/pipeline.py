"""Pipeline parallelism: which decoder layers a stage holds, how a step is cut into
micro-batches, and how hidden states travel between stages.

A stage builds only its own layers (the others are parameter-free placeholders, so the
checkpoint's tensors for them are skipped at load). A step's rows are cut into contiguous
micro-batches; stage s runs micro-batch k while stage s+1 runs k-1 (the GPipe forward schedule),
so with M micro-batches and P stages a step costs about (M + P - 1) / M stage-times instead of P.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from strata.distributed import parallel_state as ps


_ABSENT = object()


class PPMissingLayer(nn.Module):
    """Stands where a layer of another pipeline stage would be; holds nothing."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a layer of another pipeline stage was called")


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the layers on stage pp_rank: an even split, the remainder to the first
    stages (the last stage also runs the final norm and the LM head)."""
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) is more than the model's "
                         f"{num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def make_layers(num_layers: int, build: Callable[[int], nn.Module]) -> tuple[nn.ModuleList, int, int]:
    """This stage's layers built, the others placeholders; returns (layers, start, end)."""
    start, end = stage_layer_range(num_layers, ps.get_pp_rank(), ps.get_pp_size())
    layers = nn.ModuleList(build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return layers, start, end


def stage_holds_vocab(tied_embeddings: bool) -> tuple[bool, bool]:
    """(token embedding, final norm and LM head) on this stage: the embedding on the first stage
    (and on the last when the LM head shares its weight), the head on the last. A model sets the
    parts it does not hold to None."""
    groups = ps.get_groups()
    return groups.is_first_stage or (groups.is_last_stage and tied_embeddings), groups.is_last_stage


def on_other_stage(model: nn.Module, param_name: str) -> bool:
    """True for a checkpoint parameter that belongs to a part another stage holds: a layer
    (PPMissingLayer) or a vocabulary part the model set to None."""
    module, parts = model, param_name.split(".")
    for part in parts[:-1]:
        if part.isdigit():
            module = module[int(part)] if isinstance(module, nn.ModuleList) and int(part) < len(module) else None
        else:
            module = getattr(module, part, _ABSENT)
            if module is None:
                return True   # a part the model set to None: not on this stage
        if module is None or module is _ABSENT:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False


def split_rows(tokens_per_row: list[int], num_micro_batches: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [r0, r1) with about equal token counts, at most num_micro_batches
    and never empty. Every stage cuts the same step the same way (it is a pure function)."""
    num = max(1, min(num_micro_batches, len(tokens_per_row)))
    total = sum(tokens_per_row)
    bounds, acc = [0], 0
    for row, count in enumerate(tokens_per_row[:-1]):
        acc += count
        cuts_left = num - len(bounds)
        rows_left = len(tokens_per_row) - (row + 1)
        if cuts_left > 0 and (acc >= total * len(bounds) / num or rows_left == cuts_left):
            bounds.append(row + 1)
    bounds.append(len(tokens_per_row))
    return list(zip(bounds, bounds[1:]))


def send_to_next_stage(hidden: torch.Tensor, residual: torch.Tensor):
    """Start sending [2, num_tokens, hidden] to the same tp_rank of the next stage; returns the
    request to wait on before the buffers may be reused."""
    import torch.distributed as dist
    groups = ps.get_groups()
    payload = torch.stack([hidden, residual]).contiguous()
    return dist.isend(payload, dst=groups.stage_peer(groups.pp_rank + 1)), payload


def recv_from_prev_stage(num_tokens: int, hidden_size: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.distributed as dist
    groups = ps.get_groups()
    payload = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
    dist.recv(payload, src=groups.stage_peer(groups.pp_rank - 1))
    return payload[0], payload[1]
