import pytest

from strata.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of) == (1, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words == []
    assert p.ignore_eos is False
    assert (p.max_tokens, p.min_tokens) == (16, 0)
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert p.include_stop_str_in_output is False
    assert p.logit_bias is None
    assert p.sampling_type == SamplingType.RANDOM


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": "7"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {3: "x"}}, "logit_bias"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_messages_carry_value_and_range():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1.0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)


def test_valid_edge_values():
    SamplingParams(top_k=-1, min_p=1.0, top_p=1.0, presence_penalty=2, frequency_penalty=-2)
    SamplingParams(n=3, best_of=3, max_tokens=None, min_tokens=100, logprobs=0, seed=-5)
    assert SamplingParams(top_k=-1).top_k == 0


def test_stop_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


def test_logit_bias_string_keys_become_ints():
    p = SamplingParams(logit_bias={"50256": -100, 7: 2.5})
    assert p.logit_bias == {50256: -100.0, 7: 2.5}
    assert all(type(k) is int for k in p.logit_bias)


def test_check_token_ids_against_vocab():
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).check_token_ids(vocab_size=10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).check_token_ids(vocab_size=10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[12]).check_token_ids(vocab_size=10)


def test_sampling_type():
    assert SamplingParams(temperature=0.0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6, seed=3).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.7, seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.7).sampling_type == SamplingType.RANDOM


def test_greedy_resets_truncation():
    p = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    assert (p.top_k, p.top_p, p.min_p) == (0, 1.0, 0.0)


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], logit_bias={1: 1.0})
    q = p.clone()
    assert q == p
    q.stop.append("y")
    q.logit_bias[2] = 3.0
    assert p.stop == ["x"] and p.logit_bias == {1: 1.0}
