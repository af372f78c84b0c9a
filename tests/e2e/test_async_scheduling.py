"""Async scheduling (step N+1 scheduled and launched before step N's tokens are known) must give
what the synchronous engine gives: the same tokens, logprobs, finish reasons and stop reasons,
whatever finishes a request and at whichever step, and every KV block back at the end. The HF
comparison of plain greedy decoding in both modes lives in test_engine_equivalence.py."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_tiny_model, make_tiny_model_with_default_tokenizer

from strata import LLM, SamplingParams
from strata.sampling_params import RequestOutputKind

PROMPTS = [
    [5, 17, 33, 101, 7],
    [9] * 13 + [44, 45],
    list(range(3, 40)),
    [300, 301, 302],
    list(range(100, 150)),
    [8],
    list(range(200, 236)) + [7, 8, 9],
    list(range(200, 236)) + [11],
]
MAX_NEW = 12
CONFIGS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 7, "enable_prefix_caching": False},
    # 8 blocks of 16 tokens hold about half of the batch: requests are preempted and recomputed.
    "preempt": {"num_gpu_blocks_override": 8, "max_model_len": 128, "max_num_batched_tokens": 24},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def greedy_tokens(tiny):
    llm = LLM(str(tiny), skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), params, use_tqdm=False)]


def prompts(ids=PROMPTS):
    return [{"prompt_token_ids": p} for p in ids]


def make_llm(path, async_scheduling, **kw):
    # A fixed KV cache: on a GPU the default plan gives one engine most of the card, and these
    # tests keep a sync and an async engine alive at once.
    kw.setdefault("kv_cache_memory", "64MiB")
    return LLM(str(path), skip_tokenizer_init=True, async_scheduling=async_scheduling, **kw)


def assert_all_blocks_free(llm):
    sched = llm.llm_engine.scheduler
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.kv.num_free_blocks == sched.kv.num_blocks and not sched.kv.req_blocks
    assert all(r not in sched.requests for r in llm.llm_engine.executor.runner.states)


def summary(outputs):
    """What must not depend on the scheduling mode; logprobs to float rounding, since the batch
    around a request differs between the modes."""
    rows = []
    for out in outputs:
        for c in out.outputs:
            logprobs = None if c.logprobs is None else [
                {t: round(lp.logprob, 4) for t, lp in entry.items()} for entry in c.logprobs]
            rows.append((out.request_id, c.index, c.token_ids, c.finish_reason, c.stop_reason, logprobs))
        if out.prompt_logprobs is not None:
            rows.append([None if e is None else {t: round(lp.logprob, 4) for t, lp in e.items()}
                         for e in out.prompt_logprobs])
    return rows


def mixed_params(greedy_tokens):
    """Per prompt, a different way (and step) to finish, and every sampling feature that reads the
    tokens sampled before: penalties, min_tokens, seeds, logprobs, n > 1."""
    g = greedy_tokens
    return [
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[g[1][4]], logprobs=3),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[g[2][1]], min_tokens=4,
                       presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=MAX_NEW, seed=11, ignore_eos=True,
                       repetition_penalty=1.3, logprobs=1),
        SamplingParams(temperature=1.0, max_tokens=7, seed=5, n=3, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.5,
                       frequency_penalty=-0.5),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[g[7][0]], ignore_eos=True),
    ]


@pytest.mark.parametrize("config", CONFIGS)
def test_mixed_finishes_and_sampling_features_match_sync(tiny, greedy_tokens, config):
    params = mixed_params(greedy_tokens)
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(tiny, async_scheduling, **CONFIGS[config])
        results[async_scheduling] = summary(llm.generate(prompts(), params, use_tqdm=False))
        assert_all_blocks_free(llm)
        if config == "preempt":
            assert llm.llm_engine.scheduler.num_preemptions > 0
    assert results[True] == results[False]
    reasons = [row[3] for row in results[True] if isinstance(row, tuple)]
    assert "stop" in reasons and "length" in reasons


def test_streamed_outputs_match_sync_step_for_step(tiny, greedy_tokens):
    """Cumulative outputs: async delivers the same sequence of outputs, one step later."""
    streams = {}
    for async_scheduling in (False, True):
        engine = make_llm(tiny, async_scheduling).llm_engine
        for i, params in enumerate(mixed_params(greedy_tokens)):
            params = params.clone()
            params.output_kind = RequestOutputKind.CUMULATIVE
            engine.add_request(str(i), prompts()[i], params)
        seen = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen.setdefault(out.request_id, []).append(
                    ([c.token_ids for c in out.outputs], out.finished))
        streams[async_scheduling] = seen
    assert streams[True] == streams[False]


def run_with_aborts(path, async_scheduling, config):
    """Run the batch, aborting two requests (one of them n=2) after a few steps; returns the
    outputs by request id."""
    llm = make_llm(path, async_scheduling, **config)
    engine = llm.llm_engine
    for i, ids in enumerate(PROMPTS):
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, n=2 if i == 4 else 1)
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
        steps += 1
        if steps == 4:
            for rid in ("2", "4"):
                outs[rid] = engine.abort_request(rid)
    assert_all_blocks_free(llm)
    return outs


@pytest.mark.parametrize("config", ["default", "preempt"])
def test_abort_mid_stream(tiny, greedy_tokens, config):
    for async_scheduling in (False, True):
        outs = run_with_aborts(tiny, async_scheduling, CONFIGS[config])
        for rid, out in outs.items():
            ref = greedy_tokens[int(rid)]
            for c in out.outputs:
                if rid in ("2", "4"):
                    assert c.finish_reason == "abort" and c.token_ids == ref[: len(c.token_ids)]
                    assert len(c.token_ids) < MAX_NEW
                else:
                    assert c.token_ids == ref and c.finish_reason == "length"


def test_request_id_reused_while_its_last_step_is_in_flight(tiny, greedy_tokens):
    """A request ends (stop token) while the step after is in flight; its id is admitted again at
    once. The new request must get none of the old one's tokens."""
    engine = make_llm(tiny, True).llm_engine
    stop = greedy_tokens[0][2]
    engine.add_request("x", prompts()[0], SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                         stop_token_ids=[stop]))
    engine.add_request("other", prompts()[2], SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                             ignore_eos=True))
    outs = {}
    reused = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "x" and out.finished and not reused:
                assert out.outputs[0].token_ids == greedy_tokens[0][: greedy_tokens[0].index(stop) + 1]
                engine.add_request("x", prompts()[3], SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                                     ignore_eos=True))
                reused = True
            elif out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    assert reused
    assert outs == {"x": greedy_tokens[3], "other": greedy_tokens[2]}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random model with the default model's real tokenizer, for stop strings."""
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("smol_tiny")
    make_tiny_model_with_default_tokenizer(path)
    return path


def test_stop_strings_match_sync(text_model):
    texts = ["The capital of France is", "Hello, my name is", "1, 2, 3,", "Once upon a time"]
    sync = LLM(str(text_model))
    full = sync.generate(texts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    params = []
    for i, out in enumerate(full):
        text = out.outputs[0].text
        # A stop string from a different place of each continuation: requests stop at different steps.
        start = min(len(text) - 3, 2 + 5 * i)
        params.append(SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                     stop=[text[start: start + 3]], include_stop_str_in_output=i % 2 == 1))
    results = {}
    for async_scheduling in (False, True):
        llm = LLM(str(text_model), async_scheduling=async_scheduling)
        outs = llm.generate(texts, params, use_tqdm=False)
        results[async_scheduling] = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason,
                                      o.outputs[0].stop_reason) for o in outs]
        assert_all_blocks_free(llm)
    assert results[True] == results[False]
    assert sum(r[2] == "stop" for r in results[True]) >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host<->device syncs exist only on a GPU")
def test_decode_steps_never_wait_for_the_gpu(tiny):
    """The point of async scheduling: between launching step N+1 and finishing step N the host
    must not wait for queued device work. A hidden sync (a Python-list index on a CUDA tensor, a
    copy from pageable memory) silently turns the engine synchronous again, so decode steps,
    greedy and seeded, run here under torch's sync debug mode set to raise."""
    llm = make_llm(tiny, True, dtype="float32", kv_cache_memory=1 << 28)
    engine = llm.llm_engine
    engine.add_request("greedy", {"prompt_token_ids": PROMPTS[2]},
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.add_request("seeded", {"prompt_token_ids": PROMPTS[0]},
                       SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True))
    for _ in range(4):                     # prefill and the first decodes: uploads may pin memory
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)
