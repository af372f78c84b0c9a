"""The correctness part of gpu_parallel.py: greedy tokens of tensor-parallel engines on one set of
random weights, written once as a safetensors checkpoint (dummy weights are drawn per shard, so
they differ between TP sizes and cannot be compared).

* TP=N vs TP=1 in float32: the same tokens up to float rounding (the all-reduce sums in another
  order than one GPU's matmul); reported as prompts identical and the first position that differs.
* TP=N with symmetric memory vs TP=N with NCCL, in bfloat16: the same kernels but the all-reduce,
  so every token must agree. At TP=2 both add the same two numbers once; at TP=4 the order of the
  sum may differ, so a late token may differ there too.
* TP=N with the fused all-reduce + RMSNorm vs without it (``STRATA_FUSED_NORM=0``), in bfloat16:
  the same sums and norms in fewer kernels, bit-identical at TP=2.
* TP=N with o_proj and down_proj sending their shares as they compute them vs the fused kernel
  sending them (``STRATA_GEMV_PUSH=0``), in bfloat16: the same rows by another road, identical.
Each engine uses CUDA graphs and async scheduling (the defaults), batches of 1 and of 4 prompts.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import torch
from gpu_llama8b import LLAMA_31_8B

NUM_NEW = 32


def write_checkpoint(smoke: bool) -> Path:
    """Llama-3.1-8B's layer shape (hidden 4096, 32 heads, 8 KV heads, MLP 14336: the decode all-reduces
    of [batch, 4096]) with 2 layers and a 32768-token vocabulary, random bf16 weights."""
    cfg = dict(LLAMA_31_8B, num_hidden_layers=2, vocab_size=32768, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2)
    cfg.pop("rope_scaling")
    if smoke:
        cfg.update(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                   vocab_size=4096)
    path = Path(tempfile.mkdtemp(prefix="parallel-check-"))
    (path / "config.json").write_text(json.dumps(cfg))
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        # Wider than the dummy loader's +-0.02: distinct logits, so greedy ties are rare.
        return (torch.rand(*shape, generator=gen) * 0.1 - 0.05).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save_safetensors(tensors, path / "model.safetensors")
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """The safetensors layout written directly (the GPU machines need not have the package): an
    8-byte little-endian header length, a JSON header of dtypes, shapes and byte offsets, the data."""
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)   # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def greedy_tokens(path: Path, tp: int, dtype: str, all_reduce: str, smoke: bool, env: dict | None = None) -> list:
    """Greedy tokens of one prompt alone, then of four in one batch (the engine's startup line,
    with its all-reduce, is logged as it starts); ``env`` is set while the engine starts."""
    from strata.engine.data_parallel import environment
    with environment(**(env or {})):
        return _greedy_tokens(path, tp, dtype, all_reduce, smoke)


def _greedy_tokens(path: Path, tp: int, dtype: str, all_reduce: str, smoke: bool) -> list:
    from strata import LLM, SamplingParams
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, vocab - 10, (n,), generator=gen).tolist() for n in (7, 32, 61, 128)]
    llm = LLM(str(path), dtype=dtype, skip_tokenizer_init=True, tensor_parallel_size=tp,
              all_reduce=all_reduce, max_model_len=512, max_num_seqs=8, use_tqdm_on_load=False,
              **({"kv_cache_memory": "64MiB"} if smoke else {}))
    try:
        params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        one = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        batch = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in one + batch]
    finally:
        llm.llm_engine.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(got: list, want: list) -> dict:
    """Sequences identical, and the first position that differs in each that is not."""
    first = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None) for g, w in zip(got, want)]
    return {"identical": sum(f is None for f in first), "of": len(want),
            "first_diff": [f for f in first if f is not None]}


def run_checks(tp_sizes: list[int], smoke: bool) -> list[dict]:
    """One row per comparison: what was compared, and compare()'s result (or the error)."""
    path = write_checkpoint(smoke)
    rows: list[dict] = []
    try:
        ref32 = greedy_tokens(path, 1, "float32", "auto", smoke)
    except Exception as e:   # nothing to compare against: say so and stop
        return [{"check": "TP=1 float32 reference", "error": f"{type(e).__name__}: {e}"}]
    for tp in [t for t in tp_sizes if t > 1]:
        rows.append(_row(f"TP={tp} vs TP=1, float32 (all_reduce=auto)",
                         lambda: compare(greedy_tokens(path, tp, "float32", "auto", smoke), ref32)))
        if smoke:   # no bfloat16 symmetric memory on the CPU: gloo either way
            continue
        try:
            nccl = greedy_tokens(path, tp, "bfloat16", "nccl", smoke)
        except Exception as e:
            rows.append({"check": f"TP={tp} bfloat16 NCCL", "error": f"{type(e).__name__}: {e}"})
            continue
        fused = None
        try:
            fused = greedy_tokens(path, tp, "bfloat16", "auto", smoke)
        except Exception as e:
            rows.append({"check": f"TP={tp} bfloat16 symmetric memory", "error": f"{type(e).__name__}: {e}"})
        if fused is not None:
            rows.append(_row(f"TP={tp} symmetric memory vs NCCL, bfloat16", lambda: compare(fused, nccl)))
            rows.append(_row(f"TP={tp} fused all-reduce + RMSNorm vs separate kernels, bfloat16",
                             lambda: compare(fused, greedy_tokens(path, tp, "bfloat16", "auto", smoke,
                                                                  env={"STRATA_FUSED_NORM": "0"}))))
            rows.append(_row(f"TP={tp} shares sent by the GEMVs vs by the fused kernel, bfloat16",
                             lambda: compare(fused, greedy_tokens(path, tp, "bfloat16", "auto", smoke,
                                                                  env={"STRATA_GEMV_PUSH": "0"}))))
    return rows


def _row(name: str, fn) -> dict:
    try:
        result = fn()
    except Exception as e:   # reported in the table; the other checks still run
        return {"check": name, "error": f"{type(e).__name__}: {e}"}
    print(f"{name}: {result}", flush=True)
    return {"check": name, **result}


def report(rows: list[dict]) -> None:
    print("\n| greedy check | prompts identical | first differing position |\n|---|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['check']} | error: {r['error'][:120]} | |")
        else:
            print(f"| {r['check']} | {r['identical']}/{r['of']} | {r['first_diff'] or '-'} |")


# ---- all-reduce alone: worker processes without an engine (a quick first check on the GPUs) ----
def all_reduce_only(tp: int, token_counts: tuple, hidden: int, smoke: bool) -> dict:
    """Start tp processes joined like strata's ranks, let them choose their all-reduce as a
    worker does, time one step's 65 all-reduces (Llama-3.1-8B: 2 per layer + 1) per size through
    NCCL and symmetric memory; {"tp", "choice", "all_reduce": {tokens: [per-rank timings]}}."""
    import socket

    import torch.multiprocessing as mp

    from strata.distributed.parallel_state import CUDA_SAFE_ENV
    if not smoke:
        os.environ.update(CUDA_SAFE_ENV)   # NVLink multicast off in every process started here
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_rank, args=(rank, tp, init_method, token_counts, hidden, smoke, queue))
             for rank in range(tp)]
    for proc in procs:
        proc.start()
    replies = dict(queue.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    errors = {rank: r["error"] for rank, r in replies.items() if "error" in r}
    if errors:
        raise RuntimeError(f"all-reduce ranks failed: {errors}")
    return {"tp": tp, "choice": replies[0]["choice"],
            "all_reduce": {n: [replies[r]["timing"][n] for r in range(tp)] for n in token_counts}}


def _all_reduce_rank(rank: int, tp: int, init_method: str, token_counts: tuple, hidden: int, smoke: bool,
                     queue) -> None:
    import traceback

    from strata.distributed import parallel_state as ps
    from strata.distributed.comm_timing import time_all_reduce_step
    try:
        if smoke:
            device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        else:
            os.environ.update(ps.CUDA_SAFE_ENV)   # before any CUDA or NCCL setup, as strata's ranks
            torch.cuda.set_device(rank)
            device, dtype, backend = torch.device("cuda", rank), torch.bfloat16, "nccl"
        ps.init_distributed(rank, tp, 1, backend, init_method, 120.0)
        choice = ps.init_all_reduce(device, dtype, "auto", hidden)
        with torch.inference_mode():
            timing = {n: time_all_reduce_step(n, hidden, dtype, device, 65) for n in token_counts}
        queue.put((rank, {"choice": choice.describe(), "timing": timing}))
        import torch.distributed as dist
        dist.destroy_process_group()
    except Exception as e:   # the parent reports it, naming the rank
        queue.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}))
