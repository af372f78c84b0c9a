"""The OpenAI-compatible server against the official openai client and raw HTTP, on the
default model: texts equal LLM.generate with the same parameters; errors use OpenAI's body."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server_fixture import LiveServer
from strata import LLM, SamplingParams

openai = pytest.importorskip("openai")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm():
    return LLM(use_tqdm_on_load=False, kv_cache_memory="256MiB", max_model_len=512, max_waiting=200)


@pytest.fixture(scope="module")
def server():
    # The server drives its own engine from its own thread; `llm` (a second engine on the same
    # model) computes the offline references, so no engine is ever stepped from two threads.
    srv = LiveServer(LLM(use_tqdm_on_load=False, kv_cache_memory="256MiB", max_model_len=512, max_waiting=200))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def offline(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.base_url + "/version").json()


def test_completion_matches_offline(server, client, llm):
    resp = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0)
    ref = offline(llm, PROMPT, temperature=0, max_tokens=12)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids) and resp.usage.completion_tokens == 12
    assert server.wait_idle()


def test_completion_stream_matches_offline(server, client, llm):
    stream = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline(llm, PROMPT, temperature=0, max_tokens=12).outputs[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_matches_offline_and_streams(server, client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == ref.outputs[0].text


def test_n2_stop_seed(server, client, llm):
    resp = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=10, n=2, temperature=0.9,
                                     seed=7)
    again = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=10, n=2, temperature=0.9,
                                      seed=7)
    assert [c.text for c in resp.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in resp.choices) == [0, 1]
    ref = offline(llm, PROMPT, max_tokens=10, n=2, temperature=0.9, seed=7)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [c.text for c in ref.outputs]
    greedy = offline(llm, PROMPT, temperature=0, max_tokens=12).outputs[0].text
    word = greedy.split()[1]
    stopped = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0, stop=[word])
    assert stopped.choices[0].text == greedy[: greedy.index(word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs_formats(server, client):
    resp = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) >= 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.token == c.top_logprobs[0].token for c in content)   # greedy picks the top token


def test_streamed_logprobs_offsets_continue_across_chunks(server, client):
    """text_offset is a position in the whole text, as in a non-streamed response: it must not
    restart at 0 in every chunk."""
    whole = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    offsets, tokens = [], []
    for chunk in client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0,
                                           logprobs=1, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            offsets += chunk.choices[0].logprobs.text_offset
            tokens += chunk.choices[0].logprobs.tokens
    assert tokens == whole.choices[0].logprobs.tokens
    assert offsets == whole.choices[0].logprobs.text_offset


def test_echo_and_token_prompts(server, client, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    resp = client.completions.create(model="smollm2", prompt=[ids, ids], max_tokens=3, temperature=0, echo=True)
    assert len(resp.choices) == 2 and all(c.text.startswith(PROMPT) for c in resp.choices)


def post(server, path, body, **kw):
    return httpx.post(server.base_url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=60, **kw)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 7}, 400, "top_p"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens"),
    ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ({"prompt": "hi " * 600}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": [], "max_tokens": 5}, 400, "prompt"),
    ({"prompt": "hi", "logit_bias": {"999999": 5}}, 400, None),
])
def test_bad_input_gets_openai_error(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    if param:
        assert param in (err["param"] or "") or param in err["message"]
    assert server.wait_idle()


def test_prompt_too_long_names_both_numbers(server):
    r = post(server, "/v1/completions", {"prompt": "hi " * 600})
    msg = r.json()["error"]["message"]
    assert "512" in msg and "600" in msg or "601" in msg


def test_malformed_json_and_missing_fields(server):
    assert post(server, "/v1/completions", b"{not json").status_code == 400
    assert post(server, "/v1/chat/completions", {"messages": []}).status_code == 400
    assert post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}).status_code == 400
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_disconnect_mid_stream_frees_blocks(server, llm):
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break   # leaving the block closes the connection mid-stream
    assert server.wait_idle(timeout=10), "blocks not returned after the client left"


def test_async_engine_generate_streams_and_aborts_when_left(server, llm):
    # AsyncEngine.generate, the API for callers other than the HTTP server, on the server's engine.
    import asyncio

    async def run(max_tokens: int, keep: int | None):
        outs = []
        async for out in server.engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       ignore_eos=True)):
            outs.append(out)
            if keep is not None and len(outs) == keep:
                break   # a caller that leaves early
        return outs

    outs = asyncio.run(run(6, None))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].text == offline(llm, PROMPT, temperature=0, max_tokens=6,
                                               ignore_eos=True).outputs[0].text
    assert len(asyncio.run(run(400, 2))) == 2
    assert server.wait_idle(timeout=10), "leaving generate() early did not abort the request"


def test_metrics_exported(server, client):
    client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("strata:time_to_first_token_seconds_bucket", "strata:time_per_output_token_seconds_count",
                 "strata:e2e_request_latency_seconds_sum", "strata:request_queue_time_seconds_count",
                 "strata:num_requests_running", "strata:num_requests_waiting", "strata:kv_cache_usage_perc",
                 "strata:prefix_cache_hit_rate", "strata:num_preemptions",
                 "strata:prompt_tokens_total", "strata:generation_tokens_total"):
        assert name in text, name


def test_concurrent_streams_all_complete(server, llm):
    n = 64
    results = [None] * n

    def worker(i):
        with httpx.stream("POST", server.base_url + "/v1/completions", timeout=300,
                          json={"prompt": f"Count to {i}:", "max_tokens": 8, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as r:
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    text += "".join(c["text"] for c in chunk["choices"])
            results[i] = text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert time.time() - start < 300
    for i in (0, 17, 63):
        assert results[i] == offline(llm, f"Count to {i}:", max_tokens=8, temperature=0, ignore_eos=True).outputs[0].text
    assert all(r is not None for r in results)
    assert server.wait_idle()


def test_api_key_required_on_v1_only():
    # Its own engine: two servers must never step one engine from two threads.
    srv = LiveServer(LLM(use_tqdm_on_load=False, kv_cache_memory="64MiB", max_model_len=256), api_key="sekret")
    try:
        assert httpx.get(srv.base_url + "/v1/models").status_code == 401
        ok = httpx.get(srv.base_url + "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.get(srv.base_url + "/health").status_code == 200
    finally:
        srv.stop()


def test_full_waiting_queue_is_503():
    small = LLM(use_tqdm_on_load=False, kv_cache_memory="64MiB", max_model_len=256, max_num_seqs=1, max_waiting=1)
    srv = LiveServer(small)
    try:
        body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()                     # kept: dropping it closes the stream
            next(lines)                                      # the first request is running
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as waiting:
                time.sleep(0.5)                              # the second waits behind it
                third = post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
                assert third.status_code == 503, third.text
                assert third.json()["error"]["code"] == 503
        assert srv.wait_idle()
    finally:
        srv.stop()
