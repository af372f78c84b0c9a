"""strata against HF transformers on tiny random models (fp32, CPU): greedy tokens, teacher-forced
prompt logprobs, an in-memory HF model adopted without copies, and the errors a bad checkpoint
directory gives."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import TINY_CONFIGS, hf_greedy, make_tiny_model

from strata import LLM, SamplingParams

MAX_NEW_TOKENS = 16
# Lengths 1 to 40, so that a batch mixes single-token and multi-block prompts (block size 16).
PROMPTS = [[7], [5, 17, 33, 101, 7], [9] * 11 + [44, 45], list(range(3, 30)),
           [(13 * i) % 500 + 3 for i in range(40)]]
# HF parameters strata keeps inside one fused tensor (qkv_proj, gate_up_proj).
FUSED_IN_STRATA = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def _llm(model, **kwargs) -> LLM:
    # On the CPU in float32, as the reference runs; the in-memory model lives there too.
    return LLM(model, skip_tokenizer_init=True, use_tqdm_on_load=False, kv_cache_memory="64MiB",
               device="cpu", dtype="float32", **kwargs)


def _generate(llm: LLM, params: SamplingParams = GREEDY, prompts=PROMPTS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices of 64 gain nothing from threads, and on a busy machine idle OpenMP workers spinning
    for their turn make these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """(name, checkpoint dir, HF model, HF greedy tokens for PROMPTS)."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = make_tiny_model(name, path)
    return name, path, hf, hf_greedy(hf, PROMPTS, MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return _llm(str(tiny[1]))


def test_greedy_matches_hf(tiny, tiny_llm):
    name, _, _, expected = tiny
    got = [o.outputs[0].token_ids for o in _generate(tiny_llm)]
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert g == e, f"{name}: prompt of {len(prompt)} tokens: strata {g} != HF {e}"
    assert len({tuple(e) for e in expected}) > 1, "degenerate model: every prompt gives the same output"


def test_prompt_logprobs_match_hf_logits(tiny, tiny_llm):
    """Teacher forcing: the logprob strata gives each prompt token equals HF's from one forward."""
    name, _, hf, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for prompt, out in zip(PROMPTS[1:], _generate(tiny_llm, params, PROMPTS[1:])):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)   # [len, vocab]
        ref = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        got = torch.tensor([lp[tok].logprob for lp, tok in zip(out.prompt_logprobs[1:], prompt[1:])])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ---- an HF model already in memory ----------------------------------------------------------------

def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"tok{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt_post_ln_proj"])
def test_in_memory_hf_model_is_adopted_without_copies(name, tmp_path):
    hf = make_tiny_model(name, tmp_path)
    probe = torch.tensor([PROMPTS[-1]])
    with torch.no_grad():
        logits_before = hf(probe).logits
    expected = hf_greedy(hf, PROMPTS, MAX_NEW_TOKENS)

    llm = _llm(hf)
    model = llm.llm_engine.executor.runner.model
    strata_ptrs = {p.data_ptr() for p in model.parameters()}
    fused = {n for n, _ in model.named_parameters() if "qkv_proj" in n or "gate_up_proj" in n}
    for hf_name, hf_param in hf.named_parameters():
        if any(f".{part}." in hf_name for part in FUSED_IN_STRATA):   # re-pointed at rows of strata's fused tensor
            owner = [p for n, p in model.named_parameters() if n in fused
                     and p.data_ptr() <= hf_param.data_ptr() < p.data_ptr() + p.numel() * p.element_size()]
            assert owner, f"{hf_name} does not view strata's fused storage"
        else:          # the very same storage
            assert hf_param.data_ptr() in strata_ptrs, f"{hf_name} was copied"
    with torch.no_grad():
        assert torch.equal(hf(probe).logits, logits_before), "the HF model changed"

    got = [o.outputs[0].token_ids for o in _generate(llm)]
    assert got == expected
    disk = _llm(str(tmp_path))
    lp = SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2)
    a, b = _generate(llm, lp), _generate(disk, lp)
    assert [o.outputs[0].logprobs for o in a] == [o.outputs[0].logprobs for o in b]
    assert [o.prompt_logprobs for o in a] == [o.prompt_logprobs for o in b]


def test_in_memory_hf_model_with_tokenizer(tmp_path):
    hf = make_tiny_model("llama", tmp_path)
    tokenizer = _word_tokenizer(TINY_CONFIGS["llama"]["vocab_size"])
    prompt = PROMPTS[1]
    expected = hf_greedy(hf, [prompt], MAX_NEW_TOKENS)[0]
    llm = LLM(model=hf, tokenizer=tokenizer, use_tqdm_on_load=False, kv_cache_memory="64MiB",
              device="cpu", dtype="float32")
    out = llm.generate(" ".join(f"tok{t}" for t in prompt), GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text.split() == [tokenizer.convert_ids_to_tokens(t) for t in expected]


def test_in_memory_model_built_from_config_only():
    """A model made as ``LlamaForCausalLM(config)`` has no ``architectures``: its class names it."""
    import transformers
    cfg = {k: v for k, v in TINY_CONFIGS["llama"].items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    expected = hf_greedy(hf, PROMPTS[:2], 4)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in _generate(_llm(hf), params, PROMPTS[:2])]
    assert got == expected


# ---- errors a user can cause --------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama_ckpt")
    make_tiny_model("llama", path)
    return path


def test_unsupported_architecture_is_named(tmp_path, llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        _llm(str(tmp_path))
    assert "GPT2LMHeadModel" in str(e.value)
    assert "LlamaForCausalLM" in str(e.value) and "OPTForCausalLM" in str(e.value)


def test_directory_without_safetensors(tmp_path, llama_dir):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="safetensors") as e:
        _llm(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_truncated_safetensors_names_the_file(tmp_path, llama_dir):
    for f in llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError) as e:
        _llm(str(tmp_path))
    assert str(weights) in str(e.value)
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as e:
        _llm(str(missing))
    assert str(missing) in str(e.value)
