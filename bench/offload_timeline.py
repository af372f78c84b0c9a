"""Timeline of one offloaded decode step (GPU): where each layer's time goes.

Loads the Llama-3.1-8B shape (bf16, random weights) under --gpu-budget with the policy's plan
(every layer streamed from host RAM, the KV cache in host RAM with CPU attention, on an H100
with 4 GiB), generates --batch prompts of --prompt-len tokens, and records one decode pass:
- the copy stream: each streamed layer's weight copy (CUDA events around it);
- the compute stream: when each layer's weights were there (an event after the wait for them)
  and when its work was done (an event where its slot is released);
- the host-tier worker: each task's wait for its copies down, K/V writes and attention;
- the main thread: each micro-batch's start (q/k/v, queuing the host side) and its wait in
  result() for the worker.
CUDA event times are put on the host clock from an event recorded on an idle GPU at the pass's
start. Printed: per layer, the period, the copy, the worker's busy time and idle gaps, and the
main thread's waits; then the medians over the middle layers. The first prefill pass is
traced the same way, and every pass's time is printed.

    python bench/offload_timeline.py --batch 96
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_llama8b import LLAMA_31_8B  # noqa: E402
from gpu_offload import make_model_dir, warm_up  # noqa: E402

from strata.attention import host_tier  # noqa: E402
from strata.runner import offload_loop, offload_mover  # noqa: E402


class Trace:
    def __init__(self):
        self.on = False
        self.events = []        # (kind, layer, mb, host start, host end) with host times
        self.cuda = []          # (kind, layer, torch.cuda.Event, host time it was queued)
        self.layer = -1
        self.mb = 0
        self.task_labels = []   # (layer, mb) of each started task, in order
        self.writes = []        # seconds each task spent writing K/V, in start order
        self.arm = False        # trace the next pass
        self.ref = None         # the traced pass's reference event, its host time, its length
        self.t_ref = None
        self.t_end = 0.0

    def add(self, kind, t0, t1, layer=None, mb=None):
        if self.on:
            self.events.append((kind, self.layer if layer is None else layer, self.mb if mb is None else mb, t0, t1))

    def mark(self, kind, layer, stream=None):
        if self.on:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream or torch.cuda.current_stream())
            self.cuda.append((kind, layer, ev, time.perf_counter()))


T = Trace()


def install() -> None:
    now = time.perf_counter
    mover_cls = offload_mover.OffloadMover
    real_before, real_after = mover_cls.before_layer, mover_cls.after_layer

    def before_layer(self, index):
        real_before(self, index)
        T.layer, T.mb = index, 0
        T.mark("ready", index)   # the compute stream passed the wait for the layer's weights

    def after_layer(self, index):
        T.mark("done", index)
        real_after(self, index)

    def copy_to_slot(self, host, slot, released, index):
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(released)
            T.mark("copy0", index, self.copy_stream)
            self.slots[slot].copy_(host, non_blocking=True)
            T.mark("copy1", index, self.copy_stream)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.stats.bytes_to_device += host.numel()
        self._staging_ready[slot] = ready
        self._log("arrive", index)
        return ready

    mover_cls.before_layer, mover_cls.after_layer, mover_cls._copy_to_slot = before_layer, after_layer, copy_to_slot

    worker_cls = host_tier.HostAttentionWorker
    real_start, real_run = worker_cls.start, worker_cls._run

    def start(self, *a, **k):
        t0 = now()
        label = (T.layer, T.mb)
        T.task_labels.append(label)
        r = real_start(self, *a, **k)
        T.add("start", t0, now(), *label)
        r._label = label
        T.mb += 1
        return r

    def run(self, arrived, *a):
        t0 = now()
        if arrived is not None:
            arrived.synchronize()
        t1 = now()
        written = self.stats["write_s"]
        real_run(self, None, *a)
        t2 = now()
        if T.on:
            T.events.append(("worker_wait", None, None, t0, t1))
            T.events.append(("worker_busy", None, None, t1, t2))
            T.writes.append(self.stats["write_s"] - written)

    worker_cls.start, worker_cls._run = start, run
    pending_cls = host_tier.PendingAttention
    real_result = pending_cls.result

    def result(self):
        t0 = now()
        if self.waits_for_cpu:   # (fresh prompts only: result() does not wait for the worker)
            try:
                self.task.result()
            except BaseException:
                pass
        t1 = now()
        out = real_result(self)
        label = getattr(self, "_label", (None, None))
        T.add("result_wait", t0, t1, *label)
        return out

    pending_cls.result = result

    from strata.models.llama import LlamaForCausalLM
    real_split = LlamaForCausalLM.split_layer_forward

    def split_layer_forward(self, *a, **k):
        t0 = now()
        r = real_split(self, *a, **k)
        T.add("qkv", t0, now())
        return r

    LlamaForCausalLM.split_layer_forward = split_layer_forward
    pipeline_cls = offload_loop._HostKVPipeline
    real_take = pipeline_cls._take

    def take(self, item):
        t0 = now()
        label = getattr(item[2], "_label", (None, None))
        real_take(self, item)
        T.add("resume", t0, now(), label[0])

    pipeline_cls._take = take

    loop_cls = offload_loop.OffloadLayerLoop
    real_loop = loop_cls.run

    def loop_run(self, *a, **k):
        if not T.arm:
            return real_loop(self, *a, **k)
        T.arm = False
        torch.cuda.synchronize()
        ref = torch.cuda.Event(enable_timing=True)
        ref.record()
        t_ref = now()
        T.on, T.events, T.cuda, T.task_labels, T.writes = True, [], [], [], []
        try:
            out = real_loop(self, *a, **k)
            torch.cuda.synchronize()
        finally:
            T.on = False
        T.t_end = now() - t_ref
        T.ref, T.t_ref = ref, t_ref
        return out

    loop_cls.run = loop_run


def report(title: str) -> dict:
    """Per-layer timeline of the traced pass (ms from its start)."""
    t_ref = T.t_ref
    gpu, lags = {}, {}
    for kind, layer, ev, t_host in T.cuda:
        gpu.setdefault(layer, {})[kind] = T.ref.elapsed_time(ev)
        # how long after the host queued the event the GPU reached it: ~0 when the GPU waits
        # for the host (launch-bound), the GPU's backlog otherwise
        lags.setdefault(kind, []).append(T.ref.elapsed_time(ev) - (t_host - t_ref) * 1e3)
    # worker tasks in start order
    waits = [e for e in T.events if e[0] == "worker_wait"]
    busy = [e for e in T.events if e[0] == "worker_busy"]
    tasks = []
    for label, w, b, wr in zip(T.task_labels, waits, busy, T.writes):
        tasks.append((label, (w[3] - t_ref) * 1e3, (w[4] - t_ref) * 1e3, (b[4] - t_ref) * 1e3, wr * 1e3))
    per_layer = {}
    for (layer, mb), w0, w1, b1, wr in tasks:
        d = per_layer.setdefault(layer, dict(busy=0.0, wait=0.0, write=0.0, tasks=0, first=w1, last=b1))
        d["busy"] += b1 - w1
        d["wait"] += w1 - w0
        d["write"] += wr
        d["tasks"] += 1
        d["first"], d["last"] = min(d["first"], w1), max(d["last"], b1)
    for kind in ("result_wait", "start", "qkv", "resume"):
        for e in T.events:
            if e[0] == kind:
                per_layer.setdefault(e[1], {}).setdefault(kind, 0.0)
                per_layer[e[1]][kind] += (e[4] - e[3]) * 1e3
    print(f"\n== {title}: pass {T.t_end * 1e3:.1f} ms, {len(tasks)} host tasks")
    print("layer | ready  done   period | copy0  copy1  copy ms | worker first..last  busy  waitD2H | main: start  result_wait")
    layers = sorted(k for k in gpu if isinstance(k, int))
    prev = None
    periods = []
    for i in layers:
        g, w = gpu[i], per_layer.get(i, {})
        period = g.get("ready", 0) - prev if prev is not None else float("nan")
        prev = g.get("ready")
        if 2 <= i < len(layers) - 2:
            periods.append(period)
        print(f"{i:5d} | {g.get('ready', float('nan')):6.1f} {g.get('done', float('nan')):6.1f} {period:6.1f} | "
              f"{g.get('copy0', float('nan')):6.1f} {g.get('copy1', float('nan')):6.1f} "
              f"{g.get('copy1', 0) - g.get('copy0', 0):6.2f} | {w.get('first', float('nan')):7.1f}..{w.get('last', float('nan')):7.1f} "
              f"{w.get('busy', 0):5.2f} {w.get('wait', 0):6.2f} | {w.get('start', 0):6.2f} {w.get('result_wait', 0):6.2f}")
    mid = [i for i in layers if 2 <= i < len(layers) - 2]
    med = lambda key: statistics.median(per_layer.get(i, {}).get(key, 0.0) for i in mid)  # noqa: E731
    copies = [gpu[i]["copy1"] - gpu[i]["copy0"] for i in mid if "copy0" in gpu[i]]
    results = dict(period=statistics.median(periods), busy=med("busy"), wait=med("wait"), write=med("write"),
                   tasks=med("tasks"), start=med("start"),
                   result_wait=med("result_wait"), qkv=med("qkv"), resume=med("resume"), copy=statistics.median(copies) if copies else 0.0,
                   pass_ms=T.t_end * 1e3)
    print(f"median over layers {mid[0]}..{mid[-1]}: period {results['period']:.2f} ms, copy {results['copy']:.2f}, "
          f"worker busy {results['busy']:.2f} (of it K/V writes {results['write']:.2f}, {results['tasks']:.0f} tasks) + "
          f"waiting for copies down {results['wait']:.2f}, "
          f"main: qkv {results['qkv']:.2f}, start {results['start']:.2f}, resume {results['resume']:.2f} of which blocked in result {results['result_wait']:.2f}; GPU backlog "
          f"(event reached - queued, median ms): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in lags.items()))
    return results


def kernel_report(prof, seconds: float, tokens: int) -> None:
    """GPU time by kernel over one pass, grouped into matmuls, attention, copies and the rest."""
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None)
        if total is None:
            total = e.cuda_time_total
        if total > 0:
            rows.append((total / 1e3, e.count, e.key))
    rows.sort(reverse=True)
    groups = {}
    for ms, _, name in rows:
        low = name.lower()
        kind = ("copy" if "memcpy" in low or "memset" in low else
                "matmul" if any(w in low for w in ("gemm", "nvjet", "cutlass", "xmma", "matmul")) else
                "attention" if "flash" in low or "attention" in low or "fmha" in low else "other")
        groups[kind] = groups.get(kind, 0.0) + ms
    print(f"\n== kernels over a pass of {tokens} tokens, {seconds * 1e3:.1f} ms: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])))
    for ms, count, name in rows[:30]:
        print(f"  {ms:9.2f} ms {count:6d} x {ms * 1e3 / max(count, 1):9.1f} us  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--gpu-budget", default="4GiB")
    ap.add_argument("--batch", type=int, default=104)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=6, help="new tokens (the third decode pass is traced)")
    ap.add_argument("--offload-policy", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or int8")
    ap.add_argument("--trace-wave", action="store_true",
                    help="trace the second prefill wave (its prompts beside the first wave's decodes), not the first")
    ap.add_argument("--profile", action="store_true", help="cProfile the main thread in the first prefill pass")
    ap.add_argument("--kernels", action="store_true",
                    help="torch.profiler over the first prefill pass and the third decode pass: GPU time by kernel")
    args = ap.parse_args()
    from strata import LLM, SamplingParams
    install()
    model_dir = make_model_dir(LLAMA_31_8B)
    llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, gpu_memory_budget=args.gpu_budget,
              max_model_len=args.prompt_len + args.new_tokens, max_num_seqs=args.batch, use_tqdm_on_load=False,
              offload_policy=args.offload_policy, kv_cache_dtype=args.kv_cache_dtype)
    gen = torch.Generator().manual_seed(0)
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()}
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    warm_up(llm, prompts, vocab, gen)
    passes = {"n": 0, "times": []}
    loop_cls = offload_loop.OffloadLayerLoop
    traced_run = loop_cls.run

    def counting(self, *a, **k):
        from strata.forward_context import get_attn_metadata
        meta = get_attn_metadata()
        decode = meta.max_query_len == 1
        passes["n"] += decode
        # the first prefill, the third decode; --trace-wave: the second prefill wave (beside the
        # first wave's decodes) in place of the first
        prefills = sum(1 for what, _ in passes["times"] if what != "decode")
        T.arm = passes["n"] == 3 if decode else prefills == (1 if args.trace_wave else 0)
        profile = None
        if args.profile and not decode and not passes["times"]:
            import cProfile
            profile = cProfile.Profile()
            profile.enable()
        kernels = None
        if args.kernels and T.arm:
            kernels = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            kernels.__enter__()
        t0 = time.perf_counter()
        out = traced_run(self, *a, **k)
        torch.cuda.synchronize()
        if kernels is not None:
            kernels.__exit__(None, None, None)
            kernel_report(kernels, time.perf_counter() - t0, meta.num_tokens)
        if profile is not None:
            import pstats
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        what = "decode" if decode else f"prefill of {meta.num_tokens} tokens"
        passes["times"].append((what, time.perf_counter() - t0))
        if T.t_ref is not None:
            report(what)
            T.t_ref = None
        return out

    loop_cls.run = counting
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    loop_cls.run = traced_run
    print(f"batch {args.batch}, {args.new_tokens} new tokens in {seconds:.2f} s; passes (s): "
          + ", ".join(f"{what} {t:.3f}" for what, t in passes["times"]))

if __name__ == "__main__":
    main()
