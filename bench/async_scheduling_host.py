"""Host time of an engine step with synchronous vs async scheduling, on the CPU.

    python bench/async_scheduling_host.py [--batch 256] [--steps 50] [--repeats 3]

A tiny random Llama (dummy weights) decodes `--batch` requests at once. Every engine step is
split by timers around the runner's device work (model forward, LM head, sampler: on a GPU these
are queued kernels) and the host work (schedule, input and sampling-metadata preparation, the
wait for the sampled ids, scheduler update, output processing). On the CPU the device work runs
in line, so nothing overlaps here: the point is what the host does per step in each mode, which
async scheduling hides behind the device's next step on a GPU (the device idles only where the
host takes longer than a step). Prints a markdown table; medians over `--repeats` runs that
alternate the two modes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 1024}
PARTS = ["schedule", "prepare", "finish", "update", "outputs"]


def timed(totals: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t
    return wrapper


def instrument(engine, totals: dict) -> None:
    runner = engine.executor.runner
    runner.model.forward = timed(totals, "device", runner.model.forward)
    runner.model.compute_logits = timed(totals, "device", runner.model.compute_logits)
    runner.sampler.forward = timed(totals, "device", runner.sampler.forward)
    runner.launch = timed(totals, "launch", runner.launch)   # includes the device work
    runner.finish = timed(totals, "finish", runner.finish)
    engine.scheduler.schedule = timed(totals, "schedule", engine.scheduler.schedule)
    engine.scheduler.update = timed(totals, "update", engine.scheduler.update)
    engine.output_processor.process = timed(totals, "outputs", engine.output_processor.process)


def measure(model_dir: Path, async_scheduling: bool, args) -> dict[str, float]:
    from strata import LLM, SamplingParams
    llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=args.batch,
              async_scheduling=async_scheduling, use_tqdm_on_load=False)
    engine = llm.llm_engine
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, ignore_eos=True,
                            max_tokens=args.steps + 64)
    for i in range(args.batch):
        prompt = [(7 * i + j) % 2000 + 1 for j in range(args.prompt_len)]
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()) \
            or engine.scheduler.waiting:
        engine.step()
    for _ in range(8):   # decode warm-up
        engine.step()
    totals: dict[str, float] = defaultdict(float)
    instrument(engine, totals)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = time.perf_counter() - t0
    per_step = {k: v * 1e3 / args.steps for k, v in totals.items()}
    result = {"wall": wall * 1e3 / args.steps, "device": per_step["device"]}
    result["host"] = result["wall"] - result["device"]
    result["prepare"] = per_step["launch"] - per_step["device"]
    for name in ("schedule", "finish", "update", "outputs"):
        result[name] = per_step[name]
    while engine.has_unfinished_requests():
        for rid in list(engine.output_processor.states):
            engine.abort_request(rid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="decode steps measured per run")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the device work of a tiny model gains nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(CONFIG))
        for r in range(args.repeats):
            for mode in ((False, True) if r % 2 == 0 else (True, False)):
                runs[mode].append(measure(Path(tmp), mode, args))
    print(f"\nbatch {args.batch} decode, temperature {args.temperature}, top_p {args.top_p}, "
          f"{args.steps} steps x {args.repeats} runs, load average {os.getloadavg()[0]:.2f}\n")
    cols = ["wall", "device", "host"] + PARTS
    print("| scheduling | " + " | ".join(f"{c} ms" for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, name in ((False, "sync"), (True, "async")):
        med = {c: statistics.median(run[c] for run in runs[mode]) for c in cols}
        print(f"| {name} | " + " | ".join(f"{med[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
