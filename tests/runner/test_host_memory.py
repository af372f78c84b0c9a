"""Host memory of the offload tiers on a GPU machine, checked on the CPU: page-locked buffers
are exactly the size asked (torch's pinned allocator rounds up to a power of two: an OPT-30B
layer of 1.15 GiB took 2 GiB, and the CPU tier of 46 layers passed a 128 GiB host), they are
unpinned and unmapped when their last view goes, and the mover frees each layer's original as
it packs it. cudaHostRegister is replaced by a function that touches every page, as the real
one does when it locks them, so the process's RSS shows what the buffers hold."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from strata.core.offload_policy import OffloadPlan
from strata.runner import host_memory
from strata.runner.offload_mover import OffloadMover

MIB = 2**20
PAGE = 4096


def _status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = {"register": [], "unregister": []}

    def register(ptr, nbytes):
        assert ptr % PAGE == 0
        # cudaHostRegister locks the pages: they are faulted in (resident) from here on
        ctypes.memset(ptr, 0, nbytes)
        calls["register"].append((ptr, nbytes))

    monkeypatch.setattr(host_memory, "_register", register)
    monkeypatch.setattr(host_memory, "_unregister", lambda ptr: calls["unregister"].append(ptr))
    return calls


def test_pinned_buffer_is_exact_and_unpinned_with_its_last_view(fake_cuda):
    gc.collect()
    before_bytes = host_memory.pinned_bytes()
    nbytes = 64 * MIB + 1   # torch's pinned allocator would hold 128 MiB for it
    rss0 = _status_bytes("VmRSS")
    buf = host_memory.host_buffer(nbytes, pinned=True)
    grown = _status_bytes("VmRSS") - rss0
    assert buf.numel() == nbytes and buf.dtype == torch.uint8
    assert fake_cuda["register"] == [(buf.data_ptr(), nbytes)]
    assert host_memory.pinned_bytes() - before_bytes == nbytes
    assert 64 * MIB <= grown <= 66 * MIB, f"RSS grew by {grown / MIB:.1f} MiB for a 64 MiB buffer"
    ptr = buf.data_ptr()
    view = buf[100:200].view(torch.int32)
    del buf
    assert fake_cuda["unregister"] == []           # a view still uses it
    del view
    gc.collect()
    assert fake_cuda["unregister"] == [ptr]
    assert host_memory.pinned_bytes() == before_bytes
    assert _status_bytes("VmRSS") - rss0 < 2 * MIB   # unmapped, not cached


def test_unpinned_and_empty_buffers(fake_cuda):
    assert host_memory.host_buffer(0, pinned=True).numel() == 0
    assert host_memory.host_buffer(1000, pinned=False).numel() == 1000
    assert fake_cuda["register"] == []


def test_failed_registration_falls_back(monkeypatch):
    """Without CUDA (or if the driver refuses) the allocator of torch is the fallback; here, on a
    CPU-only torch, that raises as torch.empty(pin_memory=True) would."""
    def refuse(ptr, nbytes):
        raise RuntimeError("no driver")

    monkeypatch.setattr(host_memory, "_register", refuse)
    calls = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: calls.append(k) or real_empty(*a, **{
        key: v for key, v in k.items() if key != "pin_memory"}))
    buf = host_memory.host_buffer(3 * PAGE, pinned=True)
    assert buf.numel() == 3 * PAGE and calls[-1].get("pin_memory") is True


class Stack(nn.Module):
    """Layers of 8 MiB (float32) each."""

    def __init__(self, layers: int, width: int = 1448):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))


# The RSS figures of the mover test need a process whose allocator no other test has shaped:
# glibc raises its mmap threshold as a process frees large blocks (up to 32 MiB), so late in the
# whole suite an 8 MiB tensor came from the heap and stayed resident after it was freed (RSS grew
# by the model's 48 MiB there, not when this file ran alone). The suite runs it in a child.
_FRESH_PROCESS = os.environ.get("STRATA_TEST_FRESH_PROCESS") == "1"


def test_mover_frees_originals_in_a_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
         f"{__file__}::test_mover_pins_each_layer_exactly_and_frees_its_original"],
        env={**os.environ, "STRATA_TEST_FRESH_PROCESS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not _FRESH_PROCESS, reason="run in a fresh process by "
                    "test_mover_frees_originals_in_a_fresh_process")
def test_mover_pins_each_layer_exactly_and_frees_its_original(fake_cuda):
    """All 6 layers on the CPU tier, pinned: one registration of exactly the packed size per
    layer, and the process's peak RSS while placing stays at the model plus one layer plus the
    slots (the originals are freed as they are packed; a copy of the whole model beside the
    tier would add 48 MiB)."""
    layers = 6
    model = Stack(layers)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    with torch.no_grad():
        x = torch.randn(3, 1448)
        expected = x
        for layer in model.layers:
            expected = torch.tanh(layer(expected))
    gc.collect()
    plan = OffloadPlan(("cpu",) * layers, 2, 1, 64, 0, 0, 0, 1.0, 1.0, 1.0, 1.0, "test")
    open("/proc/self/clear_refs", "w").write("5")   # restart the peak-RSS count (VmHWM) here
    base = _status_bytes("VmRSS")
    mover = OffloadMover(model, plan, torch.device("cpu"), pin_host=True)
    peak, after = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    assert [n for _, n in fake_cuda["register"]] == [mover.slot_bytes] * layers
    assert mover.slot_bytes - layer_bytes < 64 * 4     # the layout's alignment only
    slots = sum(s.numel() for s in mover.slots)
    margin = 4 * MIB
    assert after - base <= slots + margin, f"RSS grew by {(after - base) / MIB:.1f} MiB"
    assert peak - base <= slots + mover.slot_bytes + margin, f"peak grew by {(peak - base) / MIB:.1f} MiB"
    with torch.no_grad():   # the tier still computes the same thing
        mover.begin_pass()
        y = x
        for i, layer in enumerate(model.layers):
            mover.before_layer(i)
            y = torch.tanh(layer(y))
            mover.after_layer(i)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    mover.close()
    registered = [p for p, _ in fake_cuda["register"]]
    del mover, model
    gc.collect()
    assert sorted(fake_cuda["unregister"]) == sorted(registered)
