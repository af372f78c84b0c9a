"""Perplexity evaluation: the built-in English text, the engine's perplexity against HF
transformers on a tiny random model, the `strata perplexity` command and its argument errors."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from hf_tiny import make_tiny_model

from strata import LLM
from strata.entrypoints.cli import build_parser, main
from strata.evaluation import english_eval_text, perplexity

CONTEXT_LEN = 64
NUM_TOKENS = 3 * CONTEXT_LEN + 10   # three full windows and a partial one that is not scored


# ---- the text ------------------------------------------------------------------------------------

def test_text_is_deterministic_english_prose():
    text = english_eval_text()
    assert text == english_eval_text()
    assert 20_000 <= len(text) <= 50_000
    short = english_eval_text(max_chars=2_000)
    assert len(short) <= 2_000 and text.startswith(short)
    words = text.split()
    plain = [w for w in words if w.strip(".,;:!?()\"'“”’").isalpha()]
    assert len(plain) >= 0.9 * len(words), "mostly plain words"
    code = sum(text.count(c) for c in "=[]{}<>\\|_#@`~^$")
    assert code <= 0.005 * len(text), f"{code} code symbols in {len(text)} characters"
    assert not any(line.startswith((">>>", "    ")) for line in text.splitlines()), "no code lines"
    lowered = [w.lower().strip(".,;:") for w in words]
    assert lowered.count("the") >= 0.04 * len(words), "English: 'the' is its commonest word"


# ---- perplexity against HF ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(strata LLM, HF model, token ids) for a tiny random Llama in float32 on the CPU."""
    path = tmp_path_factory.mktemp("tiny_llama")
    hf = make_tiny_model("llama", path)
    llm = LLM(str(path), skip_tokenizer_init=True, use_tqdm_on_load=False, kv_cache_memory="64MiB",
              device="cpu", dtype="float32")
    token_ids = torch.randint(3, 512, (NUM_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    return llm, hf, token_ids


@pytest.fixture
def one_thread():
    """Matrices of 64 gain nothing from threads; idle OpenMP workers only slow a busy CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_nll(hf, window: list[int], first_scored: int) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([window])).logits[0].double(), -1)   # [len, vocab]
    return [-logprobs[pos - 1, window[pos]].item() for pos in range(first_scored, len(window))]


@pytest.mark.usefixtures("one_thread")
def test_non_overlapping_windows_match_hf(tiny):
    llm, hf, ids = tiny
    nll = []
    for start in range(0, NUM_TOKENS - CONTEXT_LEN + 1, CONTEXT_LEN):
        nll += _hf_nll(hf, ids[start:start + CONTEXT_LEN], 1)
    got = perplexity(llm, ids, context_len=CONTEXT_LEN)
    assert (got.num_windows, got.num_tokens) == (3, 3 * (CONTEXT_LEN - 1))
    expected = math.fsum(nll) / len(nll)
    assert got.nll_mean == pytest.approx(expected, rel=1e-4)
    assert got.ppl == pytest.approx(math.exp(expected), rel=1e-4)

    first_two = perplexity(llm, ids, context_len=CONTEXT_LEN, max_windows=2)
    assert (first_two.num_windows, first_two.num_tokens) == (2, 2 * (CONTEXT_LEN - 1))
    assert first_two.nll_mean == pytest.approx(math.fsum(nll[:2 * (CONTEXT_LEN - 1)]) / (2 * (CONTEXT_LEN - 1)),
                                               rel=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_strided_windows_score_each_token_once_and_match_hf(tiny):
    """HF's sliding-window recipe: each window scores only the tokens the previous one did not."""
    llm, hf, ids = tiny
    stride = CONTEXT_LEN // 2
    nll, scored_end = [], 0
    for start in range(0, NUM_TOKENS - CONTEXT_LEN + 1, stride):
        nll += _hf_nll(hf, ids[start:start + CONTEXT_LEN], max(scored_end - start, 1))
        scored_end = start + CONTEXT_LEN
    got = perplexity(llm, ids, context_len=CONTEXT_LEN, stride=stride)
    assert got.num_windows == (NUM_TOKENS - CONTEXT_LEN) // stride + 1
    assert got.num_tokens == len(nll) == scored_end - 1
    assert got.nll_mean == pytest.approx(math.fsum(nll) / len(nll), rel=1e-4)


@pytest.mark.parametrize("kwargs, name", [
    ({"context_len": 1}, "context_len"), ({"context_len": 0}, "context_len"),
    ({"context_len": 256}, "context_len"),             # the tiny model's max_model_len
    ({"context_len": 2 * NUM_TOKENS}, "context_len"),  # longer than the text: not one full window
    ({"stride": 0}, "stride"), ({"stride": CONTEXT_LEN + 1}, "stride"),
    ({"max_windows": 0}, "max_windows"),
    ({"text_or_token_ids": []}, "text_or_token_ids"), ({"text_or_token_ids": ""}, "text_or_token_ids"),
    ({"text_or_token_ids": "  \n"}, "text_or_token_ids"),
    ({"text_or_token_ids": "some text"}, "tokenizer"),  # this LLM has none
])
def test_bad_arguments_name_the_parameter(tiny, kwargs, name):
    llm, _, ids = tiny
    args = {"text_or_token_ids": ids, "context_len": CONTEXT_LEN, **kwargs}
    with pytest.raises(ValueError, match=name):
        perplexity(llm, **args)


# ---- the command ---------------------------------------------------------------------------------

def test_help_explains_every_flag():
    sub = build_parser()._subparsers._group_actions[0].choices["perplexity"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"perplexity {action.option_strings or action.dest} has no help text"


def test_cli_on_default_model(capsys):
    from strata.loader.model_loader import default_model_path
    # The model as the positional MODEL: the same file the default resolves to.
    assert main(["perplexity", str(default_model_path()), "--max-windows", "2", "--context-len", "128"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"windows\s+2 of 128 tokens", out)
    assert re.search(r"tokens\s+254 scored", out)
    ppl = float(re.search(r"perplexity\s+(\S+)", out).group(1))
    assert math.isfinite(ppl) and 1 < ppl < 1000, out


def test_cli_missing_text_file_fails_before_loading(capsys):
    assert main(["perplexity", "--text", "/no/such/file.txt"]) == 2
    assert "/no/such/file.txt" in capsys.readouterr().err
