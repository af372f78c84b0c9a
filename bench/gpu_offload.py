"""Offloading on one GPU: Llama-3.1-8B's shape (bf16, random weights, 15 GiB) under a 4 GiB GPU
budget, FlexGen's setting (prompts of 512 tokens, 32 new tokens, the largest batch the policy
picks), beside the host-to-device bandwidth measured in the same run and HF transformers with
accelerate's device_map offloading under the same budget.

    python bench/gpu_offload.py --offload-dir /tmp/strata-tier                 # parts 1-4
    python bench/gpu_offload.py --offload-dir /tmp/strata-tier --flexgen \
        --wheels .bench-assets/flexgen-wheels                                    # and part 5
    python bench/gpu_offload.py --smoke        # CPU, a tiny Llama: every part at toy size
    python bench/gpu_offload.py --skip-hf --skip-disk

Parts (each engine in a process of its own, one after another, so that one's pinned host memory
and GPU memory are gone before the next starts):
1. rates: pinned host->device copy bandwidth (1 GiB, median of 5) and the disk's read rate (a
   1 GiB file written to --offload-dir, flushed, dropped from the page cache, read once).
2. strata, CPU tier: ``LLM(gpu_memory_budget="4GiB")``; the policy's batch B of 512-token
   prompts, 32 new tokens (EOS ignored): generated tok/s over the whole generate call (prefill
   included, as FlexGen counts). The bound: a generation of 32 tokens takes at least 32 forward
   passes, each bringing the streamed layers' bytes over PCIe, so tok/s <= B * 32 / (32 * streamed
   bytes / bandwidth); the passes actually run are printed beside it. Also: the cost
   model's prediction for this run, and the GPU memory torch allocated at peak. The same engine
   then times B prompts with --hf-new-tokens new tokens, for part 3.
3. HF transformers ``generate`` with accelerate's ``infer_auto_device_map(max_memory={0:
   --hf-weight-budget})`` + ``dispatch_model`` (weights that do not fit stay in CPU RAM and are
   copied in per forward; accelerate budgets weights only, so the rest of the GPU budget is left
   for HF's KV cache and activations): the largest batch whose GPU peak stays within the budget
   (probed with one-token generations), timed at that batch and at strata's batch B (when HF can
   run it at all; its peak is printed beside the budget), against strata's figure of part 2.
4. strata, disk tier: --disk-cpu-budget of host RAM (default 4 GiB: the embedding, the disk
   staging buffers and a few layers), the rest of the layers read from files each pass; tok/s
   against the bound the measured disk rate allows, and the cost model's prediction from the
   disk rate the engine measured at startup beside the bench's own measurement.
5. (--flexgen) bench/flexgen_peer.py: strata vs FlexGen 0.1.8 on OPT-30B's shape under
   --flexgen-gpu-budget (its wheels, and pulp's and attrs', in --wheels), strata's process
   exited before FlexGen's starts.
accelerate or flexgen missing on the machine: pip install from a carried wheel folder (--wheels).
Each part prints the seconds elapsed since the start, so a device call can be planned.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_llama8b import LLAMA_31_8B  # noqa: E402  (the shape every GPU bench uses)

SMOKE = dict(LLAMA_31_8B, vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, torch_dtype="float32")
GIB = 2**30


def h2d_bandwidth(nbytes: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[1:])


def disk_bandwidth(folder: str, nbytes: int, pinned: bool) -> float:
    """The mover's read path, best of 3 reads (what the policy measures at startup)."""
    from strata.runner.offload_loop import disk_read_rate
    return disk_read_rate(folder, nbytes, reads=3, pinned=pinned)


def make_model_dir(config: dict) -> Path:
    path = Path(tempfile.mkdtemp(prefix="strata-offload-model-"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def warm_up(llm, prompts: list, vocab: int, gen: torch.Generator) -> None:
    """One generation of as many other prompts of the same length, two new tokens each: the
    timed run's shapes (prefill micro-batches, waves, decode steps) have all been launched once,
    so one-time costs (kernel specialization, cuBLAS's choices, staging buffers growing) stay out
    of it, as FlexGen's own benchmark warms up on its whole batch. Other prompts: the timed run's
    must not find their prefixes cached."""
    from strata import SamplingParams
    length = len(prompts[0]["prompt_token_ids"])
    others = [{"prompt_token_ids": torch.randint(0, vocab, (length,), generator=gen).tolist()} for _ in prompts]
    llm.generate(others, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) each thread of this process has run, by native id (Linux's
    /proc; empty elsewhere)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:   # the thread has ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def steady_state(steps: list, loops: list, batch: int) -> dict | None:
    """A stream between its ramps: the passes from the first that runs the full batch to the
    last, start to start (the host's time between passes included). Each pass yields a token
    for each of its sequences (a decode's, or a wave prompt's first), so this is the rate a
    server sustains, the steps inside that run short of the batch counted as they ran. steps:
    (tokens, sequences) of each scheduled step; loops: (start, end) of each pass, in the same
    order. None when they do not pair up or fewer than two passes ran the full batch."""
    steps = [s for s in steps if s[0]]
    if len(steps) != len(loops):
        return None
    full = [i for i, (_, seqs) in enumerate(steps) if seqs == batch]
    if len(full) < 2:
        return None
    window = range(full[0], full[-1])
    seconds = loops[full[-1]][0] - loops[full[0]][0]
    tokens = sum(steps[i][1] for i in window)
    return dict(passes=len(window), full=sum(1 for i in window if steps[i][1] == batch), seconds=seconds,
                tok_s=tokens / seconds, mean_seqs=tokens / len(window))


def strata_run(model_dir, args, prompt_len, new_tokens, batch=None, short_new_tokens=None, waves=1, **offload):
    """Load, warm up, generate once; returns a dict of figures (and the batch the plan chose).
    short_new_tokens: then time the same prompts with that many new tokens (result["short"]).
    waves: submit waves * batch prompts at once (a stream: the engine keeps the batch full)."""
    from strata import LLM, SamplingParams
    from strata.core.offload_policy import Workload, predict_throughput
    t0 = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, device=args.device,
              max_model_len=prompt_len + new_tokens, max_num_seqs=args.max_num_seqs, use_tqdm_on_load=False,
              **offload)
    load_s = time.perf_counter() - t0
    engine = llm.llm_engine
    plan, mover = engine.offload_plan, engine.offload_mover
    batch = batch or plan.batch_size
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()}
               for _ in range(batch * waves)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    steps = []   # (tokens scheduled, sequences) per engine step of the timed run
    scheduler = engine.scheduler
    schedule = scheduler.schedule

    def counted_schedule():
        out = schedule()
        steps.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out
    warm_up(llm, prompts, vocab, gen)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    passes0, disk0 = mover.stats.passes, mover.stats.bytes_from_disk
    from strata.attention import host_tier
    host0 = dict(host_tier.worker().stats)
    worker_tid = host_tier.worker().thread_id()
    cpu0 = thread_cpu_s()
    scheduler.schedule = counted_schedule
    # The host's time inside each pass's layer loop (queuing it) and between passes (the engine's
    # own work: sampling's sync, scheduling, the next step's inputs), no sync added.
    loops = []
    loop = engine.executor.runner.model.layer_loop
    loop_run = loop.run

    def timed_loop(*a, **k):
        t = time.perf_counter()
        try:
            return loop_run(*a, **k)
        finally:
            loops.append((t, time.perf_counter()))
    loop.run = timed_loop
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    scheduler.schedule = schedule
    del loop.run
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cpu = {tid: t - cpu0.get(tid, 0.0) for tid, t in thread_cpu_s().items()}
    # The host tier's worker during the timed run: the rate its attention reached in the steps,
    # beside the startup probe's that the plan used.
    host = {key: value - host0[key] for key, value in host_tier.worker().stats.items()}
    # The startup probe again, now: a host slower in the run than at startup is either slower
    # now too (other tenants) or was slowed by the run's own work beside the attention.
    probe_after = 0.0
    if args.device == "cuda" and plan.kv_host_layers:
        from strata.runner.offload_loop import cpu_attention_rate
        cfg = engine.model_config
        probe_after = cpu_attention_rate(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
                                         kv_format=engine.kv_format)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    # a stream's prediction is the cost model's steady state (prefill waves beside decodes)
    workload = Workload(prompt_len + new_tokens, prompt_len, new_tokens, batch, stream=waves > 1)
    predicted = predict_throughput(engine.offload_spec, engine.offload_hardware, plan, workload)
    if args.device == "cuda" and getattr(args, "disk_bytes_per_s", None):
        # the prediction again from the bench's own disk measurement (when it took one)
        import dataclasses
        bench_hw = dataclasses.replace(engine.offload_hardware, disk_bytes_per_s=args.disk_bytes_per_s)
        predicted_bench_disk = predict_throughput(engine.offload_spec, bench_hw, plan, workload).predicted_tok_s
    else:
        predicted_bench_disk = float("nan")
    spec = engine.offload_spec
    result = dict(
        batch=batch, load_s=load_s, seconds=seconds, generated=generated, tok_s=generated / seconds,
        passes=mover.stats.passes - passes0, disk_bytes=mover.stats.bytes_from_disk - disk0,
        streamed_bytes=len(plan.streamed) * spec.layer_bytes, cpu_bytes=plan.count("cpu") * spec.layer_bytes,
        predicted_tok_s=predicted.predicted_tok_s, predicted_bench_disk_tok_s=predicted_bench_disk,
        plan=plan.describe(),
        gpu_peak_gib=torch.cuda.max_memory_allocated() / GIB if args.device == "cuda" else 0.0,
        gpu_reserved_gib=torch.cuda.max_memory_reserved() / GIB if args.device == "cuda" else 0.0,
        waves=waves, steps=len(steps), mean_step_seqs=statistics.mean(n for _, n in steps) if steps else 0,
        mean_step_tokens=statistics.mean(t for t, _ in steps) if steps else 0,
        wait_s=mover.stats.wait_seconds, kv_host_layers=plan.kv_host_layers, plan_host_gib=plan.host_bytes / GIB,
        plan_disk_gib_s=engine.offload_hardware.disk_bytes_per_s / GIB,
        plan_cpu_attn_gib_s=engine.offload_hardware.cpu_attn_bytes_per_s / GIB,
        plan_cpu_write_gib_s=engine.offload_hardware.cpu_write_bytes_per_s / GIB,
        host_attention=dict(host, gib_s=host["attend_bytes"] / GIB / max(host["attend_s"], 1e-9)),
        between_passes_s=[b[0] - a[1] for a, b in zip(loops, loops[1:])],
        steady=steady_state(steps, loops, batch),
        cpu_attn_probe_after_gib_s=probe_after / GIB,
        thread_cpu_s=dict(main=cpu.pop(threading.get_native_id(), 0.0), worker=cpu.pop(worker_tid, 0.0),
                          others=sorted(cpu.values(), reverse=True), cores=os.cpu_count()))
    if short_new_tokens:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=short_new_tokens, ignore_eos=True),
                            use_tqdm=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        result["short"] = dict(batch=batch, new_tokens=short_new_tokens, seconds=seconds, generated=generated,
                               tok_s=generated / seconds, gpu_peak_gib=torch.cuda.max_memory_allocated() / GIB
                               if args.device == "cuda" else 0.0)
    mover.close()
    del llm, engine, mover, outs
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def hf_load(config: dict, args, weight_budget: int):
    """HF's Llama with random weights, dispatched by accelerate under weight_budget of GPU memory."""
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cfg = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device="cpu").eval()
    src = "cuda" if args.device == "cuda" else "cpu"
    gen = torch.Generator(device=src).manual_seed(0)
    with torch.no_grad():   # random weights drawn on the GPU, as strata's dummy loader does
        for p in model.parameters():
            p.copy_(torch.empty(p.shape, dtype=p.dtype, device=src).uniform_(-0.02, 0.02, generator=gen))
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # to_empty left it unset
    if args.device == "cuda":
        device_map = infer_auto_device_map(model, max_memory={0: weight_budget, "cpu": 400 * GIB},
                                           no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
        model = dispatch_model(model, device_map=device_map)
        on_gpu = sum(1 for v in device_map.values() if v == 0)
        placement = f"{on_gpu} of {len(device_map)} modules on the GPU"
    else:
        placement = "all on the CPU (smoke)"
    return model, cfg, placement


def hf_generate(model, cfg, args, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """One timed generate call; the GPU peak over it (torch allocated: weights, KV, activations)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to("cuda" if args.device == "cuda" else "cpu")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    generated = (out.shape[1] - prompt_len) * batch
    peak = torch.cuda.max_memory_allocated() / GIB if args.device == "cuda" else 0.0
    return dict(batch=batch, tok_s=generated / seconds, seconds=seconds, gpu_peak_gib=peak)


def hf_run(config: dict, args, strata_batch: int, prompt_len: int, new_tokens: int, budget: int) -> dict:
    """HF + accelerate: the largest batch within the GPU budget (one-token generations probe it:
    doubling, then halving the gap), timed there and at strata's batch."""
    t0 = time.perf_counter()
    weight_budget = min(budget, _parse(args.hf_weight_budget))
    model, cfg, placement = hf_load(config, args, weight_budget)
    result = dict(placement=placement, weight_budget_gib=weight_budget / GIB, load_s=time.perf_counter() - t0)
    hf_generate(model, cfg, args, 1, 16, 2)   # warm-up

    def fits(batch: int) -> bool:
        try:
            peak = hf_generate(model, cfg, args, batch, prompt_len, 1)["gpu_peak_gib"]
        except torch.cuda.OutOfMemoryError:
            peak = float("inf")
        if args.device == "cuda":
            torch.cuda.empty_cache()
        probes.append((batch, peak))
        return peak * GIB <= budget or args.device != "cuda"

    probes: list = []
    lo, hi = 0, None
    batch = 1
    while hi is None and batch <= args.max_num_seqs:
        if fits(batch):
            lo, batch = batch, 2 * batch
        else:
            hi = batch
    hi = hi or args.max_num_seqs + 1
    while hi - lo > 1 and hi - lo > lo // 8:   # within an eighth: each probe is a forward pass
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    result["probes"] = probes
    if lo >= 1:
        result["largest"] = hf_generate(model, cfg, args, lo, prompt_len, new_tokens)
    try:
        result["at_strata_batch"] = hf_generate(model, cfg, args, strata_batch, prompt_len, new_tokens)
    except torch.cuda.OutOfMemoryError:
        result["at_strata_batch"] = dict(batch=strata_batch, error="out of GPU memory")
    del model
    gc.collect()
    return result


def _parse(size: str) -> int:
    from strata.config import parse_bytes
    return parse_bytes(size)


def ensure_accelerate(wheels: str | None) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        if not wheels:
            raise SystemExit("accelerate is not installed: pass --wheels DIR holding its wheel") from None
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                               "--no-deps", "accelerate"])


def rates_part(device: str, offload_dir: str, probe_bytes: int) -> dict:
    h2d = h2d_bandwidth(GIB) if device == "cuda" else float("inf")
    disk = disk_bandwidth(offload_dir, probe_bytes, device == "cuda")
    return dict(h2d=h2d, disk=disk, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__)


def strata_part(model_dir: str, opts: dict, prompt_len: int, new_tokens: int, batch=None, short_new_tokens=None,
                **offload) -> dict:
    return strata_run(model_dir, argparse.Namespace(**opts), prompt_len, new_tokens, batch, short_new_tokens,
                      **offload)


def hf_part(config: dict, opts: dict, strata_batch: int, prompt_len: int, new_tokens: int, budget: int) -> dict:
    return hf_run(config, argparse.Namespace(**opts), strata_batch, prompt_len, new_tokens, budget)


CHILD_PARTS = {"rates": rates_part, "strata": strata_part, "hf": hf_part}


def in_child(part: str, **kwargs) -> dict:
    """CHILD_PARTS[part](**kwargs) in a Python process of its own, which exits before this returns
    (its pinned host memory, CUDA context and GPU memory go with it); its result, or the error,
    with the child's host memory (host_mem.run_watched: peak RSS, MemAvailable's fall)."""
    from host_mem import run_watched
    fd, out = tempfile.mkstemp(suffix=".json", prefix=f"strata-bench-{part}-")
    os.close(fd)
    try:
        code, mem = run_watched([sys.executable, str(Path(__file__).resolve()), "--child",
                                 json.dumps(dict(part=part, kwargs=kwargs, out=out))])
        text = Path(out).read_text()
    finally:
        os.unlink(out)
    if code != 0 or not text:
        return {"error": f"the {part} process exited with {code}", "host_mem": mem}
    return {**json.loads(text), "host_mem": mem}


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec["kwargs"].get("opts", {}).get("smoke"):
        torch.set_num_threads(1)
    result = CHILD_PARTS[spec["part"]](**spec["kwargs"])
    Path(spec["out"]).write_text(json.dumps(result, default=str))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, short lengths")
    ap.add_argument("--gpu-budget", default="4GiB", help="gpu_memory_budget of every strata run and HF's budget")
    ap.add_argument("--offload-policy", default="auto",
                    help="offload_policy of the main run, e.g. 'w_cpu=1,kv_cpu=0' for the KV cache on the GPU")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="kv_cache_dtype of part 2's runs (one batch and the stream): auto (bf16) or int8 "
                         "(codes + scales in host RAM, half the bytes the CPU's attention reads)")
    ap.add_argument("--disk-cpu-budget", default="4GiB", help="host RAM budget of the disk-tier run")
    ap.add_argument("--offload-dir", default=None, help="disk tier folder (default: a temporary one)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hf-new-tokens", type=int, default=8, help="new tokens of the strata-vs-HF runs")
    ap.add_argument("--hf-weight-budget", default="2GiB",
                    help="GPU memory accelerate may fill with weights (max_memory); the rest of --gpu-budget is "
                         "left for HF's KV cache and activations, which decide the largest batch HF holds")
    ap.add_argument("--hf-batch", type=int, default=None,
                    help="strata's batch in every part (default: each run's policy's); HF is also timed at it")
    ap.add_argument("--disk-new-tokens", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="most sequences the policy (and HF's probe) may batch")
    ap.add_argument("--stream-waves", type=int, default=0,
                    help="part 2b: submit this many times the plan's batch of prompts at once, a stream the engine "
                         "keeps its batch full from (0: skip)")
    ap.add_argument("--stream-step-tokens", type=int, default=0,
                    help="part 2b's max_num_batched_tokens: the batch's decodes plus the whole prompts that replace "
                         "the sequences finishing each step (prompts are not chunked); 0: the plan's (one prefill "
                         "wave and the other waves' decodes)")
    ap.add_argument("--skip-main", action="store_true", help="skip part 2 (parts 3 and 4 then need --hf-batch)")
    ap.add_argument("--skip-hf", action="store_true", help="skip part 3")
    ap.add_argument("--skip-disk", action="store_true", help="skip part 4")
    ap.add_argument("--int4", action="store_true",
                    help="also run the main run with int4 weights (groups of --int4-group): offloaded layers "
                         "cross PCIe as 4-bit codes, the GPU computes from them (reported apart, not vs HF)")
    ap.add_argument("--int4-group", type=int, default=64)
    ap.add_argument("--flexgen", action="store_true", help="run part 5: bench/flexgen_peer.py (OPT-30B shape)")
    ap.add_argument("--flexgen-gpu-budget", default="8GiB", help="GPU budget of part 5")
    ap.add_argument("--flexgen-gen-len", type=int, default=32, help="new tokens of part 5")
    ap.add_argument("--wheels", default=None, help="folder with accelerate / flexgen, pulp, attrs wheels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.disk_cpu_budget = "3MiB"
        args.prompt_len, args.new_tokens, args.hf_new_tokens, args.disk_new_tokens = 32, 4, 2, 2
        args.max_num_seqs = 4
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    args = parse_args()
    t_start = time.perf_counter()

    def elapsed() -> str:
        return f"[{time.perf_counter() - t_start:.0f} s]"

    config = SMOKE if args.smoke else LLAMA_31_8B
    offload_dir = args.offload_dir or tempfile.mkdtemp(prefix="strata-offload-bench-")
    model_dir = str(make_model_dir(config))
    budget = _parse(args.gpu_budget)
    h, i = config["hidden_size"], config["intermediate_size"]
    layer_bytes = 2 * (2 * h * h + 2 * h * h // 4 + 3 * h * i)   # the mover reads one layer at a time
    rates = in_child("rates", device=args.device, offload_dir=offload_dir,
                     probe_bytes=(16 << 20) if args.smoke else layer_bytes)
    h2d, disk = rates["h2d"], rates["disk"]
    results: dict = {"device": rates["device"], "torch": rates["torch"], "h2d_gib_s": h2d / GIB,
                     "disk_gib_s": disk / GIB}
    print(f"{elapsed()} rates: host->device {h2d / GIB:.1f} GiB/s (pinned), disk read {disk / GIB:.2f} GiB/s "
          f"(one layer's {layer_bytes / GIB:.2f} GiB through the mover's read path, best of 3)", flush=True)
    opts = dict(device=args.device, max_num_seqs=args.max_num_seqs, disk_bytes_per_s=disk, smoke=args.smoke,
                hf_weight_budget=args.hf_weight_budget)
    # CPU-only smoke: a RAM budget forces every layer but two onto disk, standing in for the GPU budget.
    main_budget = dict(gpu_memory_budget=args.gpu_budget) if not args.smoke else dict(
        cpu_memory_budget="4MiB", offload_dir=offload_dir)
    batch = args.hf_batch
    if not args.skip_main:
        r = in_child("strata", model_dir=model_dir, opts=opts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     batch=args.hf_batch, short_new_tokens=None if args.skip_hf else args.hf_new_tokens,
                     offload_policy=args.offload_policy, kv_cache_dtype=args.kv_cache_dtype, **main_budget)
        if "error" in r:
            raise SystemExit(f"strata's main run failed: {r['error']}")
        batch = batch or r["batch"]
        report_main(r, args, h2d, budget, results, elapsed)
    if args.stream_waves:
        step_budget = dict(max_num_batched_tokens=args.stream_step_tokens,
                           enable_chunked_prefill=False) if args.stream_step_tokens else {}
        r = in_child("strata", model_dir=model_dir, opts=opts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     batch=args.hf_batch, waves=args.stream_waves, offload_policy=args.offload_policy,
                     kv_cache_dtype=args.kv_cache_dtype, **step_budget, **main_budget)
        report_stream(r, args, h2d, results, elapsed)
    if args.int4:
        q = in_child("strata", model_dir=model_dir, opts=opts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     offload_policy=args.offload_policy, quantization="int4", quantization_group_size=args.int4_group,
                     **main_budget)
        report_int4(q, args, h2d, results, elapsed)
    if not args.skip_hf:
        if batch is None:
            raise SystemExit("part 3 needs strata's batch: run part 2 or pass --hf-batch")
        ensure_accelerate(args.wheels)
        hf = in_child("hf", config=config, opts=opts, strata_batch=batch, prompt_len=args.prompt_len,
                      new_tokens=args.hf_new_tokens, budget=budget)
        report_hf(results.get("strata", {}).get("short"), hf, args, budget, results, elapsed)
    if not args.skip_disk:
        disk_budget = dict(cpu_memory_budget=args.disk_cpu_budget, offload_dir=offload_dir)
        if not args.smoke:
            disk_budget["gpu_memory_budget"] = args.gpu_budget
        # its own policy's batch: the host budget that sends layers to disk also bounds a host KV cache
        d = in_child("strata", model_dir=model_dir, opts=opts, prompt_len=args.prompt_len,
                     new_tokens=args.disk_new_tokens, batch=args.hf_batch, **disk_budget)
        report_disk(d, args, disk, results, elapsed)
    if args.flexgen:
        run_flexgen_part(args, results, elapsed)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def report_int4(q: dict, args, h2d: float, results: dict, elapsed) -> None:
    if "error" in q:
        print(f"{elapsed()} strata int4: {q['error']}", flush=True)
        return
    qbound = q["generated"] / (args.new_tokens * q["streamed_bytes"] / h2d) if args.device == "cuda" else float("nan")
    results["int4"] = dict(q, bound_tok_s=qbound)
    print(f"plan: {q['plan']}")
    print(f"{elapsed()} strata int4 (groups of {args.int4_group}), batch {q['batch']}, "
          f"{args.prompt_len}+{args.new_tokens}: {q['tok_s']:.1f} tok/s, {q['streamed_bytes'] / GIB:.2f} GiB "
          f"streamed per pass -> PCIe bound {qbound:.1f} tok/s, {q['tok_s'] / qbound:.0%} of it; GPU peak "
          f"{q['gpu_peak_gib']:.2f} GiB", flush=True)


def report_hf(short: dict | None, hf: dict, args, budget: int, results: dict, elapsed) -> None:
    results["hf"] = hf
    if "error" in hf:
        print(f"{elapsed()} HF+accelerate: {hf['error']}", flush=True)
        return
    probes = ", ".join(f"{b}: {p:.2f}" for b, p in hf["probes"])
    print(f"{elapsed()} HF+accelerate ({hf['placement']}, weights budget {hf['weight_budget_gib']:.2f} GiB; "
          f"prefill GPU peak by batch, GiB: {probes})", flush=True)
    s = short["tok_s"] if short else float("nan")
    for key, what in (("largest", "largest batch within the budget"), ("at_strata_batch", "strata's batch")):
        r = hf.get(key)
        if r is None:
            print(f"  HF {what}: none (batch 1 does not fit the {budget / GIB:.2f} GiB budget)")
            continue
        if "error" in r:
            print(f"  HF {what} {r['batch']}: {r['error']}")
            continue
        within = "within" if r["gpu_peak_gib"] * GIB <= budget else "OVER"
        print(f"  HF {what} {r['batch']}, {args.prompt_len}+{args.hf_new_tokens}: {r['tok_s']:.2f} tok/s, GPU peak "
              f"{r['gpu_peak_gib']:.2f} GiB ({within} the budget) -> strata {s:.2f} tok/s at its batch "
              f"{short['batch'] if short else '?'} is {s / r['tok_s']:.1f}x (target 10x)", flush=True)


def report_main(r: dict, args, h2d: float, budget: int, results: dict, elapsed) -> None:
    # The fewest passes a generation of N tokens takes is N (one prefill for all prompts, N-1
    # decode steps), each bringing every streamed layer over PCIe once.
    bound = (r["generated"] / (args.new_tokens * r["streamed_bytes"] / h2d) if args.device == "cuda"
             else float("nan"))
    results["strata"] = dict(r, bound_tok_s=bound)
    # What the process holds of the GPU: the caching allocator's reserve, not only live tensors.
    within = "within" if max(r["gpu_peak_gib"], r["gpu_reserved_gib"]) * GIB <= budget else "OVER"
    print(f"plan: {r['plan']}")
    print(f"{elapsed()} strata   KV cache {args.kv_cache_dtype}, batch {r['batch']}, "
          f"{args.prompt_len}+{args.new_tokens} tokens: {r['tok_s']:.1f} tok/s "
          f"({r['generated']} tokens in {r['seconds']:.2f} s, {r['passes']} passes, load {r['load_s']:.0f} s); "
          f"PCIe bound {bound:.1f} tok/s -> {r['tok_s'] / bound:.0%} of it (target 85%); predicted "
          f"{r['predicted_tok_s']:.1f} tok/s (measured / predicted {r['tok_s'] / r['predicted_tok_s']:.2f}); GPU peak "
          f"{r['gpu_peak_gib']:.2f} GiB allocated ({r['gpu_reserved_gib']:.2f} reserved), {within} the "
          f"{budget / GIB:.2f} GiB budget; KV of {r['kv_host_layers']} layers in host RAM (CPU attention "
          f"measured at {r['plan_cpu_attn_gib_s']:.1f} GiB/s); waited {r['wait_s']:.2f} s for fetches", flush=True)
    report_host_tier(r)


def report_host_tier(r: dict) -> None:
    """The host tier's worker in the timed run, beside the rate the plan's startup probe measured."""
    h = r["host_attention"]
    if h["attend_bytes"]:
        print(f"  host tier in the run: attention {h['attend_bytes'] / GIB:.1f} GiB in {h['attend_s']:.2f} s = "
              f"{h['gib_s']:.1f} GiB/s (the plan's probe: {r['plan_cpu_attn_gib_s']:.1f}; again after the run, "
              f"without copies beside it: {r.get('cpu_attn_probe_after_gib_s', 0.0):.1f}); K/V writes "
              f"{h['write_s']:.2f} s (the probe's rate: {r.get('plan_cpu_write_gib_s', 0.0):.1f} GiB/s); waiting "
              f"for the copies down {h['wait_s']:.2f} s", flush=True)
    c = r.get("thread_cpu_s")
    if c:
        busy = [t for t in c["others"] if t >= 0.05 * r["seconds"]]
        print(f"  CPU in the run ({r['seconds']:.1f} s on {c['cores']} cores): main thread {c['main']:.1f} s, host "
              f"tier's worker {c['worker']:.1f} s, {len(busy)} other threads busy over 5% of it "
              f"{sum(busy):.1f} s (most {max(busy, default=0.0):.1f}, least {min(busy, default=0.0):.1f}), "
              f"all threads {c['main'] + c['worker'] + sum(c['others']):.1f} s", flush=True)
    gaps = r.get("between_passes_s")
    if gaps:
        print(f"  host time between passes: median {statistics.median(gaps) * 1e3:.1f} ms, "
              f"{sum(gaps):.2f} s in all", flush=True)


def report_stream(r: dict, args, h2d: float, results: dict, elapsed) -> None:
    """A stream of prompts: each pass of the weights yields at most one token for each of the
    plan's batch of sequences, so tok/s <= batch / (streamed bytes / bandwidth)."""
    if "error" in r:
        print(f"{elapsed()} strata stream: {r['error']}", flush=True)
        return
    bound = r["batch"] / (r["streamed_bytes"] / h2d) if args.device == "cuda" else float("nan")
    results["stream"] = dict(r, bound_tok_s=bound)
    print(f"plan: {r['plan']}")
    budget = f"{args.stream_step_tokens}" if args.stream_step_tokens else "the plan's"
    print(f"{elapsed()} strata stream, KV cache {args.kv_cache_dtype}: {r['waves']} x batch {r['batch']} prompts "
          f"of {args.prompt_len}+{args.new_tokens}, step budget {budget} tokens: {r['tok_s']:.1f} tok/s ({r['generated']} "
          f"tokens in {r['seconds']:.2f} s, {r['passes']} passes against the {r['generated'] / r['batch']:.0f} of a "
          f"full batch each, {r['steps']} steps of {r['mean_step_seqs']:.1f} sequences / "
          f"{r['mean_step_tokens']:.0f} tokens on average); PCIe bound at the batch {bound:.1f} tok/s -> "
          f"{r['tok_s'] / bound:.0%} of it; predicted (steady state) {r['predicted_tok_s']:.1f} tok/s (measured / "
          f"predicted {r['tok_s'] / r['predicted_tok_s']:.2f}); GPU peak {r['gpu_peak_gib']:.2f} GiB allocated "
          f"({r['gpu_reserved_gib']:.2f} reserved)", flush=True)
    steady = r.get("steady")
    if steady:
        print(f"  steady state (from the first pass with the full batch of {r['batch']} to the last): {steady['passes']} "
              f"passes of {steady['mean_seqs']:.1f} sequences on average ({steady['full']} full) in "
              f"{steady['seconds']:.2f} s: {steady['tok_s']:.1f} tok/s -> {steady['tok_s'] / bound:.0%} of the PCIe "
              "bound", flush=True)
    report_host_tier(r)


def report_disk(d: dict, args, disk: float, results: dict, elapsed) -> None:
    if "error" in d:
        print(f"{elapsed()} disk tier: {d['error']}", flush=True)
        return
    per_pass = d["disk_bytes"] / max(d["passes"], 1)
    dbound = d["generated"] / (d["passes"] * per_pass / disk) if per_pass else float("nan")
    results["disk"] = dict(d, bound_tok_s=dbound)
    ratio = d["tok_s"] / d["predicted_tok_s"]
    print(f"plan: {d['plan']}")
    print(f"{elapsed()} disk tier, batch {d['batch']}, {args.prompt_len}+{args.disk_new_tokens} tokens: "
          f"{d['tok_s']:.2f} tok/s, {per_pass / GIB:.2f} GiB read from disk per pass "
          f"({d['disk_bytes'] / d['seconds'] / GIB:.2f} GiB/s achieved) -> disk bound {dbound:.2f} tok/s, "
          f"{d['tok_s'] / dbound:.0%} of it; predicted {d['predicted_tok_s']:.2f} tok/s from the engine's disk rate "
          f"{d['plan_disk_gib_s']:.2f} GiB/s (measured / predicted {ratio:.2f}: {'within' if abs(ratio - 1) <= 0.2 else 'OUTSIDE'} "
          f"20%), {d['predicted_bench_disk_tok_s']:.2f} from the bench's {disk / GIB:.2f} GiB/s", flush=True)


def run_flexgen_part(args, results: dict, elapsed) -> None:
    if args.smoke:
        print("flexgen: needs a GPU; skipped in --smoke")
        return
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, str(Path(__file__).with_name("flexgen_peer.py")), "--gpu-budget", args.flexgen_gpu_budget,
           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.flexgen_gen_len), "--json", out]
    if args.wheels:
        cmd += ["--wheels", args.wheels]
    code = subprocess.call(cmd)
    if code == 0 and os.path.exists(out):
        results["flexgen_peer"] = json.loads(Path(out).read_text())
    print(f"{elapsed()} flexgen part done (exit {code})", flush=True)


if __name__ == "__main__":
    main()
