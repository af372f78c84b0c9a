"""Which tensor- and pipeline-parallel rank this process is, and the collectives layers use.

Set once when a worker starts (``init_distributed``); layers read it when they are built, to
size their shards. With no setup it is rank 0 of 1 and every collective is a no-op.

Ranks are laid out TP-major, as vLLM and Megatron do: global rank = pp_rank * tp_size +
tp_rank, so the ranks of one tensor-parallel group are neighbours (one machine's GPUs) and
pipeline stages talk to the same tp_rank of the next stage.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

# Variables set in every process strata starts for CUDA: NVLink multicast (NVLS) off in NCCL,
# PyTorch's symmetric memory and NVSHMEM. On shared hosts a program that uses multicast can put
# every GPU of the host out of service; strata's all-reduces are small and gain little from it.
CUDA_SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class ParallelGroups:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None      # torch.distributed ProcessGroup of this rank's TP peers
    world_group: Any = None   # gloo group of every rank: startup checks, control messages
    # Symmetric-memory all-reduce for small messages (symm_all_reduce.py); None: NCCL/gloo only.
    fast_all_reduce: Any = None

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_peer(self, pp_rank: int) -> int:
        """Global rank of this tp_rank in another pipeline stage."""
        return pp_rank * self.tp_size + self.tp_rank


_groups = ParallelGroups()


def init_parallel_groups(groups: ParallelGroups) -> None:
    global _groups
    _groups = groups


def get_groups() -> ParallelGroups:
    return _groups


def get_tp_rank() -> int:
    return _groups.tp_rank


def get_tp_size() -> int:
    return _groups.tp_size


def get_pp_rank() -> int:
    return _groups.pp_rank


def get_pp_size() -> int:
    return _groups.pp_size


def init_distributed(rank: int, tp_size: int, pp_size: int, backend: str, init_method: str,
                     timeout_s: float) -> ParallelGroups:
    """Join the process group (every rank calls this with its own rank) and make the TP groups.
    ``timeout_s`` bounds every collective on gloo, so a peer that died cannot block forever."""
    import torch.distributed as dist
    world_size = tp_size * pp_size
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    tp_group = None
    for pp_rank in range(pp_size):   # every rank creates every group, in the same order
        ranks = [pp_rank * tp_size + t for t in range(tp_size)]
        group = dist.new_group(ranks, timeout=timeout) if tp_size < world_size else dist.group.WORLD
        if rank in ranks:
            tp_group = group
    world_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    groups = ParallelGroups(rank % tp_size, tp_size, rank // tp_size, pp_size, tp_group, world_group)
    init_parallel_groups(groups)
    return groups


def init_all_reduce(device, dtype, mode: str = "auto", hidden_size: int | None = None):
    """Choose how this rank's tensor-parallel group sums (every rank calls this together, before
    the model runs): symmetric memory for small messages where it works, else NCCL/gloo. With
    the model's hidden size, sums that feed an RMSNorm may fuse with it (all_reduce_rms_norm)."""
    from strata.distributed.symm_all_reduce import AllReduceChoice, select_all_reduce
    if _groups.tp_size == 1:
        return AllReduceChoice("none", "one tensor-parallel rank")
    choice = select_all_reduce(_groups.tp_group, _groups.world_group, device, dtype, _groups.tp_size, mode,
                               hidden_size)
    init_parallel_groups(dataclasses.replace(_groups, fast_all_reduce=choice.impl))
    return choice


def tensor_model_parallel_all_reduce(x):
    """Sum partial results across tensor-parallel ranks (a no-op on one rank). The result may be
    a new tensor (symmetric memory) or x itself (NCCL, gloo): use the return value."""
    if _groups.tp_size == 1:
        return x
    fast = _groups.fast_all_reduce
    if fast is not None and fast.can_run(x):
        return fast(x)
    import torch.distributed as dist
    dist.all_reduce(x, group=_groups.tp_group)
    return x


def sums_in_norms() -> bool:
    """Whether a model's row-parallel projections leave their tensor-parallel sums to the RMSNorm
    that follows each (at TP>1): the post-attention norm sums o_proj's shares, the next layer's
    input norm (or the final norm) the MLP's, and one fused all-reduce + residual + norm kernel
    replaces an all-reduce and a norm twice a layer where symmetric memory allows it. Between
    layers the carry's hidden state is then this rank's share of the sum wherever a residual is
    there too (the first layer's input, from the embedding, is whole). Pipeline stages pass
    shares on as they are: rank r of the next stage gets rank r's, and its group sums them."""
    return _groups.tp_size > 1


def _fused_norm():
    fast = _groups.fast_all_reduce
    return fast.norm if fast is not None else None


def all_reduce_rms_norm(x, residual, weight, eps: float):
    """``(norm(sum + residual), sum + residual)`` in one kernel, where sum is x summed over the
    tensor-parallel ranks, or None where no fused kernel takes x (then the caller sums and
    normalises apart)."""
    fused = _fused_norm()
    if fused is None or not fused.can_run(x, residual):
        if fused is not None:
            fused.check_nothing_sent()
        return None
    return fused(x, residual, weight, eps)


def share_push_target(x, out_features: int):
    """Where the row-parallel projection of x (its ``out_features``-wide share of a sum that the
    next RMSNorm completes) may send its rows to the peers as it computes them, or None. Only a
    projection whose result goes straight into ``RMSNorm(..., partial=True)`` may ask; the
    result must then be passed through ``share_sent``."""
    fused = _fused_norm()
    if fused is None or x.dim() != 2:
        return None
    return fused.push_target(x.shape[0], out_features, x.dtype, x.device)


def share_sent(share):
    """Record that ``share`` went to the peers with ``share_push_target``'s target (the next fused
    all-reduce + norm then only receives). Returns share."""
    return _fused_norm().sent(share)


def tensor_model_parallel_all_reduce_max(x):
    """Elementwise max across tensor-parallel ranks (a no-op on one rank)."""
    if _groups.tp_size == 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_groups.tp_group)
    return x


def tensor_model_parallel_all_gather(x, dim: int = -1):
    if _groups.tp_size == 1:
        return x
    import torch
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(_groups.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_groups.tp_group)
    return torch.cat(parts, dim=dim)
