"""The ``strata`` command: generate, chat, serve, bench, perplexity, quantize and info."""

from __future__ import annotations

import argparse
import sys

from strata.engine.arg_utils import EngineArgs

EXAMPLES = """examples:
  strata generate "The capital of France is" --max-tokens 32
  strata generate "Tell me a joke" --chat --temperature 0.8 --seed 1
  strata chat --system "You are terse."
  strata info --model path/to/model.gguf
  strata perplexity --context-len 512 --max-windows 8
  strata quantize path/to/hf-model path/to/model-int4 --method int4 --group-size 64
"""


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (names and defaults as vLLM's SamplingParams)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate at most (default: 256 for generate/chat)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; higher = more random (default: 0 for generate, 0.7 for chat)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2] (default: 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2] (default: 0)")
    g.add_argument("--seed", dest="sampling_seed", type=int, default=None,
                   help="per-request seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--n", type=int, default=1, help="completions per prompt (generate only)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _sampling_params(args, default_temperature: float):
    from strata import SamplingParams
    return SamplingParams(
        n=args.n, max_tokens=args.max_tokens or 256,
        temperature=default_temperature if args.temperature is None else args.temperature,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.sampling_seed, stop=args.stop,
        ignore_eos=args.ignore_eos)


def _add_perplexity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                        help="model directory or .gguf file (same as --model; default: the embedded "
                             "SmolLM2-135M-Instruct)")
    g = parser.add_argument_group("perplexity")
    g.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text file to score (default: the built-in English text, prose of "
                        "Python's help topics, see strata/evaluation/text.py)")
    g.add_argument("--context-len", type=int, default=512,
                   help="tokens per window: each is one prompt scored with its own context (default: 512)")
    g.add_argument("--stride", type=int, default=None,
                   help="text tokens between window starts; below --context-len the windows overlap "
                        "and each scores only its last STRIDE tokens (default: --context-len, no overlap)")
    g.add_argument("--max-windows", type=int, default=None,
                   help="score at most this many windows from the start of the text (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata", description="strata: run large language models on a CPU or GPUs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete one or more prompts and print the text",
                         description="Complete prompts (batched) and print each completion.")
    gen.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    _add_sampling_args(gen)
    EngineArgs.add_cli_args(gen)

    chat = sub.add_parser("chat", help="interactive chat that streams the reply as it is generated",
                          description="Interactive chat; an empty line or Ctrl-D quits, /reset clears history.")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat)
    EngineArgs.add_cli_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page",
                           description="Serve the OpenAI API (/v1/completions, /v1/chat/completions, "
                                       "/v1/models), /health, /version, /metrics and a chat page at /.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (or set STRATA_API_KEY)")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients use (default: the model file or directory name)")
    serve.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug"], help="HTTP access log level")
    EngineArgs.add_cli_args(serve)

    bench = sub.add_parser("bench", help="benchmarks: `strata bench serve` load-tests an OpenAI-compatible server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    from strata.entrypoints import bench_serve
    bench_serve.add_cli_args(bench_sub.add_parser(
        "serve", help="TTFT, TPOT, ITL, latency and throughput of a running server",
        description=bench_serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))

    ppl = sub.add_parser("perplexity", help="perplexity of the model on a text (llama.cpp's llama-perplexity)",
                         description="Cut the text into windows of --context-len tokens, score every "
                                     "token after each window's first with the engine's prompt logprobs, "
                                     "and print exp(mean negative log-likelihood).")
    _add_perplexity_args(ppl)
    EngineArgs.add_cli_args(ppl)

    from strata.entrypoints import quantize_cli
    quantize_cli.add_parser(sub)

    info = sub.add_parser("info", help="architecture, parameters, dtype, memory plan and KV capacity",
                          description="Load the model and print what was loaded where.")
    EngineArgs.add_cli_args(info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_path", None) is not None:
        if args.model is not None:
            parser.error(f"the model is given twice: {args.model_path!r} and --model {args.model!r}")
        args.model = args.model_path
    if args.command == "quantize":
        from strata.entrypoints import quantize_cli
        return quantize_cli.main(args)
    if args.command == "bench":
        from strata.entrypoints import bench_serve
        return bench_serve.main(args)
    if args.command == "serve":
        from strata.entrypoints.openai.server import run_server
        try:
            run_server(args)
        except (ValueError, FileNotFoundError, TypeError) as e:
            print(f"strata: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        # A bad text file fails before the model loads.
        text = _perplexity_text(args) if args.command == "perplexity" else None
        from strata import LLM
        llm = LLM(**_engine_kwargs(args))
        if args.command == "generate":
            return _generate(llm, args)
        if args.command == "chat":
            return _chat(llm, args)
        if args.command == "perplexity":
            return _perplexity(llm, args, text)
        return _info(llm)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _engine_kwargs(args) -> dict:
    engine = EngineArgs.from_cli_args(args)
    return {k: v for k, v in vars(engine).items() if k != "extra"}


def _generate(llm, args) -> int:
    params = _sampling_params(args, default_temperature=0.0)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outs = llm.generate(args.prompts, params)
    for out, prompt in zip(outs, args.prompts):
        for comp in out.outputs:
            if len(args.prompts) > 1 or len(out.outputs) > 1:
                print(f"--- prompt {prompt!r}, completion {comp.index} ({comp.finish_reason}) ---")
            print(comp.text if args.chat else prompt + comp.text)
    return 0


def _chat(llm, args) -> int:
    params = _sampling_params(args, default_temperature=0.7)
    engine = llm.llm_engine
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        req_id = engine.add_request(None, {"prompt_token_ids": ids}, params)
        reply = _stream(engine, req_id)
        history.append({"role": "assistant", "content": reply})
    return 0


def _stream(engine, req_id: str) -> str:
    """Run the engine until this request finishes, printing text as it arrives."""
    shown = 0
    text = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != req_id:
                    continue
                text = out.outputs[0].text
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
    except KeyboardInterrupt:
        engine.abort_request(req_id)   # Ctrl-C stops this reply, not the session
        print(" [stopped]")
    print()
    return text


def _perplexity_text(args) -> str:
    if args.text is None:
        from strata.evaluation import english_eval_text
        return english_eval_text()
    try:
        with open(args.text, encoding="utf-8") as f:
            return f.read()
    except OSError as e:   # a directory, no permission...: a user error, not a traceback
        raise ValueError(f"--text {args.text}: {e.strerror or e}") from None


def _perplexity(llm, args, text: str) -> int:
    import time
    from strata.evaluation import perplexity
    start = time.perf_counter()
    result = perplexity(llm, text, context_len=args.context_len, stride=args.stride,
                        max_windows=args.max_windows, use_tqdm=True)
    seconds = time.perf_counter() - start
    print(f"text        {args.text or 'built-in English text'} ({len(text)} characters)")
    print(f"windows     {result.num_windows} of {args.context_len} tokens"
          + (f", stride {args.stride}" if args.stride else ""))
    print(f"tokens      {result.num_tokens} scored in {seconds:.1f} s "
          f"({result.num_tokens / seconds:.0f} tokens/s)")
    print(f"nll         {result.nll_mean:.4f} nats per token")
    print(f"perplexity  {result.ppl:.4f}")
    return 0


def _info(llm) -> int:
    engine = llm.llm_engine
    cfg = engine.model_config
    num_params, weight_bytes = engine.facts.num_parameters, engine.facts.weight_bytes
    kv_tokens = engine.num_blocks * engine.args.block_size
    rows = [
        ("model", engine.source.name),
        ("architecture", cfg.architecture),
        ("parameters", f"{num_params / 1e6:.1f}M"),
        ("layers / hidden / heads / kv heads", f"{cfg.num_layers} / {cfg.hidden_size} / {cfg.num_heads} / {cfg.num_kv_heads}"),
        ("vocabulary", str(cfg.vocab_size)),
        ("dtype / device", f"{str(cfg.dtype).removeprefix('torch.')} / {engine.device}"),
        ("checkpoint quantization", engine.source.quantization or "none"),
        ("weights", f"{weight_bytes / 2**30:.3f} GiB"),
        ("KV cache", f"{engine.describe_kv_dtype()}, {engine.num_blocks * engine.kv_block_bytes / 2**30:.3f} GiB: "
                     f"{engine.num_blocks} blocks "
                     f"x {engine.args.block_size} tokens = {kv_tokens} tokens "
                     f"({engine.kv_block_bytes // engine.args.block_size} bytes per token)"),
        ("max_model_len", f"{engine.scheduler_config.max_model_len} (model: {cfg.max_position_embeddings})"),
        ("max concurrent full-length sequences", f"{kv_tokens / engine.scheduler_config.max_model_len:.1f}"),
        ("tokenizer", "none" if engine.tokenizer is None else
         f"{engine.tokenizer.vocab_size} tokens, chat template: {'yes' if engine.tokenizer.chat_template else 'no'}"),
    ]
    if engine.offload_plan is not None:
        hw = engine.offload_hardware
        rows.append(("offload policy", engine.offload_plan.describe()))
        rows.append(("offload measured rates", f"host->device {hw.h2d_bytes_per_s / 2**30:.1f} GiB/s, disk read "
                     f"{hw.disk_bytes_per_s / 2**30:.2f} GiB/s, matmul {hw.flops / 1e12:.2f} TFLOP/s, memory "
                     f"{hw.mem_bytes_per_s / 2**30:.0f} GiB/s"
                     + (f", CPU attention over host KV {hw.cpu_attn_bytes_per_s / 2**30:.1f} GiB/s"
                        if hw.cpu_attn_bytes_per_s else "")))
    parallel = engine.describe_parallel()   # layout, who samples, how the ranks all-reduce, replicas
    if parallel:
        rows.append(("parallel", parallel.removeprefix(" | ")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
