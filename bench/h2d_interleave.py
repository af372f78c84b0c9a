"""How long a small host->device copy waits behind a large one on another stream (GPU).

The offloaded decode step copies the next layers' weights up on a copy stream (hundreds of MiB
per layer) while host-tier attention sends each micro-batch's output up on the compute stream (a
few hundred KiB). If the copy engine takes the two in turn, the small copy waits for the whole
layer copy and the compute stream with it. This probe issues a layer-sized copy, then after
--delay-ms a small copy on another stream, and reports when the small one finished (median of
--reps), with the large copy whole and cut into chunks of several sizes.

    python bench/h2d_interleave.py --layer-mib 416 --small-kib 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MIB = 2**20


def trial(big_dst, big_src, small_dst, small_src, chunk: int, delay_s: float, big_stream, small_stream) -> tuple:
    """(ms from the small copy's issue to its end, ms of the large copy) of one trial."""
    torch.cuda.synchronize()
    big_start, big_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    small_start, small_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(big_stream):
        big_start.record(big_stream)
        n = big_src.numel()
        for a in range(0, n, chunk):
            big_dst[a: a + chunk].copy_(big_src[a: a + chunk], non_blocking=True)
        big_end.record(big_stream)
    time.sleep(delay_s)
    with torch.cuda.stream(small_stream):
        small_start.record(small_stream)
        small_dst.copy_(small_src, non_blocking=True)
        small_end.record(small_stream)
    torch.cuda.synchronize()
    return small_start.elapsed_time(small_end), big_start.elapsed_time(big_end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer-mib", type=int, default=416, help="size of the large copy (an 8B layer in bf16: 416)")
    ap.add_argument("--small-kib", type=int, default=512, help="size of the small copy")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="issue the small copy this long after the large one")
    ap.add_argument("--chunks-mib", type=int, nargs="+", default=[0, 64, 16, 4], help="chunk sizes (0: whole)")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    big = args.layer_mib * MIB
    big_src = torch.empty(big, dtype=torch.uint8, pin_memory=True)
    big_dst = torch.empty(big, dtype=torch.uint8, device="cuda")
    small_src = torch.empty(args.small_kib * 1024, dtype=torch.uint8, pin_memory=True)
    small_dst = torch.empty_like(small_src, device="cuda")
    big_stream, small_stream = torch.cuda.Stream(), torch.cuda.Stream()
    alone = [trial(big_dst[:0], big_src[:0], small_dst, small_src, 1, 0, big_stream, small_stream)[0]
             for _ in range(args.reps)]
    print(f"device: {torch.cuda.get_device_name()}; small copy {args.small_kib} KiB alone: "
          f"{statistics.median(alone):.3f} ms")
    for chunk_mib in args.chunks_mib:
        chunk = chunk_mib * MIB or big
        runs = [trial(big_dst, big_src, small_dst, small_src, chunk, args.delay_ms / 1e3, big_stream, small_stream)
                for _ in range(args.reps + 1)][1:]
        small_ms = statistics.median(r[0] for r in runs)
        big_ms = statistics.median(r[1] for r in runs)
        print(f"large copy {args.layer_mib} MiB in chunks of {chunk_mib or args.layer_mib} MiB: "
              f"{big_ms:.2f} ms ({big / big_ms / 1e6:.1f} GB/s); the small copy issued {args.delay_ms} ms "
              f"after it finished {small_ms:.3f} ms after its issue")


if __name__ == "__main__":
    main()
