"""Why the one-row int4 kernels run at a third to a half of the bandwidth floor: Nsight Compute
counters for each kernel on the Llama-3.1-8B decode shapes, next to cuBLAS on bf16 weights.

    python bench/gpu_int4_profile.py --time                  # timings only (CUDA graphs), no ncu
    python bench/gpu_int4_profile.py --split-sweep [--shapes qkv down] [--tiles 2,256,1 ...]
    ncu --clock-control none --target-processes all --kernel-name regex:'_w4|w4_gemv|gemv|gemm|nvjet' \
        --metrics $(python bench/gpu_int4_profile.py --metrics) --csv --page raw \
        python bench/gpu_int4_profile.py --run > ncu.csv
    python bench/gpu_int4_profile.py --table ncu.csv         # one line per kernel launch

--run calls each variant PROFILED_CALLS times on fresh weights (no warm-up inside the profile:
the first call compiles, so --run compiles everything first, then synchronizes and marks the
profiled range with torch.cuda.profiler start/stop; give ncu --profile-from-start off).
Variants: "fma" (the default element-wise tile), "gemv" (strata.kernels.int4_gemv, default tile
and a 4-warp tile), "magic" (the tensor-core magic-number tile), "bf16" (cuBLAS on bf16).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GROUP = 128
PROFILED_CALLS = 2

METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct",
    "launch__registers_per_thread",
    "launch__grid_size",
    "launch__block_size",
    "launch__occupancy_limit_registers",
    "smsp__inst_executed.sum",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "lts__t_sectors_srcunit_tex_op_read.sum",
]


def variants():
    from strata.kernels import int4_gemv
    from strata.kernels import quant_matmul as qm

    def fma(n, k):
        return qm.default_config(1, n, k, 4, None, GROUP, "fma")

    def gemv(n, k):
        return int4_gemv.gemv_config(n, k)

    def gemv4w(n, k):
        return dict(GEMV4=True, BLOCK_N=128, KW=8, SPLIT_K=None, num_warps=4, num_stages=1)

    def magic(n, k):
        return qm.magic_int4_config(n, GROUP)
    return {"fma": fma, "gemv": gemv, "gemv4w": gemv4w, "magic": magic}


def make(n: int, k: int):
    """COPIES int4 copies of an [n, k] weight with fp32 scales and mins, as the engine stores them
    (gpu_quant_sweep.make_weights)."""
    import torch

    from gpu_quant_sweep import make_weights
    return make_weights(4, n, k, GROUP, scale_dtype=torch.float32)[3]


def run(time_only: bool) -> None:
    import torch
    import torch.nn.functional as F

    from strata.kernels import quant_matmul as qm
    from gpu_llama8b import copy_bandwidth
    from gpu_skinny_sweep import graph_us
    torch.manual_seed(0)
    bw = copy_bandwidth() if time_only else None
    calls = []                          # (label, fn) in profiling order
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = make(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = qm.w4a16_matmul_ref(x, *weights[0], GROUP).float()
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for label, cfg_of in variants().items():
            cfg = cfg_of(n, k)
            try:
                got = qm.w4a16_matmul(x, *weights[0], GROUP, config=cfg).float()
            except Exception as e:      # noqa: BLE001 - a tile that does not build: say so, go on
                print(f"{name:8s} {label:7s} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            err = ((got - want).norm() / want.norm()).item()
            fns = [lambda w=w, cfg=cfg, x=x: qm.w4a16_matmul(x, *w, GROUP, config=cfg) for w in weights]
            calls.append((f"{name}/{label}", fns[1]))
            if time_only:
                us = graph_us(fns)
                floor_us = sum(t.numel() * t.element_size() for t in weights[0]) / bw * 1e6
                rows.append((name, label, us, floor_us / us, err))
        calls.append((f"{name}/bf16", lambda w=bf16[0], x=x: F.linear(x, w)))
        if time_only:
            us = graph_us([lambda w=w: F.linear(x, w) for w in bf16])
            rows.append((name, "bf16", us, n * k * 2 / bw * 1e6 / us, 0.0))
    torch.cuda.synchronize()
    if time_only:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
        print(f"{'shape':8s} {'kernel':7s} {'us':>8s} {'of floor':>9s} {'rel err':>9s}")
        for name, label, us, frac, err in rows:
            print(f"{name:8s} {label:7s} {us:8.1f} {100 * frac:8.1f}% {err:9.2e}")
        return
    for label, fn in calls:             # the profiled range: each call PROFILED_CALLS times
        print(f"profiling {label}", flush=True)
        torch.cuda.profiler.start()
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def split_sweep(tuned_out: str | None, shapes: list[str] | None = None,
                tiles: list[tuple[int, int, int]] | None = None) -> None:
    """The word-wise kernel at many programs an SM (split over K): tiles (rows, words a row a
    step, warps) x programs-per-SM x stages, each shape's best against the element-wise tile, by
    CUDA-graph timing."""
    import torch

    from strata.kernels import quant_matmul as qm
    from gpu_llama8b import copy_bandwidth
    from gpu_skinny_sweep import graph_us
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # Long runs of words a row (KW = 32-128: 128-512 bytes a row a step): with KW = 8-16 a warp's
    # load touched 16 rows x 32-64 bytes and every tile ran at the same ~36% of the floor.
    tiles = tiles or [(4, 64, 1), (8, 64, 1), (8, 64, 2), (16, 64, 2), (16, 64, 4), (32, 64, 4),
             (2, 128, 1), (4, 128, 2), (8, 128, 4), (16, 128, 4), (8, 32, 1), (16, 32, 1),
             (16, 32, 2), (32, 32, 4), (4, 128, 1), (8, 128, 1), (8, 128, 2)]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs")
    tuned = {}
    all_shapes = {**SHAPES, "lm_head": (128256, 4096)}
    for name, (n, k) in all_shapes.items():
        if shapes and name not in shapes:
            continue
        weights = make(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = qm.w4a16_matmul_ref(x, *weights[0], GROUP).float()
        floor_us = sum(t.numel() * t.element_size() for t in weights[0]) / bw * 1e6
        fma = qm.default_config(1, n, k, 4, None, GROUP, "fma")
        res = [(graph_us([lambda w=w, x=x: qm.w4a16_matmul(x, *w, GROUP, config=fma)
                          for w in weights]), "fma")]
        for (bn, kw, warps), per_sm, stages in itertools.product(tiles, (2, 4, 8, 16), (1, 2)):
            blocks = -(-n // bn)
            split = max(1, min(-(-per_sm * sms // blocks), k // (8 * kw * 2)))
            cfg = dict(GEMV4=True, BLOCK_N=bn, KW=kw, SPLIT_K=split, num_warps=warps,
                       num_stages=stages)
            try:
                got = qm.w4a16_matmul(x, *weights[0], GROUP, config=cfg).float()
                err = ((got - want).norm() / want.norm()).item()
                if not err < 1e-3:
                    print(f"  WRONG {name} {cfg} err {err:.2e}")
                    continue
                us = graph_us([lambda w=w, x=x, cfg=cfg: qm.w4a16_matmul(x, *w, GROUP, config=cfg)
                               for w in weights])
            except Exception as e:      # noqa: BLE001 - a tile that does not build: skip it
                print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            res.append((us, json.dumps(cfg)))
        res.sort()
        best = next((json.loads(label) for _, label in res if label != "fma"), None)
        if best is not None:
            tuned[f"{n},{k}"] = best
        print(f"{name} [{n} x {k}] floor {floor_us:.1f} us; fma "
              f"{dict((l, t) for t, l in res)['fma']:.1f} us")
        for us, label in res[:5]:
            print(f"  {us:8.1f} us {100 * floor_us / us:5.1f}%  {label}")
        del weights
        torch.cuda.empty_cache()
    print("best gemv tiles:", json.dumps(tuned))
    if tuned_out:
        Path(tuned_out).write_text(json.dumps(tuned, indent=1))


def table(path: str) -> None:
    """ncu's raw CSV (one row per launch) -> a compact table, medians per kernel name and grid."""
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    reader = list(csv.DictReader(lines))
    if not reader:
        print("no ncu rows")
        return
    body = [r for r in reader if r.get("ID", "").isdigit()]
    short = {m: m.split("__", 1)[1].replace("average_warps_issue_stalled_", "stall_")
             .replace("_per_issue_active.ratio", "").replace(".avg.pct_of_peak_sustained", "%")
             for m in METRICS}
    for r in body:
        print(f"--- {r['Kernel Name'][:60]}")
        print("    " + "  ".join(f"{short[m]}={r.get(m, '?')}" for m in METRICS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--split-sweep", action="store_true")
    ap.add_argument("--tuned-out", help="with --split-sweep: write each shape's best gemv tile, "
                                        "for bench/gpu_quant.py --gemv-tuned")
    ap.add_argument("--shapes", nargs="+", choices=[*SHAPES, "lm_head"],
                    help="with --split-sweep: only these matrices")
    ap.add_argument("--tiles", nargs="+", metavar="ROWS,KW,WARPS",
                    help="with --split-sweep: these tiles instead of the built-in list")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--metrics", action="store_true")
    ap.add_argument("--table")
    args = ap.parse_args()
    if args.metrics:
        print(",".join(METRICS))
    elif args.split_sweep:
        tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else None
        split_sweep(args.tuned_out, args.shapes, tiles)
    elif args.table:
        table(args.table)
    else:
        run(time_only=args.time)


if __name__ == "__main__":
    main()
