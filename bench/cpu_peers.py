"""The engines of bench/cpu_vs_llamacpp.py, one per child process: strata, llama.cpp (through
llama-cpp-python's C API, run by the Python of its own venv) and HF transformers.

    python bench/cpu_peers.py --engine strata|strata-dp|strata-reference|llamacpp|hf --model X.gguf --threads N

A worker loads its model once, prints {"ready": ...} and then answers one JSON task per line on
stdin with one JSON line on stdout, timing only the engine's own work:

    {"task": "generate", "prompts": [[ids], ...], "max_tokens": N}
        -> {"seconds": s, "tokens": [[ids], ...]}   greedy, every sequence exactly N tokens
    {"task": "prefill", "prompt": [ids]}
        -> {"seconds": s, "tokens": [[first id]]}     the prompt and its first token
    {"task": "tokenize", "text": str} -> {"seconds": 0, "tokens": [ids]}   (strata only)

The llama.cpp worker imports neither torch nor strata (its venv has neither): it drives
llama_decode directly, the way llama.cpp's own `batched` example does, with one context per
number of parallel sequences, a sequence id per request and greedy picks (argmax of each
sequence's last logits). That is the least Python a llama.cpp run can carry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class StrataEngine:
    data_parallel = False

    def __init__(self, model: str, threads: int, max_seqs: int, max_len: int):
        import torch

        from strata import LLM, SamplingParams
        torch.set_num_threads(threads)
        self.params = SamplingParams
        # data_parallel: a replica per core, one thread each (the engine splits the cores).
        extra = {"data_parallel_size": threads} if self.data_parallel and threads > 1 else {}
        # No prefix caching: every timed prompt is computed again, as llama.cpp does after a clear.
        self.llm = LLM(model, max_num_seqs=max_seqs, max_model_len=max_len, enable_prefix_caching=False,
                       use_tqdm_on_load=False, **extra)
        self.info = {"threads": torch.get_num_threads(), "torch": torch.__version__, **extra}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return seconds, [list(o.outputs[0].token_ids) for o in outs]


class HFEngine:
    """transformers in float32 on the GGUF's dequantized weights (its own GGUF reader)."""

    def __init__(self, model: str, threads: int, max_seqs: int, max_len: int):
        import torch
        import transformers
        torch.set_num_threads(threads)
        self.torch = torch
        path = os.path.abspath(model)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        self.info = {"threads": torch.get_num_threads(), "transformers": transformers.__version__}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        torch = self.torch
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the HF peer takes prompts of one length (no padding)")
        ids = torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      pad_token_id=0)
        seconds = time.perf_counter() - t0
        return seconds, out[:, ids.shape[1]:].tolist()


class LlamaCppEngine:
    """llama.cpp's C API: one model, a context per number of parallel sequences (made on first
    use, then reused after clearing its memory), default context settings otherwise."""

    def __init__(self, model: str, threads: int, max_seqs: int, max_len: int):
        import llama_cpp as L
        import numpy as np
        self.L, self.np = L, np
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.threads, self.max_len = threads, max_len
        self.contexts: dict[int, tuple] = {}
        self.info = {"threads": threads, "llama_cpp_python": L.__version__,
                     "system_info": L.llama_print_system_info().decode(errors="replace")}

    def _context(self, n_seqs: int):
        if n_seqs not in self.contexts:
            L = self.L
            cp = L.llama_context_default_params()
            cp.n_ctx = n_seqs * self.max_len      # each sequence gets max_len cells (not unified)
            cp.n_seq_max = n_seqs
            cp.n_threads = cp.n_threads_batch = self.threads
            cp.no_perf = True
            ctx = L.llama_init_from_model(self.model, cp)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {n_seqs} sequences")
            batch = L.llama_batch_init(max(cp.n_batch, n_seqs), 0, 1)
            self.contexts[n_seqs] = (ctx, batch, cp.n_batch)
        return self.contexts[n_seqs]

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        L = self.L
        ctx, batch, n_batch = self._context(len(prompts))
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        out: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        # Prompts: as many tokens per llama_decode as n_batch allows, logits only for each
        # prompt's last token.
        entries = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        picks = {}
        for start in range(0, len(entries), n_batch):
            picks.update(self._decode(ctx, batch, entries[start:start + n_batch]))
        for seq in range(len(prompts)):
            out[seq].append(picks[seq])
        for step in range(1, max_tokens):
            entries = [(out[seq][-1], len(p) + step - 1, seq, True) for seq, p in enumerate(prompts)]
            for seq, tok in self._decode(ctx, batch, entries).items():
                out[seq].append(tok)
        return time.perf_counter() - t0, out

    def _decode(self, ctx, batch, entries) -> dict[int, int]:
        """One llama_decode over (token, position, sequence, wants logits); greedy picks by sequence."""
        L, np = self.L, self.np
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(entries)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed (context full?)")
        picks = {}
        for i, (_, _, seq, logits) in enumerate(entries):
            if logits:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))
                picks[seq] = int(row.argmax())
        return picks


class StrataDataParallelEngine(StrataEngine):
    """strata with data_parallel_size = threads: a process of one thread per core, each with its
    own scheduler, requests spread over them (for batched throughput)."""
    data_parallel = True


ENGINES = {"strata": StrataEngine, "strata-dp": StrataDataParallelEngine, "strata-reference": StrataEngine, "hf": HFEngine, "llamacpp": LlamaCppEngine}


def serve(engine, out) -> None:
    """Answer tasks on stdin until it closes, on `out`."""
    for line in sys.stdin:
        task = json.loads(line)
        if task["task"] == "generate":
            seconds, tokens = engine.generate(task["prompts"], task["max_tokens"])
        elif task["task"] == "prefill":
            seconds, tokens = engine.generate([task["prompt"]], 1)
        elif task["task"] == "tokenize":     # strata's GGUF tokenizer (the same vocabulary as llama.cpp's)
            seconds, tokens = 0.0, engine.llm.get_tokenizer().encode(task["text"])
        else:
            raise ValueError(f"unknown task {task['task']!r}")
        print(json.dumps({"seconds": seconds, "tokens": tokens}), file=out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=sorted(ENGINES), required=True)
    ap.add_argument("--model", required=True, help="the .gguf file")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--max-seqs", type=int, default=32, help="most sequences in one task")
    ap.add_argument("--max-len", type=int, default=1024, help="most tokens of one sequence, prompt included")
    args = ap.parse_args()
    if args.engine == "strata-reference":
        # strata's fp32 reference path: every weight dequantized at load, only torch ops.
        os.environ["STRATA_QUANT_REFERENCE"] = os.environ["STRATA_DISABLE_CPU_KERNELS"] = "1"
    # stdout carries the answers: a private copy of it; file descriptor 1 itself now points at
    # stderr, so engines' own prints (strata's startup line, processes they start) go there.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    engine = ENGINES[args.engine](args.model, args.threads, args.max_seqs, args.max_len)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, **engine.info}), file=answers, flush=True)
    serve(engine, answers)


if __name__ == "__main__":
    main()
