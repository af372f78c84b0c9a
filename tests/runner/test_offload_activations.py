"""The offload policy's count of a step's activations (core/offload_policy.activation_bytes) holds
what the offload loop really allocates: on the CPU, a dispatch mode records every tensor an op
creates (outputs that share no storage with its inputs) and frees it when the storage dies, so
the peak of the live bytes is what CUDA's max_memory_allocated would see beyond the weights and
the KV cache. The step: a prefill of several prompts cut into micro-batches, then sampling with
every truncation and penalty on. The count must hold the peak, and its carries must not be loose.

The carries of the step's hidden states outweigh the rest at (40, 8, 16), as for the 8B model the
GPU benchmark runs: concatenating the micro-batches' carries before the final norm (the loop's
old ending) overran a 4 GiB budget there, and overruns the count here."""

from __future__ import annotations

import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from strata import LLM, SamplingParams
from strata.core.offload_policy import activation_bytes

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1024, hidden_size=256,
              intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, torch_dtype="float32")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under the mode and still referenced."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in inputs and key not in self.live:
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-act")
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


@pytest.mark.parametrize("prompt_len, num_prompts, micro_batch_tokens, kv_cpu", [
    (40, 8, 16, 0), (30, 6, 64, 0), (20, 1, 64, 0),
    (40, 8, 16, 0.5),   # host-KV layers: two micro-batches in flight there
])
def test_step_activations_within_count(model_dir, prompt_len, num_prompts, micro_batch_tokens, kv_cpu):
    torch.set_num_threads(1)
    llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, device="cpu", dtype="float32",
              max_num_seqs=8, kv_cache_memory="4MiB", use_tqdm_on_load=False,
              offload_policy=f"w_gpu=0.5,w_disk=0.5,micro_batch_tokens={micro_batch_tokens},kv_cpu={kv_cpu}")
    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": [(7 * r + 3 * t) % 1000 + 3 for t in range(prompt_len)]}
               for r in range(num_prompts)]
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.1,
                            repetition_penalty=1.1, logprobs=5, max_tokens=1, seed=0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)   # lazy tables built
    with LiveBytes() as mode:
        llm.generate(prompts, params, use_tqdm=False)
    counted = activation_bytes(engine.offload_spec, prompt_len * num_prompts, micro_batch_tokens,
                               num_prompts, prompt_len, host_kv=kv_cpu > 0)
    engine.offload_mover.close()
    assert mode.peak <= counted, f"live {mode.peak / 2**20:.2f} MiB > counted {counted / 2**20:.2f} MiB"
    # The carries and logits, the part that grows with the batch, are not loose by more than 2x
    # (one micro-batch's intermediates are counted generously for the GPU kernels' temporaries).
    grows = activation_bytes(engine.offload_spec, prompt_len * num_prompts, 0, num_prompts, 0)
    assert mode.peak >= grows / 2, f"count loose: live {mode.peak / 2**20:.2f}, carries {grows / 2**20:.2f} MiB"
