"""The kernel path gives the same greedy tokens as the torch reference path, with batching,
chunked prefill and prefix caching on, and frees every block.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors
(STRATA_FORCE_TRITON=1), which checks how they are wired into the layers. On a GPU both paths
run on CUDA in float32: the reference with STRATA_DISABLE_TRITON=1 and no graphs, the kernel
path with CUDA graphs for the decode steps.
"""

from __future__ import annotations

import pytest
import torch

from hf_tiny import make_tiny_model
from strata import LLM, SamplingParams

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHARED = list(range(200, 236))   # a 36-token prefix: two full blocks shared by three prompts
PROMPTS = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302], [8],
           SHARED + [7, 8, 9], SHARED + [11], SHARED + [12, 13, 14, 15, 16]]
MAX_NEW = 8


def generate(path, **kw):
    llm = LLM(str(path), skip_tokenizer_init=True, device=DEVICE, dtype="float32",
              max_num_batched_tokens=24, max_num_seqs=8, kv_cache_memory="16MiB", **kw)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    kv = llm.llm_engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "llama3_scaled_tied"])
def test_kernel_path_matches_torch_path(arch, tmp_path, monkeypatch):
    make_tiny_model(arch, tmp_path)
    monkeypatch.setenv("STRATA_DISABLE_TRITON", "1")
    reference, _ = generate(tmp_path, enforce_eager=True)
    monkeypatch.delenv("STRATA_DISABLE_TRITON")
    if not CUDA:
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    got, llm = generate(tmp_path, enforce_eager=False)
    assert got == reference
    if CUDA:
        assert llm.llm_engine.graphs is not None and llm.llm_engine.graphs.graphs


@pytest.mark.skipif(not CUDA, reason="half precision is the GPU's; the CPU computes in float32")
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.15), ("float16", 0.03)])
def test_half_precision_kernel_path_tracks_fp32(dtype, tol, tmp_path, monkeypatch):
    """Teacher-forced log-probs of every prompt token, kernels + graphs in half precision vs the
    float32 torch path: within the rounding of the dtype (a broken kernel is off by whole units)."""
    make_tiny_model("llama", tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)

    def prompt_logprobs(dt, eager):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, device=DEVICE, dtype=dt, enforce_eager=eager,
                  max_num_batched_tokens=24, max_num_seqs=8, kv_cache_memory="16MiB")
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [[lp[tok].logprob for lp, tok in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                for o in outs]

    monkeypatch.setenv("STRATA_DISABLE_TRITON", "1")
    reference = prompt_logprobs("float32", True)
    monkeypatch.delenv("STRATA_DISABLE_TRITON")
    got = prompt_logprobs(dtype, False)
    worst = max(abs(a - b) for ref_row, row in zip(reference, got) for a, b in zip(ref_row, row))
    assert worst < tol, f"{dtype} log-probs differ from float32 by up to {worst:.3f}"


def test_kernel_path_async_scheduling_matches_sync(tmp_path, monkeypatch):
    """Async scheduling on the kernel path (CUDA graphs, pinned copies and events on a GPU):
    greedy, seeded random and penalised rows give what synchronous scheduling gives."""
    make_tiny_model("llama", tmp_path)
    if not CUDA:
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=MAX_NEW, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, presence_penalty=1.0,
                             repetition_penalty=1.4, logprobs=2),
              SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=MAX_NEW - 3, ignore_eos=True)]
    params = [params[i % len(params)] for i in range(len(PROMPTS))]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, device=DEVICE, dtype="float32",
                  max_num_batched_tokens=24, max_num_seqs=8, kv_cache_memory="16MiB",
                  async_scheduling=async_scheduling)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        results.append([[c.token_ids for c in o.outputs] for o in outs])
        kv = llm.llm_engine.scheduler.kv
        assert kv.num_free_blocks == kv.num_blocks
    assert results[0] == results[1]
