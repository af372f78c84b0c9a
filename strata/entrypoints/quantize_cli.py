"""``strata quantize MODEL OUT_DIR --method int8|int4 [--group-size G] [--calibrate ...]``: a
quantized copy of a float checkpoint that loads back without re-quantizing (strata.quant.export),
rounded to nearest or calibrated with GPTQ (strata.quant.calibrate)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Quantize the linear weights of MODEL (round to nearest, the same codes as
LLM(MODEL, quantization=...)) and write OUT_DIR: model.safetensors (or shards and an index)
with the packed codes and scales, config.json with quantization_config, and the tokenizer.
`strata generate --model OUT_DIR ...` then loads the codes directly: no float weights, no
quantization at load. A .gguf MODEL is dequantized first and its vocabulary exported.

--calibrate quantizes with GPTQ instead of rounding to nearest: strata runs the model layer by
layer on a built-in calibration text (docstrings of the Python standard library, disjoint from
the `strata perplexity` text), and quantizes each linear so that its outputs on that text, not
its weights, stay closest to the float ones; each layer sees the already quantized layers before
it. int4 groups also get the range (scale and min) that rounds their weights with the least
squared error instead of min..max. Same format and size; slower to write (minutes on a CPU for
a 135M model), more accurate, above all for int4 with groups of 128. Example:
  strata quantize model.gguf out/ --method int4 --group-size 128 --calibrate"""


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
    p.add_argument("--calibrate", action="store_true",
                   help="quantize with GPTQ on the built-in calibration text (stdlib docstrings) "
                        "instead of rounding to nearest; runs the whole float model on the CPU")
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="with --calibrate: tokens of calibration text, in windows of "
                        "--calibration-seq-len (default: 2048, as measured in docs/benchmarks.md; "
                        "more is slower, and on SmolLM2 no better)")
    p.add_argument("--calibration-seq-len", type=int, default=None, metavar="L",
                   help="with --calibrate: tokens per calibration window (default: 512)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="with --calibrate: quantize each matrix's input columns in order of "
                        "decreasing activation energy (GPTQ's act-order; same file format, no "
                        "cost at inference). On by default: the int4 g128 perplexity gate needs "
                        "it on SmolLM2 (+5.6%% with it, +13.8%% without)")
    p.add_argument("--max-shard-size", default="4GiB",
                   help="largest output file; bigger checkpoints are split into shards with an "
                        "index, as HF does (default: 4GiB)")


def main(args: argparse.Namespace) -> int:
    from strata.config import parse_bytes
    from strata.quant.export import quantize_checkpoint
    try:
        calibration = _calibration(args)
        summary = quantize_checkpoint(args.model_dir, args.out_dir, args.method, args.group_size,
                                      max_shard_bytes=parse_bytes(args.max_shard_size), progress=True,
                                      calibration=calibration)
    except (ValueError, FileNotFoundError) as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    group = f", groups of {args.group_size or 128}" if args.method == "int4" else ", per channel"
    if calibration is not None:
        group += (f", GPTQ on {calibration.num_windows * calibration.seq_len} calibration tokens"
                  + (", act-order" if calibration.act_order else ""))
    print(f"wrote       {summary.out_dir} ({args.method}{group})")
    print(f"tensors     {summary.num_quantized} quantized, {summary.num_kept} kept as they were")
    print(f"size        {summary.bytes_in / 2**20:.1f} MiB of float tensors -> "
          f"{summary.bytes_out / 2**20:.1f} MiB in {summary.shards} file(s)")
    print(f"tokenizer   {summary.tokenizer}")
    print(f"time        {summary.seconds:.1f} s")
    return 0


def _calibration(args: argparse.Namespace):
    from strata.quant.calibrate import CalibrationConfig
    if not args.calibrate:
        given = [flag for flag, value in (("--calibration-tokens", args.calibration_tokens),
                                          ("--calibration-seq-len", args.calibration_seq_len),
                                          ("--act-order", args.act_order)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --calibrate")
        return None
    given = {"num_tokens": args.calibration_tokens, "seq_len": args.calibration_seq_len}
    return CalibrationConfig(act_order=args.act_order is not False,
                             **{key: value for key, value in given.items() if value is not None})
