"""Tile sweep for strata's decode matmul (strata.kernels.skinny_matmul) against cuBLAS.

For each weight shape of a Llama-3.1-8B layer (q/k/v, o_proj, gate/up, down; ``*_tp2``: one rank's
share at tensor parallel 2) and each batch of 1-16 rows, times every candidate tile shape and
cuBLAS (F.linear) in CUDA graphs that rotate over 4 copies of the weights (so an o_proj-sized
matrix cannot sit in L2), and prints each one's time and fraction of the device-to-device copy
bandwidth measured in the same run. The best configs are what ``default_config`` encodes.

    python bench/gpu_skinny_sweep.py [--rows 1 2 4 8 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_llama8b import copy_bandwidth  # noqa: E402

from strata.kernels import skinny_matmul as sk  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          # one rank's share at tensor parallel 2 (columns split for qkv and gate/up, rows for the rest)
          "qkv_tp2": (3072, 4096), "o_proj_tp2": (4096, 2048), "gate_up_tp2": (14336, 4096), "down_tp2": (4096, 7168)}
COPIES = 4


def candidates(m: int):
    if m <= 4:
        for bn, bk, w in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8)):
            if m * bn * bk // (32 * w) <= 128:      # fp32 accumulators per thread
                yield dict(BLOCK_M=m, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=w, num_stages=1)
    for bn, bk, st in itertools.product((16, 32, 64), (128, 256), (3, 5)):
        yield dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, num_warps=4, num_stages=st)


def graph_us(fns, reps: int = 5) -> float:
    """Median GPU time of one call, from a CUDA graph of reps rounds over fns."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(fns)))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    results = []
    for name in args.shapes:
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(COPIES)]
        floor_us = n * k * 2 / bw * 1e6
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = sk.skinny_matmul_ref(x, ws[0])
            rows = [("cublas", graph_us([lambda w=w: F.linear(x, w) for w in ws]))]
            for cfg in candidates(m):
                try:
                    got = sk.skinny_matmul(x, ws[0], config=cfg)
                    if not torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2):
                        print(f"  WRONG {cfg}", flush=True)
                        continue
                    us = graph_us([lambda w=w: sk.skinny_matmul(x, w, config=cfg) for w in ws])
                except Exception as e:       # out of resources for a tile: skip it
                    print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                    continue
                rows.append((json.dumps(cfg), us))
            default = sk.default_config(m, n, k)
            rows.append(("default", graph_us([lambda w=w: sk.skinny_matmul(x, w) for w in ws])))
            rows.sort(key=lambda r: r[1])
            print(f"{name} [{m} x {k}] x [{n} x {k}]^T: floor {floor_us:.1f} us", flush=True)
            for label, us in rows[:6] + [r for r in rows[6:] if r[0] in ("default", "cublas")]:
                print(f"  {us:8.2f} us  {floor_us / us:6.1%}  {label}", flush=True)
            results.append(dict(shape=name, m=m, n=n, k=k, floor_us=floor_us,
                                best=rows[0][0], best_us=rows[0][1],
                                cublas_us=next(us for lab, us in rows if lab == "cublas"),
                                default_us=next(us for lab, us in rows if lab == "default"),
                                top=rows[:10]))
        del ws
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dict(copy_GBps=bw / 1e9, results=results), indent=1))


if __name__ == "__main__":
    main()
