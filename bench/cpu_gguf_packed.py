"""GGUF weights kept packed vs dequantized to float32 on the CPU: load time, resident weight
memory and batch-1 greedy decode speed of one model, plus the packed matmuls against F.linear
on the model's shapes.

    python bench/cpu_gguf_packed.py [--model PATH.gguf] [--tokens 128] [--runs 3]

Each path loads in its own process (so neither's memory counts in the other's RSS); the
dequantized path is STRATA_QUANT_REFERENCE=1, what strata did before GGUF weights stayed packed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Once upon a time"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(model: str | None, tokens: int, runs: int) -> dict:
    """One path, in this process: what a child process prints as JSON."""
    import torch

    from strata import LLM, SamplingParams
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    llm = LLM(model, kv_cache_memory=1 << 27, use_tqdm_on_load=False)
    load_s = time.perf_counter() - t0
    net = llm.llm_engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    rss_loaded = _rss_mib()
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)   # warm-up
    speeds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
        speeds.append(len(out.token_ids) / (time.perf_counter() - t0))
    return {"load_s": load_s, "weight_mib": weight_bytes / 2**20, "rss_after_load_mib": rss_loaded - rss_before,
            "tok_s": statistics.median(speeds), "runs": speeds, "threads": torch.get_num_threads(),
            "first_tokens": out.token_ids[:16]}


def run_path(model: str | None, tokens: int, runs: int, reference: bool) -> dict:
    env = dict(os.environ, STRATA_QUANT_REFERENCE="1" if reference else "0")
    cmd = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--runs", str(runs)]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def kernel_table(runs: int = 50) -> list[tuple]:
    """Packed matmul vs F.linear on the dequantized weight, SmolLM2-135M shapes, 1 row of x."""
    import torch

    from strata.kernels import cpu_quant as cq
    rows = []
    for name, n, k, bits in (("qkv", 960, 576, 4), ("gate_up", 3072, 576, 4), ("down", 576, 1536, 4),
                             ("lm_head (Q8_0)", 49152, 576, 8)):
        if bits == 4:
            weights = (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.rand(n, k // 32, 2))
            rows.append((name, f"{n}x{k}", *_time_matmuls(cq.w4_matmul, cq.w4_dequantize, weights, k, runs)))
        else:
            weights = (torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32))
            rows.append((name, f"{n}x{k}", *_time_matmuls(cq.w8_matmul, cq.w8_dequantize, weights, k, runs)))
    return rows


def _time_matmuls(matmul, dequantize, weights, k: int, runs: int) -> tuple[float, float, float]:
    """Median us of F.linear on the dequantized weight, the C matmul, torch's tiled stand-in."""
    import torch
    import torch.nn.functional as F

    from strata.kernels import cpu_quant as cq
    lib, x = cq.library(), torch.randn(1, k)
    w = dequantize(*weights)
    c_us = _best_us(lambda: matmul(x, *weights, lib, check=False), runs) if lib is not None else float("nan")
    return (_best_us(lambda: F.linear(x, w), runs), c_us,
            _best_us(lambda: matmul(x, *weights, None, check=False), max(3, runs // 10)))


def _best_us(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: strata's embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.tokens, args.runs)))
        return
    results = {ref: run_path(args.model, args.tokens, args.runs, ref) for ref in (False, True)}
    print(f"model: {args.model or 'default (SmolLM2-135M-Instruct Q4_1)'}, {args.tokens} tokens greedy "
          f"batch 1, median of {args.runs}, {results[False]['threads']} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| path | load s | weights MiB | RSS after load MiB | decode tok/s (runs) |")
    print("|---|---:|---:|---:|---:|")
    for ref, r in results.items():
        print(f"| {'dequantized fp32 (STRATA_QUANT_REFERENCE=1)' if ref else 'packed'} | {r['load_s']:.2f} | "
              f"{r['weight_mib']:.0f} | {r['rss_after_load_mib']:.0f} | {r['tok_s']:.1f} "
              f"({', '.join(f'{s:.1f}' for s in r['runs'])}) |")
    same = results[False]["first_tokens"] == results[True]["first_tokens"]
    print(f"first 16 tokens equal: {same}")
    print("\n| matmul, 1 row | shape | F.linear fp32 us | packed C us | packed torch-tiles us |")
    print("|---|---|---:|---:|---:|")
    for name, shape, ref_us, c_us, torch_us in kernel_table():
        print(f"| {name} | {shape} | {ref_us:.0f} | {c_us:.0f} | {torch_us:.0f} |")


if __name__ == "__main__":
    main()
