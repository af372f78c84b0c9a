"""The scheduler and KV-cache bookkeeping on their own: no model, no torch tensors."""

from __future__ import annotations

import pytest

from strata.config import CacheConfig, SchedulerConfig
from strata.core.block_pool import BlockPool, hash_block_tokens
from strata.core.request import Request, RequestStatus
from strata.core.sched_output import RunnerOutput
from strata.core.scheduler import RequestRejected, Scheduler
from strata.sampling_params import SamplingParams


def make_scheduler(num_blocks=16, block_size=4, budget=64, max_len=64, caching=True, max_seqs=8):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching), num_blocks)


def req(rid, prompt, max_tokens=4, n=1):
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True)
    return Request(rid, prompt, params)


def fake_step(sched: Scheduler, token=7):
    """Schedule, then 'sample' `token` for every request that reached the end of its tokens."""
    out = sched.schedule()
    result = RunnerOutput()
    for rid in out.num_scheduled_tokens:
        r = sched.requests[rid]
        result.sampled_token_ids[rid] = [token] if r.num_computed_tokens == r.num_tokens else []
    return out, sched.update(out, result)


def test_block_pool_refcounts_and_lru_eviction():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_block(a, h)
    pool.free([b, a])
    assert pool.num_free_blocks == 4
    assert pool.get_cached_block(h) is a           # freed but still cached
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free([a])
    pool.allocate(4)                               # takes every block: the cached one is evicted
    assert pool.get_cached_block(h) is None
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_double_free_is_caught():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a])


def test_chunked_prefill_respects_budget_and_mixes_decodes():
    s = make_scheduler(budget=6)
    s.add_request([req("a", list(range(10)))])
    out, _ = fake_step(s)
    assert out.num_scheduled_tokens == {"a": 6}
    s.add_request([req("b", list(range(20, 23)))])
    out, _ = fake_step(s)
    assert out.num_scheduled_tokens == {"a": 4, "b": 2}   # a finishes its prompt, b starts
    out, _ = fake_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}   # a decodes while b finishes its prompt


def test_prefix_cache_hit_skips_computed_blocks():
    s = make_scheduler()
    s.add_request([req("a", list(range(10)), max_tokens=1)])
    fake_step(s)
    s.add_request([req("b", list(range(9)) + [99], max_tokens=1)])
    out, _ = fake_step(s)
    # Two whole blocks of 4 tokens are shared; b computes only the remaining 2.
    assert out.num_scheduled_tokens == {"b": 2}
    assert out.new_requests[0].num_computed_tokens == 8


def test_full_prompt_hit_still_computes_last_token():
    s = make_scheduler()
    s.add_request([req("a", list(range(8)), max_tokens=1)])
    fake_step(s)
    s.add_request([req("b", list(range(8)), max_tokens=1)])
    out, _ = fake_step(s)
    assert out.num_scheduled_tokens == {"b": 4}    # one block hit, not two: logits are needed


def test_preemption_frees_newest_and_requeues_it_first():
    s = make_scheduler(num_blocks=4, block_size=4, max_len=16)
    s.add_request([req("a", list(range(7)), max_tokens=8)])
    s.add_request([req("b", list(range(7)), max_tokens=8)])
    for _ in range(3):
        out, _ = fake_step(s)
    assert s.num_preemptions >= 1
    assert s.waiting[0].request_id == "b" and s.waiting[0].num_computed_tokens == 0
    while s.requests:
        fake_step(s)
    assert s.kv.num_free_blocks == 4


def test_request_too_long_is_rejected_at_admission():
    s = make_scheduler(max_len=16)
    with pytest.raises(RequestRejected, match="16"):
        s.add_request([req("a", list(range(16)))])
    with pytest.raises(RequestRejected, match="empty"):
        s.add_request([req("a", [])])
    small = make_scheduler(num_blocks=2, block_size=4, max_len=64)
    with pytest.raises(RequestRejected, match="KV blocks"):
        small.add_request([req("a", list(range(20)))])


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    s.add_request([req("a", list(range(10)), max_tokens=20)])
    fake_step(s)
    assert s.kv.num_free_blocks < 16
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 16 and not s.requests
    out = s.schedule()
    assert out.finished_req_ids == {"a"}


def test_fork_shares_prompt_blocks_and_copies_on_write():
    s = make_scheduler(block_size=4)
    sibs = [Request(f"r#{i}", list(range(6)), SamplingParams(n=3, max_tokens=3, ignore_eos=True),
                    parent_id="r", sequence_index=i) for i in range(3)]
    s.add_request(sibs)
    fake_step(s)   # the first sibling computes the prompt, then the others fork it
    shared = s.kv.req_blocks["r#0"][0]
    assert shared.ref_cnt == 3                     # the full first block is shared three ways
    out, _ = fake_step(s)
    # Each sibling recomputes prompt token 5, in the shared partial block: copies are made.
    assert len(out.block_copies) >= 2
    assert {r.req_id for r in out.new_requests} == {"r#1", "r#2"}
    while s.requests:
        fake_step(s)
    assert s.kv.num_free_blocks == 16


def test_eos_and_min_tokens():
    s = make_scheduler()
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=10, min_tokens=2), eos_token_ids=frozenset({7}))
    s.add_request([r])
    fake_step(s, token=7)
    assert not r.is_finished                       # eos before min_tokens is ignored
    fake_step(s, token=7)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.output_token_ids == [7, 7]
