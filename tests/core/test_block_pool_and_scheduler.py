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


def test_freed_blocks_without_hash_are_reused_first():
    # Caching off: a freed request's blocks come back before any never-used block (their cache
    # memory is already touched), in the request's order.
    pool = BlockPool(8, enable_caching=False)
    first = pool.allocate(3)
    pool.free(list(reversed(first)))               # tail first, as the manager frees
    assert [b.block_id for b in pool.allocate(3)] == [b.block_id for b in first]

    # Caching on: a block with no hash is handed out before cached content is evicted.
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_block(a, h)
    pool.free([a])                                 # cached: tail of the queue
    pool.free([b])                                 # no hash: head
    assert pool.allocate(1) == [b]
    assert pool.get_cached_block(h) is a           # still revivable


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


# ---- async scheduling: step N+1 is scheduled before step N's tokens are known ----------------


def sampled(sched: Scheduler, out, token=7):
    """A RunnerOutput giving `token` to every request that step `out` sampled for."""
    return RunnerOutput({rid: [token] if rid in out.sampling_req_ids else []
                         for rid in out.num_scheduled_tokens})


def schedule_tracking(sched: Scheduler):
    """schedule(), noting which requests the step samples for (as the runner would know)."""
    before = {rid: r.num_placeholders for rid, r in sched.requests.items()}
    out = sched.schedule()
    out.sampling_req_ids = {rid for rid in out.num_scheduled_tokens
                            if sched.requests[rid].num_placeholders > before.get(rid, 0)}
    return out


def test_async_decode_schedules_the_placeholder_token():
    s = make_scheduler()
    r = req("a", [1, 2, 3], max_tokens=5)
    s.add_request([r])
    first = schedule_tracking(s)                   # the prompt: samples the first token
    assert first.num_scheduled_tokens == {"a": 3} and r.num_placeholders == 1
    second = schedule_tracking(s)                  # its input is the token still in flight
    assert second.num_scheduled_tokens == {"a": 1} and r.num_placeholders == 2
    assert r.num_computed_tokens == 4 and r.output_token_ids == []
    s.update(first, sampled(s, first, token=11))
    assert r.output_token_ids == [11] and r.num_placeholders == 1
    third = schedule_tracking(s)
    assert third.num_scheduled_tokens == {"a": 1} and r.num_computed_tokens == 5
    s.update(second, sampled(s, second, token=12))
    s.update(third, sampled(s, third, token=13))
    assert r.output_token_ids == [11, 12, 13] and r.num_placeholders == 0


def test_async_no_step_past_max_tokens_or_context():
    s = make_scheduler(max_len=64)
    r = req("a", [1, 2, 3], max_tokens=2)
    s.add_request([r])
    steps = [schedule_tracking(s), schedule_tracking(s)]
    # Two placeholders reach max_tokens: the next schedule has nothing to run for this request.
    assert r.num_placeholders == 2 and s.schedule().num_scheduled_tokens == {}
    for out in steps:
        s.update(out, sampled(s, out))
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7, 7]
    assert s.kv.num_free_blocks == 16 and not s.requests


def test_async_finish_in_flight_drops_the_next_token_and_frees_blocks():
    s = make_scheduler()
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=10), eos_token_ids=frozenset({2}))
    s.add_request([r])
    first, second = schedule_tracking(s), schedule_tracking(s)
    updates = s.update(first, sampled(s, first, token=2))   # eos: finished in step 1
    assert updates[0].finished and r.output_token_ids == [2]
    assert s.kv.num_free_blocks == 16
    assert s.update(second, sampled(s, second, token=99)) == []   # step 2's token is dropped
    assert r.output_token_ids == [2]
    assert s.schedule().finished_req_ids == {"a"}


def test_async_reused_id_does_not_take_the_old_requests_token():
    s = make_scheduler()
    old = req("x", [1, 2, 3], max_tokens=10)
    s.add_request([old])
    first, second = schedule_tracking(s), schedule_tracking(s)
    s.update(first, sampled(s, first))
    s.finish_request("x", RequestStatus.FINISHED_ABORTED)
    new = req("x", [4, 5, 6, 7], max_tokens=10)
    s.add_request([new])
    third = schedule_tracking(s)                   # the new x computes its prompt
    assert third.new_requests[0].prompt_token_ids == [4, 5, 6, 7] and "x" in third.finished_req_ids
    s.update(second, sampled(s, second, token=99))   # the old x's token, in flight when it ended
    assert new.output_token_ids == [] and new.num_placeholders == 1
    s.update(third, sampled(s, third, token=5))
    assert new.output_token_ids == [5]


def test_async_preempted_request_keeps_its_token_and_waits_for_it():
    s = make_scheduler(num_blocks=4, block_size=4, max_len=16)
    a, b = req("a", list(range(7)), max_tokens=8), req("b", list(range(7)), max_tokens=8)
    s.add_request([a])
    s.add_request([b])
    pending = [schedule_tracking(s)]
    while True:
        pending.append(schedule_tracking(s))      # may preempt while the step before is in flight
        if s.num_preemptions:
            break
        s.update(pending[0], sampled(s, pending.pop(0)))
    victim = s.waiting[0]
    assert victim.status is RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    # Its token from the step in flight is still unknown: it is not resumed before that.
    pending.append(schedule_tracking(s))
    assert victim.num_placeholders == 1 and victim.request_id not in pending[-1].num_scheduled_tokens
    known = len(victim.output_token_ids)
    for out in pending:
        s.update(out, sampled(s, out))
    assert len(victim.output_token_ids) == known + 1 and victim.num_placeholders == 0


def test_async_placeholder_block_is_cached_only_once_its_tokens_are_known():
    s = make_scheduler(block_size=4)
    r = req("a", [1, 2, 3], max_tokens=4)
    s.add_request([r])
    first = schedule_tracking(s)                   # positions 0-2
    second = schedule_tracking(s)                  # position 3 holds the placeholder: block full
    assert s.kv._num_cached_blocks.get("a", 0) == 0
    s.update(first, sampled(s, first, token=9))
    third = schedule_tracking(s)
    assert s.kv._num_cached_blocks["a"] == 1        # cached with the real token 9 in it
    assert s.kv.req_blocks["a"][0].block_hash == hash_block_tokens(None, [1, 2, 3, 9])
    for out in (second, third):
        s.update(out, sampled(s, out))


def test_async_last_block_is_cached_when_the_request_ends():
    s = make_scheduler(block_size=4)
    r = req("a", [1, 2, 3], max_tokens=2)
    s.add_request([r])
    first, second = schedule_tracking(s), schedule_tracking(s)   # second: position 3, a placeholder
    assert s.schedule().num_scheduled_tokens == {}      # max_tokens reached: nothing more to run
    s.update(first, sampled(s, first, token=9))
    s.update(second, sampled(s, second, token=8))
    assert r.is_finished and s.kv.num_free_blocks == 16
    # The block of positions 0-3 (its KV written by the second step) serves later prompts.
    assert s.kv.pool.get_cached_block(hash_block_tokens(None, [1, 2, 3, 9])) is not None



def test_async_request_ending_in_flight_gives_its_seat_and_blocks_at_once():
    """A request whose in-flight token is its last leaves the batch when the next step is
    scheduled: a waiting request takes its seat and blocks in that step, not the one after, and
    its full blocks are cached as they would be at its end; its last token still arrives."""
    s = make_scheduler(num_blocks=3, block_size=4, max_seqs=1)
    a, b = req("a", [1, 2, 3], max_tokens=2), req("b", [4, 5, 6], max_tokens=2)
    s.add_request([a])
    s.add_request([b])
    first, second = schedule_tracking(s), schedule_tracking(s)   # a's prompt, then its 2nd token
    assert set(second.num_scheduled_tokens) == {"a"}
    s.update(first, sampled(s, first, token=9))
    third = schedule_tracking(s)                   # a ends with step 2's token: b starts now
    assert third.num_scheduled_tokens == {"b": 3} and "a" not in s.kv.req_blocks
    assert s.kv.pool.get_cached_block(hash_block_tokens(None, [1, 2, 3, 9])) is not None
    s.update(second, sampled(s, second, token=8))
    assert a.status is RequestStatus.FINISHED_LENGTH and a.output_token_ids == [9, 8]
    s.update(third, sampled(s, third, token=5))
    assert b.output_token_ids == [5] and not s.waiting
    assert s.schedule().finished_req_ids == {"a"}
