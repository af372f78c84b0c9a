"""Data parallelism on the CPU: two replicas (a process and a thread each) give the tokens one
engine gives, with batching, chunked prefill and prefix caching on; requests spread over both;
every KV block of finished and aborted requests comes back; bad input fails at add_request and
loses nothing; the OpenAI server runs on replicas; a replica that dies ends the engine with an
error naming it."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hf_tiny import make_tiny_model, make_tiny_model_with_default_tokenizer

from strata import LLM, SamplingParams
from strata.core.scheduler import RequestRejected
from strata.engine.data_parallel import DataParallelEngine
from strata.executor.executor import WorkerFailure

PROMPTS = [
    [5, 17, 33, 101, 7],
    [9] * 13 + [44, 45],
    list(range(3, 40)),            # longer than the 32-token budget: chunked
    [300, 301, 302],
    [8],
    list(range(200, 236)) + [7, 8, 9],
    list(range(200, 236)) + [11],  # shares two full blocks with the one before: a prefix hit
]
ENGINE = dict(skip_tokenizer_init=True, use_tqdm_on_load=False, max_num_batched_tokens=32,
              enable_prefix_caching=True, enable_chunked_prefill=True)


def run(llm, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def greedy():
    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def sampled():
    # Seeded: the tokens depend on the request alone, not on which engine or batch ran it.
    return [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, ignore_eos=True, n=2, seed=i)
            for i in range(len(PROMPTS))]


def blocks_in_use(engine: DataParallelEngine) -> list[int]:
    return [s.kv_blocks_used for s in engine.replica_stats()]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def reference(llama):
    llm = LLM(str(llama), **ENGINE)
    return run(llm, greedy()), run(llm, sampled())


@pytest.fixture(scope="module")
def dp(llama):
    llm = LLM(str(llama), data_parallel_size=2, **ENGINE)
    yield llm
    llm.llm_engine.shutdown()


def test_replicas_give_one_engines_tokens(dp, reference):
    engine = dp.llm_engine
    assert isinstance(engine, DataParallelEngine)
    assert run(dp, greedy()) == reference[0]
    assert run(dp, sampled()) == reference[1]
    assert all(r.num_requests > 0 for r in engine.replicas)        # both replicas served
    assert blocks_in_use(engine) == [0, 0]                          # every block back
    assert sum(s.prefix_hits for s in engine.replica_stats()) > 0   # the shared prefix was reused
    assert "data parallel: 2 replicas" in engine.describe() and "CPU, 1 thread" in engine.describe()


def test_abort_frees_blocks_and_reports_nothing_more(dp):
    engine = dp.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in PROMPTS[:4]]
    seen: dict[str, int] = {}
    while len(seen) < len(ids):      # every request has produced a token
        for out in engine.step():
            seen[out.request_id] = len(out.outputs[0].token_ids)
    engine.abort_request(ids[0])
    engine.abort_request(ids[3])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in (ids[0], ids[3]), "an aborted request was reported"
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {ids[1], ids[2]}
    assert all(len(o.outputs[0].token_ids) == 60 for o in finished.values())
    assert blocks_in_use(engine) == [0, 0]


def test_bad_input_fails_at_add_and_the_replicas_keep_serving(dp, reference):
    engine = dp.llm_engine
    limit = engine.scheduler_config.max_model_len
    with pytest.raises(RequestRejected, match=f"the prompt has {limit + 4} tokens.*holds {limit}"):
        dp.generate([{"prompt_token_ids": [3] * (limit + 4)}], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        dp.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": [10**7]}], greedy(), use_tqdm=False)
    assert not engine.has_unfinished_requests()          # the batch's good prompt was not admitted
    assert run(dp, greedy()) == reference[0]
    assert blocks_in_use(engine) == [0, 0]


def test_invalid_options_are_named(llama):
    with pytest.raises(ValueError, match="data_parallel_size must be an int >= 1, got 0"):
        LLM(str(llama), data_parallel_size=0, **ENGINE)
    with pytest.raises(ValueError, match="offloading .* runs one engine"):
        LLM(str(llama), data_parallel_size=2, cpu_memory_budget="1GiB", **ENGINE)
    with pytest.raises(ValueError, match="leave them at 1"):
        LLM(str(llama), parallel="auto", data_parallel_size=2, **ENGINE)


def test_parallel_auto_runs_the_replicas_it_chooses(llama, monkeypatch):
    from strata.distributed.auto import Layout
    from strata.engine import engine as engine_module
    monkeypatch.setattr(engine_module, "auto_layout", lambda *a: Layout(1, 1, 2, "a test's reason"))
    llm = LLM(str(llama), parallel="auto", goal="throughput", **ENGINE)
    try:
        assert isinstance(llm.llm_engine, DataParallelEngine) and len(llm.llm_engine.replicas) == 2
        assert "chosen by parallel=auto, goal throughput, because a test's reason" in llm.llm_engine.describe()
    finally:
        llm.llm_engine.shutdown()


def test_a_replica_that_dies_ends_the_engine_naming_it(llama):
    llm = LLM(str(llama), data_parallel_size=2, **ENGINE)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for p in PROMPTS[:4]:
        engine.add_request(None, {"prompt_token_ids": p}, params)
    for _ in range(3):
        engine.step()
    victim = engine.replicas[1]
    os.kill(victim.proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=f"data-parallel replica 1 \\(pid {victim.proc.pid}\\) exited"):
        while True:
            engine.step()
    assert time.monotonic() - start < 10
    assert all(r.proc.exitcode is not None for r in engine.replicas)   # the other one was stopped too
    assert not engine.has_unfinished_requests()
    with pytest.raises(WorkerFailure):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], greedy(), use_tqdm=False)


def test_a_replica_that_stops_responding_is_named_within_worker_timeout(llama):
    llm = LLM(str(llama), data_parallel_size=2, worker_timeout=2.0, **ENGINE)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for p in PROMPTS[:4]:
        engine.add_request(None, {"prompt_token_ids": p}, params)
    engine.step()
    victim = engine.replicas[0]
    os.kill(victim.proc.pid, signal.SIGSTOP)   # alive but silent: no exit, no EOF
    start = time.monotonic()
    try:
        with pytest.raises(WorkerFailure, match="data-parallel replica 0 .* has not responded for more than "
                                                "worker_timeout=2s"):
            while True:
                engine.step()
        assert time.monotonic() - start < 2.0 + 5
        assert all(r.proc.exitcode is not None for r in engine.replicas)
    finally:
        if victim.proc.exitcode is None:
            os.kill(victim.proc.pid, signal.SIGKILL)


def test_openai_server_on_replicas(tmp_path):
    import httpx
    from server_fixture import LiveServer
    make_tiny_model_with_default_tokenizer(tmp_path)
    prompt = "The capital of France is"
    want = LLM(str(tmp_path), use_tqdm_on_load=False).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    server = LiveServer(LLM(str(tmp_path), data_parallel_size=2, use_tqdm_on_load=False))
    try:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        for _ in range(3):   # spread over both replicas
            got = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()
            assert got["choices"][0]["text"] == want.outputs[0].text
        with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
        assert len(chunks) >= 5
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
        assert "strata:kv_cache_usage_perc" in metrics and "strata:num_requests_running" in metrics
        assert all(r.num_requests > 0 for r in server.llm.llm_engine.replicas)
    finally:
        server.stop()
