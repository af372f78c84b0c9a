"""Tile sweep for strata's weight-only quantized matmuls (strata.kernels.quant_matmul) against
cuBLAS on the unquantized bf16 weights.

For each weight shape of a Llama-3.1-8B layer (q/k/v, o_proj, gate/up, down), each format (int8
per channel, int4 with groups of --group-size) and each row count, times every candidate tile
and cuBLAS (F.linear on bf16 weights of the same shape) in CUDA graphs that rotate over 4 copies
of the weights (so an o_proj-sized matrix cannot sit in L2). Decode rows (<= 16) print each
time's fraction of the bandwidth floor (packed weight, scale and min bytes over the copy
bandwidth measured in the same run); prefill rows print the rate in TFLOP/s. The best configs are
what ``default_config`` should encode.

    python bench/gpu_quant_sweep.py [--rows 1 4 16 512 4096] [--bits 4 8] [--json FILE]

Every candidate compiles once per format (a second or two each): split a long sweep into runs
with --bits, --rows and --shapes.

    python bench/gpu_quant_sweep.py --gemv [--json FILE]

One row, int4 groups of 128 with float32 scales and mins (as the engine stores them), bf16 x:
the word-wise kernel (strata.kernels.int4_gemv) over tiles (BLOCK_N, KW, num_warps) at the
automatic SPLIT_K, then the best three tiles of each shape at other slice counts and 2 stages,
against the element-wise tile it replaces (``int4_decode="fma"``) and cuBLAS on bf16 weights,
for the 8B shapes and the LM head; prints each shape's best with its fraction of the bandwidth
floor, and the ``GEMV_INT4_TUNED`` table that would make them the defaults.
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
from gpu_skinny_sweep import COPIES, SHAPES, graph_us  # noqa: E402

from strata.kernels import quant_matmul as qm  # noqa: E402


def candidates(m: int, bits: int, group_size: int):
    """Tiles worth timing for m rows: CUDA-core FMAs for one or two rows, the 16-row tensor-core
    tile up to 16 (for int4 also the magic-number tile, FAST_INT4, with and without its inline
    PTX), GEMM tiles beyond."""
    if m <= 2:
        for bn, bk, w in itertools.product((4, 8, 16), (256, 512, 1024, 2048), (4, 8)):
            weight_bytes = bn * bk * bits // 8
            if 1024 <= weight_bytes <= 16384 and bn * bk // (32 * w) <= 128:   # fp32 acc a thread
                yield dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=w,
                           num_stages=1)
    if m <= qm.MAX_DECODE_ROWS:
        for bn, bk, st in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 5)):
            yield dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, num_warps=4,
                       num_stages=st)
        if bits == 4:
            yield from fast_int4_candidates(group_size)
        return
    for bm, bn, bk, st in itertools.product((64, 128), (64, 128, 256), (32, 64, 128), (3, 4)):
        if bm * bn <= 128 * 128:
            yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True,
                       num_warps=4 if bm * bn <= 64 * 128 else 8, num_stages=st, GROUP_M=8)


def fast_int4_candidates(group_size: int):
    """The magic-number int4 tile: BLOCK_K divides the group; 32 columns on 1 or 2 warps and 64
    or 128 on 4 trade per-step overheads (x, the ones dot, scale loads) against programs."""
    for (bn, w), bk, st, asm in itertools.product(((16, 1), (32, 2), (32, 4), (64, 4), (128, 4)),
                                                  (64, 128, 256), (4, 6), (True, False)):
        if bk <= group_size and (asm or (bn, bk, st) == (64, 128, 4)):
            yield dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, FAST_INT4=True,
                       USE_ASM=asm, num_warps=w, num_stages=st)


def make_weights(bits: int, n: int, k: int, group_size: int, scale_dtype=torch.bfloat16):
    """(call(x, weight, config), reference(x), packed bytes, weights): COPIES quantized copies of
    one random [n, k] matrix's shape, scaled so that outputs are O(1)."""
    copies = []
    for _ in range(COPIES):
        if bits == 8:
            q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
            copies.append((q, torch.rand(n, device="cuda", dtype=torch.bfloat16) / (64 * k ** 0.5)))
        else:
            q = qm.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"))
            scales = torch.rand(n, k // group_size, device="cuda") / (4 * k ** 0.5)
            copies.append((q, scales.to(scale_dtype), (-7.5 * scales).to(scale_dtype)))
    extra = () if bits == 8 else (group_size,)
    op, op_ref = ((qm.w8a16_matmul, qm.w8a16_matmul_ref) if bits == 8
                  else (qm.w4a16_matmul, qm.w4a16_matmul_ref))

    def call(x, weight, config=None):
        return op(x, *weight, *extra, config=config)

    def ref(x):
        return op_ref(x, *copies[0], *extra)
    nbytes = sum(t.numel() * t.element_size() for t in copies[0])
    return call, ref, nbytes, copies


def sweep_one(call, ref, copies, bf16_copies, m: int, k: int, bits: int, group_size: int):
    """[(label, us)] sorted by time, for every candidate that runs and matches the reference."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = ref(x).float()
    rows = [("cublas-bf16", graph_us([lambda w=w: F.linear(x, w) for w in bf16_copies]))]
    for cfg in candidates(m, bits, group_size):
        try:
            if not torch.allclose(call(x, copies[0], cfg).float(), want, rtol=2e-2, atol=2e-2):
                print(f"  WRONG {cfg}", flush=True)
                continue
            us = graph_us([lambda w=w, cfg=cfg: call(x, w, cfg) for w in copies])
        except Exception as e:       # out of resources for a tile: skip it
            print(f"  skip {cfg}: {type(e).__name__}", flush=True)
            continue
        rows.append((json.dumps(cfg), us))
    rows.append(("default", graph_us([lambda w=w: call(x, w) for w in copies])))
    return sorted(rows, key=lambda r: r[1])


GEMV_SHAPES = {**SHAPES, "lm_head": (128256, 4096)}
# (BLOCK_N, KW, num_warps): 4 to 16 rows a thread (BLOCK_N * KW / (128 * num_warps)).
GEMV_TILES = [(128, 8, 1), (128, 8, 2), (128, 16, 2), (128, 16, 4), (256, 8, 1), (256, 8, 2),
              (256, 8, 4), (256, 16, 4), (256, 16, 8), (512, 8, 2), (512, 8, 4), (512, 8, 8),
              (512, 16, 8)]


def gemv_config(bn: int, kw: int, warps: int, split_k=None, stages: int = 1) -> dict:
    return dict(GEMV4=True, BLOCK_N=bn, KW=kw, SPLIT_K=split_k, num_warps=warps,
                num_stages=stages)


def gemv_time(call, x, copies, want, cfg):
    """us per call of cfg, or None when it fails or disagrees with the reference."""
    try:
        if not torch.allclose(call(x, copies[0], cfg).float(), want, rtol=2e-2, atol=2e-2):
            print(f"  WRONG {cfg}", flush=True)
            return None
        return graph_us([lambda w=w: call(x, w, cfg) for w in copies])
    except Exception as e:           # out of resources for a tile: skip it
        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def gemv_sweep_shape(name: str, bw: float) -> dict:
    from strata.kernels import int4_gemv
    n, k = GEMV_SHAPES[name]
    call, ref, nbytes, copies = make_weights(4, n, k, 128, scale_dtype=torch.float32)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    want = ref(x).float()
    floor_us = nbytes / bw * 1e6
    bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(2)]
    rows = {"cublas-bf16": graph_us([lambda w=w: F.linear(x, w) for w in bf16])}
    del bf16
    fma = qm.default_config(1, n, k, 4, torch.bfloat16, 128, "fma")
    rows["old fma " + json.dumps(fma)] = gemv_time(call, x, copies, want, fma)
    tried = {}
    for bn, kw, w in GEMV_TILES:
        auto = int4_gemv._split_k(n, k, bn, kw, x.device)
        tried[(bn, kw, w, auto, 1)] = gemv_time(call, x, copies, want, gemv_config(bn, kw, w, auto))
    best = sorted((t, key) for key, t in tried.items() if t is not None)[:3]
    for _, (bn, kw, w, auto, _) in best:
        for split in sorted({1, max(1, auto // 2), 2 * auto} - {auto}):
            if split * 4 * 8 * kw <= k:
                tried[(bn, kw, w, split, 1)] = gemv_time(call, x, copies, want,
                                                         gemv_config(bn, kw, w, split))
        tried[(bn, kw, w, auto, 2)] = gemv_time(call, x, copies, want,
                                                gemv_config(bn, kw, w, auto, 2))
    for key, t in tried.items():
        rows[json.dumps(gemv_config(*key))] = t
    rows["default"] = graph_us([lambda w=w: call(x, w) for w in copies])
    ranked = sorted((t, label) for label, t in rows.items() if t is not None)
    print(f"{name} int4 g128 [1 x {k}] x [{n} x {k}]^T: bandwidth floor {floor_us:.1f} us "
          f"({nbytes / 1e6:.1f} MB)", flush=True)
    for t, label in ranked[:6] + [r for r in ranked[6:] if not r[1].startswith("{")]:
        print(f"  {t:9.2f} us  {floor_us / t:6.1%}  {label}", flush=True)
    gemv_best = min((t, key) for key, t in tried.items() if t is not None)
    del copies
    torch.cuda.empty_cache()
    return dict(shape=name, n=n, k=k, floor_us=floor_us, best_us=gemv_best[0],
                best=gemv_config(*gemv_best[1]), default_us=rows["default"],
                old_us=rows["old fma " + json.dumps(fma)] or float("nan"), cublas_bf16_us=rows["cublas-bf16"],
                top=ranked[:10])


def gemv_main(args, bw: float) -> None:
    results = [gemv_sweep_shape(name, bw) for name in args.gemv_shapes]
    print("\n| matrix | N x K | floor us | new best us | of floor | old us | of floor | "
          "bf16 cuBLAS us | best config |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        c = r["best"]
        print(f"| {r['shape']} | {r['n']} x {r['k']} | {r['floor_us']:.1f} | {r['best_us']:.2f} | "
              f"{r['floor_us'] / r['best_us']:.0%} | {r['old_us']:.2f} | "
              f"{r['floor_us'] / r['old_us']:.0%} | {r['cublas_bf16_us']:.2f} | "
              f"BLOCK_N={c['BLOCK_N']} KW={c['KW']} warps={c['num_warps']} "
              f"SPLIT_K={c['SPLIT_K']} stages={c['num_stages']} |")
    print("\n# strata/kernels/int4_gemv.py, the measured bests:")
    print("GEMV_INT4_TUNED = {")
    for r in results:
        print(f"    ({r['n']}, {r['k']}): {r['best']!r},")
    print("}")
    if args.json:
        args.json.write_text(json.dumps(dict(copy_GBps=bw / 1e9, results=results), indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 512, 4096])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--bits", type=int, nargs="+", choices=[4, 8], default=[4, 8])
    ap.add_argument("--group-size", type=int, choices=qm.GROUP_SIZES, default=128)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--gemv", action="store_true",
                    help="one row, int4: sweep the word-wise kernel's tiles (see above)")
    ap.add_argument("--gemv-shapes", nargs="+", choices=list(GEMV_SHAPES),
                    default=list(GEMV_SHAPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if args.gemv:
        gemv_main(args, bw)
        return
    results = []
    for name, bits in itertools.product(args.shapes, args.bits):
        n, k = SHAPES[name]
        call, ref, nbytes, copies = make_weights(bits, n, k, args.group_size)
        bf16_copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
                       for _ in range(COPIES)]
        floor_us = nbytes / bw * 1e6
        for m in args.rows:
            rows = sweep_one(call, ref, copies, bf16_copies, m, k, bits, args.group_size)
            print(f"{name} int{bits} [{m} x {k}] x [{n} x {k}]^T: bandwidth floor {floor_us:.1f} us",
                  flush=True)
            for label, us in rows[:6] + [r for r in rows[6:] if r[0] in ("default", "cublas-bf16")]:
                rate = (f"{floor_us / us:6.1%}" if m <= qm.MAX_DECODE_ROWS
                        else f"{2 * m * n * k / us / 1e6:6.1f} TFLOP/s")
                print(f"  {us:9.2f} us  {rate}  {label}", flush=True)
            times = dict(rows)
            results.append(dict(shape=name, bits=bits, group_size=args.group_size, m=m, n=n, k=k,
                                floor_us=floor_us, best=rows[0][0], best_us=rows[0][1],
                                cublas_bf16_us=times["cublas-bf16"], default_us=times["default"],
                                top=rows[:10]))
        del copies, bf16_copies
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dict(copy_GBps=bw / 1e9, results=results), indent=1))


if __name__ == "__main__":
    main()
