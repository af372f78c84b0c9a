"""The default model, SmolLM2-135M-Instruct Q4_1 GGUF, against transformers reading the same file.

Both dequantize the same blocks to float32, so the forward passes should agree closely: we
require the same top-1 token at every position (teacher forcing) and log-probabilities within
2e-3 (float32 reductions in a different order over 30 layers).
"""

from __future__ import annotations

import pytest
import torch

from strata import LLM, SamplingParams
from strata.loader.model_loader import default_model_path

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Grüße aus München! Ça va très bien, merci. 日本語も少し。",
]
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def llm():
    return LLM(use_tqdm_on_load=False)


def test_prompt_ids_match_transformers(llm, hf):
    tok, _ = hf
    ours = llm.get_tokenizer()
    for text in TEXTS:
        assert ours.encode(text) == tok(text)["input_ids"]
    messages = [{"role": "user", "content": "Wie spät ist es? 🙂"}]
    assert (ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_teacher_forced_logprobs_match(llm, hf):
    tok, model = hf
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)   # [n, vocab]
        out = llm.generate([{"prompt_token_ids": ids}],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                           use_tqdm=False)[0]
        for pos in range(1, len(ids)):
            entry = out.prompt_logprobs[pos]
            actual = ids[pos]
            # The logprob strata gives the actual next token, and its top-1 choice.
            assert entry[actual].logprob == pytest.approx(ref[pos - 1, actual].item(), abs=LOGPROB_TOL)
            top1 = next(t for t, lp in entry.items() if lp.rank == 1)
            assert top1 == ref[pos - 1].argmax().item(), f"top-1 differs at position {pos} of {text!r}"
        # The sampled continuation is the argmax of the last position.
        assert out.outputs[0].token_ids[0] == model(torch.tensor([ids])).logits[0, -1].argmax().item()


def test_greedy_text_matches_transformers(llm, hf):
    tok, model = hf
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref[: len(out.outputs[0].token_ids)]
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "<|im_start|>assistant" in out.prompt
    assert out.outputs[0].text.strip()
