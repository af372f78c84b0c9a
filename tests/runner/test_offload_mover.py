"""The offload mover on its own (CPU): a stack of linear layers streamed from disk through two
staging slots. Prefetch order, slot reuse, and no layer computing before its weights arrived
(the copies are made slow on purpose: a missing wait would compute with the previous layer's
weights and change the result)."""

from __future__ import annotations

import torch
from torch import nn

from strata.core.offload_policy import OffloadPlan
from strata.runner.offload_mover import OffloadMover

NUM_LAYERS = 6
WIDTH = 32


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(NUM_LAYERS))

    def run(self, x, mover=None):
        if mover is not None:
            mover.begin_pass()
        for i, layer in enumerate(self.layers):
            if mover is not None:
                mover.before_layer(i)
            x = torch.tanh(layer(x))
            if mover is not None:
                mover.after_layer(i)
        return x


def plan(placement, depth=2) -> OffloadPlan:
    return OffloadPlan(tuple(placement), depth, 1, 64, 0, 0, 0, 1.0, 1.0, 1.0, 1.0, "test")


def make(placement, depth=2, delay=0.0, tmp_path=None):
    model = Stack()
    x = torch.randn(4, WIDTH)
    with torch.no_grad():
        expected = model.run(x)
    mover = OffloadMover(model, plan(placement, depth), torch.device("cpu"), str(tmp_path), fetch_delay_s=delay)
    return model, mover, x, expected


def uses_after_arrival(log) -> bool:
    arrived: set[int] = set()
    for what, layer in log:
        if what == "arrive":
            arrived.add(layer)
        elif what == "use":
            if layer not in arrived:
                return False
            arrived.discard(layer)   # the next use needs the next fetch
    return True


def test_prefetch_order_and_slot_reuse(tmp_path):
    model, mover, x, expected = make(["disk"] * NUM_LAYERS, tmp_path=tmp_path)
    slot_ptrs = [s.data_ptr() for s in mover.slots]
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model.run(x, mover), expected, rtol=0, atol=0)
    issues = [layer for what, layer in mover.stats.fetch_log if what == "issue"]
    # layers 0 and 1 first, then each layer's successor-but-one as soon as it is done, wrapping
    # into the next pass: the first two layers of pass k+1 are in flight at the end of pass k
    assert issues == list(range(NUM_LAYERS)) * 3 + [0, 1]
    log = mover.stats.fetch_log
    for i in range(NUM_LAYERS - 2):   # layer i+2's fetch is issued right after layer i ran
        assert log.index(("issue", i + 2)) > log.index(("use", i))
    assert len(mover.slots) == 2 and [s.data_ptr() for s in mover.slots] == slot_ptrs
    for i, layer in enumerate(model.layers):   # layer i computes from slot i % 2
        slot = mover.slots[i % 2]
        assert slot.data_ptr() <= layer.weight.data_ptr() < slot.data_ptr() + slot.numel()
    assert mover.host_weight_bytes() == 2 * mover.slot_bytes
    mover.drain()   # the next pass's first two reads may still be running
    assert mover.stats.bytes_from_disk == (3 * NUM_LAYERS + 2) * mover.slot_bytes
    mover.close()


def test_slow_copies_are_waited_for(tmp_path):
    model, mover, x, expected = make(["disk"] * NUM_LAYERS, delay=0.02, tmp_path=tmp_path)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model.run(x, mover), expected, rtol=0, atol=0)
    assert uses_after_arrival(mover.stats.fetch_log)
    assert mover.stats.wait_seconds > 0.02   # the loop did wait for the slow reads
    mover.close()


def test_without_the_wait_results_change(tmp_path):
    """The check above can fail: skipping the wait computes with stale slot contents."""
    model, mover, x, expected = make(["disk"] * NUM_LAYERS, delay=0.05, tmp_path=tmp_path)
    mover.before_layer = lambda index: None
    with torch.no_grad():
        got = model.run(x, mover)
    assert not torch.equal(got, expected)
    mover.reset = lambda: None
    mover._pool.shutdown(wait=True)


def test_mixed_tiers_odd_count_and_depth(tmp_path):
    placement = ["resident", "disk", "resident", "disk", "disk", "resident"]
    for depth in (1, 2, 3):
        model, mover, x, expected = make(placement, depth=depth, tmp_path=tmp_path / str(depth))
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(model.run(x, mover), expected, rtol=0, atol=0)
        assert uses_after_arrival(mover.stats.fetch_log)
        assert {layer for what, layer in mover.stats.fetch_log} == {1, 3, 4}
        assert len(mover.slots) == depth
        mover.close()


def test_failed_pass_resets(tmp_path):
    model, mover, x, expected = make(["disk"] * NUM_LAYERS, tmp_path=tmp_path)
    with torch.no_grad():
        mover.begin_pass()
        mover.before_layer(0)
        mover.after_layer(0)
        mover.reset()   # a pass that failed after layer 0
        torch.testing.assert_close(model.run(x, mover), expected, rtol=0, atol=0)
    mover.close()


def test_micro_batch_spans_and_metadata_split():
    from strata.runner.input_batch import dummy_prefill_inputs
    from strata.runner.offload_loop import micro_batch_spans, split_metadata
    assert micro_batch_spans([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert micro_batch_spans([5, 30, 1, 1, 3], 8) == [(0, 1), (1, 2), (2, 5)]   # a long row alone
    assert micro_batch_spans([4], 1) == [(0, 1)]
    # decode rows and fresh prompts apart (host-KV layers), however few tokens they hold
    fresh = [False, False, True, True, False]
    assert micro_batch_spans([1, 1, 5, 5, 1], 100, fresh) == [(0, 2), (2, 4), (4, 5)]
    assert micro_batch_spans([1, 1, 5, 5, 1], 8, fresh) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    meta = dummy_prefill_inputs(20, 4, 4, 100, torch.device("cpu")).attn   # rows of 5 tokens
    part = split_metadata(meta, 1, 3, torch.device("cpu"))
    assert part.num_tokens == 10 and part.query_start_loc_cpu == [0, 5, 10]
    assert part.query_start_loc.tolist() == [0, 5, 10] and part.seq_lens_cpu == [5, 5]
    assert torch.equal(part.slot_mapping, meta.slot_mapping[5:15])
    assert torch.equal(part.block_tables, meta.block_tables[1:3]) and part.prefill_rows == [0, 1]


def test_disk_probe_reads_through_the_movers_path(tmp_path, monkeypatch):
    """The policy's disk rate is measured with the mover's own read (mmap, copy, pages dropped),
    best of several reads of the probe's full size, and the probe file is removed."""
    from strata.runner import offload_loop, offload_mover
    sizes = []
    real = offload_mover.read_mapped

    def spy(fd, mm, dst):
        sizes.append(dst.numel())
        return real(fd, mm, dst)

    monkeypatch.setattr(offload_mover, "read_mapped", spy)
    rate = offload_loop.disk_read_rate(str(tmp_path), 3 * 2**20, reads=3)
    assert sizes == [3 * 2**20] * 3 and rate > 0
    assert not list(tmp_path.iterdir())


def test_host_memory_room_counts_the_weights_held(tmp_path):
    """Without a cpu_memory_budget a GPU plan may fill a share of the RAM available plus the
    weights loaded and not yet placed (the tiers take their place); unreadable: no limit."""
    from strata.runner.offload_loop import HOST_MEMORY_UTILIZATION, host_memory_room
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   100000000 kB\n")
    held = (2048 * 2048 + 2048) * 4
    want = HOST_MEMORY_UTILIZATION * (100000000 * 1024 + held)
    assert host_memory_room(held, str(meminfo)) == int(want)
    assert host_memory_room(held, str(tmp_path / "missing")) is None
    assert host_memory_room(0) > 0   # this machine's


def test_cpu_write_rate_times_prompt_runs(monkeypatch):
    """The startup probe of the host tier's K/V writes: runs of a prompt's consecutive slots at
    random places through host_tier.write_kv, every slot inside the cache, a quarter of it a call."""
    from strata.attention import host_tier
    from strata.runner import offload_loop
    monkeypatch.setattr(offload_loop, "CPU_ATTENTION_PROBE_BYTES", 1 << 22)
    calls = []
    real = host_tier.write_kv

    def write(cache, k, v, slots, threads):
        calls.append((cache.shape, k.shape, slots.clone()))
        real(cache, k, v, slots, threads)

    monkeypatch.setattr(host_tier, "write_kv", write)
    rate = offload_loop.cpu_write_rate(2, 64, torch.bfloat16, prompt_len=64, reps=3)
    assert rate > 0 and len(calls) == 4   # a warm-up and 3 timed
    for shape, kshape, slots in calls:
        blocks = shape[1]
        assert blocks * 16 * 2 * 64 * 2 * 2 == 1 << 22
        runs = slots.view(-1, 64)
        assert kshape[0] == slots.numel() == blocks * 16 // 4
        assert torch.equal(runs - runs[:, :1], torch.arange(64).expand_as(runs))
        assert int(slots.min()) >= 0 and int(slots.max()) < blocks * 16 and (runs[:, 0] % 16 == 0).all()
