"""`strata bench serve` against a live strata server: every request succeeds, output lengths are
fixed by ignore_eos, and the latencies it reports are consistent with each other."""

from __future__ import annotations

import json

import pytest

from server_fixture import LiveServer
from strata import LLM
from strata.entrypoints.cli import main

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 4, 48, 6   # a chat template alone is ~30 tokens


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(LLM(use_tqdm_on_load=False, kv_cache_memory="64MiB", max_model_len=512))
    yield srv
    srv.stop()


def bench(server, tmp_path, *extra) -> dict:
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--base-url", server.base_url, "--num-prompts", str(NUM_PROMPTS),
            "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--result-file", str(out), *extra]
    assert main(argv) == 0
    assert server.wait_idle()
    return json.loads(out.read_text())


def check(result: dict, capsys) -> None:
    assert result["completed"] == NUM_PROMPTS and result["failed"] == 0 and not result["errors"]
    assert result["model"] == "smollm2"
    assert result["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert result["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert result["output_tokens_method"] == ["usage"]
    # prompts were sized with the server's own token counts, so they land near --input-len
    assert result["input_len_method"].startswith("server tokenizer")
    assert all(abs(n - INPUT_LEN) <= 4 for n in result["input_lens"])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "p50", "p90", "p99"):
            assert result[f"{stat}_{metric}_ms"] >= 0
        assert result[f"p50_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[f"p99_{metric}_ms"]
    assert all(0 < t <= e for t, e in zip(result["ttfts_s"], result["e2els_s"]))
    assert result["p99_e2el_ms"] <= result["duration_s"] * 1000
    assert 0 < result["p50_tpot_ms"] and 0 < result["p50_itl_ms"]
    assert result["output_throughput"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN / result["duration_s"])
    assert result["total_token_throughput"] > result["output_throughput"] > 0
    assert result["request_throughput"] == pytest.approx(NUM_PROMPTS / result["duration_s"])
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_completions_all_at_once(server, tmp_path, capsys):
    check(bench(server, tmp_path, "--seed", "1"), capsys)


def test_chat_with_max_concurrency(server, tmp_path, capsys):
    result = bench(server, tmp_path, "--endpoint", "/v1/chat/completions", "--max-concurrency", "2",
                   "--request-rate", "50")
    assert result["max_concurrency"] == 2 and result["request_rate"] == 50
    check(result, capsys)


def test_dataset_file(server, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "output_len": 3 + i}) + "\n" for i in range(2)))
    out = tmp_path / "d.json"
    assert main(["bench", "serve", "--base-url", server.base_url, "--dataset", str(data),
                 "--num-prompts", "3", "--result-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["output_lens"] == [3, 4, 3]


def test_unreachable_server_counts_failures(tmp_path, capsys):
    from server_fixture import free_port
    out = tmp_path / "f.json"
    code = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "x",
                 "--num-prompts", "2", "--dataset", str(_one_line(tmp_path)), "--result-file", str(out)])
    result = json.loads(out.read_text())
    assert code == 1 and result["completed"] == 0 and result["failed"] == 2
    assert "ConnectError" in result["errors"][0]


def _one_line(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "output_len": 2}) + "\n")
    return path
