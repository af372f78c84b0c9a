"""A faster all-reduce for the small messages of tensor-parallel decoding on NVLink GPUs.

A decode step of an 8B model at TP=2 runs 65 all-reduces of [batch, 4096] bf16. At batch 1
(8 KiB) NCCL spends ~14 us on each, mostly fixed cost. PyTorch's symmetric memory maps every
rank's buffer into its peers' address space (CUDA IPC over NVLink), so one kernel can read the
peers' data directly: one-shot all-reduce (each rank reads every peer's whole message and sums,
one barrier before and one after) for the smallest messages, two-shot (each rank reduces its
slice, then gathers the others' reduced slices) up to ``max_bytes``; NCCL above that.

Only the point-to-point ops are used, never the multicast (NVLS / multimem) ones: the GPU
machines forbid multicast, and every process strata starts sets the variables that keep it off
(``parallel_state.CUDA_SAFE_ENV``).

The buffer is allocated and exchanged once, before any CUDA graph is captured; an all-reduce
copies its input into the buffer (inside the one-shot kernel where torch has that op), reduces,
and writes a new output tensor. All of it is capturable.

``select_all_reduce`` decides on every rank of the tensor-parallel group together (the ranks
agree through the gloo group, so none waits in a rendezvous its peers skipped) and says why it
chose what it chose. Any missing piece (CPU, a dtype or group size the kernels lack, no peer
access, an import, allocation or self-test error) means NCCL, as does ``all_reduce='nccl'`` or
``STRATA_ALL_REDUCE=nccl``.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import torch

ALL_REDUCE_MODES = ("auto", "nccl")
# Starting points, not measurements of ours: inductor's one-shot threshold is 128 KiB, published
# H100 figures put the one-shot/NCCL crossover near 400 KiB at 8 GPUs (higher at 2), and vLLM
# runs point-to-point two-shot at 2 GPUs up to tens of MiB. 8 MiB covers a decode step of 256
# sequences at hidden 8192 (4 MiB bf16) and prompt chunks up to 1024 tokens at hidden 4096.
# bench/gpu_parallel.py times NCCL and these side by side at several sizes, to set them from.
ONE_SHOT_MAX_BYTES = 256 * 2**10
MAX_BYTES = 8 * 2**20
# The kernels' dtypes (AT_DISPATCH_FLOAT_AND_BFLOAT16) and group sizes (DISPATCH_WORLD_SIZES).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)
SUPPORTED_WORLD_SIZES = (2, 4, 8)
# Vectorised 16-byte loads: smaller or ragged messages go to NCCL.
ALIGN_BYTES = 16


@dataclass(frozen=True)
class AllReduceChoice:
    kind: str                           # "symm_mem" | "nccl" | "gloo"
    reason: str                         # why, for the startup line and `strata info`
    impl: "SymmMemAllReduce | None" = None

    def describe(self) -> str:
        if self.kind == "symm_mem":
            return (f"all-reduce: symmetric memory (one-shot up to {_size(self.impl.one_shot_max_bytes)}, "
                    f"two-shot up to {_size(self.impl.max_bytes)}, NCCL above)")
        return f"all-reduce: {self.kind.upper()} ({self.reason})"


def _size(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes % 2**20 == 0 else f"{nbytes // 2**10} KiB"


class SymmMemAllReduce:
    """One symmetric buffer of ``max_bytes`` for one dtype and one tensor-parallel group."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = MAX_BYTES,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name = group.group_name
        self.device, self.dtype = device, dtype
        self.max_bytes, self.one_shot_max_bytes = max_bytes, min(one_shot_max_bytes, max_bytes)
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:   # needed by older torch, a deprecated no-op by newer ones
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(self.group_name)
        set_backend = getattr(symm_mem, "set_backend", None)
        if set_backend is not None:   # CUDA IPC, not NVSHMEM: peers on this host over NVLink
            try:
                set_backend("CUDA")
            except Exception:   # already chosen by an earlier allocation in this process
                pass
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)  # [max elements]
        try:
            handle = symm_mem.rendezvous(self.buffer, self.group_name)
        except TypeError:   # torch versions whose rendezvous takes the group object
            handle = symm_mem.rendezvous(self.buffer, group)
        if getattr(handle, "world_size", group.size()) != group.size():
            raise RuntimeError(f"rendezvous joined {handle.world_size} ranks, the group has {group.size()}")
        if getattr(handle, "multicast_ptr", 0):   # the environment should have prevented it
            raise RuntimeError("the symmetric buffer got an NVLink multicast mapping; strata never uses one")
        ops = torch.ops.symm_mem
        self._copy_out = getattr(ops, "one_shot_all_reduce_copy_out", None)
        self._one_shot_out = ops.one_shot_all_reduce_out
        self._two_shot_out = getattr(ops, "two_shot_all_reduce_out", None)
        self._two_shot_inplace = ops.two_shot_all_reduce_

    def can_run(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        # The one-shot kernel copies x in with the buffer's 16-byte vectors: x must allow them too.
        return (x.dtype == self.dtype and x.device == self.device and x.is_contiguous()
                and 0 < nbytes <= self.max_bytes and nbytes % ALIGN_BYTES == 0
                and x.data_ptr() % ALIGN_BYTES == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group of x, in a new tensor of x's shape (x is not changed)."""
        flat = x.view(-1)
        n = flat.numel()
        staged = self.buffer[:n]
        out = torch.empty_like(x)
        if n * x.element_size() <= self.one_shot_max_bytes:
            if self._copy_out is not None:   # the copy into the buffer happens in the same kernel
                self._copy_out(staged, flat, "sum", self.group_name, out.view(-1))
            else:
                staged.copy_(flat)
                self._one_shot_out(staged, "sum", self.group_name, out.view(-1))
            return out
        staged.copy_(flat)
        if self._two_shot_out is not None:
            self._two_shot_out(staged, "sum", self.group_name, out.view(-1))
        else:
            self._two_shot_inplace(staged, "sum", self.group_name)
            out.view(-1).copy_(staged)
        return out


def requested_mode(mode: str) -> str:
    """The engine option, unless STRATA_ALL_REDUCE=nccl forces NCCL (benchmarks, debugging)."""
    if mode not in ALL_REDUCE_MODES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_MODES}, got {mode!r}")
    env = os.environ.get("STRATA_ALL_REDUCE", "").strip().lower()
    if env and env not in ALL_REDUCE_MODES:
        raise ValueError(f"STRATA_ALL_REDUCE must be one of {ALL_REDUCE_MODES}, got {env!r}")
    return "nccl" if env == "nccl" else mode


def local_obstacle(device: torch.device, dtype: torch.dtype, tp_size: int, mode: str) -> str | None:
    """Why this rank cannot use symmetric memory (None: nothing local stands in the way)."""
    if mode == "nccl":
        return "forced by all_reduce='nccl' or STRATA_ALL_REDUCE=nccl"
    if device.type != "cuda":
        return "not a CUDA device"
    from strata.distributed.parallel_state import CUDA_SAFE_ENV
    unsafe = sorted(k for k, v in CUDA_SAFE_ENV.items() if os.environ.get(k) != v)
    if unsafe:   # the rendezvous would set up NVLink multicast, which these machines forbid
        return (f"NVLink multicast is not switched off in this process ({', '.join(unsafe)} not as "
                "strata sets them)")
    if dtype not in SUPPORTED_DTYPES:
        return f"the symmetric-memory kernels take bfloat16 and float32, the model runs {dtype}"
    if tp_size not in SUPPORTED_WORLD_SIZES:
        return f"the symmetric-memory kernels take groups of {SUPPORTED_WORLD_SIZES}, not {tp_size}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018 (raises if the ops are missing)
        torch.ops.symm_mem.two_shot_all_reduce_  # noqa: B018
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"torch {torch.__version__} lacks symmetric memory ({type(e).__name__}: {e})"
    return None


def peer_obstacle(me: tuple[str, int], peers: list[tuple[str, int]]) -> str | None:
    """Every peer on this host, and its GPU reachable by peer-to-peer access (NVLink or PCIe P2P)."""
    host, index = me
    for peer_host, peer_index in peers:
        if peer_host != host:
            return f"the tensor-parallel group spans hosts ({host}, {peer_host})"
        if peer_index != index and not torch.cuda.can_device_access_peer(index, peer_index):
            return f"GPU {index} has no peer-to-peer access to GPU {peer_index}"
    return None


def gather_group(obj, group, world_group) -> dict:
    """obj of every rank of this rank's tensor-parallel group, by global rank (gathered over the
    gloo group of all ranks, which every rank calls at the same point)."""
    import torch.distributed as dist
    gathered: list = [None] * dist.get_world_size(world_group)
    dist.all_gather_object(gathered, obj, group=world_group)
    return {rank: gathered[rank] for rank in dist.get_process_group_ranks(group)}


def agree(reason: str | None, group, world_group) -> str | None:
    """The first obstacle any rank of the group found, so that the whole group takes the same
    path (a lone rank in a rendezvous would wait for its peers forever)."""
    import torch.distributed as dist
    me = dist.get_rank()
    for rank, other in sorted(gather_group(reason, group, world_group).items()):
        if other is not None:
            return other if rank == me else f"rank {rank}: {other}"
    return None


def select_all_reduce(group, world_group, device: torch.device, dtype: torch.dtype, tp_size: int,
                      mode: str = "auto") -> AllReduceChoice:
    """Every rank calls this at the same point (before the model runs any step)."""
    if device.type != "cuda":
        return AllReduceChoice("gloo", "CPU ranks")
    reason = local_obstacle(device, dtype, tp_size, requested_mode(mode))
    me = (socket.gethostname(), device.index if device.index is not None else torch.cuda.current_device())
    peers = gather_group(me, group, world_group)
    reason = agree(reason or peer_obstacle(me, list(peers.values())), group, world_group)
    impl = None
    if reason is None:
        try:
            impl = SymmMemAllReduce(group, device, dtype)
            reason = self_test(impl, group, device, dtype)
        except Exception as e:   # any failure here means NCCL, never a broken engine
            reason = f"symmetric memory setup failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        reason = agree(reason, group, world_group)
    if reason is not None:
        return AllReduceChoice("nccl", reason)
    return AllReduceChoice("symm_mem", "NVLink peers on one host", impl)


def self_test(impl: SymmMemAllReduce, group, device: torch.device, dtype: torch.dtype) -> str | None:
    """One all-reduce of each kind checked against NCCL's: a wrong mapping shows here, not in
    the model's outputs."""
    import torch.distributed as dist
    rank = dist.get_rank(group)
    for nbytes in (ALIGN_BYTES * 64, min(impl.max_bytes, impl.one_shot_max_bytes * 2)):
        n = nbytes // dtype.itemsize
        x = (torch.arange(n, device=device) % 7 + rank + 1).to(dtype)   # small integers: exact sums
        want = x.clone()
        dist.all_reduce(want, group=group)
        got = impl(x)
        torch.cuda.synchronize(device)
        if not torch.equal(got, want):
            return f"self-test of a {nbytes}-byte all-reduce disagreed with NCCL"
    return None
