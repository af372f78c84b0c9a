"""A Hugging Face model directory with its own tokenizer files: text prompts, the chat template
from tokenizer_config.json, and EOS ids from generation_config.json."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_tiny_model_with_default_tokenizer

from strata import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("smol_tiny")
    tok, model = make_tiny_model_with_default_tokenizer(path)
    # An extra end-of-sequence id that only generation_config.json names.
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 5]
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path, tok, model


def test_text_prompt_and_chat_from_directory(model_dir):
    path, tok, model = model_dir
    llm = LLM(str(path))
    assert 5 in llm.llm_engine.eos_token_ids and 2 in llm.llm_engine.eos_token_ids
    prompt = "Héllo wörld, the answer is"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    ids = tok(prompt)["input_ids"]
    assert out.prompt_token_ids == ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             min_new_tokens=8)[0, len(ids):].tolist()
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4),
                    use_tqdm=False)[0]
    assert chat.prompt == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                  add_generation_prompt=True)
