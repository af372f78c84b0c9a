"""`strata bench serve`: load-test any OpenAI-compatible server (strata's, llama.cpp's, vLLM's).

Sends streaming requests from asyncio + httpx, either arriving as a Poisson process
(``--request-rate``; inf = all at once) or kept at a fixed number in flight (``--max-concurrency``),
and measures per request, as vLLM's ``bench serve`` does:

- TTFT: request sent -> first streamed chunk that carries a choice (in chat, with content);
- ITL: the gaps between later chunks (a chunk may carry more than one token);
- TPOT: (e2e - ttft) / (output_tokens - 1);
- e2e latency: request sent -> stream finished.

Output lengths are fixed by sending ``ignore_eos: true`` with ``max_tokens = output_len`` (servers
that ignore ``ignore_eos``, such as llama-cpp-python, can be given ``--ban-token-id`` for each
end-of-generation id instead). Random prompts are built from random English words; before the run two
probe requests with ``max_tokens=1`` read ``usage.prompt_tokens`` from the server itself, and a line
through the two points (tokens per word and the fixed overhead, e.g. a chat template) sets how many
words give ``--input-len`` tokens. A server that reports no usage falls back to 1.3 tokens per word;
the JSON says which (``input_len_method``). Output token counts come from the stream's usage where the
server sends it, else from ``finish_reason == "length"`` (= max_tokens), else from counting chunks
(``output_tokens_method``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

WORDS = """the of and to in is was for on are with as be at by this had not but from or have an they
which one you were all we her she there would their will when who him been has more if no out so said
what up its about than into them can only other time new some could these two may first then do any
like my now over such our man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good very
make world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three house
river market garden window paper music animal winter summer morning evening story family country city
water light night school number sound place letter mother father answer ground study learn plant cover
food sun four thought head stand page grow draw open seem together next white children begin walk
example ease both mark often always those song measure product black short numeral class wind question
happen complete ship area half rock order fire south problem piece told knew pass farm top whole king
size heard best hour better true during hundred five remember step early hold west reach fast verb sing
listen six table travel less""".split()
FALLBACK_TOKENS_PER_WORD = 1.3
PERCENTILES = (50, 90, 99)


@dataclass
class RequestSpec:
    prompt: str
    output_len: int
    input_len: int                      # tokens, as measured or estimated before sending


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    ttft: float = 0.0                   # seconds
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_method: str = ""
    prompt_tokens: int | None = None    # from the server's usage, when it sends one


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    parser.add_argument("--endpoint", default="/v1/completions",
                        choices=["/v1/completions", "/v1/chat/completions"], help="API route (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals; inf = all at once (default: inf)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight at once (default: no limit)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens of random prompts (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=64, help="tokens to generate per request (default: %(default)s)")
    parser.add_argument("--dataset", default=None,
                        help="JSONL file of {\"prompt\": str, \"output_len\": int} lines instead of random prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--ban-token-id", type=int, action="append", default=None,
                        help="token id sent with logit_bias -100 (repeatable): fixes output lengths on "
                             "servers that ignore ignore_eos")
    parser.add_argument("--result-file", default=None, help="write the results as JSON here")
    parser.add_argument("--label", default=None, help="name stored in the JSON (e.g. the server's)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one request may take (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("strata bench serve needs httpx: pip install httpx", file=sys.stderr)
        return 2
    if args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        print("strata: error: --num-prompts, --input-len and --output-len must be >= 1", file=sys.stderr)
        return 2
    if args.max_concurrency is not None and args.max_concurrency < 1:
        print(f"strata: error: --max-concurrency must be >= 1, got {args.max_concurrency}", file=sys.stderr)
        return 2
    if not args.request_rate > 0:
        print(f"strata: error: --request-rate must be > 0 (inf = all at once), got {args.request_rate}",
              file=sys.stderr)
        return 2
    result = asyncio.run(run_benchmark(args))
    print(format_table(result))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["completed"] > 0 else 1


async def run_benchmark(args: argparse.Namespace) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await _first_model(client)
        rng = random.Random(args.seed)
        if args.dataset:
            specs, input_len_method = _dataset_specs(args.dataset, args.num_prompts), "dataset (unmeasured)"
        else:
            specs, input_len_method = await _random_specs(client, args, model, rng)
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(spec: RequestSpec) -> RequestResult:
            if semaphore is None:
                return await send_request(client, args, model, spec)
            async with semaphore:
                return await send_request(client, args, model, spec)

        tasks = []
        start = time.perf_counter()
        for spec in specs:
            tasks.append(asyncio.create_task(one(spec)))
            if not math.isinf(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, specs, results, duration, input_len_method)


async def _first_model(client) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def _dataset_specs(path: str, num_prompts: int) -> list[RequestSpec]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"dataset {path} has no lines")
    rows = [rows[i % len(rows)] for i in range(num_prompts)]   # cycle when asking for more than it holds
    return [RequestSpec(r["prompt"], int(r["output_len"]), 0) for r in rows]


async def _random_specs(client, args, model: str, rng: random.Random) -> tuple[list[RequestSpec], str]:
    """Random-word prompts of about --input-len tokens, sized with the server's own token counts."""
    fit = await _calibrate(client, args, model, random.Random(args.seed + 1))
    if fit is None:
        slope, overhead, method = FALLBACK_TOKENS_PER_WORD, 0.0, "word count x 1.3 (server sent no usage)"
    else:
        slope, overhead = fit
        method = f"server tokenizer via usage.prompt_tokens ({slope:.3f} tokens/word + {overhead:.1f})"
    num_words = max(1, round((args.input_len - overhead) / slope))
    specs = []
    for _ in range(args.num_prompts):
        prompt = " ".join(rng.choice(WORDS) for _ in range(num_words))
        specs.append(RequestSpec(prompt, args.output_len, round(overhead + slope * num_words)))
    return specs, method


async def _calibrate(client, args, model: str, rng: random.Random) -> tuple[float, float] | None:
    """(tokens per word, fixed tokens) from two probe prompts of 32 and 256 words; None without usage.

    The probes also warm the server up before anything is timed."""
    counts = []
    for num_words in (32, 256):
        prompt = " ".join(rng.choice(WORDS) for _ in range(num_words))
        body = _request_body(args, model, prompt, max_tokens=1, stream=False)
        try:
            resp = await client.post(args.endpoint, json=body)
            resp.raise_for_status()
            counts.append(int(resp.json()["usage"]["prompt_tokens"]))
        except (KeyError, TypeError, ValueError, LookupError) as e:
            print(f"strata bench serve: no prompt token count from the server ({e!r})", file=sys.stderr)
            return None
    slope = (counts[1] - counts[0]) / (256 - 32)
    return (slope, counts[0] - slope * 32) if slope > 0 else None


def _request_body(args, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": args.temperature,
            "ignore_eos": True, "stream": stream}
    if args.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if args.ban_token_id:
        body["logit_bias"] = {str(t): -100 for t in args.ban_token_id}
    return body


async def send_request(client, args, model: str, spec: RequestSpec) -> RequestResult:
    result = RequestResult()
    body = _request_body(args, model, spec.prompt, spec.output_len, stream=True)
    num_chunks, finish_reason, usage = 0, None, None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", args.endpoint, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue                      # blank separators and ': ping' comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                if not chunk.get("choices") or not _carries_tokens(chunk["choices"][0]):
                    continue
                now = time.perf_counter()
                if num_chunks == 0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                num_chunks += 1
                finish_reason = chunk["choices"][0].get("finish_reason") or finish_reason
    except Exception as e:  # a benchmark records every failure and goes on
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    if num_chunks == 0:
        result.error = "stream carried no choices"
        return result
    result.success = True
    _count_tokens(result, usage, finish_reason, num_chunks, spec.output_len)
    return result


def _carries_tokens(choice: dict) -> bool:
    """Chat streams open with a role-only chunk that no token has reached yet: it does not count."""
    if "delta" not in choice:
        return True
    return bool(choice["delta"].get("content")) or choice.get("finish_reason") is not None


def _count_tokens(result: RequestResult, usage, finish_reason, num_chunks: int, max_tokens: int) -> None:
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens, result.output_tokens_method = int(usage["completion_tokens"]), "usage"
        result.prompt_tokens = usage.get("prompt_tokens")
    elif finish_reason == "length":
        result.output_tokens, result.output_tokens_method = max_tokens, "max_tokens (finish_reason=length)"
    else:
        result.output_tokens, result.output_tokens_method = num_chunks, "streamed chunks"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(name: str, values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    out = {f"mean_{name}_ms": sum(ms) / len(ms) if ms else 0.0}
    out.update({f"p{q}_{name}_ms": percentile(ms, q) for q in PERCENTILES})
    return out


def summarize(args, model: str, specs: list[RequestSpec], results: list[RequestResult], duration: float,
              input_len_method: str) -> dict:
    ok = [(s, r) for s, r in zip(specs, results) if r.success]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else s.input_len for s, r in ok)
    output_tokens = sum(r.output_tokens for _, r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for _, r in ok if r.output_tokens > 1]
    summary = {
        "label": args.label, "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
        "num_prompts": len(specs), "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency, "input_len": None if args.dataset else args.input_len,
        "output_len": None if args.dataset else args.output_len, "dataset": args.dataset, "seed": args.seed,
        "input_len_method": input_len_method,
        "output_tokens_method": sorted({r.output_tokens_method for _, r in ok}),
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": [r.error for r in results if not r.success][:20],
        "duration_s": duration, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    summary.update(_stats("ttft", [r.ttft for _, r in ok]))
    summary.update(_stats("tpot", tpots))
    summary.update(_stats("itl", [x for _, r in ok for x in r.itls]))
    summary.update(_stats("e2el", [r.e2e for _, r in ok]))
    summary.update({"ttfts_s": [r.ttft for _, r in ok], "e2els_s": [r.e2e for _, r in ok],
                    "output_lens": [r.output_tokens for _, r in ok],
                    "input_lens": [r.prompt_tokens if r.prompt_tokens is not None else s.input_len for s, r in ok]})
    return summary


def format_table(s: dict) -> str:
    rows = [("Server / model", f"{s['base_url']}{s['endpoint']} / {s['model']}"),
            ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Max concurrency", s["max_concurrency"] or "none"), ("Request rate (req/s)", s["request_rate"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["total_input_tokens"]), ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    names = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st)",
             "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{k:<42}{v:>18}" for k, v in rows]
    for key, title in names.items():
        lines.append("{:-^60}".format(f" {title} "))
        for stat in ("mean", "p50", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key.upper()} (ms)':<42}{s[f'{stat}_{key}_ms']:>18.2f}")
    lines.append(f"{'Prompt length':<16}{s['input_len_method']:>44}")
    lines.append(f"{'Output tokens':<16}{', '.join(s['output_tokens_method']) or '-':>44}")
    if s["errors"]:
        lines.append(f"first error: {s['errors'][0]}")
    lines.append("=" * 60)
    return "\n".join(lines)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="strata bench serve", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(_parser)
    sys.exit(main(_parser.parse_args()))
