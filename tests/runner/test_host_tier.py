"""Host-tier attention pieces (attention/host_tier.py) checked on their own."""

import os
import threading
import time

import pytest
import torch

from strata.attention import host_tier, torch_ref
from strata.attention.backend import AttentionMetadata


def test_fresh_prompts_attend_as_one_batched_call():
    """Runs of equal-length fresh prompts attend in one causal call: the same output as each
    prompt alone with its causal mask (GQA: 6 query heads over 2 KV heads)."""
    g = torch.Generator().manual_seed(0)
    n, length, heads, kv_heads, d, scale = 3, 7, 6, 2, 16, 0.25
    tokens = 2 + n * length      # two tokens before the run, which it must not touch
    q = torch.randn(tokens, heads, d, generator=g)
    k = torch.randn(tokens, kv_heads, d, generator=g)
    v = torch.randn(tokens, kv_heads, d, generator=g)
    out = torch.full_like(q, float("nan"))
    host_tier.fresh_prompts_attention(q, k, v, out, 2, n, length, scale)
    assert out[:2].isnan().all()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    for p in range(n):
        a, b = 2 + p * length, 2 + (p + 1) * length
        expected = torch_ref._sdpa(q[a:b], k[a:b], v[a:b], mask, scale, heads // kv_heads)
        torch.testing.assert_close(out[a:b], expected, rtol=1e-5, atol=1e-6)


def _meta(query_lens, seq_lens, slots, block_tables, block_size):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        num_tokens=starts[-1], slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(block_tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens_cpu=list(seq_lens), query_lens_cpu=list(query_lens), query_start_loc_cpu=starts,
        block_size=block_size, decode_rows=[i for i, n in enumerate(query_lens) if n == 1],
        prefill_rows=[i for i, n in enumerate(query_lens) if n != 1], max_query_len=max(query_lens))


def test_fresh_prompt_result_does_not_wait_for_its_cache_write():
    """A micro-batch of fresh prompts returns its output at once (computed on the device side),
    while the slow worker still writes its K/V; the next task, a decode of the same sequence,
    still attends over that K/V (the worker keeps the order), and a failed write surfaces at
    drain()."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, block, length, scale = 4, 2, 16, 4, 6, 0.25
    cache = torch.zeros(2, 4, block, kv_heads, d)
    table = [[1, 2]]
    worker = host_tier.HostAttentionWorker(delay_s=0.3)
    q, k, v = (torch.randn(length + 1, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    prompt = _meta([length], [length], [block + i for i in range(length)], table, block)
    t0 = time.perf_counter()
    pending = worker.start(q[:length], k[:length], v[:length], cache, prompt, scale)
    out = pending.result()
    assert time.perf_counter() - t0 < 0.2 and not pending.task.done()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    torch.testing.assert_close(out, torch_ref._sdpa(q[:length], k[:length], v[:length], mask, scale, 2),
                               rtol=1e-5, atol=1e-6)
    decode = _meta([1], [length + 1], [block + length], table, block)
    got = worker.start(q[length:], k[length:], v[length:], cache, decode, scale).result()
    expected = torch_ref._sdpa(q[length:], k, v, torch.ones(1, length + 1, dtype=torch.bool), scale, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    worker.drain()

    bad = _meta([length], [length], [99 * block + i for i in range(length)], table, block)   # no such slot
    worker.start(q[:length], k[:length], v[:length], cache, bad, scale).result()   # no wait, no error yet
    with pytest.raises(Exception):
        worker.drain()


def test_rows_are_split_once_a_step(monkeypatch):
    """Which rows attend on the CPU (and their metadata) is the same in every layer of a step:
    worked out for the first layer's call and kept with the step's metadata; each layer still
    attends over its own cache. Mixed rows: a fresh prompt between two decodes."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, d, block, scale = 4, 2, 16, 4, 0.25
    calls = []
    real = host_tier._split_rows
    monkeypatch.setattr(host_tier, "_split_rows", lambda *a: calls.append(1) or real(*a))
    meta = _meta([1, 3, 1], [5, 3, 2], [4, 12, 13, 14, 20], [[1, 2], [3, 0], [5, 0]], block)
    worker = host_tier.HostAttentionWorker()
    outs = []
    for layer in range(3):
        cache = torch.randn(2, 6, block, kv_heads, d, generator=g)
        q, k, v = (torch.randn(5, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
        want = cache.clone()
        torch_ref.write_kv(want, k, v, meta.slot_mapping)
        got = worker.start(q, k, v, cache, meta, scale).result()
        outs.append((got, torch_ref.paged_attention(q, want, meta, scale)))
    worker.drain()
    assert len(calls) == 1
    # the thread whose CPU time benchmarks account: the worker's own, not the caller's
    tid = worker.thread_id()
    assert tid != threading.get_native_id()
    assert os.path.exists(f"/proc/self/task/{tid}") or not os.path.exists("/proc/self/task")
    for got, want in outs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
