"""The offload policy search (pure Python): every plan respects every budget, for a table of
model sizes and budgets; budgets too small for one layer are a clear error; explicit fractions
are honoured; more memory never predicts less throughput."""

from __future__ import annotations

import pytest

from strata.config import parse_offload_policy
from strata.core.offload_policy import GPU_RESERVE, KNEE_TOLERANCE, Hardware, ModelSpec, Workload, search_policy

GIB = 2**30
H100 = Hardware("cuda", h2d_bytes_per_s=25e9, disk_bytes_per_s=2e9, flops=600e12, mem_bytes_per_s=2.5e12)
# The same GPU with a host that attends over its KV cache at 20 GB/s (FlexGen's CPU delegation).
H100_HOST_ATTN = Hardware("cuda", h2d_bytes_per_s=25e9, disk_bytes_per_s=2e9, flops=600e12,
                          mem_bytes_per_s=2.5e12, cpu_attn_bytes_per_s=20e9)
CPU = Hardware("cpu", h2d_bytes_per_s=float("inf"), disk_bytes_per_s=1e9, flops=100e9, mem_bytes_per_s=20e9)


def llama_spec(layers, hidden, inter, kv_heads, vocab, head_dim=128, dtype_bytes=2, host_embed=True):
    params = hidden * (hidden + 2 * kv_heads * head_dim) + hidden * hidden + 3 * hidden * inter
    table = vocab * hidden * dtype_bytes
    return ModelSpec(num_layers=layers, layer_bytes=params * dtype_bytes, layer_params=params,
                     device_bytes=table + (0 if host_embed else table), host_bytes=table if host_embed else 0,
                     hidden_size=hidden, intermediate_size=inter, vocab_size=vocab,
                     kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes, dtype_bytes=dtype_bytes)


MODELS = {
    "llama-8b": llama_spec(32, 4096, 14336, 8, 128256),
    "llama-70b": llama_spec(80, 8192, 28672, 8, 128256),
    "opt-30b": llama_spec(48, 7168, 28672 * 2 // 3, 56, 50272, host_embed=False),
    "smol-135m": llama_spec(30, 576, 1536, 3, 49152, head_dim=64),
}
BUDGETS = [(4 * GIB, 32 * GIB), (4 * GIB, 8 * GIB), (12 * GIB, None), (24 * GIB, 200 * GIB), (6 * GIB, 2 * GIB)]


@pytest.mark.parametrize("hw", [H100, H100_HOST_ATTN], ids=["kv-gpu", "kv-any"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpu, cpu", BUDGETS)
def test_plans_respect_budgets(name, gpu, cpu, hw):
    spec = MODELS[name]
    workload = Workload(max_model_len=544, prompt_len=512, gen_len=32, max_num_seqs=256)
    try:
        plan = search_policy(spec, hw, workload, gpu, cpu)
    except ValueError as e:   # only when nothing fits: then the message says which budget
        assert "budget" in str(e)
        return
    assert len(plan.placement) == spec.num_layers
    assert plan.device_bytes <= gpu * (1 - GPU_RESERVE)
    if cpu is not None:
        assert plan.host_bytes <= cpu
    staged = plan.prefetch_depth * spec.layer_bytes
    assert plan.device_bytes >= (spec.device_bytes + plan.count("resident") * spec.layer_bytes + staged
                                 + plan.kv_bytes + plan.activation_bytes)
    seq_kv = 544 * spec.kv_bytes_per_token
    host_share = plan.kv_host_layers / spec.num_layers
    assert plan.batch_size >= 1
    assert plan.kv_bytes + plan.host_kv_bytes >= plan.batch_size * seq_kv - spec.num_layers
    assert plan.host_kv_bytes == pytest.approx(plan.batch_size * seq_kv * host_share, abs=plan.batch_size)
    assert plan.host_bytes >= plan.host_kv_bytes + plan.count("cpu") * spec.layer_bytes
    if hw is H100:
        assert plan.kv_host_layers == 0
    if plan.streamed:
        assert plan.prefetch_depth >= 2      # copies overlap compute
    assert plan.predicted_tok_s > 0 and plan.reason
    assert "predicted" in plan.describe()


def test_more_memory_never_predicts_less():
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    rates = [search_policy(spec, H100, workload, g * GIB, 64 * GIB).predicted_tok_s for g in (3, 4, 8, 16, 40)]
    assert rates == sorted(rates)
    everything = search_policy(spec, H100, workload, 80 * GIB, 64 * GIB)
    assert everything.count("resident") == spec.num_layers     # all fits: nothing streams


def test_small_host_budget_sends_layers_to_disk():
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    plan = search_policy(spec, H100, workload, 4 * GIB, 6 * GIB)
    assert plan.count("disk") > 0 and plan.host_bytes <= 6 * GIB
    assert plan.count("cpu") * spec.layer_bytes + spec.host_bytes <= 6 * GIB


@pytest.mark.parametrize("gpu, cpu, hw, message", [
    (0.5 * GIB, None, H100, "gpu_memory_budget .* cannot hold even one layer"),
    (None, 1 * GIB, CPU, "cpu_memory_budget .* cannot hold even one layer"),
])
def test_budget_below_one_layer(gpu, cpu, hw, message):
    with pytest.raises(ValueError, match=message):
        search_policy(MODELS["llama-8b"], hw, Workload(544, 512, 32, 256), gpu and int(gpu), cpu)


def test_no_room_for_one_sequence_names_max_model_len():
    with pytest.raises(ValueError, match="max_model_len"):
        search_policy(MODELS["llama-8b"], H100, Workload(131072, 130000, 1072, 256), 4 * GIB, None)


def test_explicit_fractions():
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 64)
    fractions = parse_offload_policy("w_gpu=0.25,w_cpu=0.5,micro_batch_tokens=1024,prefetch_depth=3")
    plan = search_policy(spec, H100, workload, 40 * GIB, None, fractions)
    assert (plan.count("resident"), plan.count("cpu"), plan.count("disk")) == (8, 16, 8)
    assert plan.micro_batch_tokens == 1024 and plan.prefetch_depth == 3 and plan.explicit
    with pytest.raises(ValueError, match="fits the budgets"):
        search_policy(spec, H100, workload, 4 * GIB, None, parse_offload_policy("w_gpu=1"))


def test_cpu_only_budget_counts_resident_layers_and_slots():
    spec, workload = MODELS["smol-135m"], Workload(256, 240, 16, 8)
    budget = spec.device_bytes + spec.host_bytes + 10 * spec.layer_bytes
    plan = search_policy(spec, CPU, workload, None, budget)
    assert plan.count("cpu") == 0
    assert plan.host_bytes <= budget
    assert plan.count("resident") == 8 and plan.prefetch_depth == 2    # 8 resident + 2 slots


def test_kv_on_host_lets_the_batch_grow():
    """Llama-8B under 4 GiB: the KV cache of one sequence crowds the GPU, so with a host that
    attends fast enough the policy keeps the cache there and the batch grows, and with it the
    predicted throughput; too slow a host, or none measured, keeps it on the GPU."""
    import dataclasses
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    on_gpu = search_policy(spec, H100, workload, 4 * GIB, None)
    on_host = search_policy(spec, H100_HOST_ATTN, workload, 4 * GIB, None)
    assert on_gpu.kv_host_layers == 0 and on_host.kv_host_layers > 0
    assert on_host.batch_size >= 2 * on_gpu.batch_size
    assert on_host.predicted_tok_s > 1.5 * on_gpu.predicted_tok_s
    assert "host RAM" in on_host.describe() and "CPU attention" in on_host.describe()
    slow = dataclasses.replace(H100_HOST_ATTN, cpu_attn_bytes_per_s=0.05e9)
    assert search_policy(spec, slow, workload, 4 * GIB, None).kv_host_layers == 0
    # A host budget caps what the host KV holds: batch x its share of a sequence's KV fits.
    small = search_policy(spec, H100_HOST_ATTN, workload, 4 * GIB, 18 * GIB)
    assert small.host_bytes <= 18 * GIB
    assert small.batch_size < on_host.batch_size or small.kv_host_layers < on_host.kv_host_layers


def test_explicit_kv_fraction():
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    plan = search_policy(spec, H100, workload, 4 * GIB, None, parse_offload_policy("w_cpu=1,kv_cpu=0.5"))
    assert plan.kv_host_layers == 16 and plan.explicit
    assert [plan.kv_on_host(i) for i in (0, 15, 16, 31)] == [False, False, True, True]
    gpu_only = search_policy(spec, H100, workload, 4 * GIB, None, parse_offload_policy("w_cpu=1"))
    assert plan.batch_size > gpu_only.batch_size


def test_host_kv_layers_cost_layer_by_layer():
    """The decode step of a plan with host-KV layers, as the offload loop runs it: a streamed layer
    takes the longer of its copy and its compute, so a host layer whose CPU attention outlasts its
    copy is not hidden by the I/O slack of the other layers (the old model's max(io, compute) was:
    predicted 1.7x the H100's measured rate); and with several micro-batches the CPU attention and
    the GPU work of a host layer overlap (one micro-batch: they add up)."""
    import dataclasses

    from strata.core.offload_policy import step_costs
    spec = MODELS["llama-8b"]
    layers, batch, ctx = spec.num_layers, 37, 37 * 544
    host = dataclasses.replace(H100_HOST_ATTN, h2d_bytes_per_s=51 * GIB)   # as measured on the H100
    copy = spec.layer_bytes / host.h2d_bytes_per_s
    slow = dataclasses.replace(host, cpu_attn_bytes_per_s=4.8 * GIB)
    cpu_layer = ctx * spec.kv_bytes_per_token / layers / slow.cpu_attn_bytes_per_s
    assert cpu_layer > 1.5 * copy
    io, compute, step = step_costs(spec, slow, 0, layers, 0, batch, ctx, 1, 2, kv_host_layers=16)
    assert step > max(io, compute) + 10 * (cpu_layer - copy)          # host layers are CPU-bound each
    assert step == pytest.approx(16 * copy + 16 * cpu_layer, rel=0.1)
    # GPU work as long as the CPU's: four micro-batches hide most of the shorter one.
    even = dataclasses.replace(slow, flops=2.0 * spec.layer_params * batch / cpu_layer)
    one = step_costs(spec, even, 0, layers, 0, batch, ctx, 1, 2, kv_host_layers=layers)[2]
    four = step_costs(spec, even, 0, layers, 0, batch, ctx, 4, 2, kv_host_layers=layers)[2]
    # (four micro-batches cost the host three more launches a layer: HOST_KV_MICRO_BATCH_S each)
    from strata.core.offload_policy import HOST_KV_MICRO_BATCH_S
    assert four - 3 * layers * HOST_KV_MICRO_BATCH_S < 0.7 * one
    # A fast host: the host layers are I/O-bound like the others, and the step is the copies.
    fast = step_costs(spec, host, 0, layers, 0, batch, ctx, 1, 2, kv_host_layers=16)
    assert fast[2] == pytest.approx(layers * copy, rel=0.1)


def test_host_bytes_count_the_steps_host_buffers():
    """A GPU plan's host RAM is its CPU tier, its host KV cache and the step's host buffers (the
    host tier's pinned staging, the host embedding's pinned rows): the sum the startup line
    prints, and the one the budget bounds (a budget that leaves no room for those buffers gets
    a smaller batch)."""
    from strata.core.offload_policy import host_step_bytes, step_tokens
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    plan = search_policy(spec, H100_HOST_ATTN, workload, 4 * GIB, 40 * GIB)
    assert plan.kv_host_layers > 0
    step = host_step_bytes(spec, step_tokens(plan.batch_size, plan.prefill_waves, 544), plan.micro_batch_tokens,
                           544, True)
    weights = spec.host_bytes + plan.count("cpu") * spec.layer_bytes
    assert step > 0 and plan.host_bytes == weights + plan.host_kv_bytes + step
    assert plan.host_bytes <= 40 * GIB
    tight = search_policy(spec, H100_HOST_ATTN, workload, 4 * GIB, weights + plan.host_kv_bytes)
    assert tight.host_bytes <= weights + plan.host_kv_bytes
    assert tight.batch_size < plan.batch_size or tight.kv_host_layers < plan.kv_host_layers
    # Loading places each layer as it loads: it holds the plan's host share, a layer in flight
    # and its packed copy, and the parts outside the layers until they move to the GPU.
    assert plan.load_host_bytes == plan.host_bytes + 2 * spec.layer_bytes + spec.device_bytes
    disk = search_policy(spec, H100, workload, 4 * GIB, 6 * GIB)
    assert disk.count("disk") > 0 and disk.load_host_bytes < 0.6 * spec.weight_bytes
    assert "while loading" in disk.describe()


def test_compute_bound_batch_stops_at_the_knee(monkeypatch):
    """Past the batch where the host's attention overtakes the weight stream, more sequences add
    host KV and latency more than throughput: the auto plan takes the placement with the most
    throughput, lowers its batch to the smallest predicting within KNEE_TOLERANCE of its largest
    batch's (the rates measured on an H100 host), places that batch anew, and says so; an
    explicit policy keeps the largest batch that fits."""
    from strata.core import offload_policy
    from strata.core.offload_policy import _evaluate
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    hw = Hardware("cuda", h2d_bytes_per_s=51 * GIB, disk_bytes_per_s=1.2 * GIB, flops=700e12,
                  mem_bytes_per_s=2.9e12, cpu_attn_bytes_per_s=15.9 * GIB)
    plan = search_policy(spec, hw, workload, 4 * GIB, 40 * GIB)
    with monkeypatch.context() as m:
        m.setattr(offload_policy, "KNEE_TOLERANCE", 0.0)
        largest = search_policy(spec, hw, workload, 4 * GIB, 40 * GIB)

    def at(cap):   # the largest batch's placement at a lower batch
        return _evaluate(spec, hw, workload, 4 * GIB, 40 * GIB, largest.count("resident"), largest.count("cpu"),
                         largest.prefetch_depth, largest.micro_batch_tokens, largest.kv_host_layers, cap,
                         largest.prefill_waves)
    assert largest.batch_size > plan.batch_size and largest.compute_seconds > largest.io_seconds
    floor = (1 - KNEE_TOLERANCE) * largest.predicted_tok_s
    assert at(plan.batch_size).predicted_tok_s >= floor
    assert at(plan.batch_size - 1) is None or at(plan.batch_size - 1).predicted_tok_s < floor
    assert plan.predicted_tok_s >= at(plan.batch_size).predicted_tok_s   # placed anew: never worse
    assert f"batch {plan.batch_size}: more would add under" in plan.reason
    assert plan.host_kv_bytes < largest.host_kv_bytes
    explicit = search_policy(spec, hw, workload, 4 * GIB, 40 * GIB,
                             parse_offload_policy(f"w_cpu=1,kv_cpu={largest.kv_host_layers / 32},"
                                                  f"prefill_waves={largest.prefill_waves}"))
    assert explicit.batch_size == largest.batch_size


def test_prefill_waves_shrink_the_step_and_cost_a_pass_each():
    """A plan prefilling its batch in W waves budgets a step of one wave (its prompts at
    max_model_len and the other sequences' decodes), so its activations shrink and the batch
    may grow; its prediction counts W prefill passes of a W-th of the prompts."""
    from strata.core.offload_policy import step_costs, step_tokens
    assert step_tokens(123, 1, 544) == 123 * 544
    assert step_tokens(123, 2, 544) == 62 * 544 + 61
    assert step_tokens(123, 4, 544) == 31 * 544 + 92
    spec, workload = MODELS["llama-8b"], Workload(544, 512, 32, 256)
    plans = {w: search_policy(spec, H100_HOST_ATTN, workload, 4 * GIB, 60 * GIB,
                              parse_offload_policy(f"w_cpu=1,kv_cpu=1,micro_batch_tokens=4096,prefill_waves={w}"))
             for w in (1, 2, 4)}
    assert plans[1].batch_size < plans[2].batch_size < plans[4].batch_size
    assert "prefilled in" not in plans[1].describe() and "prefilled in 4 waves" in plans[4].describe()
    for w, plan in plans.items():
        assert plan.prefill_waves == w and plan.device_bytes <= 4 * GIB * (1 - GPU_RESERVE)
        wave_tokens = -(-plan.batch_size // w) * 512
        _, _, prefill = step_costs(spec, H100_HOST_ATTN, 0, 32, 0, wave_tokens, wave_tokens, -(-wave_tokens // 4096),
                                   plan.prefetch_depth, 32, prefill=True)
        total = w * prefill + 31 * plan.step_seconds
        assert plan.predicted_tok_s == pytest.approx(plan.batch_size * 32 / total)
    # The auto search weighs waves too, and only on a GPU.
    auto = search_policy(spec, H100_HOST_ATTN, workload, 4 * GIB, 60 * GIB)
    assert auto.predicted_tok_s >= max(p.predicted_tok_s for p in plans.values()) * (1 - KNEE_TOLERANCE)
    cpu = search_policy(MODELS["smol-135m"], CPU, workload, None, 0.2 * GIB)
    assert cpu.prefill_waves == 1


def test_stream_prefills_beside_decodes():
    """The engine's workload is a stream (a queue keeps the batch full): over gen_len passes every
    sequence is replaced once, W of them carry a wave of prompts beside the others' decodes, so
    the waves cost no pass of their own; fresh prompts' K and V are written at the host's write
    rate. One batch at once pays its prefill passes on top."""
    from dataclasses import replace

    from strata.core.offload_policy import _evaluate, step_costs
    assert Workload.from_max_model_len(544, 256).stream
    spec = MODELS["llama-8b"]
    hw = Hardware("cuda", h2d_bytes_per_s=51 * GIB, disk_bytes_per_s=1.2 * GIB, flops=700e12,
                  mem_bytes_per_s=2.9e12, cpu_attn_bytes_per_s=48 * GIB, cpu_write_bytes_per_s=10 * GIB)
    stream, batch = Workload(544, 512, 32, 256, stream=True), Workload(544, 512, 32, 256)
    for waves in (4, 8, 16):
        plan = _evaluate(spec, hw, stream, 4 * GIB, 60 * GIB, 0, 32, 2, 4096, 32, 200, waves)
        wave = -(-plan.batch_size // waves)
        others = plan.batch_size - wave
        _, _, wave_step = step_costs(spec, hw, 0, 32, 0, others + wave * 512, others * 544,
                                     -(-others // 4096) + -(-wave * 512 // 4096), 2, 32, fresh_tokens=wave * 512)
        assert wave_step > plan.step_seconds   # the wave's prefill costs the pass something
        total = waves * wave_step + (32 - waves) * plan.step_seconds
        assert plan.predicted_tok_s == pytest.approx(plan.batch_size * 32 / total)
        once = _evaluate(spec, hw, batch, 4 * GIB, 60 * GIB, 0, 32, 2, 4096, 32, 200, waves)
        assert once.batch_size == plan.batch_size
        # A wave that rides along beats paying for its pass (the H100 streamed at 577 tok/s with
        # 8 waves of 30 prompts, 495 for one batch of 234; 4 waves of 59 streamed at only 462,
        # more than this model sees: each wave step then held 0.65 s of the GPU's prefill).
        if waves >= 8:
            assert once.predicted_tok_s < plan.predicted_tok_s
    assert _evaluate(spec, hw, replace(stream, gen_len=4), 4 * GIB, 60 * GIB, 0, 32, 2, 4096, 32, 200, 8) is None
    # Writing K and V is the host's work: a slower write makes a prefill (and a wave step) longer.
    slow = replace(hw, cpu_write_bytes_per_s=2 * GIB)
    for fresh in (dict(prefill=True), dict(fresh_tokens=4096)):
        tokens = 4096 if "prefill" in fresh else 4096 + 100
        fast_s = step_costs(spec, hw, 0, 32, 0, tokens, tokens, 2, 2, 32, **fresh)[2]
        assert step_costs(spec, slow, 0, 32, 0, tokens, tokens, 2, 2, 32, **fresh)[2] > fast_s
