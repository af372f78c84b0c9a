"""Where a batch-1 decode step of the 8B-shaped model spends its time (diagnostic, GPU only).

    python bench/gpu_decode_profile.py [--batch 1] [--async-scheduling] [--quantization int4]

Prints, for a decode step at ~200 tokens of context: the graph replay alone (the forward pass
on the GPU), the LM head, one whole engine step measured from Python (scheduler, input
preparation, forward, sampling, output processing; synchronized before and after, so host and
GPU work add up), the mean step of 50 back-to-back steps (synchronized only around all 50: with
--async-scheduling the host work of one step overlaps the GPU work of the next), the bandwidth
floor of the weights, and torch.profiler's top GPU kernels over a few engine steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpu_llama8b import copy_bandwidth, median_ms, model_dir  # bench/ is the script dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="decode rows")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="the engine option: step N+1 prepared while the GPU computes step N")
    parser.add_argument("--quantization", choices=["int8", "int4"],
                        help="weights quantized at load (int4 in groups of 128)")
    args = parser.parse_args()
    from strata import LLM, SamplingParams
    quant = dict(quantization=args.quantization) if args.quantization else {}
    llm = LLM(str(model_dir(False)), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_model_len=4096, max_num_seqs=256, async_scheduling=args.async_scheduling, **quant)
    engine = llm.llm_engine
    runner = engine.executor.runner
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": list(range(1000 + i, 1128 + i))}, params)
    for _ in range(72):                       # prefill, then decode to ~200 tokens of context
        engine.step()
    step_ms = []
    for _ in range(50):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        engine.step()
    torch.cuda.synchronize()
    back_to_back_ms = (time.perf_counter() - t) * 1e3 / 50
    size = next(s for s in runner.graphs.sizes if s >= args.batch)
    graph, hidden = runner.graphs.graphs[size]
    replay_ms = median_ms(graph.replay, reps=50)
    head_ms = median_ms(lambda: runner.model.compute_logits(hidden[: args.batch]), reps=50)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                       if "embed_tokens" not in n)
    bw = copy_bandwidth()
    mode = "async" if args.async_scheduling else "sync"
    print(f"batch {args.batch}, {mode} scheduling: engine step {statistics.median(step_ms):.3f} ms "
          f"(median of 50, synchronized), {back_to_back_ms:.3f} ms back to back (mean of 50), graph replay "
          f"{replay_ms:.3f} ms, LM head {head_ms:.3f} ms, weight floor {weight_bytes / bw * 1e3:.3f} ms "
          f"({weight_bytes / 1e9:.2f} GB at {bw / 1e9:.0f} GB/s)")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
