"""Tensor and pipeline parallelism on the CPU (gloo, one process per rank): greedy tokens equal
to one process, with batching, chunked prefill (a 32-token budget) and prefix caching on. The
Llama TP=2 engine runs with async scheduling (every rank samples its own tokens, the engine
launches step N+1 before step N's tokens are back), the Qwen3 one synchronously.

Starting worker processes is slow on a small machine (each imports torch), so each model gets
one engine per module. The 4-process TP=2 x PP=2 test runs outside CI only (CI has 2 cores)."""

from __future__ import annotations

import os

import pytest
from hf_tiny import make_tiny_model

from strata import LLM, SamplingParams

PROMPTS = [
    [5, 17, 33, 101, 7],
    [9] * 13 + [44, 45],
    list(range(3, 40)),            # longer than the 32-token budget: chunked
    [300, 301, 302],
    [8],
]
# Two prompts sharing a 36-token prefix (two full blocks of 16): the second run hits the cache.
SHARED = list(range(200, 236))
PREFIX_PROMPTS = [SHARED + [7, 8, 9], SHARED + [11]]
MAX_NEW = 8
ENGINE = dict(skip_tokenizer_init=True, use_tqdm_on_load=False, max_num_batched_tokens=32,
              enable_prefix_caching=True, enable_chunked_prefill=True)


def greedy(**kw):
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def run(llm, prompts, params=None):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params or greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def reference(path):
    llm = LLM(str(path), **ENGINE)
    tokens = run(llm, PROMPTS + PREFIX_PROMPTS)
    logprobs = llm.generate([{"prompt_token_ids": PROMPTS[2]}], greedy(logprobs=2, prompt_logprobs=1),
                            use_tqdm=False)[0]
    return tokens, logprobs


def check_matches(llm, ref):
    tokens, ref_lp = ref
    assert run(llm, PROMPTS + PREFIX_PROMPTS) == tokens
    assert run(llm, PREFIX_PROMPTS) == tokens[-2:]          # prefix-cache hits
    sched = llm.llm_engine.scheduler
    assert sched.kv.num_free_blocks == sched.kv.num_blocks  # every block back
    out = llm.generate([{"prompt_token_ids": PROMPTS[2]}], greedy(logprobs=2, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_lp.outputs[0].token_ids
    for got, want in zip(out.outputs[0].logprobs, ref_lp.outputs[0].logprobs):
        assert got.keys() == want.keys()
        for tok in got:
            assert got[tok].logprob == pytest.approx(want[tok].logprob, abs=1e-4)
    for got, want in zip(out.prompt_logprobs[1:], ref_lp.prompt_logprobs[1:]):
        assert {t: round(lp.logprob, 3) for t, lp in got.items()} == pytest.approx(
            {t: round(lp.logprob, 3) for t, lp in want.items()}, abs=2e-3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)            # 4 heads, 2 KV heads: one KV head per rank
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    # One KV head for two ranks: replicated. Tied embeddings, q/k norms.
    make_tiny_model("qwen3", path, num_key_value_heads=1)
    return path


def start(path, **kw):
    llm = LLM(str(path), **ENGINE, **kw)
    return llm


# 6 KV blocks of 16 tokens: the batches below do not fit, so requests are preempted and
# recomputed while their last token is still only on the ranks' devices.
SMALL_CACHE = dict(num_gpu_blocks_override=6, max_model_len=96)


@pytest.fixture(scope="module")
def llama_tp2_async(llama):
    llm = start(llama, tensor_parallel_size=2, async_scheduling=True, **SMALL_CACHE)
    yield llm
    llm.llm_engine.shutdown()


def seeded_random_matches(llm, path):
    """n > 1 and seeded random sampling: each rank draws the same tokens as one process."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_NEW, n=2, ignore_eos=True)
    one = LLM(str(path), **ENGINE).generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    two = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    assert [c.token_ids for c in two[0].outputs] == [c.token_ids for c in one[0].outputs]


def test_tp2_llama_async_matches_one_process(llama, llama_tp2_async):
    ref = reference(llama)
    line = llama_tp2_async.llm_engine.describe()
    assert "tensor parallel 2 x pipeline parallel 1 (gloo" in line and "every rank samples" in line
    assert "async scheduling" in line and "all-reduce: GLOO (CPU ranks)" in line
    executor = llama_tp2_async.llm_engine.executor
    seen = {"most_in_flight": 0, "checked": 0}
    finish, check = executor.finish, executor._check_same_tokens

    def finish_spy(handle):
        seen["most_in_flight"] = max(seen["most_in_flight"], len(executor._in_flight))
        return finish(handle)

    def check_spy(handle, replies):
        seen["checked"] += isinstance(replies[1], dict)   # rank 1's own tokens, compared
        return check(handle, replies)

    executor.finish, executor._check_same_tokens = finish_spy, check_spy
    try:
        check_matches(llama_tp2_async, ref)
    finally:
        del executor.finish, executor._check_same_tokens
    assert seen["most_in_flight"] == 2 and seen["checked"] > 10   # step N+1 launched before N finished
    seeded_random_matches(llama_tp2_async, llama)


def mixed_params(greedy_tokens):
    """Per prompt another way (and step) to finish, and the sampling features that read the tokens
    sampled before, which each rank must know without being told: penalties, min_tokens, seeds."""
    g = greedy_tokens
    return [
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[g[1][4]], logprobs=3),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[g[2][1]], min_tokens=4,
                       presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=MAX_NEW, seed=11, ignore_eos=True,
                       repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, max_tokens=5, seed=5, n=3, ignore_eos=True),
    ]


def finishes(outputs):
    return [(c.index, c.token_ids, c.finish_reason, c.stop_reason)
            for o in outputs for c in o.outputs]


def test_tp2_async_sampling_features_and_preemption_match_one_process(llama, llama_tp2_async):
    prompts = PROMPTS + PREFIX_PROMPTS
    one_llm = LLM(str(llama), **ENGINE, **SMALL_CACHE)
    params = mixed_params(run(one_llm, prompts))
    one = one_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    scheduler = llama_tp2_async.llm_engine.scheduler
    preemptions = scheduler.num_preemptions
    two = llama_tp2_async.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert finishes(two) == finishes(one)
    assert {row[2] for row in finishes(two)} == {"stop", "length"}
    assert scheduler.num_preemptions > preemptions
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks
    # Unseeded random rows: every rank draws from the same random state (the engine checks the
    # ranks' tokens agree at every step and would raise WorkerFailure otherwise).
    out = llama_tp2_async.generate([{"prompt_token_ids": PROMPTS[1]}],
                                   SamplingParams(temperature=1.0, n=3, max_tokens=MAX_NEW, ignore_eos=True),
                                   use_tqdm=False)
    assert [len(c.token_ids) for c in out[0].outputs] == [MAX_NEW] * 3


def test_tp2_async_abort_mid_stream(llama, llama_tp2_async):
    """Aborts while a step is in flight on the ranks: the others' tokens are unchanged."""
    ref = run(LLM(str(llama), **ENGINE, **SMALL_CACHE), PROMPTS)
    engine = llama_tp2_async.llm_engine
    for i, ids in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": ids}, greedy())
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
        steps += 1
        if steps == 4:
            outs["abort-1"] = engine.abort_request("abort-1")
    for i, want in enumerate(ref):
        got = outs[f"abort-{i}"].outputs[0]
        if i == 1:
            assert got.finish_reason == "abort" and got.token_ids == want[: len(got.token_ids)]
        else:
            assert got.token_ids == want
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    # A call to every rank while the last step is still in flight: its answer is taken first and
    # kept for the engine's next step, which then runs on as before.
    assert engine._in_flight is not None
    assert len(set(engine.executor.call("fingerprint").values())) == 1
    assert run(llama_tp2_async, PROMPTS[:2]) == ref[:2]


def test_ranks_that_sample_other_tokens_are_named():
    """The engine's check of the ranks' tokens, without processes: rank 1 drew another token."""
    from strata.core.sched_output import RunnerOutput
    from strata.executor.multiproc import MultiprocExecutor, WorkerFailure

    executor = MultiprocExecutor.__new__(MultiprocExecutor)
    executor.driver = 0

    def fail(what, first_error=None):
        raise WorkerFailure(what)

    executor._fail = fail
    replies = {0: RunnerOutput({"a": [5], "b": []}), 1: {"a": [5], "b": []}}
    executor._check_same_tokens("step 3", replies)
    replies[1] = {"a": [6], "b": []}
    with pytest.raises(WorkerFailure, match=r"step 3: rank 1 sampled \[6\] for request 'a' where the "
                                            r"driver \(rank 0\) sampled \[5\]"):
        executor._check_same_tokens("step 3", replies)


def test_tp2_qwen3_replicated_kv_head_matches_one_process(qwen3):
    ref = reference(qwen3)
    llm = start(qwen3, tensor_parallel_size=2)
    try:
        llm.start_profile()   # every rank profiles its own steps
        check_matches(llm, ref)
        tables = llm.stop_profile()
        assert sorted(tables) == [0, 1] and all("aten::" in t for t in tables.values())
        seeded_random_matches(llm, qwen3)
    finally:
        llm.llm_engine.shutdown()


def test_pp2_matches_one_process(llama):
    ref = reference(llama)
    llm = start(llama, pipeline_parallel_size=2)
    try:
        assert "tensor parallel 1 x pipeline parallel 2" in llm.llm_engine.describe()
        check_matches(llm, ref)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.skipif(bool(os.environ.get("CI")), reason="4 processes: too slow for CI's 2 cores")
def test_tp2_pp2_matches_one_process(qwen3):
    ref = reference(qwen3)
    llm = start(qwen3, tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        check_matches(llm, ref)
    finally:
        llm.llm_engine.shutdown()


def test_bad_layouts_fail_before_any_process_starts(llama):
    with pytest.raises(ValueError, match="tensor_parallel_size \\(3\\) must divide"):
        LLM(str(llama), **ENGINE, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size \\(3\\) is more than"):
        LLM(str(llama), **ENGINE, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="async_scheduling needs pipeline_parallel_size = 1"):
        LLM(str(llama), **ENGINE, pipeline_parallel_size=2, async_scheduling=True)
    with pytest.raises(ValueError, match="all_reduce must be 'auto' or 'nccl', got 'nvls'"):
        LLM(str(llama), **ENGINE, tensor_parallel_size=2, all_reduce="nvls")


TORCHRUN_SCRIPT = """
import json, sys
from strata import LLM, SamplingParams
llm = LLM(sys.argv[1], skip_tokenizer_init=True, use_tqdm_on_load=False, max_num_batched_tokens=32,
          pipeline_parallel_size=2)
prompts = json.loads(sys.argv[2])
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
llm.llm_engine.shutdown()
"""


@pytest.mark.skipif(bool(os.environ.get("CI")), reason="torchrun starts 3 more interpreters: too slow for CI")
def test_torchrun_ranks_match_one_process(llama, tmp_path):
    """The multi-machine path on one machine: torchrun starts both ranks, rank 0 runs the engine
    and rank 1 (the driver, last pipeline stage) serves its steps, then both exit."""
    import json
    import subprocess
    import sys
    ref, _ = reference(llama)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    prompts = PROMPTS + PREFIX_PROMPTS
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(script), str(llama), json.dumps(prompts)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("TOKENS"))
    assert json.loads(line.removeprefix("TOKENS ")) == ref


@pytest.mark.skipif(bool(os.environ.get("CI")), reason="3 processes loading SmolLM2: too slow for CI")
def test_gguf_tp3_matches_one_process():
    """The default SmolLM2-135M Q4_1 GGUF: 9 heads and 3 KV heads over 3 ranks, each rank taking
    its rows (column parallel) or 32-wide block columns (row parallel) of the packed blocks."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    one = [o.outputs[0].text for o in LLM(use_tqdm_on_load=False).generate(prompts, params, use_tqdm=False)]
    llm = LLM(use_tqdm_on_load=False, tensor_parallel_size=3)
    try:
        assert "kept packed" in llm.llm_engine.describe()
        assert [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)] == one
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.skipif(bool(os.environ.get("CI")), reason="another 2-process engine: too slow for CI")
def test_tp2_int8_at_load_matches_one_process(llama):
    """Row-parallel shards take each channel's scale from its whole row (an all-reduce of the
    row maxima) and the LM head is quantized per vocabulary slice: the same codes as one process."""
    kw = dict(ENGINE, quantization="int8")
    one = run(LLM(str(llama), **kw), PROMPTS + PREFIX_PROMPTS)
    llm = LLM(str(llama), **kw, tensor_parallel_size=2)
    try:
        assert "LM head quantized" in llm.llm_engine.describe()
        assert run(llm, PROMPTS + PREFIX_PROMPTS) == one
    finally:
        llm.llm_engine.shutdown()
    # int4 groups straddling two ranks' columns would change the codes: refused, naming the rank
    # (either: both hit it, and the first to report wins).
    with pytest.raises(ValueError, match="rank [01]: int4 groups of 128 do not tile this rank's 32 inputs"):
        LLM(str(llama), **dict(ENGINE, quantization="int4"), tensor_parallel_size=2)
