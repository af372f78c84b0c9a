"""kv_cache_dtype="int8" through the whole engine: the Triton kernel path gives the torch path's
greedy tokens, greedy tokens track the unquantized cache's, the same kv_cache_memory holds
several times the blocks, and bad values fail before the model loads.

Without a GPU the kernels run in Triton's interpreter (STRATA_FORCE_TRITON=1), which is slow:
the kernel-path case keeps its prompts short, with 4-token blocks so that a shared prefix,
chunked prefill and batching still all happen.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_tiny_model

from strata import LLM, SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHARED = [200, 201, 202, 203, 204, 205, 206, 207, 208]      # two full 4-token blocks, shared
KERNEL_PROMPTS = [list(range(3, 17)), [300, 301, 302], [8], SHARED + [7, 8], SHARED + [11]]
# The equivalence tests' prompts, and three sharing a 36-token prefix.
PROMPTS = [[5, 17, 33, 101, 7], [9] * 13 + [44, 45], list(range(3, 40)), [300, 301, 302],
           list(range(100, 150)), [8]] + [list(range(200, 236)) + tail for tail in ([7, 8, 9], [11], [12, 13])]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


def generate(path, prompts, max_new, **kw):
    llm = LLM(str(path), skip_tokenizer_init=True, device=DEVICE, dtype="float32", max_num_seqs=8,
              kv_cache_memory="16MiB", use_tqdm_on_load=False, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    kv = llm.llm_engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
    return [o.outputs[0].token_ids for o in outs], outs


def test_int8_kernel_path_matches_torch_path(tiny_llama, monkeypatch):
    """Batching, chunked prefill (8-token budget, a 14-token prompt) and prefix-cache hits."""
    kw = dict(kv_cache_dtype="int8", block_size=4, max_num_batched_tokens=8)
    monkeypatch.setenv("STRATA_DISABLE_TRITON", "1")
    reference, _ = generate(tiny_llama, KERNEL_PROMPTS, 5, enforce_eager=True, **kw)
    monkeypatch.delenv("STRATA_DISABLE_TRITON")
    if not CUDA:
        pytest.importorskip("triton")
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    got, outs = generate(tiny_llama, KERNEL_PROMPTS, 5, enforce_eager=False, **kw)
    assert got == reference
    assert outs[-1].num_cached_tokens == 8          # the shared prefix's two blocks, read as codes


def test_int8_greedy_tracks_the_unquantized_cache(tiny_llama, monkeypatch):
    """Greedy tokens of the torch path with int8 K/V against float32 K/V. Measured: all 144 of 144
    the same (a quantized cache shifts logits by ~1e-3 here; a near tie could flip one token and
    the rest of that sequence with it, so the bound leaves room)."""
    monkeypatch.setenv("STRATA_DISABLE_TRITON", "1")
    want, _ = generate(tiny_llama, PROMPTS, 16, max_num_batched_tokens=24)
    got, _ = generate(tiny_llama, PROMPTS, 16, max_num_batched_tokens=24, kv_cache_dtype="int8")
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    total = sum(map(len, want))
    assert same >= 0.9 * total, f"{same} of {total} greedy tokens agree"


def test_int8_copy_on_write_moves_codes_and_scales(tiny_llama, monkeypatch):
    """Samples of one prompt share its partial last block and copy it before writing: the copy
    must carry the scales with the codes. Each sample's logprobs must match a recompute of its own
    sequence (to ~1e-3: the recompute writes its K/V in a prefill, whose float rounding can move
    a code by one step)."""
    monkeypatch.setenv("STRATA_DISABLE_TRITON", "1")
    llm = LLM(str(tiny_llama), skip_tokenizer_init=True, device=DEVICE, dtype="float32", kv_cache_dtype="int8",
              kv_cache_memory="16MiB", use_tqdm_on_load=False)
    prompt = list(range(50, 70))    # 20 tokens: the second block is partial
    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, n=3, seed=7, logprobs=0)
    together = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in together.outputs}) == 3
    check = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for c in together.outputs:
        alone = llm.generate([{"prompt_token_ids": prompt + c.token_ids}], check, use_tqdm=False)[0]
        recomputed = [alone.prompt_logprobs[len(prompt) + i][t].logprob for i, t in enumerate(c.token_ids)]
        reported = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
        assert recomputed == pytest.approx(reported, abs=1e-3)


def test_int8_cache_holds_more_blocks_at_the_same_memory(tmp_path):
    """Same kv_cache_memory: codes (1 byte) + a float32 scale per 32-wide head vs float32 values
    (Qwen3's tiny head_dim 32): 4 * 32 / (32 + 4) = 3.56x the blocks. At head_dim 128 in bf16 the
    gain is 1.94x (tests/quant/test_kv_cache_quant.py)."""
    make_tiny_model("qwen3", tmp_path)
    blocks = {}
    for kv in ("auto", "int8"):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, device=DEVICE, dtype="float32", kv_cache_dtype=kv,
                  kv_cache_memory="4MiB", use_tqdm_on_load=False)
        engine = llm.llm_engine
        blocks[kv] = engine.num_blocks
        assert engine.num_blocks * engine.kv_block_bytes <= 4 * 2**20
    layers, kv_heads, head_dim, block_size = 2, 2, 32, 16
    assert blocks["auto"] == 4 * 2**20 // (layers * block_size * 2 * kv_heads * head_dim * 4)
    assert blocks["int8"] == 4 * 2**20 // (layers * block_size * 2 * kv_heads * (head_dim + 4))
    assert blocks["int8"] / blocks["auto"] == pytest.approx(4 * 32 / 36, rel=1e-3)


@pytest.mark.parametrize("value,match", [("int4", "kv_cache_dtype"), ("fp16", "kv_cache_dtype"),
                                         ("fp8", None)])
def test_bad_kv_cache_dtype_fails_before_loading(value, match, tmp_path):
    if value == "fp8":
        if CUDA and torch.cuda.get_device_capability() >= (8, 9):
            pytest.skip("this GPU runs fp8")
        match = r"kv_cache_dtype='fp8' needs .*compute capability >= 8\.9"
    # No model at this path: the option is checked first.
    with pytest.raises(ValueError, match=match):
        LLM(str(tmp_path / "no_model_here"), skip_tokenizer_init=True, kv_cache_dtype=value)
