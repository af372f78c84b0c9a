"""strata vs FlexGen itself on OPT-30B's shape (FlexGen's own model family): dummy weights, the
same GPU budget, prompt and generation lengths and (as near as FlexGen's knobs allow) batch.

    python bench/flexgen_peer.py --wheels .bench-assets/flexgen-wheels        # on the GPU machine
    python bench/flexgen_peer.py --print-flexgen-args                          # the FlexGen command only

FlexGen 0.1.8 (``pip download flexgen==0.1.8 pulp attrs --no-deps -d .bench-assets/flexgen-wheels``
beforehand; the GPU machine has no network) is installed from that folder. Its benchmark loads the
OPT tokenizer from the Hugging Face hub only to turn one prompt into ids; with dummy weights
(``--path _DUMMY_``) the ids do not matter, so ``AutoTokenizer.from_pretrained`` is replaced by
OfflineTokenizer, which left-pads a fixed id sequence to the prompt length as the real one would.

Order: strata first, in a process of its own that exits before FlexGen starts
(``LLM(gpu_memory_budget=...)``: its policy picks the placement and batch B;
bench/gpu_offload.strata_run times one generate call of B prompts, prefill included); then FlexGen
in a child process with B split into micro-batches of --flexgen-gpu-batch (its num-gpu-batches),
the weights' GPU share the budget leaves after two streamed sub-layers and the activations
(flexgen_policy), KV cache and attention on the CPU (--cpu-cache-compute, FlexGen's choice for
large batches). FlexGen's figure is its own "total throughput" (generated tokens over prefill +
decode latency). Both GPU peaks are printed beside the budget, and strata's host peak RSS (its
child's VmHWM, bench/host_mem.py) beside the host bytes its plan counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30
# OPT-30B as Hugging Face describes it (strata/models/opt.py reads this).
OPT_30B = dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272, hidden_size=7168,
               ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56, max_position_embeddings=2048,
               do_layer_norm_before=True, word_embed_proj_dim=7168, activation_function="relu",
               enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True,
               bos_token_id=2, eos_token_id=2, pad_token_id=1, torch_dtype="float16")


class OfflineTokenizer:
    """What flexgen.flex_opt.get_test_inputs needs of an OPT tokenizer: ``tok(prompts,
    padding="max_length", max_length=n).input_ids``, left-padded with OPT's pad id (1) after BOS
    (2). The ids stand for "Paris is the capital city of"; dummy weights make any ids equivalent."""

    pad_token_id, bos_token_id, eos_token_id = 1, 2, 2
    ids = [2, 32826, 16, 5, 812, 343, 9]

    def __init__(self, padding_side: str = "left"):
        self.padding_side = padding_side

    @classmethod
    def from_pretrained(cls, name, padding_side="left", **_):
        return cls(padding_side)

    def __call__(self, prompts, padding=None, max_length=None, **_):
        rows = []
        for _prompt in prompts:
            ids = list(self.ids)
            if padding == "max_length" and max_length is not None:
                ids = ids[-max_length:]
                pad = [self.pad_token_id] * (max_length - len(ids))
                ids = pad + ids if self.padding_side == "left" else ids + pad
            rows.append(ids)
        return argparse.Namespace(input_ids=rows)

    def batch_decode(self, rows, **_):
        return [" ".join(str(int(t)) for t in row) for row in rows]


def flexgen_policy(gpu_budget: int, batch: int, prompt_len: int, gpu_batch: int,
                   hidden: int = 7168, ffn: int = 28672, layers: int = 48, heads: int = 56,
                   dtype_bytes: int = 2) -> dict:
    """FlexGen's knobs for a GPU budget: its weights' GPU percent is what the budget leaves after
    two streamed MLP sub-layers (FlexGen loads sub-layer j+1 while j computes), a micro-batch's
    prefill activations (hidden states, the MLP's widest tensor, the attention scores FlexGen
    materialises) and a 10% reserve; KV cache and activations' homes as FlexGen runs large
    batches (cache on the CPU with CPU attention)."""
    layer_bytes = dtype_bytes * (4 * hidden * hidden + 2 * hidden * ffn)
    model_bytes = layers * layer_bytes + 2 * 50272 * hidden
    mlp_bytes = dtype_bytes * 2 * hidden * ffn
    tokens = gpu_batch * prompt_len
    activations = dtype_bytes * (4 * tokens * hidden + tokens * ffn + gpu_batch * heads * prompt_len * prompt_len)
    room = 0.9 * gpu_budget - 2 * mlp_bytes - activations
    if room < 0:
        raise ValueError(f"a {gpu_budget / GIB:.1f} GiB budget does not hold FlexGen's two MLP sub-layers "
                         f"({2 * mlp_bytes / GIB:.2f} GiB) and a micro-batch of {gpu_batch} prompts' activations "
                         f"({activations / GIB:.2f} GiB): lower --flexgen-gpu-batch or raise --gpu-budget")
    w_gpu = int(100 * room / model_bytes)
    return dict(gpu_batch_size=gpu_batch, num_gpu_batches=max(1, round(batch / gpu_batch)),
                percent=[w_gpu, 100 - w_gpu, 0, 100, 100, 0], cpu_cache_compute=True)


def flexgen_host_bytes(policy: dict, seq_len: int, hidden: int = 7168, ffn: int = 28672, layers: int = 48,
                       dtype_bytes: int = 2) -> int:
    """Host RAM FlexGen fills: its weights' CPU share and, with the cache on the CPU, the KV cache
    of the whole batch (FlexGen allocates every sequence's at full length)."""
    model_bytes = layers * dtype_bytes * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 50272 * hidden
    batch = policy["gpu_batch_size"] * policy["num_gpu_batches"]
    cache = batch * seq_len * 2 * layers * hidden * dtype_bytes * policy["percent"][3] // 100
    return model_bytes * policy["percent"][1] // 100 + cache


def host_cap(policy: dict, seq_len: int, available: int | None, share: float = 0.8) -> None:
    """Fewer FlexGen micro-batches when its host RAM would pass `share` of what is available
    (strata's process has exited by then): FlexGen has no host budget and was killed for memory."""
    if available is None:
        return
    while policy["num_gpu_batches"] > 1 and flexgen_host_bytes(policy, seq_len) > share * available:
        policy["num_gpu_batches"] -= 1
        policy["capped_for_host_ram"] = True


def available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def flexgen_argv(policy: dict, prompt_len: int, gen_len: int, offload_dir: str, log_file: str) -> list[str]:
    argv = ["--model", "facebook/opt-30b", "--path", "_DUMMY_", "--offload-dir", offload_dir,
            "--prompt-len", str(prompt_len), "--gen-len", str(gen_len),
            "--gpu-batch-size", str(policy["gpu_batch_size"]), "--num-gpu-batches", str(policy["num_gpu_batches"]),
            "--percent", *map(str, policy["percent"]), "--log-file", log_file]
    if policy["cpu_cache_compute"]:
        argv.append("--cpu-cache-compute")
    return argv


def parse_flexgen_log(text: str) -> dict:
    """Figures of flexgen.utils.write_benchmark_log's text."""
    out = {}
    for key, pattern in [("peak_gpu_gb", r"peak gpu mem: ([\d.]+) GB"), ("prefill_s", r"prefill latency: ([\d.]+) s"),
                         ("decode_s", r"decode latency: ([\d.]+) s"), ("total_s", r"total latency: ([\d.]+) s"),
                         ("tok_s", r"total throughput: ([\d.]+) token/s")]:
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    return out


def run_flexgen_child(argv: list[str]) -> None:
    """In the child: FlexGen's own benchmark with the offline tokenizer."""
    import transformers
    transformers.AutoTokenizer = OfflineTokenizer
    import flexgen.flex_opt as flex_opt
    flex_opt.AutoTokenizer = OfflineTokenizer
    parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(parser)
    flex_opt.run_flexgen(parser.parse_args(argv))


def ensure_flexgen(wheels: str | None) -> None:
    try:
        import flexgen  # noqa: F401
        import pulp  # noqa: F401
    except ImportError:
        if not wheels:
            raise SystemExit("flexgen is not installed: pass --wheels DIR holding the flexgen, pulp and "
                             "attrs wheels (pip download flexgen==0.1.8 pulp attrs --no-deps -d DIR)") from None
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels,
                               "--no-deps", "flexgen", "pulp", "attrs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-budget", default="8GiB", help="GPU memory budget of both engines")
    ap.add_argument("--cpu-budget", default=None, help="strata's cpu_memory_budget (FlexGen: no such knob)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="most sequences strata's policy may batch")
    ap.add_argument("--batch", type=int, default=None, help="batch of both (default: strata's policy's)")
    ap.add_argument("--flexgen-gpu-batch", type=int, default=8, help="FlexGen's --gpu-batch-size")
    ap.add_argument("--flexgen-percent", type=int, nargs=6, default=None, help="override FlexGen's --percent")
    ap.add_argument("--wheels", default=None, help="folder with the flexgen, pulp and attrs wheels")
    ap.add_argument("--skip-strata", action="store_true")
    ap.add_argument("--skip-flexgen", action="store_true")
    ap.add_argument("--print-flexgen-args", action="store_true", help="print FlexGen's command line and exit")
    ap.add_argument("--flexgen-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.flexgen_child is not None:
        run_flexgen_child(args.flexgen_child)
        return
    from strata.config import parse_bytes
    budget = parse_bytes(args.gpu_budget)
    results: dict = {"gpu_budget_gib": budget / GIB, "prompt_len": args.prompt_len, "gen_len": args.gen_len}
    batch = args.batch
    if not args.skip_strata and not args.print_flexgen_args:
        results["strata"] = run_strata(args, batch)
        batch = batch or results["strata"]["batch"]
        s = results["strata"]
        print(f"strata   OPT-30B shape, batch {s['batch']}, {args.prompt_len}+{args.gen_len}: {s['tok_s']:.2f} tok/s "
              f"(GPU peak {s['gpu_peak_gib']:.2f} GiB of {budget / GIB:.2f}); plan: {s['plan']}", flush=True)
        from host_mem import describe
        print(f"strata   {describe(s['host_mem'], s.get('plan_host_gib'))}", flush=True)
    batch = batch or 64
    policy = flexgen_policy(budget, batch, args.prompt_len, args.flexgen_gpu_batch)
    if args.flexgen_percent:
        policy["percent"] = list(args.flexgen_percent)
    if not args.print_flexgen_args:
        host_cap(policy, args.prompt_len + args.gen_len, available_ram())
    dry = args.print_flexgen_args or args.skip_flexgen
    offload_dir = "OFFLOAD_DIR" if dry else tempfile.mkdtemp(prefix="flexgen-offload-")
    log_file = os.path.join(offload_dir, "flexgen.log")
    argv = flexgen_argv(policy, args.prompt_len, args.gen_len, offload_dir, log_file)
    print("flexgen  python -m flexgen.flex_opt " + " ".join(argv), flush=True)
    if dry:
        if args.json and "strata" in results:   # --skip-flexgen: strata's figures (and host peak) alone
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        return
    ensure_flexgen(args.wheels)
    proc = subprocess.run([sys.executable, __file__, "--flexgen-child", *argv], text=True, capture_output=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-4000:])
        raise SystemExit(f"FlexGen failed (exit {proc.returncode})")
    fg = parse_flexgen_log(Path(log_file).read_text())
    fg.update(batch=policy["gpu_batch_size"] * policy["num_gpu_batches"], policy=policy)
    results["flexgen"] = fg
    if policy.get("capped_for_host_ram"):
        print(f"flexgen  batch lowered to {fg['batch']} (strata's: {batch}): FlexGen's weights and KV cache must fit "
              f"80% of the host RAM available", flush=True)
    print(f"flexgen  OPT-30B, batch {fg['batch']} ({policy['num_gpu_batches']} x {policy['gpu_batch_size']}), "
          f"{args.prompt_len}+{args.gen_len}: {fg['tok_s']:.2f} tok/s (GPU peak {fg.get('peak_gpu_gb', 0):.2f} GB, "
          f"percent {policy['percent']})", flush=True)
    if "strata" in results:
        ratio = results["strata"]["tok_s"] / fg["tok_s"]
        results["ratio"] = ratio
        print(f"strata / FlexGen: {ratio:.2f}x (target: > 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def run_strata(args, batch: int | None) -> dict:
    """strata in a process of its own (gpu_offload.in_child), which has exited, pinned host
    memory and all, before FlexGen's starts: FlexGen allocates OPT-30B's 60 GB of dummy weights
    in host RAM, and beside strata's pinned copies the machine ran out (killed)."""
    from gpu_offload import in_child, make_model_dir
    opts = dict(device="cuda", max_num_seqs=args.max_num_seqs, smoke=False)
    offload = dict(gpu_memory_budget=args.gpu_budget)
    if args.cpu_budget:
        offload["cpu_memory_budget"] = args.cpu_budget
    result = in_child("strata", model_dir=str(make_model_dir(OPT_30B)), opts=opts, prompt_len=args.prompt_len,
                      new_tokens=args.gen_len, batch=batch, **offload)
    from host_mem import describe
    if "error" in result:   # e.g. exit -9: killed for memory; how far its RSS got says why
        raise SystemExit(f"strata's OPT-30B run failed: {result['error']}; {describe(result['host_mem'])} "
                         "(its plan is on its startup line above)")
    return result


if __name__ == "__main__":
    main()
