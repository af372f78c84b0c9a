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

Where the sum feeds an RMSNorm (the decoder layers' row-parallel projections, see
strata.layers.norm.RMSNorm's ``partial``), a second buffer serves strata's own kernel that sums,
adds the residual and normalises in one launch (strata.kernels.all_reduce_norm), for up to
``SymmMemNorm.max_rows`` rows; ``STRATA_FUSED_NORM=0`` turns it off (comparisons). The
row-parallel GEMV before it may send its share to the peers' buffers itself, tile by tile
(``SymmMemNorm.push_target``; ``STRATA_GEMV_PUSH=0`` leaves the sending to the norm kernel).

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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # (the kernels import Triton, which a CPU-only install may lack)
    from strata.kernels.all_reduce_norm import PushTarget

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
            fused = self.impl.norm
            fused = f"; fused with the next RMSNorm up to {fused.max_rows} rows" if fused is not None else ""
            return (f"all-reduce: symmetric memory (one-shot up to {_size(self.impl.one_shot_max_bytes)}, "
                    f"two-shot up to {_size(self.impl.max_bytes)}, NCCL above{fused})")
        return f"all-reduce: {self.kind.upper()} ({self.reason})"


def _size(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes % 2**20 == 0 else f"{nbytes // 2**10} KiB"


def _symmetric(group, device: torch.device, numel: int, dtype: torch.dtype, fill: float = 0.0):
    """A buffer every rank of ``group`` maps, and its handle (filled with ``fill`` on every rank
    before any rank returns: the rendezvous waits for all of them)."""
    import torch.distributed._symmetric_memory as symm_mem
    group_name = group.group_name
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:   # needed by older torch, a deprecated no-op by newer ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(group_name)
    set_backend = getattr(symm_mem, "set_backend", None)
    if set_backend is not None:   # CUDA IPC, not NVSHMEM: peers on this host over NVLink
        try:
            set_backend("CUDA")
        except Exception:   # already chosen by an earlier allocation in this process
            pass
    buffer = symm_mem.empty(numel, dtype=dtype, device=device)
    buffer.fill_(fill)
    torch.cuda.synchronize(device)
    try:
        handle = symm_mem.rendezvous(buffer, group_name)
    except TypeError:   # torch versions whose rendezvous takes the group object
        handle = symm_mem.rendezvous(buffer, group)
    if getattr(handle, "world_size", group.size()) != group.size():
        raise RuntimeError(f"rendezvous joined {handle.world_size} ranks, the group has {group.size()}")
    if getattr(handle, "multicast_ptr", 0):   # the environment should have prevented it
        raise RuntimeError("the symmetric buffer got an NVLink multicast mapping; strata never uses one")
    return buffer, handle


class SymmMemAllReduce:
    """One symmetric buffer of ``max_bytes`` for one dtype and one tensor-parallel group (and,
    given the model's hidden size, the fused all-reduce + RMSNorm's own, ``norm``)."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = MAX_BYTES,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES, hidden_size: int | None = None):
        self.group_name = group.group_name
        self.device, self.dtype = device, dtype
        self.max_bytes, self.one_shot_max_bytes = max_bytes, min(one_shot_max_bytes, max_bytes)
        self.buffer, _ = _symmetric(group, device, max_bytes // dtype.itemsize, dtype)   # [max elements]
        self.norm = None
        if hidden_size is not None and os.environ.get("STRATA_FUSED_NORM", "1") != "0":
            self.norm = SymmMemNorm(group, device, dtype, hidden_size, self.one_shot_max_bytes)
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


class SymmMemNorm:
    """The symmetric buffer and row counters of strata.kernels.all_reduce_norm for one hidden
    size: RMSNorm of the group's sum of x (plus a residual) in one kernel, for up to
    ``max_rows`` rows (as many as one-shot's byte limit holds)."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, hidden_size: int, max_bytes: int):
        from strata.kernels.all_reduce_norm import EMPTY_FILL, MAX_COLS, PushTarget, block_for, buffer_numel
        import torch.distributed as dist
        if hidden_size > MAX_COLS:
            raise ValueError(f"the fused all-reduce + RMSNorm takes rows of up to {MAX_COLS}, not {hidden_size}")
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.rank, self.world = dist.get_rank(group), group.size()
        self.max_rows = max(1, min(64, max_bytes // (block_for(hidden_size) * dtype.itemsize)))
        self.buffer, handle = _symmetric(group, device, buffer_numel(self.max_rows, self.world, hidden_size),
                                         dtype, fill=EMPTY_FILL)
        # Every rank's buffer as mapped here (the handle's allocation, plus where in it the tensor starts).
        bases = [ptr + getattr(handle, "offset", 0) for ptr in handle.buffer_ptrs]
        if bases[self.rank] != self.buffer.data_ptr():
            raise RuntimeError("the symmetric buffer's peer addresses do not include this rank's own")
        self.bases = torch.tensor(bases, dtype=torch.int64, device=device)
        self.uses = torch.zeros(self.max_rows, dtype=torch.int32, device=device)
        self._target = PushTarget(self.bases, self.uses, self.max_rows, self.rank, self.world, hidden_size, dtype)
        self._sent = None   # the share a GEMV has sent, until the call that sums it

    def _fits(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> bool:
        return rows <= self.max_rows and cols == self.hidden_size and dtype == self.dtype and device == self.device

    def can_run(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        return (x.dim() == 2 and self._fits(*x.shape, x.dtype, x.device) and x.stride(1) == 1
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                          and residual.stride(1) == 1)))

    def push_target(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> PushTarget | None:
        """Where a GEMV computing the share of ``rows`` x ``cols`` may send it as it goes, or None
        (STRATA_GEMV_PUSH=0, or rows this call could not sum)."""
        if os.environ.get("STRATA_GEMV_PUSH", "1") == "0" or rows == 0 or not self._fits(rows, cols, dtype, device):
            return None
        return self._target

    def sent(self, share: torch.Tensor) -> torch.Tensor:
        """Record that ``share`` went to the peers as it was computed: the next call must sum it
        (and then only receives). Returns share."""
        self.check_nothing_sent()
        self._sent = share
        return share

    def check_nothing_sent(self) -> None:
        """Raise if a sent share is still waiting for its call: the peers' buffers hold rows that
        no call of theirs will empty, and every later sum would take them."""
        if self._sent is not None:
            raise RuntimeError("a tensor-parallel share was sent to the peers but never summed: a row-parallel "
                               "projection with push must go straight into the fused all-reduce + RMSNorm")

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
        """(RMSNorm of the group's sum of x plus residual, that sum plus residual)."""
        from strata.kernels.all_reduce_norm import all_reduce_rms_norm
        pushed = self._sent is not None
        if pushed and x is not self._sent:
            self.check_nothing_sent()
        self._sent = None
        return all_reduce_rms_norm(x, residual, weight, eps, bases=self.bases, uses=self.uses,
                                   max_rows=self.max_rows, rank=self.rank, world=self.world, pushed=pushed)


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
                      mode: str = "auto", hidden_size: int | None = None) -> AllReduceChoice:
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
            impl = SymmMemAllReduce(group, device, dtype, hidden_size=hidden_size)
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
    if impl.norm is not None:
        return self_test_norm(impl.norm, group, device, dtype)
    return None


def self_test_norm(fused: SymmMemNorm, group, device: torch.device, dtype: torch.dtype) -> str | None:
    """The fused all-reduce + RMSNorm against NCCL's sum and the separate norm kernel, on
    partials whose sums are exact, at one row and at the most rows, twice each (both halves of
    each row slot)."""
    import torch.distributed as dist
    from strata.kernels.norm import rms_norm
    g = torch.Generator(device="cpu").manual_seed(1234 + dist.get_rank(group))   # partials differ per rank
    shared = torch.Generator(device="cpu").manual_seed(99)                      # the rest is the same
    weight = (torch.randint(-64, 64, (fused.hidden_size,), generator=shared) / 16).to(device, dtype)
    for rows in (1, fused.max_rows, 1, fused.max_rows):
        x = (torch.randint(-64, 64, (rows, fused.hidden_size), generator=g) / 16).to(device, dtype)
        residual = (torch.randint(-64, 64, (rows, fused.hidden_size), generator=shared) / 16).to(device, dtype)
        total = x.clone()
        dist.all_reduce(total, group=group)
        want, want_residual = rms_norm(total, weight, 1e-5, residual)
        got, got_residual = fused(x, residual, weight, 1e-5)
        torch.cuda.synchronize(device)
        if not (torch.equal(got, want) and torch.equal(got_residual, want_residual)):
            return f"self-test of the fused all-reduce + RMSNorm at {rows} rows disagreed with NCCL + rms_norm"
    return None
