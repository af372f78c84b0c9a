"""The CPU fast path (GGUF weights packed, strata's C kernels for matmuls, norms, rotary, attention
and activations) gives the same greedy text as strata's fp32 reference path: every weight
dequantized at load and only torch ops (STRATA_QUANT_REFERENCE=1, STRATA_DISABLE_CPU_KERNELS=1),
on the default SmolLM2-135M-Instruct Q4_1. Prompts of several lengths run together, so steps mix
prompt chunks with decodes, and single-sequence runs cover batch-1 decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from strata import LLM, SamplingParams
from strata.kernels import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops.library() is None, reason="strata's CPU kernels could not be built")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
           "Write a haiku about the sea.", "Once upon a time, in a small village by the sea, there lived a"
           " fisherman who every morning",
           # Over 64 tokens: torch's SDPA attends for this prompt, the matmuls go through SGEMM tiles.
           "The river ran past the old mill where the miller's daughter kept her accounts in a green "
           "ledger, counting sacks of grain, coins and the days until the spring fair, when merchants came"
           " from four towns away to trade cloth, salt and news of the wider world. She wrote"]
MAX_TOKENS = 16


def _greedy(prompts, **kw) -> list[list[int]]:
    llm = LLM(kv_cache_memory=1 << 26, use_tqdm_on_load=False, enable_prefix_caching=False, **kw)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRATA_QUANT_REFERENCE", "1")
        mp.setenv("STRATA_DISABLE_CPU_KERNELS", "1")
        return _greedy(PROMPTS)


def test_batched_greedy_equals_reference(reference):
    assert _greedy(PROMPTS) == reference


def test_single_stream_and_small_chunks_equal_reference(reference):
    assert _greedy(PROMPTS[:1]) == reference[:1]
    # Prompt chunks of 8 tokens: chunks that attend to a cached prefix.
    assert _greedy(PROMPTS[3:4], max_num_batched_tokens=8, max_num_seqs=1) == reference[3:4]


@pytest.mark.parametrize("prompts", [[PROMPTS[1], "Hi"], [PROMPTS[1]]], ids=["two", "one"])
def test_fused_layer_is_bit_identical_to_the_module_path(monkeypatch, prompts):
    """One C call for all decoder layers computes exactly what the layers' modules compute with the
    same kernels: the same tokens and the same logprobs to the last bit. (Up to 16 tokens per
    step, the module path's matmuls are the same C row kernels; beyond, it multiplies through
    torch's GEMM and only agrees to rounding.) Two sequences: 13 + 1 prompt tokens in the first
    step, then decode steps of 6 (token, KV head) attention items; one: 3 items, fewer than twice
    the threads, so the stack splits the attention by query head instead."""
    from strata.layers import cpu_decoder
    llm = LLM(kv_cache_memory=1 << 26, use_tqdm_on_load=False, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    fused = llm.generate(prompts, params, use_tqdm=False)
    model = llm.llm_engine.executor.runner.model
    assert isinstance(model.layers[0].__dict__.get("_cpu_fused"), cpu_decoder.FusedDecoderLayer)
    # All layers ran as one C call (strata_decoder_stack), the embedding and final norm with them.
    assert isinstance(model.__dict__["_cpu_model_ends"], cpu_decoder.ModelEnds)
    assert any(isinstance(s, cpu_decoder.FusedDecoderStack) for s in model.__dict__["_cpu_fused_stacks"].values())
    monkeypatch.setattr(cpu_decoder, "MAX_FUSED_TOKENS", 0)
    modules = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fused, modules):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_a_forward_hook_on_a_layer_module_still_runs():
    """The fused stack skips the modules' forward calls, so a hook registered on any of them
    (GPTQ calibration's input capture, say) sends the step through the module path, and the
    stack is used again once it is removed."""
    llm = LLM(kv_cache_memory=1 << 26, use_tqdm_on_load=False, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    model = llm.llm_engine.executor.runner.model
    plain = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    calls = []
    handle = model.layers[7].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    hooked = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    handle.remove()
    assert len(calls) == 3 and hooked == plain     # once per step: the prompt and two decodes
    llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert len(calls) == 3
    # The whole-model step also looks up the embedding and runs the final norm in C.
    for module in (model.embed_tokens, model.norm):
        calls.clear()
        handle = module.register_forward_hook(lambda *args: calls.append(1))
        hooked = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
        handle.remove()
        assert len(calls) == 3 and hooked == plain


def test_decode_steps_on_a_smaller_thread_team_than_asked(reference):
    """A decode step's attention items are split among the threads asked for before the layers
    run; where OpenMP gives fewer (OMP_THREAD_LIMIT here), the items are shared out as they come
    instead, and the text is unchanged."""
    script = ("import json, torch; torch.set_num_threads(2)\n"
              "from strata import LLM, SamplingParams\n"
              "llm = LLM(kv_cache_memory=1 << 26, use_tqdm_on_load=False, enable_prefix_caching=False)\n"
              f"params = SamplingParams(temperature=0, max_tokens={MAX_TOKENS}, ignore_eos=True)\n"
              f"outs = llm.generate({PROMPTS[:3]!r}, params, use_tqdm=False)\n"
              "print(json.dumps([o.outputs[0].token_ids for o in outs]))\n")
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, OMP_THREAD_LIMIT="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == reference[:3]


def test_the_stack_follows_a_reallocated_kv_cache(reference):
    """The stack checks its layers' caches once per allocation and keeps their addresses: a new
    allocation (new tensors) is checked and bound again, not read through the old addresses."""
    llm = LLM(kv_cache_memory=1 << 26, use_tqdm_on_load=False, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids == reference[0]
    runner = llm.llm_engine.executor.runner
    old = runner.kv_caches[0]
    runner.allocate_kv_cache(runner.num_blocks)
    assert runner.kv_caches[0] is not old
    del old
    assert llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids == reference[0]
    stack = next(iter(runner.model.__dict__["_cpu_fused_stacks"].values()))
    assert stack._caches[0] == runner.kv_caches[0].data_ptr()
