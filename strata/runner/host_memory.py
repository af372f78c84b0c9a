"""Host buffers of exactly the size asked, page-locked (pinned) on a GPU machine.

Why not ``torch.empty(n, pin_memory=True)``: that goes through CUDA's caching host allocator,
which rounds every request up to the next power of two and keeps freed blocks cached for reuse
(never returned to the OS). An OPT-30B decoder layer is 1.15 GiB of float16; its pinned copy took
2 GiB, so the CPU tier of 46 layers held 92 GiB where the offload plan counted 53, and with the
planned 33.5 GiB host KV cache the process passed the 128 GiB host and was killed for memory
(2026-11-21, twice). The pinned probes and staging buffers freed at startup stayed cached too.

Here a buffer is an anonymous mapping of exactly ``nbytes`` (page-aligned), registered with
``cudaHostRegister`` (the pages become page-locked, so copies from them are real asynchronous
DMA) and unregistered just before the mapping goes, when the last tensor viewing it is freed.
The pages are ordinary anonymous memory of this process: they count in its RSS (VmRSS / VmHWM),
so a measured peak says what the tiers really hold.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import threading

import torch

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_registered = {"bytes": 0, "buffers": 0}   # page-locked through this module, now


def _register(ptr: int, nbytes: int) -> None:
    cudart = torch.cuda.cudart()
    torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, 0))


def _unregister(ptr: int) -> None:
    cudart = torch.cuda.cudart()
    torch.cuda.check_error(cudart.cudaHostUnregister(ptr))


class _Mapping(mmap.mmap):
    """An anonymous mapping that unregisters its pages before it is unmapped (torch.frombuffer
    keeps the mapping alive for as long as any tensor views it)."""

    ptr = 0
    registered = 0

    def __del__(self):
        if self.registered:
            try:
                _unregister(self.ptr)
            finally:
                with _lock:
                    _registered["bytes"] -= self.registered
                    _registered["buffers"] -= 1
                self.registered = 0


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """A uint8 tensor of exactly nbytes in host RAM; page-locked when pinned (see the module
    docstring). If the registration fails, the caching allocator's pinned memory instead, with
    a warning naming its rounded size."""
    if nbytes <= 0:
        return torch.empty(max(nbytes, 0), dtype=torch.uint8)
    if not pinned:   # a mapping too: freed memory goes back to the OS, not to malloc's heap
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
    mapping = _Mapping(-1, nbytes)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    try:
        _register(tensor.data_ptr(), nbytes)
    except Exception as exc:   # noqa: BLE001 - any CUDA error: the rounded allocator still works
        del tensor
        try:
            mapping.close()
        except BufferError:   # still viewed: it goes with its last view
            pass
        rounded = 1 << (nbytes - 1).bit_length()
        logger.warning("cudaHostRegister of %d bytes failed (%s): pinned through torch instead, "
                       "which holds %d bytes for it", nbytes, exc, rounded)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    mapping.ptr, mapping.registered = tensor.data_ptr(), nbytes
    with _lock:
        _registered["bytes"] += nbytes
        _registered["buffers"] += 1
    return tensor


def pinned_bytes() -> int:
    """Host bytes page-locked through host_buffer and not yet freed."""
    with _lock:
        return _registered["bytes"]


def pinned_buffers() -> int:
    with _lock:
        return _registered["buffers"]


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_heap() -> None:
    """Give the pages of freed malloc chunks back to the OS (glibc's malloc_trim). A model's
    parameters are malloc'd when it is built; a layer placed on its tier frees its originals,
    which glibc may keep inside its heap (resident) once its mmap threshold has grown. A no-op
    elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
