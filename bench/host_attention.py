"""The host tier's CPU attention alone (attention/host_tier.cpu_attend, what offloading's decode
rows run over a KV cache in host RAM): GiB/s of the cache's bytes, bf16 against int8 codes.

The engine's own startup probe (runner/offload_loop.cpu_attention_rate: decode rows of --context
tokens over 1 GiB of layers, so the reads come from memory, not a last-level cache), with the
blocks of 16 tokens in shuffled order, the threads the host tier uses beside a GPU (all but one),
median of 5 passes over the layers. The shape is Llama-3.1-8B's (32 query heads, 8 KV heads,
head_dim 128).

The memory's read rate on the same threads comes first (torch's sum over 4 GiB of float32): the
ceiling of an attention that reads each byte of the cache once; each line gives its share of it.

    python bench/host_attention.py                       # batches 96 and 235, bf16 and int8
    STRATA_CPU_KERNELS_NO_AVX512=1 python bench/host_attention.py --dtype bf16   # the 8-wide path
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strata.attention import host_tier  # noqa: E402
from strata.quant.kv import KV_FORMATS, kv_cache_bytes_per_slot  # noqa: E402
from strata.runner.offload_loop import cpu_attention_rate  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[96, 235], help="decode rows")
    ap.add_argument("--context", type=int, default=528, help="tokens of each row's context")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    ap.add_argument("--threads", type=int, default=None, help="default: the host tier's count beside a GPU")
    ap.add_argument("--token-major", action="store_true",
                    help="each block's keys with their heads side by side (the host tier's layout before 11-23)")
    ap.add_argument("--read-gib", type=int, default=4, help="GiB of the read-rate ceiling's buffer (0: skip it)")
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = args.threads or host_tier.attention_threads(on_cuda=True)
    ceiling = read_rate(args.read_gib, threads) if args.read_gib else 0.0
    if ceiling:
        print(f"ceiling: the host reads {ceiling / 2**30:.1f} GiB/s on {threads} threads (a sum over "
              f"{args.read_gib} GiB of float32)", flush=True)
    for batch in args.batch:
        for dtype in args.dtype:
            fmt = KV_FORMATS["int8"] if dtype == "int8" else None
            rate = cpu_attention_rate(HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, batch, args.context, during=None,
                                      kv_format=fmt, shuffle=True, threads=threads, reps=5,
                                      token_major=args.token_major)
            layer_bytes = batch * args.context * kv_cache_bytes_per_slot(KV_HEADS, HEAD_DIM, torch.bfloat16, fmt)
            share = f" ({rate / ceiling:.0%} of the read rate)" if ceiling else ""
            print(f"batch {batch:4d} x {args.context} tokens, {dtype:4s}, {threads} threads: "
                  f"{rate / 2**30:6.1f} GiB/s{share}, {layer_bytes / rate * 1e3:6.2f} ms a layer", flush=True)


def read_rate(gib: int, threads: int, reps: int = 3) -> float:
    """Bytes/s torch's sum reads a float32 buffer of `gib` GiB at on `threads` threads (median of
    reps, after one untimed pass): the memory's read rate, the ceiling of an attention that reads
    each byte of the cache once."""
    buf = torch.ones(gib * 2**28)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf.sum()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / statistics.median(times)


if __name__ == "__main__":
    main()
