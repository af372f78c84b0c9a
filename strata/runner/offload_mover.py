"""Carries out an OffloadPlan (core/offload_policy.py): puts each decoder layer's weights on its
tier and streams the offloaded ones through a few staging slots on the compute device.

Layout. A layer's parameters are packed into one flat byte buffer (64-byte aligned offsets);
all decoder layers share the layout. Streamed layer j (j-th in layer order among the streamed
ones) always computes from slot j % depth: its parameters are views into that slot, set once,
so a fetch is one copy of the packed bytes and no Python object changes per step.

Tiers. CPU: the packed bytes in pinned host memory, copied to the slot on a side CUDA stream.
Disk: a file per layer, mapped with mmap; a background thread copies the bytes into a staging
buffer (pinned, on a GPU machine; the slot itself on a CPU-only one) and then drops the pages
(madvise + fadvise DONTNEED), so the RAM held by weights stays at the resident ones plus the
slots whatever the model's size, and every pass really reads the disk.

Order. When layer i finishes, the fetch of the slot's next user (the streamed layer `depth`
places later, or the slot's first layer of the next pass) is issued into the slot i released: on the GPU the copy stream waits
for an event recorded after layer i's kernels, never the host, and the compute stream waits
for the copy's event before the layer that needs it (no use before arrival); on the CPU the
thread is started only once the layer is done, and the loop waits for it before the layer.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from strata.core.offload_policy import OffloadPlan
from strata.runner.host_memory import host_buffer, return_freed_heap

ALIGN = 64
SUPPORTED_QUANT = ("none", "int8", "int4")


@dataclass
class _Entry:
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class MoverStats:
    """What the mover did, for tests and reports."""

    fetch_log: list[tuple[str, int]] = field(default_factory=list)   # ("issue"|"arrive"|"use", layer)
    bytes_from_disk: int = 0
    bytes_to_device: int = 0
    wait_seconds: float = 0.0      # time the compute side waited for a fetch
    fetches: int = 0
    passes: int = 0                # forward passes through the layers


def layer_layout(layer: nn.Module) -> tuple[list[_Entry], int]:
    entries, offset = [], 0
    for name, p in layer.named_parameters():
        nbytes = p.numel() * p.element_size()
        entries.append(_Entry(name, offset, nbytes, p.dtype, tuple(p.shape)))
        offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def check_offloadable(model: nn.Module) -> None:
    for i, layer in enumerate(model.layers):
        for name, module in layer.named_modules():
            method = getattr(module, "quant_method", None)
            if method is not None and method.name not in SUPPORTED_QUANT:
                raise ValueError(f"offloading streams float, int8 and int4 weights; layer {i} {name} uses "
                                 f"{method.name!r} (load GGUF files dequantized: offloading does that, "
                                 f"or quantize with quantization='int8'/'int4')")


def read_mapped(fd: int, mm: mmap.mmap, dst: torch.Tensor) -> None:
    """The disk tier's read: dst.numel() bytes of a mapped file into dst, then the pages dropped
    from this process and from the page cache, so the next read comes from the disk again (the
    policy's disk rate is measured through this same function: offload_loop.disk_read_rate)."""
    n = dst.numel()
    mm.madvise(mmap.MADV_WILLNEED, 0, n)
    src = torch.frombuffer(mm, dtype=torch.uint8, count=n)
    dst.copy_(src)
    del src
    mm.madvise(mmap.MADV_DONTNEED, 0, n)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class OffloadMover:
    def __init__(self, model: nn.Module, plan: OffloadPlan, device: torch.device,
                 offload_dir: str | None = None, fetch_delay_s: float = 0.0, pin_host: bool | None = None,
                 template: nn.Module | None = None, place: bool = True):
        """pin_host: page-lock the CPU tier and the disk staging (default: on a GPU; tests of
        the host side set it on the CPU with host_memory's registration replaced). template: a
        loaded, finished layer whose layout all share (default: the first). place=False: the
        caller places each layer with place_layer as loading completes it."""
        check_offloadable(model)
        self.plan = plan
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.pin_host = self.on_cuda if pin_host is None else pin_host
        self.layers = list(model.layers)
        self.entries, self.slot_bytes = layer_layout(template if template is not None else self.layers[0])
        self.order = plan.streamed                    # streamed layers in the order they run
        self.position = {layer: pos for pos, layer in enumerate(self.order)}
        self.depth = min(plan.prefetch_depth, len(self.order)) if self.order else 0
        self.fetch_delay_s = fetch_delay_s            # tests: a slow copy on purpose
        self.stats = MoverStats()
        self._tmp = None
        self.offload_dir = offload_dir
        if plan.count("disk") and offload_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="strata-offload-")
            self.offload_dir = self._tmp.name
        if plan.count("disk"):
            os.makedirs(self.offload_dir, exist_ok=True)
        self._host: dict[int, torch.Tensor] = {}     # CPU tier: layer -> pinned packed bytes
        self._files: dict[int, tuple[int, mmap.mmap]] = {}   # disk tier: layer -> (fd, map)
        self._pending: dict[int, object] = {}        # position -> Future | CUDA event
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-offload") if plan.count("disk") else None
        self._prepare()
        self.placed: set[int] = set()
        if place:
            for i, layer in enumerate(self.layers):
                self.place_layer(i, layer)

    # ---- placement (once, at load) -------------------------------------------------------------
    def _prepare(self) -> None:
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(self.depth)]
        # Disk -> host staging on a GPU machine (pinned, so the copy to the slot is asynchronous).
        self.staging = [host_buffer(self.slot_bytes, self.pin_host)
                        for _ in range(self.depth)] if self.on_cuda and self._pool else self.slots
        self._staging_ready: list[object] = [None] * self.depth
        if self.on_cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        # buffers shared by layers (rotary tables) move once: id -> (original, moved)
        self._moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()   # not inference_mode: the worker thread writes into these buffers
    def place_layer(self, i: int, layer: nn.Module) -> None:
        """Layer i (loaded and finished) onto its tier; its host copy is freed as its parameters
        are rebound."""
        if i in self.placed:
            raise RuntimeError(f"offload: layer {i} placed twice")
        self.placed.add(i)
        for module in layer.modules():   # buffers stay on the device whatever the tier
            for name, buf in list(module.named_buffers(recurse=False)):
                if id(buf) not in self._moved:   # the original kept: its id stays its own
                    self._moved[id(buf)] = (buf, buf.to(self.device))
                setattr(module, name, self._moved[id(buf)][1])
        if len(self.placed) == len(self.layers):
            self._moved.clear()
        tier = self.plan.placement[i]
        if tier == "resident":
            for p in layer.parameters():
                p.data = p.data.to(self.device)
            return
        # a disk layer's packed bytes only pass through on their way to its file: not pinned
        packed = self._pack(layer, self.pin_host and tier == "cpu")
        if tier == "cpu":
            self._host[i] = packed
        else:
            self._files[i] = self._write(i, packed)
        self._bind(layer, self.slots[self.position[i] % self.depth])
        del packed
        return_freed_heap()   # the layer's originals, freed by _bind

    def _pack(self, layer: nn.Module, pin: bool) -> torch.Tensor:
        """The layer's parameters as one buffer of exactly the packed size (host_memory: not
        torch's pinned allocator, which rounds up to a power of two). The caller rebinds the
        parameters right after, so each layer's original is freed before the next is packed."""
        entries, size = layer_layout(layer)
        if [(e.offset, e.dtype, e.shape) for e in entries] != [(e.offset, e.dtype, e.shape) for e in self.entries]:
            raise ValueError("offloading needs every decoder layer to have the same weights layout")
        flat = host_buffer(size, pin)
        for (_, p), e in zip(layer.named_parameters(), entries):
            flat[e.offset: e.offset + e.nbytes].copy_(p.data.reshape(-1).view(torch.uint8))
        return flat

    def _write(self, index: int, packed: torch.Tensor) -> tuple[int, mmap.mmap]:
        path = os.path.join(self.offload_dir, f"layer_{index:04d}.bin")
        with open(path, "wb") as f:
            f.write(memoryview(packed.numpy()))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # the next read comes from the disk
        # ACCESS_COPY: a private mapping, writable to Python, so torch can view it without a copy.
        return fd, mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)

    def _bind(self, layer: nn.Module, slot: torch.Tensor) -> None:
        """Point the layer's parameters into the slot (their own storage is freed)."""
        params = dict(layer.named_parameters())
        for e in self.entries:
            params[e.name].data = slot[e.offset: e.offset + e.nbytes].view(e.dtype).view(e.shape)

    # ---- the pass: called by the offload layer loop --------------------------------------------
    def begin_pass(self) -> None:
        self.stats.passes += 1
        for pos in range(self.depth):
            if pos not in self._pending:
                self._issue(pos)

    def before_layer(self, index: int) -> None:
        pos = self.position.get(index)
        if pos is None:
            return
        handle = self._pending.pop(pos)
        t0 = time.perf_counter()
        if isinstance(handle, Future):
            handle = handle.result()   # the disk read (and on a GPU the copy's event)
        if handle is not None:         # a CUDA event: the compute stream waits, not the host
            torch.cuda.current_stream(self.device).wait_event(handle)
        self.stats.wait_seconds += time.perf_counter() - t0
        self._log("use", index)

    def after_layer(self, index: int) -> None:
        pos = self.position.get(index)
        if pos is None:
            return
        # The slot's next user: `depth` places on in this pass, or its first user of the next.
        nxt = pos + self.depth
        self._issue(nxt if nxt < len(self.order) else pos % self.depth)

    def _issue(self, pos: int) -> None:
        index = self.order[pos]
        slot = pos % self.depth
        released = None
        if self.on_cuda:   # the slot is free once the kernels queued so far (its last user) are done
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(self.device))
        self._log("issue", index)
        self.stats.fetches += 1
        if index in self._host:
            self._pending[pos] = self._copy_to_slot(self._host[index], slot, released, index)
        else:
            self._pending[pos] = self._pool.submit(self._read_disk, index, slot, released)

    def _copy_to_slot(self, host: torch.Tensor, slot: int, released, index: int):
        if self.fetch_delay_s:
            time.sleep(self.fetch_delay_s)
        if not self.on_cuda:
            self.slots[slot].copy_(host)
            self._log("arrive", index)
            return None
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(released)
            self.slots[slot].copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.stats.bytes_to_device += host.numel()
        self._staging_ready[slot] = ready
        self._log("arrive", index)   # queued: the compute stream waits on `ready`
        return ready

    def _read_disk(self, index: int, slot: int, released):
        """Worker thread: file -> staging buffer, then (GPU) staging -> slot on the copy stream."""
        if self.on_cuda and self._staging_ready[slot] is not None:
            self._staging_ready[slot].synchronize()   # the staging buffer's last copy has left it
        fd, mm = self._files[index]
        n = self.slot_bytes
        if self.fetch_delay_s:
            time.sleep(self.fetch_delay_s)
        read_mapped(fd, mm, self.staging[slot][:n])
        with self._lock:
            self.stats.bytes_from_disk += n
        if not self.on_cuda:
            self._log("arrive", index)
            return None
        with torch.cuda.device(self.device):
            return self._copy_to_slot(self.staging[slot], slot, released, index)

    def _log(self, what: str, index: int) -> None:
        with self._lock:
            self.stats.fetch_log.append((what, index))

    # ---- accounting and cleanup ----------------------------------------------------------------
    def host_weight_bytes(self) -> int:
        """Host RAM the tiers hold: the CPU tier, disk staging and (CPU-only) the slots."""
        total = sum(t.numel() for t in self._host.values())
        if self.on_cuda:
            return total + (sum(s.numel() for s in self.staging) if self._pool else 0)
        return total + sum(s.numel() for s in self.slots)

    def device_slot_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    def drain(self) -> None:
        """Wait for every fetch in flight (after a failed pass, and before closing)."""
        for handle in list(self._pending.values()):
            if isinstance(handle, Future):
                handle = handle.result()
            if handle is not None:
                handle.synchronize()

    def reset(self) -> None:
        """After a pass that failed half way: forget the fetches in flight; the next pass starts
        from the first streamed layer again."""
        self.drain()
        self._pending.clear()

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for fd, mm in self._files.values():
            mm.close()
            os.close(fd)
        self._files.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
