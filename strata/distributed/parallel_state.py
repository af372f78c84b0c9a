"""Which tensor-parallel rank this process is. Set once when a worker starts; layers read it
when they are built, to size their shards. With no setup it is rank 0 of 1."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelGroups:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1


_groups = ParallelGroups()


def init_parallel_groups(groups: ParallelGroups) -> None:
    global _groups
    _groups = groups


def get_tp_rank() -> int:
    return _groups.tp_rank


def get_tp_size() -> int:
    return _groups.tp_size


def tensor_model_parallel_all_reduce(x):
    """Sum partial results across tensor-parallel ranks (a no-op on one rank)."""
    if _groups.tp_size == 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x, dim: int = -1):
    if _groups.tp_size == 1:
        return x
    import torch
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(_groups.tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
