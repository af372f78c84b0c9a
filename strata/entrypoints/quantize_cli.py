"""``strata quantize MODEL OUT_DIR --method int8|int4 [--group-size G]``: a quantized copy of a
float checkpoint that loads back without re-quantizing (strata.quant.export)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Quantize the linear weights of MODEL (round to nearest, the same codes as
LLM(MODEL, quantization=...)) and write OUT_DIR: model.safetensors (or shards and an index)
with the packed codes and scales, config.json with quantization_config, and the tokenizer.
`strata generate --model OUT_DIR ...` then loads the codes directly: no float weights, no
quantization at load. A .gguf MODEL is dequantized first and its vocabulary exported."""


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (llama.cpp's quantize)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL",
                   help="float checkpoint directory (config.json + safetensors) or .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="directory to write (created; must not hold a checkpoint already)")
    p.add_argument("--method", required=True, choices=["int8", "int4"],
                   help="int8: per output channel, symmetric; int4: groups of --group-size inputs, "
                        "asymmetric (scale and min per group)")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                   help="int4 only: inputs per group; smaller is more accurate and larger on disk "
                        "(default: 128)")
    p.add_argument("--max-shard-size", default="4GiB",
                   help="largest output file; bigger checkpoints are split into shards with an "
                        "index, as HF does (default: 4GiB)")


def main(args: argparse.Namespace) -> int:
    from strata.config import parse_bytes
    from strata.quant.export import quantize_checkpoint
    try:
        summary = quantize_checkpoint(args.model_dir, args.out_dir, args.method, args.group_size,
                                      max_shard_bytes=parse_bytes(args.max_shard_size), progress=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    group = f", groups of {args.group_size or 128}" if args.method == "int4" else ", per channel"
    print(f"wrote       {summary.out_dir} ({args.method}{group})")
    print(f"tensors     {summary.num_quantized} quantized, {summary.num_kept} kept as they were")
    print(f"size        {summary.bytes_in / 2**20:.1f} MiB of float tensors -> "
          f"{summary.bytes_out / 2**20:.1f} MiB in {summary.shards} file(s)")
    print(f"tokenizer   {summary.tokenizer}")
    print(f"time        {summary.seconds:.1f} s")
    return 0
