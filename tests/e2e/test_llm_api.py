"""The offline API on the default model: vLLM's output objects, stops, logprobs, seeds, metrics."""

from __future__ import annotations

import pytest

from strata import LLM, SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm():
    return LLM(use_tqdm_on_load=False, kv_cache_memory="256MiB")


def test_output_objects_follow_vllm(llm):
    out = llm.generate([PROMPT, "Hello, my name is"], SamplingParams(temperature=0, max_tokens=6),
                       use_tqdm=False)
    assert [o.prompt for o in out] == [PROMPT, "Hello, my name is"]
    first = out[0]
    assert first.finished and first.prompt_token_ids == llm.get_tokenizer().encode(PROMPT)
    comp = first.outputs[0]
    assert comp.index == 0 and comp.finish_reason == "length" and len(comp.token_ids) == 6
    assert comp.text == llm.get_tokenizer().decode(comp.token_ids)
    m = first.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.num_prompt_tokens == len(first.prompt_token_ids) and m.num_generation_tokens == 6


def test_stop_string_is_cut_and_reported(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    word = full.text.split()[1]             # a word from inside the greedy continuation
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, stop=[word]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == word
    assert comp.text == full.text[: full.text.index(word)]
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, stop=[word],
                                               include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text.endswith(word)


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[2]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    for token, entry in zip(comp.token_ids, comp.logprobs):
        assert token in entry and entry[token].rank == 1          # greedy: the sampled token is top-1
        assert 3 <= len(entry) <= 4
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token], skip_special_tokens=False)
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))
    assert out.prompt_logprobs[0] is None
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, len(out.prompt_token_ids)))


def test_seeded_sampling_reproducible(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=0)
    a = llm.generate([PROMPT, "Hello, my name is"], params, use_tqdm=False)
    b = llm.generate(["Hello, my name is", PROMPT], params, use_tqdm=False)
    assert a[0].outputs[0].text == b[1].outputs[0].text
    assert a[1].outputs[0].text == b[0].outputs[0].text


def test_default_max_tokens_fills_context():
    llm = LLM(use_tqdm_on_load=False, max_model_len=40, kv_cache_memory="64MiB")
    ids = llm.get_tokenizer().encode(PROMPT)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 40 - len(ids) and out.finish_reason == "length"


def test_dummy_weights_load_without_checkpoint_reads(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)))
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=5,
                                                                       ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_progress_bar_over_many_prompts(llm, capsys):
    llm.generate([PROMPT] * 3, SamplingParams(temperature=0, max_tokens=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_output_kinds(llm):
    from strata.sampling_params import RequestOutputKind
    engine = llm.llm_engine
    outputs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
        engine.add_request(kind.name, PROMPT, SamplingParams(temperature=0, max_tokens=5, output_kind=kind))
        outputs[kind] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[RequestOutputKind[out.request_id]].append(out)
    cumulative, final = outputs[RequestOutputKind.CUMULATIVE], outputs[RequestOutputKind.FINAL_ONLY]
    assert len(cumulative) >= 5 and [len(o.outputs[0].token_ids) for o in cumulative][-5:] == [1, 2, 3, 4, 5]
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == cumulative[-1].outputs[0].token_ids
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)


def test_profile_records_the_steps_between_start_and_stop(llm, tmp_path):
    llm.start_profile()
    with pytest.raises(RuntimeError, match="already running"):
        llm.start_profile()
    llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    tables = llm.stop_profile(trace_dir=str(tmp_path))
    assert list(tables) == [0]
    assert "Self CPU" in tables[0] and "aten::" in tables[0]   # the model's ops ran under it
    assert (tmp_path / "rank0.json").stat().st_size > 0
    with pytest.raises(RuntimeError, match="not running"):
        llm.stop_profile()
