"""strata on one NVIDIA GPU, Llama-3.1-8B's shape in bf16 with random weights, beside the
hardware ceilings and HF transformers measured in the same process.

    python bench/gpu_llama8b.py                 # everything (about 10 minutes on an H100)
    python bench/gpu_llama8b.py --only decode   # one part: ceilings, decode, offline, hf
    python bench/gpu_llama8b.py --quick         # smoke run: 2 layers, few requests

Parts, in order (strata's engine is freed before HF loads, so each gets the whole card):
1. ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul rate.
2. strata start: ``LLM(...)`` to the first generated token (weights, memory plan, CUDA graphs).
3. decode: batch 1, 128-token prompt, 256 new tokens (EOS ignored); tok/s after the first token
   and the fraction of the bandwidth roofline = tok/s / (copy bandwidth / weight bytes per token),
   where the weight bytes per token are every weight a decode step reads (all but the embedding
   table, of which it reads one row).
4. offline: 1000 requests of 256 random prompt tokens and 256 new tokens, then 1000 requests of
   32-1024 prompt and 16-512 new tokens (uniform, seeded); total (prompt + generated) and output
   tok/s of one ``llm.generate`` call.
5. hf: HF transformers ``generate`` (sdpa attention, no compile) on the same shapes: batch-1
   decode, and static left-padded batches of 64 over a subset of each offline set, counting only
   the tokens each request asked for (a batch runs until its longest request is done).
6. serve: ``strata serve`` on the same model in a subprocess, measured by ``strata bench serve``
   at max concurrency 1, 16 and 64 (256 prompt and 256 output tokens): TTFT and TPOT p50/p99.
   Random weights need a tokenizer with Llama-3's 128256 ids: ``--make-tokenizer DIR`` (run
   where strata's default model is installed) writes SmolLM2's tokenizer with placeholder tokens
   for ids 49152-128255; pass that DIR as ``--tokenizer`` (and carry it to the GPU machine).
Medians where a part repeats. Results go to stdout as a table and to --json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_31_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")


def median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    n = 2**30 // 2                                    # 1 GiB of bf16, two sources to defeat L2
    srcs = [torch.randn(n, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    dst = torch.empty_like(srcs[0])
    i = iter(range(10**9))
    ms = median_ms(lambda: dst.copy_(srcs[next(i) % 2]))
    del srcs, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / (ms / 1e3)


def ceilings() -> dict:
    copy_bw = copy_bandwidth()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: a @ b, reps=10)
    flops = 2 * 8192**3 / (ms / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_bw / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}


def model_dir(quick: bool) -> Path:
    cfg = dict(LLAMA_31_8B)
    if quick:
        cfg["num_hidden_layers"] = 2
    path = Path(tempfile.mkdtemp(prefix="llama8b-shape-"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def random_prompts(n: int, in_lo: int, in_hi: int, out_lo: int, out_hi: int, seed: int, vocab: int):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        length = rng.randint(in_lo, in_hi)
        reqs.append(([rng.randrange(1000, vocab - 1000) for _ in range(length)], rng.randint(out_lo, out_hi)))
    return reqs


def batch1_decode_rates(llm, new_tokens: int, vocab: int = 128256) -> list[float]:
    """Batch-1 decode tok/s after the first token, three runs: a 128-token random prompt,
    ``new_tokens`` greedy tokens with EOS ignored."""
    from strata import SamplingParams
    prompt = random_prompts(1, 128, 128, 0, 0, 1, vocab)[0][0]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(3):
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        m = out.metrics
        rates.append((len(out.outputs[0].token_ids) - 1) / (m.last_token_time - m.first_token_time))
    return rates


def strata_part(args, path: Path, results: dict, async_scheduling: bool = False) -> None:
    """Keys start with strata_ (synchronous scheduling) or strata_async_."""
    from strata import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(str(path), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              gpu_memory_utilization=args.gpu_memory_utilization, async_scheduling=async_scheduling)
    prefix = "strata_async" if async_scheduling else "strata"
    measured: dict = {}
    first = llm.generate([{"prompt_token_ids": [1000, 1001, 1002]}],
                         SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), use_tqdm=False)
    measured["start_to_first_token_s"] = time.perf_counter() - t0
    assert first[0].outputs[0].token_ids
    engine = llm.llm_engine
    print(engine.describe(), flush=True)
    measured["startup"] = engine.describe()
    model = engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if "embed_tokens" not in n)
    results["weight_bytes_per_token"] = weight_bytes

    if "decode" in args.only:
        rates = batch1_decode_rates(llm, args.decode_new)
        measured["decode_tok_s"] = statistics.median(rates)
        print(f"{prefix} batch-1 decode: {rates}", flush=True)

    if "offline" in args.only:
        for name, spec in (("fixed", (args.num_requests, 256, 256, 256, 256)),
                           ("mixed", (args.num_requests, 32, 1024, 16, 512))):
            reqs = random_prompts(*spec, seed=7, vocab=128256)
            prompts = [{"prompt_token_ids": p} for p, _ in reqs]
            params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in reqs]
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - t
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            n_in = sum(len(p) for p, _ in reqs)
            measured[f"{name}_total_tok_s"] = (n_in + n_out) / elapsed
            measured[f"{name}_output_tok_s"] = n_out / elapsed
            measured[f"{name}_seconds"] = elapsed
            print(f"{prefix} offline {name}: {len(reqs)} requests, {n_in} in + {n_out} out in {elapsed:.1f}s "
                  f"-> {(n_in + n_out) / elapsed:.0f} total tok/s, {n_out / elapsed:.0f} output tok/s", flush=True)
    results.update({f"{prefix}_{k}": v for k, v in measured.items()})
    del llm, engine, model
    gc.collect()
    torch.cuda.empty_cache()


def hf_part(args, path: Path, results: dict) -> None:
    import transformers
    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").eval()
    vocab = config.vocab_size

    def hf_generate(batch: list[list[int]], new: int) -> float:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    if "decode" in args.only:
        prompt = random_prompts(1, 128, 128, 0, 0, 1, vocab)[0][0]
        hf_generate([prompt], 2)   # warm-up
        rates = []
        for _ in range(3):
            t_one = hf_generate([prompt], 1)
            t_all = hf_generate([prompt], args.decode_new)
            rates.append((args.decode_new - 1) / (t_all - t_one))
        results["hf_decode_tok_s"] = statistics.median(rates)
        print(f"HF batch-1 decode: {rates}", flush=True)

    if "offline" in args.only:
        for name, spec in (("fixed", (args.num_requests, 256, 256, 256, 256)),
                           ("mixed", (args.num_requests, 32, 1024, 16, 512))):
            reqs = random_prompts(*spec, seed=7, vocab=vocab)[: args.hf_requests]
            useful, elapsed = 0, 0.0
            for i in range(0, len(reqs), 64):
                batch = reqs[i: i + 64]
                elapsed += hf_generate([p for p, _ in batch], max(o for _, o in batch))
                useful += sum(len(p) + o for p, o in batch)
            results[f"hf_{name}_total_tok_s"] = useful / elapsed
            print(f"HF offline {name}: {len(reqs)} requests in batches of 64: {useful / elapsed:.0f} "
                  f"total tok/s (useful tokens only)", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def make_tokenizer(out_dir: str) -> None:
    """SmolLM2's tokenizer (from strata's embedded GGUF) padded with placeholder tokens up to
    Llama-3's 128256 ids, so every id a random-weight 8B model emits decodes to some text."""
    from tokenizers import AddedToken
    from strata.loader.gguf import GGUFFile
    from strata.loader.model_loader import default_model_path
    from strata.tokenizer import Tokenizer
    backend = Tokenizer.from_gguf_metadata(GGUFFile(default_model_path()).metadata).backend
    backend.add_tokens([AddedToken(f"<x{i}>", normalized=False)
                        for i in range(backend.get_vocab_size(), LLAMA_31_8B["vocab_size"])])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    backend.save(str(Path(out_dir) / "tokenizer.json"))
    print(f"wrote {out_dir}/tokenizer.json ({backend.get_vocab_size()} ids)")


def serve_part(args, path: Path, results: dict) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "strata.entrypoints.cli", "serve", "--model", str(path), "--load-format", "dummy",
           "--async-scheduling" if "async" in args.scheduling else "--no-async-scheduling",
           "--dtype", "bfloat16", "--tokenizer", args.tokenizer, "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--served-model-name", "llama8b"]
    log = open(Path(args.log_dir) / "serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx
        deadline = time.time() + 300
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"strata serve did not start; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        for concurrency, num in ((1, 16), (16, 128), (64, 256)):
            out = Path(args.log_dir) / f"serve-c{concurrency}.json"
            subprocess.run([sys.executable, "-m", "strata.entrypoints.cli", "bench", "serve",
                            "--base-url", f"http://127.0.0.1:{port}", "--model", "llama8b",
                            "--num-prompts", str(num), "--max-concurrency", str(concurrency),
                            "--input-len", "256", "--output-len", "256", "--result-file", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            r = json.loads(out.read_text())
            results[f"serve_c{concurrency}"] = {k: r[k] for k in (
                "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "output_throughput",
                "request_throughput", "failed")}
            print(f"serve c={concurrency}: {results[f'serve_c{concurrency}']}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["ceilings", "decode", "offline", "hf", "serve"],
                        choices=["ceilings", "decode", "offline", "hf", "serve"], help="parts to run")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for the serve part "
                        "(see --make-tokenizer); without it the serve part is skipped")
    parser.add_argument("--make-tokenizer", metavar="DIR", default=None,
                        help="write the serve part's tokenizer to DIR and exit")
    parser.add_argument("--log-dir", default=tempfile.gettempdir(), help="server log and serve JSON")
    parser.add_argument("--quick", action="store_true", help="2 layers and few requests: a smoke run")
    parser.add_argument("--num-requests", type=int, default=1000, help="requests per offline set")
    parser.add_argument("--hf-requests", type=int, default=128, help="requests per offline set given to HF")
    parser.add_argument("--decode-new", type=int, default=256, help="new tokens of the batch-1 decode")
    parser.add_argument("--max-model-len", type=int, default=4096, help="strata max_model_len")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="strata max_num_seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="strata token budget")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="strata memory share")
    parser.add_argument("--enforce-eager", action="store_true", help="strata without CUDA graphs")
    parser.add_argument("--scheduling", nargs="+", default=["sync"], choices=["sync", "async"],
                        help="strata's scheduling modes to measure, each with its own engine")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.make_tokenizer:
        make_tokenizer(args.make_tokenizer)
        return
    if args.quick:
        args.num_requests, args.hf_requests, args.decode_new = 64, 64, 32
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    path = model_dir(args.quick)
    if "ceilings" in args.only:
        results.update(ceilings())
        print(f"ceilings: {results['copy_GBps']:.0f} GB/s copy, {results['bf16_matmul_TFLOPs']:.0f} TFLOP/s bf16",
              flush=True)
    if {"decode", "offline"} & set(args.only):
        for mode in args.scheduling:
            strata_part(args, path, results, async_scheduling=mode == "async")
    if "hf" in args.only:
        hf_part(args, path, results)
    if "serve" in args.only and args.tokenizer:
        serve_part(args, path, results)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(r: dict) -> None:
    print(f"\n{r['device']}, torch {r['torch']}, triton {r.get('triton')}, {r['date']}")
    if "copy_GBps" in r:
        print(f"ceilings: copy {r['copy_GBps']:.0f} GB/s, bf16 matmul {r['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    hf = {k[3:]: v for k, v in r.items() if k.startswith("hf_")}
    print("| metric | engine | strata | HF | strata/HF | target |\n|---|---|---:|---:|---:|---|")
    for prefix in ("strata", "strata_async"):
        if f"{prefix}_start_to_first_token_s" not in r:
            continue
        mode = "async" if prefix.endswith("async") else "sync"
        print(f"| LLM(...) to first token (s) | {mode} | {r[f'{prefix}_start_to_first_token_s']:.1f} | | | |")
        if f"{prefix}_decode_tok_s" in r:
            tps = r[f"{prefix}_decode_tok_s"]
            target = "85% of roofline"
            if "copy_GBps" in r:
                roof = r["copy_GBps"] * 1e9 / r["weight_bytes_per_token"]
                target = f"{tps / roof:.0%} of roofline {roof:.0f} tok/s (target 85%)"
            print(f"| batch-1 decode tok/s | {mode} | {tps:.1f} | {hf.get('decode_tok_s', float('nan')):.1f} "
                  f"| {tps / hf.get('decode_tok_s', float('nan')):.2f}x | {target} |")
        for name, target in (("fixed", "20k total (H100), 5x HF"), ("mixed", "10x HF")):
            key = f"{prefix}_{name}_total_tok_s"
            if key in r:
                h = hf.get(f"{name}_total_tok_s", float("nan"))
                print(f"| offline {name} total tok/s | {mode} | {r[key]:.0f} | {h:.0f} | {r[key] / h:.1f}x | {target} |")
                print(f"| offline {name} output tok/s | {mode} | {r[f'{prefix}_{name}_output_tok_s']:.0f} | | | |")
    serve = [(k, v) for k, v in r.items() if k.startswith("serve_c")]
    if serve:
        print("\n| concurrency | TTFT p50 / p99 ms | TPOT p50 / p99 ms | output tok/s | req/s | failed |\n"
              "|---:|---:|---:|---:|---:|---:|")
        for k, v in serve:
            print(f"| {k[7:]} | {v['p50_ttft_ms']:.0f} / {v['p99_ttft_ms']:.0f} | {v['p50_tpot_ms']:.1f} / "
                  f"{v['p99_tpot_ms']:.1f} | {v['output_throughput']:.0f} | {v['request_throughput']:.2f} "
                  f"| {v['failed']} |")


if __name__ == "__main__":
    main()
