"""The host tier's CPU attention alone (attention/host_tier.cpu_attend, what offloading's decode
rows run over a KV cache in host RAM): GiB/s of the cache's bytes, bf16 against int8 codes.

Decode rows of --context tokens attend over caches of blocks of 16 tokens in shuffled order, as
many layers as make up 1 GiB (so the reads come from memory, not a last-level cache), with the
threads the host tier uses beside a GPU (all but one); median of 5 passes over the layers. The
shape is Llama-3.1-8B's (32 query heads, 8 KV heads, head_dim 128).

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
from strata.attention.backend import AttentionMetadata  # noqa: E402
from strata.quant.kv import quantize_kv  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def rate(batch: int, context: int, dtype: str, threads: int, total_bytes: int) -> tuple[float, float]:
    """(GiB/s, ms a layer) of one configuration."""
    blocks = context // BLOCK
    values = torch.randn(2, batch * blocks + 1, BLOCK, KV_HEADS, HEAD_DIM)
    if dtype == "int8":
        first = quantize_kv(values, torch.int8)
        token_bytes = 2 * KV_HEADS * (HEAD_DIM + 4)
    else:
        first = (values.to(torch.bfloat16), None)
        token_bytes = 2 * KV_HEADS * HEAD_DIM * 2
    del values
    layer_bytes = batch * blocks * BLOCK * token_bytes
    layers = [first] + [tuple(t if t is None else t.clone() for t in first)
                        for _ in range(-(-total_bytes // layer_bytes) - 1)]
    tables = torch.randperm(batch * blocks).int().view(batch, blocks)
    q = torch.randn(batch, HEADS, HEAD_DIM).to(torch.bfloat16).float()   # a bf16 model's queries
    ctx = blocks * BLOCK
    meta = AttentionMetadata(
        num_tokens=batch, slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=tables,
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32), seq_lens_cpu=[ctx] * batch,
        query_lens_cpu=[1] * batch, query_start_loc_cpu=list(range(batch + 1)), block_size=BLOCK,
        decode_rows=list(range(batch)), prefill_rows=[], max_query_len=1)

    def attend():
        for cache, scales in layers:
            host_tier.cpu_attend(q, cache, meta, HEAD_DIM ** -0.5, threads, scales)

    attend()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        attend()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return len(layers) * layer_bytes / seconds / 2**30, seconds / len(layers) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[96, 235], help="decode rows")
    ap.add_argument("--context", type=int, default=528, help="tokens of each row's context")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    ap.add_argument("--threads", type=int, default=None, help="default: the host tier's count beside a GPU")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of layers each pass reads")
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = args.threads or host_tier.attention_threads(on_cuda=True)
    for batch in args.batch:
        for dtype in args.dtype:
            gib_s, ms = rate(batch, args.context, dtype, threads, int(args.gib * 2**30))
            print(f"batch {batch:4d} x {args.context} tokens, {dtype:4s}, {threads} threads: {gib_s:6.1f} GiB/s, "
                  f"{ms:6.2f} ms a layer", flush=True)


if __name__ == "__main__":
    main()
