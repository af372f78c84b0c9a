"""Offloading through the whole engine on the CPU: weights streamed from the disk tier through
a RAM budget far below the model's size give the resident run's greedy tokens, and the RAM that
weights hold stays within the budget (the mover's accounting, and the process's peak RSS while
generating). The block schedule (several micro-batches per layer) gives the same tokens too.

The model: a random Llama of 24 layers, 3.9 MiB each in float32 (94 MiB in all)."""

from __future__ import annotations

import gc
import itertools
import json

import pytest
import torch

from strata import LLM, SamplingParams
from strata.kernels import cpu_ops

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=256,
              intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)
PROMPTS = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302], list(range(100, 150)), [8]]
MIB = 2**20
BUDGET = 12 * MIB     # three layers' worth of a 94 MiB model
# RSS may grow while generating by the KV pages the requests touch, activations and allocator
# slack: far less than the 94 MiB that streaming pages without dropping them would add.
RSS_MARGIN = 24 * MIB
# Loading adds the startup probes (a 16 MiB disk read, a 2 x 8 MiB copy) and a layer in flight to
# the budget's tiers: measured 34-35 MiB above the start when run alone, 45 late in CI's whole
# suite. Placing layers only after the whole model had loaded would add all 90 MiB of weights.
LOAD_MARGIN = 50 * MIB


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine: more threads only wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Random weights in HF's names, written directly (building the HF model initialises 24M
    parameters one by one: seconds on a busy machine)."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("llama24")
    gen = torch.Generator().manual_seed(0)
    h, i, v, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 128

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=gen) * std

    tensors = {"model.embed_tokens.weight": rand(v, h, std=1.0), "lm_head.weight": rand(v, h),
               "model.norm.weight": 1 + rand(h, std=0.1)}
    for n in range(CONFIG["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        tensors.update({
            pre + "self_attn.q_proj.weight": rand(h, h), pre + "self_attn.k_proj.weight": rand(kv, h),
            pre + "self_attn.v_proj.weight": rand(kv, h), pre + "self_attn.o_proj.weight": rand(h, h),
            pre + "mlp.gate_proj.weight": rand(i, h), pre + "mlp.up_proj.weight": rand(i, h),
            pre + "mlp.down_proj.weight": rand(h, i),
            pre + "input_layernorm.weight": 1 + rand(h, std=0.1),
            pre + "post_attention_layernorm.weight": 1 + rand(h, std=0.1)})
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": "float32"}))
    return path


def make(path, **kw):
    return LLM(str(path), skip_tokenizer_init=True, device="cpu", dtype="float32", max_num_seqs=8,
               kv_cache_memory="8MiB", use_tqdm_on_load=False, **kw)


def run(llm, prompts=PROMPTS, max_new=8):
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    kv = llm.llm_engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def resident_tokens(model_dir):
    llm = make(model_dir)
    tokens = run(llm)
    del llm
    gc.collect()
    return tokens


def _status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_tokens_vary(resident_tokens):
    """The comparisons below mean something only if the tokens depend on the weights."""
    assert len({t for seq in resident_tokens for t in seq}) >= 10


def test_disk_tier_within_ram_budget(model_dir, resident_tokens, tmp_path):
    llm = make(model_dir, cpu_memory_budget=BUDGET, offload_dir=str(tmp_path / "tier"))
    engine = llm.llm_engine
    plan, mover = engine.offload_plan, engine.offload_mover
    assert plan.count("disk") >= 22 and plan.prefetch_depth >= 2     # nearly every layer on disk
    assert len(list((tmp_path / "tier").glob("layer_*.bin"))) == plan.count("disk")
    model = engine.executor.runner.model
    streamed = {id(p) for i in plan.streamed for p in model.layers[i].parameters()}
    held = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in streamed)
    held += mover.host_weight_bytes()           # the staging slots the streamed layers share
    assert held <= BUDGET and plan.host_bytes <= BUDGET
    weights = mover.slot_bytes * CONFIG["num_hidden_layers"]
    assert weights > 7 * BUDGET

    open("/proc/self/clear_refs", "w").write("5")   # restart the peak-RSS count (VmHWM) here
    base = _status_bytes("VmRSS")
    tokens = run(llm)
    peak = _status_bytes("VmHWM")
    assert tokens == resident_tokens
    assert peak - base <= RSS_MARGIN, f"RSS grew by {(peak - base) / MIB:.1f} MiB while generating"
    steps_bytes = mover.stats.bytes_from_disk
    assert steps_bytes >= 8 * plan.count("disk") * mover.slot_bytes   # every step read the disk tier
    mover.close()


def test_loading_stays_within_ram_budget(model_dir, resident_tokens, tmp_path):
    """Each layer goes to its tier as soon as it has loaded: building the engine never holds the
    whole 94 MiB model in RAM (a model larger than RAM must load), only the budget's tiers, a
    layer in flight, the KV cache and the startup probes (a 16 MiB disk read, a 2 x 8 MiB copy).
    Placed as they load, the layers still give the resident run's tokens."""
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    base = _status_bytes("VmRSS")
    llm = make(model_dir, cpu_memory_budget=BUDGET, offload_dir=str(tmp_path / "tier"))
    peak = _status_bytes("VmHWM")
    weights = llm.llm_engine.offload_mover.slot_bytes * CONFIG["num_hidden_layers"]
    assert BUDGET + LOAD_MARGIN < 0.7 * weights   # building the model whole grew RSS by 182 MiB
    assert peak - base <= BUDGET + LOAD_MARGIN, \
        f"RSS grew by {(peak - base) / MIB:.1f} MiB while loading ({weights / MIB:.0f} MiB of weights)"
    assert run(llm) == resident_tokens
    llm.llm_engine.offload_mover.close()


def test_block_schedule_and_mixed_tiers(model_dir, resident_tokens, tmp_path):
    """Micro-batches of at most 16 tokens per layer (several per step), a third of the layers
    resident, the rest on disk, three slots ahead: the same tokens."""
    llm = make(model_dir, offload_dir=str(tmp_path),
               offload_policy="w_gpu=0.33,w_disk=0.67,micro_batch_tokens=16,prefetch_depth=3")
    plan = llm.llm_engine.offload_plan
    assert plan.micro_batch_tokens == 16 and plan.prefetch_depth == 3 and plan.count("resident") == 8
    model = llm.llm_engine.executor.runner.model
    embedded = []   # tokens of each embed call: one per micro-batch, so each one's output goes
    real_embed = model.embed   # when layer 0 has replaced it (no step-wide tensor kept alive)
    model.embed = lambda ids, pos: embedded.append(ids.numel()) or real_embed(ids, pos)
    assert run(llm) == resident_tokens
    prefill = sum(len(p) for p in PROMPTS)
    assert sum(embedded[:-7]) == prefill and max(embedded) <= max(16, max(map(len, PROMPTS)))
    llm.llm_engine.offload_mover.close()


@pytest.mark.parametrize("policy, host_layers, chunk, delay_s", [
    ("w_gpu=1,kv_cpu=1", 24, None, 0.0),
    ("w_gpu=0.5,w_disk=0.5,kv_cpu=0.5,micro_batch_tokens=16", 12, None, 0.0),
    ("w_gpu=1,kv_cpu=0.25", 6, 16, 0.0),
    # decode micro-batches of 2 rows, a slow CPU side: outputs are taken while tasks are in flight
    ("w_gpu=1,kv_cpu=0.5,micro_batch_tokens=2", 12, None, 0.002),
])
def test_kv_cache_on_host_tier(model_dir, resident_tokens, tmp_path, monkeypatch, policy, host_layers, chunk,
                               delay_s):
    """The last layers' KV cache in the host tier: their decode rows (and prompt chunks after a
    cached part) attend on the host over the host cache, fresh prompts on the device; the same
    tokens as the resident run. With chunk: prompts arrive in chunks of 16 tokens. With several
    micro-batches, micro-batch k+1's host side is queued before k's output is taken (the
    overlapped schedule, runner/offload_loop._HostKVPipeline); delay_s slows every host task."""
    from strata.attention import host_tier
    calls = {"host": 0, "rows": 0}
    real = host_tier.cpu_attend

    def counting(q_host, kv_cache, meta, scale, threads=None, kv_scales=None):
        calls["host"] += 1
        calls["rows"] += meta.num_seqs
        return real(q_host, kv_cache, meta, scale, threads, kv_scales)

    monkeypatch.setattr(host_tier, "cpu_attend", counting)
    monkeypatch.setattr(host_tier.worker(), "delay_s", delay_s)
    kw = dict(max_num_batched_tokens=chunk, enable_chunked_prefill=True) if chunk else {}
    llm = make(model_dir, offload_dir=str(tmp_path), offload_policy=policy, **kw)
    engine = llm.llm_engine
    assert engine.offload_plan.kv_host_layers == host_layers
    attn = engine.executor.runner.attn_layers
    assert [a.kv_on_host for a in attn] == [False] * (24 - host_layers) + [True] * host_layers
    assert run(llm) == resident_tokens
    assert calls["rows"] >= host_layers * len(PROMPTS) * 7     # every decode step of every host layer
    if delay_s:
        assert calls["host"] >= 3 * host_layers * 7             # several micro-batches per decode step
    engine.offload_mover.close()


@pytest.mark.parametrize("policy, host_layers", [("w_gpu=1,kv_cpu=1", 24), ("w_gpu=1,kv_cpu=0.5,micro_batch_tokens=2", 12)])
def test_int8_kv_cache_on_host_tier(model_dir, tmp_path, monkeypatch, policy, host_layers):
    """kv_cache_dtype='int8' with layers' caches in host RAM: codes and scales there (the scales
    beside their codes, in RAM too), decode rows attending over them on the CPU, fresh prompts
    over the dequantized values on the device: the resident int8 run's tokens. The codes are
    FlexGen's compressed cache: half of bf16's bytes to keep, write and read."""
    from strata.attention import host_tier
    seen = []
    real = host_tier.cpu_attend

    def recording(q_host, kv_cache, meta, scale, threads=None, kv_scales=None):
        seen.append((kv_cache.dtype, None if kv_scales is None else kv_scales.device.type))
        return real(q_host, kv_cache, meta, scale, threads, kv_scales)

    monkeypatch.setattr(host_tier, "cpu_attend", recording)
    resident = make(model_dir, kv_cache_dtype="int8")
    want = run(resident)
    del resident
    gc.collect()
    llm = make(model_dir, offload_dir=str(tmp_path), offload_policy=policy, kv_cache_dtype="int8")
    engine = llm.llm_engine
    assert engine.offload_plan.kv_host_layers == host_layers
    attn = engine.executor.runner.attn_layers
    for a in attn:
        assert a.kv_cache.dtype == torch.int8 and a.kv_scales.device == a.kv_cache.device
        assert a.kv_cache.device.type == "cpu"   # (the whole engine is on the CPU here)
        # a host-tier layer's blocks are head-major (host_tier.zeros_cache), codes and scales alike
        bs, d = a.kv_cache.shape[2], a.head_dim
        if a.kv_on_host:
            assert cpu_ops.block_strides(a.kv_cache) == (d, bs * d) and a.kv_scales.stride()[2:] == (1, bs)
        else:
            assert a.kv_cache.is_contiguous() and a.kv_scales.is_contiguous()
    assert run(llm) == want
    assert len(seen) >= host_layers * 7 and set(seen) == {(torch.int8, "cpu")}
    # The plan counts the cache as stored: codes and a float32 scale per head, not float32 values.
    spec = engine.offload_spec
    assert spec.kv_bytes_per_token == 24 * 2 * 2 * (64 + 4) and spec.kv_width == 2 * 64
    engine.offload_mover.close()
    # fp8 codes stay on the device: the CPU has no conversion for them (refused on a GPU engine).
    from strata.quant.kv import KV_FORMATS
    assert host_tier.stores(None) and host_tier.stores(KV_FORMATS["int8"]) and not host_tier.stores(KV_FORMATS["fp8"])


def test_decode_cut_in_two_for_the_host_tier(model_dir, resident_tokens, tmp_path, monkeypatch):
    """A GPU engine cuts a step that fits one micro-batch in two when layers keep their KV in host
    RAM (split_single_part), and the overlap runs on from one host-KV layer to the next: forced on
    here, with a slow worker, the resident run's tokens, two host tasks per layer and step."""
    from strata.attention import host_tier
    monkeypatch.setattr(host_tier.worker(), "delay_s", 0.001)
    llm = make(model_dir, offload_dir=str(tmp_path), offload_policy="w_gpu=1,kv_cpu=0.5")
    engine = llm.llm_engine
    loop = engine.executor.runner.model.layer_loop
    assert not loop.split_single_part   # on the CPU both halves would share the same cores
    loop.split_single_part = True
    tasks = host_tier.worker().tasks_run
    assert run(llm) == resident_tokens
    # 12 host layers x 2 halves x 7 decode steps (5 sequences each), besides the prefill's tasks
    assert host_tier.worker().tasks_run - tasks >= 12 * 2 * 7
    engine.offload_mover.close()


@pytest.mark.parametrize("micro_batch_tokens,fresh_parts", [(16, [1, 2]), (256, [1])])
def test_fresh_parts_taken_while_decode_rows_attend_on_the_host(model_dir, tmp_path, monkeypatch,
                                                                 micro_batch_tokens, fresh_parts):
    """A step of decode rows and fresh prompts (a prefill wave beside the waves before it): the
    part with decode rows waits for the CPU, the fresh parts wait for nothing, so they are taken
    (o_proj, MLP queued) while the decode part stays pending, which is taken only when its own
    next layer starts (runner/offload_loop._HostKVPipeline). Decode rows and prompts never share
    a part, even where all would fit one (256 tokens). The resident run's tokens, with a slow
    worker."""
    from strata.attention import host_tier
    from strata.runner import offload_loop
    first = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302]]
    later = [list(range(100, 150)), list(range(9, 18))]
    kw = dict(max_num_batched_tokens=64, enable_chunked_prefill=False, max_model_len=64)

    def generate(llm):
        engine = llm.llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        for p in first:
            engine.add_request(None, {"prompt_token_ids": p}, params)
        engine.step()   # the first three prompts (45 tokens; the 50-token one would pass 64)
        for p in later:
            engine.add_request(None, {"prompt_token_ids": p}, params)
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        return [outs[k] for k in sorted(outs, key=int)]

    resident = generate(make(model_dir, **kw))
    taken = []
    real_take = offload_loop._HostKVPipeline._take

    passes = itertools.count()

    def take(self, item):
        if not hasattr(self, "pass_number"):   # (ids of passes gone may come again)
            self.pass_number = next(passes)
        taken.append((self.pass_number, item[0], item[1], len(self.parts), item[2].waits_for_cpu))
        real_take(self, item)

    monkeypatch.setattr(offload_loop._HostKVPipeline, "_take", take)
    monkeypatch.setattr(host_tier.worker(), "delay_s", 0.001)
    llm = make(model_dir, offload_dir=str(tmp_path),
               offload_policy=f"w_gpu=1,kv_cpu=0.25,micro_batch_tokens={micro_batch_tokens}", **kw)
    assert generate(llm) == resident
    # The mixed step: the 3 decode rows, then the 50-token prompt and the 9-token one (two parts
    # of at most 16 tokens, or one of 256).
    parts = 1 + len(fresh_parts)
    mixed_passes = {key for key, _, _, n, waits in taken if n == parts and waits}
    assert len(mixed_passes) == 1
    mixed = [(layer, part, waits) for key, layer, part, _, waits in taken if key in mixed_passes]
    assert len(mixed) == 6 * parts
    for layer in range(18, 24):
        assert [(p, w) for l, p, w in mixed if l == layer] == [(p, False) for p in fresh_parts] + [(0, True)]
    llm.llm_engine.offload_mover.close()


def test_equal_fresh_prompts_on_the_host_tier(model_dir, tmp_path, monkeypatch):
    """Fresh prompts of one length attend as one batched call per run of them
    (host_tier.fresh_prompts_attention): the resident run's tokens, with the batched call used."""
    from strata.attention import host_tier
    prompts = [list(range(10 + 9 * p, 19 + 9 * p)) for p in range(4)] + [[5, 6, 7, 8, 9]]
    resident = run(make(model_dir), prompts, 4)
    calls = []
    real = host_tier.fresh_prompts_attention
    monkeypatch.setattr(host_tier, "fresh_prompts_attention", lambda *a: calls.append(a[5]) or real(*a))
    llm = make(model_dir, offload_dir=str(tmp_path), offload_policy="w_gpu=1,kv_cpu=1")
    assert run(llm, prompts, 4) == resident
    assert calls[:2] == [4, 1]   # layer 0: the four 9-token prompts together, then the last
    llm.llm_engine.offload_mover.close()


def test_host_tier_output_is_waited_for(model_dir, resident_tokens, tmp_path, monkeypatch):
    """The check above can fail: an o_proj that took the CPU rows' output without waiting for the
    (slow) worker reads a staging buffer not yet written, and the tokens change."""
    from strata.attention import host_tier
    monkeypatch.setattr(host_tier.worker(), "delay_s", 0.02)
    llm = make(model_dir, offload_dir=str(tmp_path), offload_policy="w_gpu=1,kv_cpu=0.25")
    monkeypatch.setattr(host_tier.PendingAttention, "result", _result_without_wait)
    try:
        assert run(llm, max_new=3) != [t[:3] for t in resident_tokens]
    finally:
        host_tier.worker().reset()
        llm.llm_engine.offload_mover.close()


def _result_without_wait(self):
    """PendingAttention.result less its wait for the worker."""
    self.staging.awaiting_result = False
    if self.out_host is not None:
        rows = self.out_host.to(self.out.device).to(self.out.dtype)
        if self.token_index is None:
            self.out.copy_(rows)
        else:
            self.out[self.token_index] = rows
    return self.out


def test_budget_below_one_layer_is_an_error(model_dir):
    with pytest.raises(ValueError, match="cpu_memory_budget .* cannot hold even one layer"):
        make(model_dir, cpu_memory_budget="4MiB")


@pytest.mark.parametrize("kw, message", [
    (dict(gpu_memory_budget="4GiB"), "gpu_memory_budget .* needs a CUDA device"),
    (dict(cpu_memory_budget="lots"), "cpu_memory_budget: cannot parse"),
    (dict(cpu_memory_budget=-5), "cpu_memory_budget must be > 0"),
    (dict(offload_policy="w_gpu=0.5,w_cpu=0.7"), "must sum to 1"),
    (dict(offload_policy="kv_cpu=1.5"), "kv_cpu must be in"),
    (dict(offload_policy="w_gpu=1,kv_cpu=1", kv_cache_dtype="fp8"), "kv_cache_dtype='fp8' needs a CUDA GPU"),
    (dict(offload_policy="speed=9"), "unknown key"),
    (dict(offload_policy="prefill_waves=0"), "prefill_waves must be in"),
    (dict(offload_policy="prefill_waves=two"), "prefill_waves must be a number"),
])
def test_bad_offload_options(model_dir, kw, message):
    with pytest.raises(ValueError, match=message):
        make(model_dir, **kw)


@pytest.mark.parametrize("method, group", [("int8", None), ("int4", 32)])
def test_quantized_weights_stream(tmp_path, method, group):
    """int8 / int4 codes and scales are parameters like float weights: they stream the same way."""
    from hf_tiny import make_tiny_model
    make_tiny_model("llama", tmp_path / "m")
    kw = dict(skip_tokenizer_init=True, device="cpu", use_tqdm_on_load=False, kv_cache_memory="4MiB",
              quantization=method, quantization_group_size=group)
    prompts = [[1, 5, 9, 33, 7], list(range(3, 40))]
    resident = run(LLM(str(tmp_path / "m"), **kw), prompts, 6)
    llm = LLM(str(tmp_path / "m"), offload_policy="w_disk=1", offload_dir=str(tmp_path / "tier"), **kw)
    assert llm.llm_engine.offload_plan.count("disk") == 2
    assert run(llm, prompts, 6) == resident
    llm.llm_engine.offload_mover.close()


def _gpu_resident(model_dir):
    """The engine options of the GPU tests (float32) and the resident engine's tokens under them."""
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="float32", max_num_seqs=8, use_tqdm_on_load=False)
    resident = LLM(str(model_dir), **kw)
    want = run(resident)
    del resident
    gc.collect()
    return kw, want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_offload_with_host_kv_matches_resident(model_dir):
    """On a GPU in float32: layers streamed from pinned RAM, half of them with their KV cache in
    host RAM (CPU attention, rotated by the same Triton kernel as the device-cache layers) and
    the token embedding looked up into its pinned staging buffer give the resident run's tokens."""
    from strata.runner.offload_loop import HostEmbedding
    kw, want = _gpu_resident(model_dir)
    llm = LLM(str(model_dir), offload_policy="w_cpu=1,kv_cpu=0.5,prefill_waves=1", **kw)
    engine = llm.llm_engine
    embed = engine.executor.runner.model.embed_tokens
    assert isinstance(embed, HostEmbedding) and embed._rows.is_pinned()
    assert engine.offload_plan.kv_host_layers > 0
    assert run(llm) == want
    assert run(llm, PROMPTS[::-1]) == want[::-1]     # the staging buffer reused step after step
    engine.offload_mover.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_offload_with_int8_host_kv_matches_resident_int8(model_dir):
    """kv_cache_dtype='int8' on a GPU: the device layers' codes written by the Triton rotary
    kernel, the host layers' by strata.quant.kv on the device before they go down (the same
    float32 operations, so the same codes), decode rows attending over host codes on the CPU:
    the resident int8 engine's tokens."""
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="float32", max_num_seqs=8, use_tqdm_on_load=False,
              kv_cache_dtype="int8")
    resident = LLM(str(model_dir), **kw)
    want = run(resident)
    del resident
    gc.collect()
    llm = LLM(str(model_dir), offload_policy="w_cpu=1,kv_cpu=0.5,prefill_waves=1", **kw)
    engine = llm.llm_engine
    attn = engine.executor.runner.attn_layers
    assert engine.offload_plan.kv_host_layers == 12
    assert [a.kv_scales.device.type for a in attn] == ["cuda"] * 12 + ["cpu"] * 12
    assert run(llm) == want
    engine.offload_mover.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_prefill_waves_match_resident(model_dir):
    """A plan that prefills its batch in waves: the engine's token budget holds one wave (whole
    prompts: chunking is off), the later waves' prompts run beside the earlier ones' decodes, and
    the tokens are the resident run's."""
    from strata.core.offload_policy import step_tokens
    kw, want = _gpu_resident(model_dir)
    llm = LLM(str(model_dir), offload_policy="w_cpu=1,kv_cpu=0.5,prefill_waves=2", **kw)
    engine = llm.llm_engine
    plan = engine.offload_plan
    assert plan.prefill_waves == 2 and "prefilled in 2 waves" in plan.describe()
    config = engine.scheduler_config
    assert not config.enable_chunked_prefill
    assert config.max_num_batched_tokens == step_tokens(plan.batch_size, 2, config.max_model_len)
    assert run(llm) == want
    engine.offload_mover.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_int4_layers_stream_packed_on_gpu(tmp_path):
    """On a GPU an offloaded int4 model is quantized on the device (quant.finish_loading's
    process_device): its streamed layers hold the packed codes the W4A16 kernel reads, so they
    cross PCIe at about a quarter of their float size, and the output is still text-like."""
    from hf_tiny import make_tiny_model
    make_tiny_model("llama", tmp_path / "m")
    kw = dict(skip_tokenizer_init=True, use_tqdm_on_load=False, quantization="int4", quantization_group_size=32)
    llm = LLM(str(tmp_path / "m"), offload_policy="w_cpu=1", **kw)
    engine = llm.llm_engine
    layer = engine.executor.runner.model.layers[0]
    linears = [m for m in layer.modules() if getattr(m, "quant_method", None) is not None]
    assert linears and all(getattr(m, "weight", None) is None and m.qweight.dtype == torch.uint8 for m in linears)
    spec = engine.offload_spec
    float_bytes = sum(m.in_features * m.out_features * 2 for m in linears)
    assert spec.layer_bytes < 0.45 * float_bytes
    assert len(run(llm, [[1, 5, 9, 33, 7]], 4)[0]) == 4
    engine.offload_mover.close()


@pytest.mark.parametrize("name", ["opt", "opt_post_ln_proj", "qwen3"])
def test_host_tier_split_layers_of_other_models(tmp_path, monkeypatch, name):
    """OPT (pre- and post-LN) and Qwen3 (q/k norms) split around attention the same way
    (split_layer_forward): with every layer's KV cache in host RAM, decode micro-batches of 2
    rows and a slow worker, the resident run's tokens."""
    from hf_tiny import make_tiny_model

    from strata.attention import host_tier
    make_tiny_model(name, tmp_path / "m")
    kw = dict(skip_tokenizer_init=True, device="cpu", use_tqdm_on_load=False, kv_cache_memory="4MiB",
              max_num_seqs=8)
    prompts = [[1, 5, 9, 33, 7], list(range(3, 40)), [11, 12], [40]]
    resident = run(LLM(str(tmp_path / "m"), **kw), prompts, 6)
    from strata.runner import offload_loop
    split_calls = []
    real_split = offload_loop._HostKVPipeline.layer
    monkeypatch.setattr(offload_loop._HostKVPipeline, "layer",
                        lambda *a: split_calls.append(1) or real_split(*a))
    monkeypatch.setattr(host_tier.worker(), "delay_s", 0.001)
    llm = LLM(str(tmp_path / "m"), offload_policy="w_gpu=1,kv_cpu=1,micro_batch_tokens=2", **kw)
    assert llm.llm_engine.offload_plan.kv_host_layers == 2
    tasks = host_tier.worker().tasks_run
    assert run(llm, prompts, 6) == resident
    assert host_tier.worker().tasks_run - tasks >= 2 * 2 * 5   # 2 layers x 2 micro-batches x 5 decode steps
    assert len(split_calls) >= 2 * 6                           # the split schedule ran in every host layer
    llm.llm_engine.offload_mover.close()
