"""No input a client can send produces a 500 or stops the server.

A bounded schemathesis run over every operation of the server's own /openapi.json (valid and
invalid bodies alike), then targeted requests for the inputs most likely to reach code that
trusts them: token ids outside the vocabulary, lone surrogates, NaN, huge n and seeds, odd JSON
types and bodies, wrong methods and routes. After all of it the server must be healthy, still
generate, and hold no request and no KV block.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from server_fixture import LiveServer
from strata import LLM

schemathesis = pytest.importorskip("schemathesis", minversion="4")
hypothesis = pytest.importorskip("hypothesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = 40        # per operation and generation mode
# A valid request may ask for a long generation (n=128, max_tokens up to the context), which the
# CPU would spend minutes on: the client gives up after this many seconds, its disconnect aborts
# the request, and the end of the run checks that every aborted request gave its blocks back.
REQUEST_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(LLM(use_tqdm_on_load=False, kv_cache_memory="64MiB", max_model_len=256))
    yield srv
    srv.stop()


def assert_alive_and_idle(srv: LiveServer) -> None:
    assert srv.wait_idle(timeout=60), "requests or KV blocks left behind"
    assert srv.engine._thread.is_alive(), "the engine thread died"
    assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
    r = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    assert srv.wait_idle(timeout=60)


# ---- schemathesis over /openapi.json ---------------------------------------------------------
def _takes_input(operation) -> bool:
    return operation.body or any(True for _ in operation.iter_parameters())


def test_schemathesis_finds_no_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    timed_out: list[str] = []
    runs = 0
    start = time.time()
    for operation in operations:
        # Negative mode needs something to break; an operation without input has one valid call.
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if _takes_input(operation) else [
            GenerationMode.POSITIVE]
        for mode in modes:
            @settings(max_examples=MAX_EXAMPLES if _takes_input(operation) else 1, deadline=None,
                      derandomize=True, database=None, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal runs
                runs += 1
                try:
                    response = case.call(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S)
                except requests.exceptions.Timeout:
                    # A long but valid generation: the client left, so the server must have
                    # aborted it and must still answer at once.
                    timed_out.append(f"{case.operation.label} {case.body!r:.200}")
                    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
                    return
                case.validate_response(response, checks=[not_a_server_error])

            check()
    print(f"\nschemathesis: {runs} requests over {len(operations)} operations in {time.time() - start:.0f}s; "
          f"{len(timed_out)} long generations left after {REQUEST_TIMEOUT_S}s")
    assert_alive_and_idle(server)


# ---- targeted inputs ------------------------------------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def send(server, path, body, *, method="POST", headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if headers is None else headers
    return httpx.request(method, server.base_url + path, content=content, headers=headers, timeout=60)


def assert_openai_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status, err
    if param is not None:
        assert param in (err["param"] or "") or param in err["message"], err
    return err


@pytest.mark.parametrize("path, body, param", [
    # token ids the model has not got
    (C, {"prompt": [-1]}, "prompt"),
    (C, {"prompt": [49152 * 1000]}, "prompt"),
    (C, {"prompt": [[5, 6], [2 ** 70]]}, "prompt"),
    (C, {"prompt": "hi", "stop_token_ids": [10 ** 9]}, "stop_token_ids"),
    (C, {"prompt": "hi", "stop_token_ids": [-3]}, "stop_token_ids"),
    # logit_bias: keys are token ids, values in [-100, 100]
    (C, {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"-5": 1}}, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),   # isdigit() but not int()
    (C, {"prompt": "hi", "logit_bias": {"12": "x"}}, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"12": 1e308}}, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"99999999": 1}}, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": [1, 2]}, "logit_bias"),
    # odd JSON types and shapes
    (C, {"prompt": {"a": 1}}, "prompt"),
    (C, {"prompt": [[1, [2]]]}, "prompt"),
    (C, {"prompt": [1.5]}, "prompt"),
    (C, {"prompt": None}, "prompt"),
    (C, {"prompt": []}, "prompt"),
    (C, {"prompt": [[]]}, "prompt"),
    (C, {"prompt": ["a", ""]}, "prompt"),
    (C, {"prompt": ["a", [5, 6]]}, "prompt"),                           # strings and ids mixed
    (C, {"prompt": [True]}, None),
    (C, {"prompt": "hi", "max_tokens": [16]}, "max_tokens"),
    (C, {"prompt": "hi", "stream": {"yes": True}}, "stream"),
    (C, {"prompt": "hi", "stream_options": "usage"}, "stream_options"),
    (C, {"prompt": "hi", "stop": 5}, "stop"),
    (C, {"prompt": "hi", "stop": [["x"]]}, "stop"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [["user", "hi"]]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages"),
    # stop lists: no empty string, at most 64 entries
    (C, {"prompt": "hi", "stop": ""}, "stop"),
    (C, {"prompt": "hi", "stop": ["a", ""]}, "stop"),
    (C, {"prompt": "hi", "stop": [f"s{i}" for i in range(10_000)]}, "stop"),
    # counts and ranges
    (C, {"prompt": "hi", "n": 0}, "n"),
    (C, {"prompt": "hi", "n": 129}, "n"),
    (C, {"prompt": "hi", "n": 10 ** 30}, "n"),
    (CHAT, {"messages": HI, "n": 100_000}, "n"),
    (C, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 10 ** 20}, "max_tokens"),
    (CHAT, {"messages": HI, "max_completion_tokens": -1}, "max_tokens"),
    (C, {"prompt": "hi", "min_tokens": 50, "max_tokens": 2}, "min_tokens"),
    (C, {"prompt": "hi", "logprobs": -1}, "logprobs"),
    (C, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": HI, "top_logprobs": 3}, "top_logprobs"),          # without logprobs
    (C, {"prompt": "hi", "best_of": 3}, "best_of"),
    (C, {"prompt": "hi", "top_k": -7}, "top_k"),
    (C, {"prompt": "hi", "temperature": -0.5}, "temperature"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    (C, {"prompt": "hi", "seed": 1.5}, "seed"),
    (C, {"prompt": "hi", "seed": "7"}, None),   # pydantic may coerce; must not 500 either way
])
def test_bad_values_get_400_naming_the_parameter(server, path, body, param):
    r = send(server, path, body)
    if param is None:
        assert r.status_code < 500, r.text
    else:
        assert_openai_error(r, 400, param)


@pytest.mark.parametrize("raw, param", [
    # Python's json module reads NaN and Infinity; JSON has neither and the sampler must never see them
    (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"prompt": "hi", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "hi", "top_p": -Infinity}', "top_p"),
    (b'{"prompt": "hi", "presence_penalty": NaN}', "presence_penalty"),
    (b'{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    (b'{"prompt": "hi", "min_p": NaN}', "min_p"),
    (b'{"prompt": "hi", "logit_bias": {"12": -Infinity}}', "logit_bias"),
    # lone surrogates: valid JSON escapes, invalid Unicode; no tokenizer or UTF-8 body takes them
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    (b'{"prompt": ["ok", "x\\udfff"], "max_tokens": 2}', "prompt"),
    (b'{"prompt": "hi", "stop": ["\\ud800"]}', "stop"),
    (b'{"prompt": "hi", "model": "\\udbff"}', "model"),
    (b'{"prompt": "hi", "user": "\\ud800"}', "user"),
    (b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    (b'{"prompt": "hi", "logit_bias": {"\\ud800": "x"}}', "logit_bias"),   # the key is echoed in the path
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', "messages"),
    (b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages"),
])
def test_nan_and_lone_surrogates_get_400(server, raw, param):
    path = CHAT if b'"messages"' in raw else C
    assert_openai_error(send(server, path, raw), 400, param)


@pytest.mark.parametrize("raw, headers", [
    (b"", {"content-type": "application/json"}),
    (b"", {}),
    (b"null", {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b'"hi"', {"content-type": "application/json"}),
    (b"{not json", {"content-type": "application/json"}),
    (b'{"prompt": "hi"}{"prompt": "hi"}', {"content-type": "application/json"}),
    (b"\xff\xfe\x00", {"content-type": "application/json"}),
    (b'{"prompt": "\xff"}', {"content-type": "application/json"}),          # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, {"content-type": "application/json"}),
    (b'{"prompt": "hi", "max_tokens": 2}', {"content-type": "text/plain"}),
    (b'{"prompt": "hi", "max_tokens": 2}', {}),
    (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}),
    (b'{"prompt": "hi", "\\ud800": 1}', {"content-type": "application/json"}),
])
def test_bad_bodies_get_400(server, raw, headers):
    for path in (C, CHAT):
        assert_openai_error(send(server, path, raw, headers=headers), 400)


def test_wrong_method_and_unknown_route_use_openai_body(server):
    for method, path in [("GET", C), ("GET", CHAT), ("PUT", C), ("DELETE", "/health"), ("POST", "/v1/models")]:
        r = send(server, path, b"", method=method)
        err = assert_openai_error(r, 405)
        assert err["type"] == "MethodNotAllowedError"
        assert r.headers.get("allow"), "a 405 names the methods the route takes"
    for path in ("/nope", "/v1/nope", "/v1/completions/extra", "/v2/completions"):
        err = assert_openai_error(httpx.get(server.base_url + path), 404)
        assert err["type"] == "NotFoundError"
    assert_openai_error(send(server, "/v1/engines/x/completions", {"prompt": "hi"}), 404)


@pytest.mark.parametrize("path, body", [
    # seeds of any size or sign: torch takes 64 bits, the server masks instead of overflowing
    (C, {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, "seed": -1}),
    (C, {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, "seed": 2 ** 64}),
    (C, {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, "seed": -(2 ** 200)}),
    (CHAT, {"messages": HI, "max_tokens": 2, "temperature": 0.7, "seed": 10 ** 40, "n": 2}),
    # extremes inside the ranges
    (C, {"prompt": "hi", "max_tokens": 2, "temperature": 1e308}),
    (C, {"prompt": "hi", "max_tokens": 2, "temperature": 1e-300}),
    (C, {"prompt": "hi", "max_tokens": 2, "temperature": 2e-5, "seed": 3}),
    (C, {"prompt": "hi", "max_tokens": 2, "top_p": 1e-300, "temperature": 1.0}),
    (C, {"prompt": "hi", "max_tokens": 2, "min_p": 1.0, "temperature": 1.0}),
    (C, {"prompt": "hi", "max_tokens": 2, "top_k": 10 ** 12, "temperature": 1.0}),
    (C, {"prompt": "hi", "max_tokens": 2, "repetition_penalty": 1e-30, "temperature": 1.0}),
    (C, {"prompt": "hi", "max_tokens": 2, "repetition_penalty": 1e30}),
    (C, {"prompt": "hi", "max_tokens": 3, "logprobs": 20, "top_k": 1, "temperature": 1.0, "echo": True}),
    (C, {"prompt": "hi", "max_tokens": 3, "logit_bias": {str(i): -100 for i in range(2000)}, "logprobs": 5}),
    (C, {"prompt": "hi", "max_tokens": 3, "logit_bias": {"12": 100}, "logprobs": 0, "stream": True}),
    (CHAT, {"messages": HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 20, "top_k": 1,
            "temperature": 1.0, "stream": True}),
    (CHAT, {"messages": HI, "max_tokens": 3, "logprobs": True}),
    # the most stop strings allowed, long ones, and a match on the first character
    (C, {"prompt": "hi", "max_tokens": 8, "stop": [f"never{i}" * 50 for i in range(64)]}),
    (C, {"prompt": "hi", "max_tokens": 8, "stop": "x" * 100_000}),
    (C, {"prompt": "hi", "max_tokens": 8, "stop": [" ", "e", "a", "\n"], "include_stop_str_in_output": True}),
    # unicode in every string field
    (C, {"prompt": "h\u00e9llo \u4e16\u754c \U0001f600 \u0000 \u202e", "max_tokens": 2, "user": "\U0001f600\u0000",
         "stop": ["\U0001f600", "\u4e16"], "suffix": "\u00e9", "model": "smollm2"}),
    (CHAT, {"messages": [{"role": "system", "content": "\u0000\u202e\U0010ffff"},
                         {"role": "user", "content": "\U0001f600" * 20, "name": "\u4e16\u754c"}],
            "max_tokens": 2, "user": "\u00e9", "stop": "\U0001f600"}),
    # content as text parts, or none; every role; no generation prompt
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                       {"type": "text", "text": " there"}]}], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "user", "content": []}], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "user"}], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "user", "content": None}], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": r, "content": "x"} for r in ("developer", "system", "user", "assistant", "tool")],
            "max_tokens": 2, "add_generation_prompt": False}),
    (CHAT, {"messages": [{"role": "user", "content": "{{ raise_exception('x') }}{% for %}"}], "max_tokens": 2}),
    # stream_options without stream; unknown fields; n > 1 with echo and logprobs
    (C, {"prompt": "hi", "max_tokens": 2, "stream_options": {"include_usage": True}}),
    (CHAT, {"messages": HI, "max_tokens": 2, "stream_options": {"include_usage": True}, "stream": False}),
    (C, {"prompt": "hi", "max_tokens": 2, "tools": [{"x": 1}], "response_format": {"type": "json_object"},
         "\u00e9": {"nested": [[[[]]]]}}),
    (C, {"prompt": [[5, 6], [7]], "max_tokens": 2, "n": 3, "echo": True, "logprobs": 2, "temperature": 0.8}),
    (C, {"prompt": "hi", "max_tokens": 2, "n": 3, "echo": True, "logprobs": 1, "stream": True,
         "stream_options": {"include_usage": True}}),
    (C, {"prompt": "hi", "max_tokens": 2, "ignore_eos": True, "min_tokens": 2, "skip_special_tokens": False}),
])
def test_unusual_but_valid_requests_succeed(server, path, body):
    r = send(server, path, body)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:], parse_constant=_no_constants)   # strict JSON: no NaN/Infinity
    else:
        json.loads(r.text, parse_constant=_no_constants)
        assert r.json()["choices"]


def _no_constants(name):
    raise AssertionError(f"response holds {name}, which is not JSON")


def test_seed_is_reproducible_whatever_its_size(server):
    def texts(seed):
        r = send(server, C, {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    for seed in (-1, 2 ** 64 + 5, -(2 ** 100)):
        assert texts(seed) == texts(seed)


# ---- clients that leave --------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_url(server):
    """The same engine behind a second app that checks an API key (so its middleware is in the path)."""
    import threading

    import uvicorn

    from server_fixture import free_port
    from strata.entrypoints.openai.server import build_app
    port = free_port()
    app = build_app(server.engine, "smollm2", api_key="sekret")
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    uv.should_exit = True
    thread.join(timeout=10)


def test_api_key_errors_use_openai_body(keyed_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                    {"Authorization": b"Bearer sekret\xc3\xa9"}, {"Authorization": b"\xff\xfe"}):
        err = assert_openai_error(httpx.post(keyed_url + C, json={"prompt": "hi"}, headers=headers), 401)
        assert err["type"] == "AuthenticationError"
    ok = httpx.post(keyed_url + C, json={"prompt": "hi", "max_tokens": 2}, headers={"Authorization": "Bearer sekret"},
                    timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("keyed", [False, True])
def test_client_leaving_aborts_a_non_streaming_request(server, keyed_url, keyed):
    # 200 tokens take far longer than the wait below: only an abort frees the blocks in time.
    url, headers = (keyed_url, {"Authorization": "Bearer sekret"}) if keyed else (server.base_url, {})
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + C, json=body, headers=headers, timeout=1.5)
    assert server.wait_idle(timeout=5), "the request ran on after its client left"
    assert server.engine._thread.is_alive()


def test_client_leaving_while_admitted_keeps_the_engine(server):
    # Thousands of sequences: the client gives up while the server is still admitting prompts,
    # which cancels the wait on the engine thread's answer. The engine must live on and abort them.
    body = {"prompt": ["hi"] * 200, "n": 128, "max_tokens": 1}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + C, json=body, timeout=2)
    assert server.wait_idle(timeout=30)
    assert_alive_and_idle(server)


def test_server_alive_and_idle_after_all(server):
    assert_alive_and_idle(server)
