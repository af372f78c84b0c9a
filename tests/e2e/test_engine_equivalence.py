"""Every scheduling optimisation must leave greedy outputs unchanged, token for token, and give
every KV block back. The reference is the HF model's own greedy generate. Each engine test runs
with synchronous and with async scheduling (step N+1 scheduled while step N computes)."""

from __future__ import annotations

import pytest
import torch

from hf_tiny import hf_greedy, make_tiny_model
from strata import LLM, SamplingParams

PROMPTS = [
    [5, 17, 33, 101, 7],
    [9] * 13 + [44, 45],
    list(range(3, 40)),
    [300, 301, 302],
    list(range(100, 150)),
    [8],
]
# Two prompts sharing a 36-token prefix (more than two blocks of 16) for prefix-cache hits.
SHARED = list(range(200, 236))
PREFIX_PROMPTS = [SHARED + [7, 8, 9], SHARED + [11], SHARED + [12, 13, 14, 15, 16]]
MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = make_tiny_model("llama", path)
    return path, hf


@pytest.fixture(scope="module")
def reference(tiny):
    _, hf = tiny
    return hf_greedy(hf, PROMPTS + PREFIX_PROMPTS, MAX_NEW)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request):
    return request.param


def make_llm(path, async_scheduling, **kw):
    # On the CPU wherever the tests run: the reference is HF's float32 on the CPU, and a random
    # tiny model's near-tied logits in a GPU's arithmetic pick other tokens (the GPU paths have
    # their own tests against their own reference).
    return LLM(str(path), skip_tokenizer_init=True, async_scheduling=async_scheduling, device="cpu", **kw)


def greedy(n=1):
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, n=n)


def run(llm, prompts, params=None):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params or greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(llm):
    sched = llm.llm_engine.scheduler
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert not sched.kv.req_blocks
    assert not llm.llm_engine.executor.runner.states or all(
        r not in sched.requests for r in llm.llm_engine.executor.runner.states)


def test_batched_matches_hf(tiny, async_scheduling, reference):
    llm = make_llm(tiny[0], async_scheduling)
    assert run(llm, PROMPTS + PREFIX_PROMPTS) == reference
    assert_all_blocks_free(llm)


def test_one_at_a_time_matches_batched(tiny, async_scheduling, reference):
    llm = make_llm(tiny[0], async_scheduling, enable_prefix_caching=False)
    for prompt, ref in zip(PROMPTS, reference):
        assert run(llm, [prompt]) == [ref]
    assert_all_blocks_free(llm)


def test_chunked_prefill_tiny_budget(tiny, async_scheduling, reference):
    llm = make_llm(tiny[0], async_scheduling, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert run(llm, PROMPTS) == reference[: len(PROMPTS)]
    assert_all_blocks_free(llm)


def test_prefix_cache_hits(tiny, async_scheduling, reference):
    llm = make_llm(tiny[0], async_scheduling, enable_prefix_caching=True)
    first = run(llm, PREFIX_PROMPTS[:1])
    outs = llm.generate([{"prompt_token_ids": p} for p in PREFIX_PROMPTS], greedy(), use_tqdm=False)
    assert first == reference[len(PROMPTS): len(PROMPTS) + 1]
    assert [o.outputs[0].token_ids for o in outs] == reference[len(PROMPTS):]
    # The shared 36-token prefix holds two whole blocks of 16 tokens.
    assert all(o.num_cached_tokens == 32 for o in outs)
    assert_all_blocks_free(llm)


def test_forced_preemption_tiny_cache(tiny, async_scheduling, reference):
    # 6 blocks of 16 tokens cannot hold all six requests at once: some are preempted and
    # recomputed, and must still produce the same tokens.
    llm = make_llm(tiny[0], async_scheduling, num_gpu_blocks_override=6, max_model_len=96,
                   enable_prefix_caching=False)
    assert run(llm, PROMPTS) == reference[: len(PROMPTS)]
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_preemption_with_prefix_cache_and_chunks(tiny, async_scheduling, reference):
    llm = make_llm(tiny[0], async_scheduling, num_gpu_blocks_override=7, max_model_len=112,
                   max_num_batched_tokens=9)
    assert run(llm, PROMPTS + PREFIX_PROMPTS) == reference
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_n_greater_than_one_shares_prompt_blocks(tiny, async_scheduling, reference):
    llm = make_llm(tiny[0], async_scheduling)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(n=3), use_tqdm=False)
    for out, ref in zip(outs, reference):
        assert [c.token_ids for c in out.outputs] == [ref] * 3
        assert [c.index for c in out.outputs] == [0, 1, 2]
    assert_all_blocks_free(llm)


def test_n_sampling_with_seed_is_reproducible_and_varied(tiny, async_scheduling):
    llm = make_llm(tiny[0], async_scheduling)
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=4, seed=123)
    a = llm.generate([{"prompt_token_ids": PROMPTS[2]}], params, use_tqdm=False)[0]
    # Same seed, different company in the batch: same samples.
    b = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params] * len(PROMPTS), use_tqdm=False)[2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1   # the n samples differ
    assert_all_blocks_free(llm)


def test_copy_on_write_keeps_siblings_apart(tiny, async_scheduling):
    """A prompt ending mid-block: the samples share that block and must copy it before writing.
    Each sample's reported logprobs must equal a fresh recompute of its own sequence, which
    fails if one sample's keys and values leak into another's."""
    llm = make_llm(tiny[0], async_scheduling)
    prompt = list(range(50, 70))    # 20 tokens: the second block is partial
    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, n=3, seed=7, logprobs=0)
    together = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in together.outputs}) == 3
    for c in together.outputs:
        check = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        alone = llm.generate([{"prompt_token_ids": prompt + c.token_ids}], check, use_tqdm=False)[0]
        recomputed = [alone.prompt_logprobs[len(prompt) + i][t].logprob for i, t in enumerate(c.token_ids)]
        reported = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
        assert recomputed == pytest.approx(reported, abs=1e-4)
    assert_all_blocks_free(llm)


def test_seed_independent_of_batch(tiny, async_scheduling):
    llm = make_llm(tiny[0], async_scheduling)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=42, ignore_eos=True)
    alone = run(llm, [PROMPTS[1]], params)
    mixed = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                         [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)] * 1 + [params]
                         + [SamplingParams(temperature=0.5, max_tokens=5, ignore_eos=True)] * 4, use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone[0]
