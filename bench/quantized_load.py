"""Load time of a checkpoint written by `strata quantize` beside quantizing the float original at
load: LLM(QUANT_DIR) vs LLM(FLOAT_DIR, quantization=...), each in a fresh process, alternating,
median of --repeats. Prints a markdown table (seconds of LLM(...) and the engine's own
load_seconds, peak RSS) and the load average before and after.

Without --model it makes the float original itself: the embedded SmolLM2-135M-Instruct GGUF
dequantized and saved as a bf16 HF checkpoint (the dtype the HF release uses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from strata import LLM
t1 = time.perf_counter()
kw = json.loads(sys.argv[2])
llm = LLM(sys.argv[1], skip_tokenizer_init=True, kv_cache_memory=1 << 26, **kw)
t2 = time.perf_counter()
print(json.dumps({"llm_s": t2 - t1, "load_s": llm.llm_engine.load_seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_float_dir(out: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from strata.config import LoadConfig
    from strata.loader.gguf import gguf_weights
    from strata.loader.model_loader import resolve_model
    source = resolve_model(None, LoadConfig())
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in gguf_weights(source.gguf)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**source.hf_config, "torch_dtype": "bfloat16"}))
    return out


def load_once(path: Path, kwargs: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(kwargs)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="float HF checkpoint directory (default: made from the embedded GGUF)")
    parser.add_argument("--repeats", type=int, default=3, help="loads of each kind (default: 3)")
    parser.add_argument("--methods", nargs="+", default=["int8", "int4"], choices=["int8", "int4"],
                        help="formats to measure (int4 in groups of 128)")
    args = parser.parse_args()
    from strata.quant.export import quantize_checkpoint
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        float_dir = Path(args.model) if args.model else make_float_dir(Path(tmp) / "float")
        rows = []
        for method in args.methods:
            group = 128 if method == "int4" else None
            summary = quantize_checkpoint(float_dir, Path(tmp) / method, method, group)
            quant_kw = {"quantization": method, "quantization_group_size": group}
            runs = {"original, quantized at load": [], "strata quantize output": []}
            for _ in range(args.repeats):
                runs["original, quantized at load"].append(load_once(float_dir, quant_kw))
                runs["strata quantize output"].append(load_once(summary.out_dir, {}))
            for kind, results in runs.items():
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                size = summary.bytes_in if kind.startswith("original") else summary.bytes_out
                rows.append((method, kind, size / 2**20, med["llm_s"], med["load_s"], med["peak_rss_mib"]))
            print(f"{method}: quantize took {summary.seconds:.1f} s")
    print("\n| format | checkpoint | tensors MiB | LLM(...) s | load_seconds | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for method, kind, mib, llm_s, load_s, rss in rows:
        print(f"| {method} | {kind} | {mib:.0f} | {llm_s:.2f} | {load_s:.2f} | {rss:.0f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
