"""Errors a user can cause get a clear message, and the engine keeps serving afterwards with
every KV block back in the pool."""

from __future__ import annotations

import pytest

from hf_tiny import make_tiny_model
from strata import LLM, SamplingParams
from strata.loader.model_loader import ModelNotFound

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return LLM(str(path), skip_tokenizer_init=True, max_model_len=64)


def free_blocks_ok(llm):
    kv = llm.llm_engine.scheduler.kv
    return kv.num_free_blocks == kv.num_blocks and not llm.llm_engine.scheduler.requests


def still_works(llm):
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert free_blocks_ok(llm)


def test_missing_path():
    with pytest.raises(ModelNotFound, match="/no/such/model"):
        LLM("/no/such/model")


def test_prompt_longer_than_context_names_both_numbers(llm):
    with pytest.raises(ValueError, match=r"100 tokens.*64"):
        llm.generate([{"prompt_token_ids": list(range(100))}], GREEDY, use_tqdm=False)
    still_works(llm)


def test_bad_prompt_in_batch_admits_none(llm):
    prompts = [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": list(range(80))}]
    with pytest.raises(ValueError):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert free_blocks_ok(llm)
    still_works(llm)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(presence_penalty=5), "presence_penalty"),
    (dict(min_p=2), "min_p"), (dict(logprobs=-1), "logprobs"),
])
def test_invalid_sampling_parameter_is_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_out_of_vocab_ids_are_rejected(llm):
    with pytest.raises(ValueError, match="512"):
        llm.generate([{"prompt_token_ids": [1, 600]}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([{"prompt_token_ids": [1, 2]}],
                     SamplingParams(max_tokens=2, logit_bias={9999: 1.0}), use_tqdm=False)
    still_works(llm)


def test_text_prompt_without_tokenizer_is_explained(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate("hello", GREEDY, use_tqdm=False)
    still_works(llm)


def test_unknown_engine_option_is_named(tmp_path):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(str(tmp_path), max_num_seq=4)


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.llm_engine
    rid = engine.add_request(None, {"prompt_token_ids": list(range(1, 30))},
                             SamplingParams(max_tokens=40, ignore_eos=True, n=2))
    for _ in range(3):
        engine.step()
    out = engine.abort_request(rid)
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert free_blocks_ok(llm)
    engine.step()   # the runner drops the aborted state on the next step
    assert not engine.executor.runner.states
    still_works(llm)


def test_max_model_len_beyond_cache_is_explained(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_small")
    make_tiny_model("llama", path)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(path), skip_tokenizer_init=True, max_model_len=200, num_gpu_blocks_override=4)
