"""Quantized weights and KV cache on one NVIDIA GPU: Llama-3.1-8B's shape, random weights.

    python bench/gpu_quant.py [--formats bf16 int8 int4] [--kv auto int8] [--quick]
                              [--int4-decode gemv|fma] [--pdl on off]

Same process, one engine at a time (each freed before the next):
1. ceilings: the device-to-device copy bandwidth (bytes read + written), as bench/gpu_llama8b.py.
2. decode, per weight format (bf16, int8 per channel, int4 in groups of 128; quantized at load):
   batch 1, 128-token prompt, 256 new tokens, median of 3; the weight memory; and the fraction of
   the format's own roofline = tok/s / (copy bandwidth / bytes a decode step reads), the bytes
   being every weight but the embedding table (packed codes, scales and the bf16 LM head).
   Ratios int8/bf16 and int4/bf16 (targets: 1.7x and 2.5x). With ``--pdl on off`` each format
   runs with and without programmatic dependent launch in its captured graphs
   (strata.kernels.pdl), a fresh engine each, for an A/B in the same process.
3. kv (with --kv): the offline fixed set (1000 x 256 prompt / 256 new tokens, ignore_eos) with
   bf16 weights at the same KV memory budget for each KV dtype: total tok/s, the KV blocks and
   the most sequences the budget lets run at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_llama8b import batch1_decode_rates, copy_bandwidth, model_dir, random_prompts  # noqa: E402

FORMATS = {"bf16": {}, "int8": {"quantization": "int8"},
           "int4": {"quantization": "int4", "quantization_group_size": 128}}


def _llm(path: Path, args, **kw):
    from strata import LLM
    return LLM(str(path), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
               max_model_len=4096, max_num_seqs=args.max_num_seqs, **kw)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _key(name: str, pdl_mode: str, args) -> str:
    """A decode result's name: the format, marked with the PDL setting unless it is the main one."""
    return name if pdl_mode == args.pdl[0] else f"{name} (pdl {pdl_mode})"


def decode_part(path: Path, args, bw: float, results: dict) -> None:
    for pdl_mode in args.pdl:
        for name in args.formats:
            decode_one(path, args, bw, results, name, pdl_mode)


def decode_one(path: Path, args, bw: float, results: dict, name: str, pdl_mode: str) -> None:
    from strata.kernels import pdl
    pdl.ENABLED = pdl_mode == "on"
    key = _key(name, pdl_mode, args)
    llm = _llm(path, args, **FORMATS[name])
    engine = llm.llm_engine
    print(engine.describe(), flush=True)
    model = engine.executor.runner.model
    read_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if "embed_tokens" not in n)
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rates = batch1_decode_rates(llm, args.decode_new)
    tok_s = statistics.median(rates)
    roofline = bw / read_bytes
    results[key] = dict(pdl=pdl_mode, decode_tok_s=tok_s, rates=rates, weight_gib=total_bytes / 2**30,
                        read_bytes_per_token=read_bytes, roofline_tok_s=roofline,
                        roofline_fraction=tok_s / roofline, startup=engine.describe())
    print(f"{key}: decode {tok_s:.1f} tok/s {rates}, weights {total_bytes / 2**30:.2f} GiB, "
          f"{tok_s / roofline:.0%} of its roofline {roofline:.0f} tok/s", flush=True)
    del llm, engine, model      # the next engine needs the whole card
    _free()


def kv_part(path: Path, args, results: dict) -> None:
    from strata import SamplingParams
    reqs = random_prompts(args.num_requests, 256, 256, 256, 256, seed=7, vocab=128256)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    for kv in args.kv:
        llm = _llm(path, args, kv_cache_memory=args.kv_budget, kv_cache_dtype=kv)
        engine = llm.llm_engine
        print(engine.describe(), flush=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        tokens = sum(len(p) for p, _ in reqs) + sum(len(o.outputs[0].token_ids) for o in outs)
        blocks = engine.num_blocks
        # How many whole 512-token sequences the KV cache holds (capped by max_num_seqs).
        seqs = min(args.max_num_seqs, blocks * engine.args.block_size // 512)
        results[f"kv_{kv}"] = dict(total_tok_s=tokens / elapsed, blocks=blocks, seqs_at_full_length=seqs)
        print(f"kv {kv}: {tokens / elapsed:.0f} total tok/s, {blocks} blocks, {seqs} sequences of 512 "
              "tokens fit", flush=True)
        del llm, engine, outs
        _free()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--kv", nargs="*", default=[], help="KV cache dtypes for the throughput part")
    ap.add_argument("--kv-budget", default="8GiB", help="KV cache memory for the throughput part")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--decode-new", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="2 layers: a smoke run")
    ap.add_argument("--int4-decode", choices=["gemv", "fma"], default="gemv",
                    help="int4 one-row kernel: the word-wise gemv (default) or the element-wise "
                         "tile (strata.kernels.quant_matmul.INT4_DECODE), for A/B")
    ap.add_argument("--gemv-tuned", type=Path, metavar="FILE",
                    help="with --int4-decode gemv: per-shape tiles, JSON {\"N,K\": config} as "
                         "bench/gpu_int4_profile.py --split-sweep --tuned-out writes it")
    ap.add_argument("--pdl", nargs="+", choices=["on", "off"], default=["on"],
                    help="programmatic dependent launch in the captured graphs (sm_90+); "
                         "'on off' runs both, the first named is the main row")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from strata.kernels import int4_gemv, quant_matmul
    quant_matmul.INT4_DECODE = args.int4_decode
    if args.gemv_tuned:
        for key, cfg in json.loads(args.gemv_tuned.read_text()).items():
            int4_gemv.GEMV_INT4_TUNED[tuple(int(v) for v in key.split(","))] = cfg
    path = model_dir(args.quick)
    bw = copy_bandwidth()
    results: dict = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9,
                     "int4_decode": args.int4_decode,
                     "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(f"{results['device']}, copy {bw / 1e9:.0f} GB/s", flush=True)
    decode_part(path, args, bw, results)
    if args.kv:
        kv_part(path, args, results)
    print("\n| weights | decode tok/s | vs bf16 | weights GiB | roofline fraction |")
    print("|---|---:|---:|---:|---:|")
    for name in results:
        r = results[name]
        if not isinstance(r, dict) or "decode_tok_s" not in r:
            continue
        base = results.get(_key("bf16", r["pdl"], args), {}).get("decode_tok_s")
        ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else ""
        print(f"| {name} | {r['decode_tok_s']:.1f} | {ratio} | {r['weight_gib']:.2f} | {r['roofline_fraction']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
