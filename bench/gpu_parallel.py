"""Tensor parallelism on several GPUs: Llama-3.1-8B's shape in bf16 with random weights at
TP=1, 2 and 4, each engine measured in the same run, with the all-reduce time per step.

    cd bench && python gpu_parallel.py --tp 1 2 --num-requests 600   # 2 GPUs, ~6 min
    cd bench && python gpu_parallel.py --tp 1 2 --auto-throughput    # + parallel="auto" for throughput
    cd bench && python gpu_parallel.py --shape 70b --tp 2 4          # Llama-3.1-70B's shape, 4 GPUs
    cd bench && python gpu_parallel.py --tp 4 --num-requests 600     # 4 GPUs
    cd bench && python gpu_parallel.py --smoke                       # CPU, gloo, tiny shapes
    cd bench && python gpu_parallel.py --tp 2 4 --all-reduce-only    # the all-reduce alone, ~1 min

Every engine runs with the defaults: async scheduling (TP>1 too) and CUDA graphs, and at TP>1
the symmetric-memory all-reduce for small messages (NCCL above 8 MiB or where it is missing; the
startup line printed for each engine says which). For each TP size, one engine at a time:
1. start: ``LLM(..., tensor_parallel_size=N)`` to the first token (workers, weights, memory plan,
   CUDA graphs with the all-reduces inside).
2. decode: batch 1, 128-token prompt, ``--decode-new`` new tokens (EOS ignored), tok/s after
   the first token; median of 3. At TP>1 also with ``all_reduce="nccl"`` (a second engine,
   decode only; ``--no-compare-nccl`` skips it) and without the fused all-reduce + RMSNorm
   (``STRATA_FUSED_NORM=0``: separate all-reduce and norm kernels; ``--no-compare-unfused``).
   At every TP size also with the bf16 GEMVs launched the plain way (``STRATA_GEMV_PDL=0``) and
   with PDL but without the L2 prefetch of their first weights (``STRATA_GEMV_PREFETCH_MIB=0``;
   ``--no-compare-gemv-pdl`` skips both). At TP>1 also with the row-parallel GEMVs leaving the
   sending of their shares to the fused all-reduce + norm (``STRATA_GEMV_PUSH=0``;
   ``--no-compare-push``).
3. offline: the GPU issue's fixed set (gpu_llama8b.py): ``--num-requests`` requests of 256 random
   prompt tokens and 256 new tokens in one ``llm.generate``; total tok/s, and per GPU.
4. all-reduce: every rank times all-reduces of [tokens, 4096] bf16 (1 token: a batch-1 decode
   step; 64 and 256: decode steps of the offline set; 2048: a prompt chunk) through NCCL and through
   symmetric memory side by side, eagerly and replayed from a CUDA graph of one step's worth
   (2 per layer + 1 for the vocab-parallel embedding); per step, the time of the slowest rank.
   Where the fused all-reduce + RMSNorm takes the size, as many of those against as many
   symmetric-memory all-reduces each followed by the norm kernel.
5. greedy check (parallel_check.py; ``--no-check`` skips it): on one random checkpoint (8B layer
   shape, 2 layers), TP=N vs TP=1 tokens in float32, and symmetric memory vs NCCL in bfloat16.
6. with ``--auto-throughput``: the engine ``parallel="auto", goal="throughput"`` builds on all the
   GPUs (for the 8B on 2 GPUs: two data-parallel replicas of TP=1), steps 1-3 on it.
Targets (8B): TP=2 batch-1 decode >= 1.7x TP=1; TP=2 offline throughput per GPU >= 85% of TP=1's,
or data-parallel replicas where they win, chosen by ``parallel="auto"``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from gpu_llama8b import LLAMA_31_8B, batch1_decode_rates, random_prompts
from parallel_check import all_reduce_only, run_checks
from parallel_check import report as report_checks

# Tokens per all-reduce of [tokens, 4096] bf16: 8 KiB (batch-1 decode, one-shot), 512 KiB and
# 2 MiB (decode batches, two-shot), 16 MiB (a prompt chunk: NCCL only).
AR_TOKENS = (1, 64, 256, 2048)


# Llama-3.1-70B's shape (the "70B-shape model at TP=4"): 80 layers of hidden 8192.
LLAMA_70B = dict(LLAMA_31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8)
SHAPES = {"8b": LLAMA_31_8B, "70b": LLAMA_70B}


def model_dir(smoke: bool, shape: str = "8b") -> Path:
    import tempfile
    cfg = dict(SHAPES[shape])
    if smoke:   # tiny but TP-shaped: heads and vocab split over 4 ranks
        cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048)
    path = Path(tempfile.mkdtemp(prefix="parallel-bench-"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# A configuration: a tensor-parallel size ("1", "2", ...) or "auto" (parallel="auto" with
# goal="throughput": on GPUs that each hold the model, data-parallel replicas of TP=1).
AUTO = "auto"


def label(config: str) -> str:
    return "parallel=auto (throughput)" if config == AUTO else f"TP={config}"


def measure_or_retry(args, path: Path, config: str) -> dict | None:
    """A TP size that fails (CUDA graphs holding NCCL all-reduces are the new part) is retried
    eagerly once, so one failure does not cost the run its other figures."""
    try:
        return measure(args, path, config, args.enforce_eager)
    except Exception as e:   # reported, then the next attempt or TP size
        print(f"{label(config)} failed: {type(e).__name__}: {e}", flush=True)
    gc.collect()
    if config != "1" and not args.enforce_eager:
        try:
            return measure(args, path, config, True)
        except Exception as e:
            print(f"{label(config)} eager failed too: {type(e).__name__}: {e}", flush=True)
    return None


def measure_in_child(config: str, variant: str | None = None, enforce_eager: bool = False) -> dict | None:
    """One TP size (or one comparison engine of it: ``variant``, eager like the engine it is
    compared with) in a process of its own: a TP=1 engine's KV cache (~110 GiB) still held by
    this process left rank 0 of the next engine no memory (seen on 2 x H200), so no engine
    shares a process with another."""
    import subprocess
    import sys
    import tempfile
    argv = list(sys.argv[1:])
    i = argv.index("--tp") if "--tp" in argv else len(argv)
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    argv[i:j] = ["--tp", config if config != AUTO else "1"]   # the GPU count check
    argv = [a for a in argv if a not in ("--check", "--auto-throughput")] + ["--no-check", "--only", config]
    argv += ["--variant", variant] if variant else []
    argv += ["--enforce-eager"] if enforce_eager and "--enforce-eager" not in argv else []
    if "--json" in argv:
        k = argv.index("--json")
        del argv[k:k + 2]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        proc = subprocess.run([sys.executable, __file__, *argv, "--json", f.name])
        try:
            found = json.loads(Path(f.name).read_text() or "{}").get("results", [])
        except json.JSONDecodeError:
            found = []
    if proc.returncode != 0 or not found:
        print(f"{label(config)}: its process ended with {proc.returncode} and no result", flush=True)
        return None
    return found[0]


def start_engine(args, path: Path, config: str, enforce_eager: bool, all_reduce: str = "auto",
                 env: dict | None = None):
    """The engine, and its start time; ``env`` is set while it starts (its workers inherit it)."""
    from strata.engine.data_parallel import environment
    with environment(**(env or {})):
        return _start_engine(args, path, config, enforce_eager, all_reduce)


def _start_engine(args, path: Path, config: str, enforce_eager: bool, all_reduce: str):
    from strata import LLM, SamplingParams
    t0 = time.perf_counter()
    layout = (dict(parallel="auto", goal="throughput") if config == AUTO
              else dict(tensor_parallel_size=int(config)))
    llm = LLM(str(path), load_format="dummy", dtype="float32" if args.smoke else "bfloat16",
              skip_tokenizer_init=True, max_model_len=args.max_model_len, **layout,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=enforce_eager, async_scheduling=False if args.sync else None,
              all_reduce=all_reduce, step_timeout=args.step_timeout, startup_timeout=args.startup_timeout,
              use_tqdm_on_load=False, **({} if not args.smoke else {"kv_cache_memory": "256MiB"}))
    llm.generate([{"prompt_token_ids": [10, 11, 12]}], SamplingParams(max_tokens=1, temperature=0.0),
                 use_tqdm=False)
    return llm, time.perf_counter() - t0


def decode_rate(args, llm, label: str) -> float:
    """Batch-1 decode tok/s after the first token, median of 3."""
    rates = batch1_decode_rates(llm, args.decode_new, llm.llm_engine.model_config.vocab_size)
    print(f"{label} batch-1 decode tok/s: {[round(r, 1) for r in rates]}", flush=True)
    return statistics.median(rates)


def shutdown(llm) -> None:
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpus_used(engine) -> tuple[int, int]:
    """(tensor-parallel size, GPUs) of an engine, data-parallel replicas included."""
    tp = engine.parallel_config.tensor_parallel_size
    replicas = len(getattr(engine, "replicas", [None]))
    return tp, engine.parallel_config.world_size * replicas


# The comparison engines: key -> (label, start_engine's extras, the flag that asks for it, only at
# TP>1, the report's column).
VARIANTS = {
    "nccl": ("all_reduce=nccl", dict(all_reduce="nccl"), "compare_nccl", True, "with NCCL all-reduce"),
    "unfused": ("STRATA_FUSED_NORM=0", dict(env={"STRATA_FUSED_NORM": "0"}), "compare_unfused", True,
                "without the fused norm"),
    "nopdl": ("STRATA_GEMV_PDL=0", dict(env={"STRATA_GEMV_PDL": "0"}), "compare_gemv_pdl", False,
              "GEMVs without PDL"),
    "noprefetch": ("STRATA_GEMV_PREFETCH_MIB=0", dict(env={"STRATA_GEMV_PREFETCH_MIB": "0"}), "compare_gemv_pdl",
                   False, "GEMVs without the prefetch"),
    "nopush": ("STRATA_GEMV_PUSH=0", dict(env={"STRATA_GEMV_PUSH": "0"}), "compare_push", True,
               "shares sent by the norm, not the GEMV"),
}


def measure_variant(args, path: Path, config: str, key: str) -> dict:
    """Batch-1 decode of one comparison engine (``VARIANTS[key]``)."""
    what, kw, *_ = VARIANTS[key]
    llm, _ = start_engine(args, path, config, args.enforce_eager, **kw)
    rate = decode_rate(args, llm, f"{label(config)} {what}")
    shutdown(llm)
    return {"config": config, "variant": key, "decode_tok_s": rate}


def measure(args, path: Path, config: str, enforce_eager: bool) -> dict:
    from strata import SamplingParams
    name = label(config)
    out: dict = {"config": config, "eager": enforce_eager}
    # First the comparison engines (decode only, each in a process of its own): the default
    # engine's figures follow its start line.
    for key, (_, _, wanted, tp_only, _) in VARIANTS.items():
        if config == AUTO or (config == "1" and tp_only) or not getattr(args, wanted):
            continue
        found = measure_in_child(config, key, enforce_eager)
        if found is not None:
            out[f"decode_tok_s_{key}"] = found["decode_tok_s"]
    llm, out["start_s"] = start_engine(args, path, config, enforce_eager)
    out["startup"] = llm.llm_engine.describe()
    tp, gpus = gpus_used(llm.llm_engine)
    out.update(tp=tp, gpus=gpus, replicas=gpus // tp)
    vocab = llm.llm_engine.model_config.vocab_size
    out["decode_tok_s"] = decode_rate(args, llm, name)

    reqs = random_prompts(args.num_requests, 256, 256, 256, 256, seed=7, vocab=vocab)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs],
                        [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in reqs],
                        use_tqdm=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(p) for p, _ in reqs) + sum(len(o.outputs[0].token_ids) for o in outs)
    out["offline_tok_s"] = tokens / elapsed
    out["offline_tok_s_per_gpu"] = tokens / elapsed / gpus
    print(f"{name} ({out['replicas']} x TP={tp}) offline: {len(reqs)} requests in {elapsed:.1f}s -> "
          f"{tokens / elapsed:.0f} tok/s", flush=True)

    if tp > 1:
        try:
            per_rank = llm.llm_engine.executor.call("time_all_reduce", list(AR_TOKENS))
            out["all_reduce"] = {str(n): slowest([r[n] for r in per_rank.values()]) for n in AR_TOKENS}
            print(f"TP={tp} all-reduce per step (ms, slowest rank): {out['all_reduce']}", flush=True)
        except Exception as e:   # the engine's figures above still stand
            print(f"TP={tp} all-reduce timing failed: {type(e).__name__}: {e}", flush=True)
    del outs
    shutdown(llm)
    return out


PATHS = ("nccl", "symm_mem", "symm_mem_norm", "fused_norm")   # comm_timing.time_all_reduce_step's


def slowest(rows: list[dict]) -> dict:
    """Per path (nccl, symm_mem) and step, the slowest rank's time (NaN where a rank has none)."""
    out = {"ops_per_step": rows[0]["ops_per_step"], "used": rows[0]["used"]}
    for path in PATHS:
        if not all(path in row for row in rows):
            continue
        timing = {}
        for key in ("eager_ms", "graph_ms"):
            values = [row[path].get(key, float("nan")) for row in rows]
            timing[key] = float("nan") if any(v != v for v in values) else max(values)
        errors = [row[path]["graph_error"] for row in rows if "graph_error" in row[path]]
        if errors:
            timing["graph_error"] = errors[0]
        out[path] = timing
    return out


def report(results: list[dict], meta: dict) -> None:
    print(f"\n{meta}")
    base = next((r for r in results if r["config"] == "1"), None)
    columns = [v[-1] for v in VARIANTS.values()]
    print(f"| layout | GPUs | start s | batch-1 decode tok/s | vs TP=1 | {' | '.join(columns)} | offline tok/s "
          f"| per GPU | per GPU vs TP=1 |\n|---|---:|---:|---:|---:|{'---:|' * len(columns)}---:|---:|---:|")
    for r in results:
        dec = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
        thr = f"{r['offline_tok_s_per_gpu'] / base['offline_tok_s_per_gpu']:.0%}" if base else ""
        variants = " | ".join(f"{r[f'decode_tok_s_{key}']:.1f}" if f"decode_tok_s_{key}" in r else ""
                              for key in VARIANTS)
        what = f"TP={r['tp']}" if r["replicas"] == 1 else f"{r['replicas']} data-parallel x TP={r['tp']}"
        if r["config"] == AUTO:
            what = f"parallel=auto, throughput: {what}"
        print(f"| {what}{' (eager)' if r['eager'] else ''} | {r['gpus']} | {r['start_s']:.0f} "
              f"| {r['decode_tok_s']:.1f} | {dec} | {variants} | {r['offline_tok_s']:.0f} "
              f"| {r['offline_tok_s_per_gpu']:.0f} | {thr} |")
    report_all_reduce(results)
    two = next((r for r in results if r["config"] == "2"), None)
    auto = next((r for r in results if r["config"] == AUTO), None)
    if base and two:
        print(f"\ntargets: TP=2 decode {two['decode_tok_s'] / base['decode_tok_s']:.2f}x TP=1 (target >= 1.7x); "
              f"TP=2 offline per GPU {two['offline_tok_s_per_gpu'] / base['offline_tok_s_per_gpu']:.0%} "
              "of TP=1 (target >= 85%)")
    if base and auto:
        print(f"parallel=auto, goal throughput, on {auto['gpus']} GPUs: {auto['replicas']} replicas x TP={auto['tp']}, "
              f"offline per GPU {auto['offline_tok_s_per_gpu'] / base['offline_tok_s_per_gpu']:.0%} of TP=1 "
              "(target >= 85%)")


def report_all_reduce(results: list[dict]) -> None:
    """ms per step (ops_per_step all-reduces), slowest rank: NCCL vs symmetric memory."""
    rows = [r for r in results if r.get("all_reduce")]
    if not rows:
        return
    print("\n| TP | tokens | all-reduces/step | used by the model | NCCL eager | NCCL graph "
          "| symm-mem eager | symm-mem graph | graph: NCCL / symm-mem | symm-mem + norm graph | fused graph |\n"
          "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        for tokens, ar in r["all_reduce"].items():
            n, s = ar.get("nccl", {}), ar.get("symm_mem", {})
            sn, fn = ar.get("symm_mem_norm", {}), ar.get("fused_norm", {})
            ratio = n.get("graph_ms", nan) / s.get("graph_ms", nan) if s else nan
            err = " ".join(f"({p} graph: {a['graph_error'][:60]})" for p, a in (("nccl", n), ("symm", s))
                           if "graph_error" in a)
            print(f"| {r['tp']} | {tokens} | {ar['ops_per_step']} | {ar['used']} | {n.get('eager_ms', nan):.3f} "
                  f"| {n.get('graph_ms', nan):.3f} | {s.get('eager_ms', nan):.3f} | {s.get('graph_ms', nan):.3f} "
                  f"| {ratio:.2f}x {err}| {sn.get('graph_ms', nan):.3f} | {fn.get('graph_ms', nan):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="tensor-parallel sizes to measure")
    parser.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny shapes, few requests")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                        help="Llama-3.1-8B's shape, or 70B's (141 GB of bf16: TP=2 at least on H200s)")
    parser.add_argument("--num-requests", type=int, default=1000, help="requests of the offline set")
    parser.add_argument("--decode-new", type=int, default=256, help="new tokens of the batch-1 decode")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs at any TP size")
    parser.add_argument("--sync", action="store_true",
                        help="synchronous scheduling at every TP size (default: async, the engine's "
                             "default on GPUs)")
    parser.add_argument("--compare-nccl", action=argparse.BooleanOptionalAction, default=True,
                        help="at TP>1 also measure batch-1 decode with all_reduce='nccl' (a second engine)")
    parser.add_argument("--compare-unfused", action=argparse.BooleanOptionalAction, default=True,
                        help="at TP>1 also measure batch-1 decode without the fused all-reduce + RMSNorm")
    parser.add_argument("--compare-gemv-pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure batch-1 decode with the bf16 GEMVs launched without PDL "
                             "(STRATA_GEMV_PDL=0), and with PDL but no L2 prefetch (STRATA_GEMV_PREFETCH_MIB=0)")
    parser.add_argument("--compare-push", action=argparse.BooleanOptionalAction, default=True,
                        help="at TP>1 also measure batch-1 decode with o_proj and down_proj leaving the sending "
                             "of their shares to the fused all-reduce + RMSNorm (STRATA_GEMV_PUSH=0)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="greedy tokens of TP>1 vs TP=1 (float32) and symmetric memory vs NCCL "
                             "(bfloat16) on one random checkpoint (parallel_check.py)")
    parser.add_argument("--all-reduce-only", action="store_true",
                        help="no engines: start the ranks alone, print the all-reduce each chooses and time "
                             "NCCL vs symmetric memory (a one-minute first check of the GPU path)")
    parser.add_argument("--step-timeout", type=float, default=180.0,
                        help="an engine step longer than this ends the run (a hang is reported, not waited out)")
    parser.add_argument("--startup-timeout", type=float, default=240.0,
                        help="an engine start longer than this ends that TP size (a hang is reported)")
    parser.add_argument("--auto-throughput", action="store_true",
                        help="also measure the engine parallel='auto', goal='throughput' builds on all the "
                             "GPUs (data-parallel replicas where the model fits one GPU)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)   # one configuration, in a child
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)   # its comparison engine
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.num_requests, args.decode_new, args.max_model_len = 16, 16, 1024
        args.max_num_seqs, args.max_num_batched_tokens = 16, 512
        args.tp = [t for t in args.tp if t <= 2]
    elif torch.cuda.device_count() < max(args.tp):
        raise SystemExit(f"--tp {args.tp} needs {max(args.tp)} GPUs; {torch.cuda.device_count()} visible")
    meta = {"shape": args.shape, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.all_reduce_only:
        results = []
        for tp in sorted(t for t in args.tp if t > 1):
            run = all_reduce_only(tp, AR_TOKENS, 128 if args.smoke else LLAMA_31_8B["hidden_size"], args.smoke)
            print(f"TP={tp}: {run['choice']}", flush=True)
            results.append({"tp": tp, "all_reduce": {str(n): slowest(rows) for n, rows in run["all_reduce"].items()}})
        print(f"\n{meta}")
        report_all_reduce(results)
        return
    path = model_dir(args.smoke, args.shape)
    configs = [args.only] if args.only else [str(tp) for tp in sorted(args.tp)] + ([AUTO] if args.auto_throughput else [])
    results = []
    for config in configs:
        if args.variant:
            result = measure_variant(args, path, config, args.variant)
        elif len(configs) == 1:
            result = measure_or_retry(args, path, config)
        else:
            result = measure_in_child(config)
        if result is not None:
            results.append(result)
    checks = run_checks(sorted(args.tp), args.smoke) if args.check and not args.only else []
    if not args.variant:
        report(results, meta)
    report_checks(checks) if checks else None
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "checks": checks}, indent=2))


if __name__ == "__main__":
    main()
