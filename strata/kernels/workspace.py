"""Per-device scratch for kernels that reduce across their programs in one launch: fp32 partials
and int32 counters, zeroed once.

The pattern (CUTLASS's serial split-K semaphore): each program writes its partial result, then
one thread increments its group's counter with acq_rel semantics at GPU scope; the program that
sees the last count reduces the group's partials and resets the counter to 0. So the buffers are
clean after every launch, reusable by the next kernel and inside CUDA graphs. Users: the int4
GEMV's split-K (a counter a row block) and the decode attention's split merge (a counter a row
and KV head). One set per device, so those kernels must run one after another (one stream, as the
engine does; with PDL a kernel touches them only after its wait).
"""

from __future__ import annotations

import torch

PARTIAL_FLOATS = 1 << 20
COUNTERS = 1 << 12
_buffers: dict = {}


def get(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [PARTIAL_FLOATS] fp32, counters [COUNTERS] int32, zeroed) of this device,
    allocated on first use. Not during a CUDA graph capture: the zeroing would happen only when
    the graph replays (the engine runs every shape once eagerly before capturing)."""
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device()
           if device.type == "cuda" else 0)
    if key not in _buffers:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kernel workspace: first use inside a CUDA graph capture; run the "
                               "model once eagerly before capturing")
        _buffers[key] = (torch.zeros(PARTIAL_FLOATS, dtype=torch.float32, device=device),
                         torch.zeros(COUNTERS, dtype=torch.int32, device=device))
    return _buffers[key]
