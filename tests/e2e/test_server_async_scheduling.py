"""A few of test_server.py's tests against a server whose engine runs with async scheduling: the
same texts as the offline (synchronous) engine, streams, n > 1, logprobs, concurrent clients, and
requests aborted by clients that leave. To run every server test that way, import more names."""

from __future__ import annotations

import pytest
from server_fixture import LiveServer

from strata import LLM

pytest.importorskip("openai")

# The imported tests are collected again here, where `server` is the fixture below; `llm` (the
# offline, synchronous reference) and `client` are test_server.py's own.
from test_server import (  # noqa: F401
    client,
    llm,
    test_async_engine_generate_streams_and_aborts_when_left,
    test_chat_matches_offline_and_streams,
    test_completion_matches_offline,
    test_completion_stream_matches_offline,
    test_concurrent_streams_all_complete,
    test_disconnect_mid_stream_frees_blocks,
    test_logprobs_formats,
    test_n2_stop_seed,
)


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(LLM(use_tqdm_on_load=False, kv_cache_memory="256MiB", max_model_len=512, max_waiting=200,
                         async_scheduling=True))
    assert srv.llm.llm_engine.async_scheduling
    yield srv
    srv.stop()
