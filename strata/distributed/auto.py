"""``parallel="auto"``: pick the tensor/pipeline layout for the model, the GPUs present and the
goal, and say why (DeepSpeed-Inference's "inference-adapted parallelism").

* latency: decode of one sequence is bound by reading the weights; tensor parallelism splits
  that read over GPUs (at the cost of two all-reduces a layer), so take the widest tensor-parallel
  group the heads allow, up to the GPUs present.
* throughput: all-reduces and the bubble of pipeline stages cost throughput; the fewest GPUs per
  copy of the model that leave room for a KV cache do best, and the remaining GPUs are better used
  as data-parallel replicas (engine/data_parallel.py: a process each, requests spread over them).
* A model too large for one node's tensor-parallel group adds pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import ModelConfig

GOALS = ("latency", "throughput")
# Share of a GPU's usable memory the weights may take for the throughput goal: the rest is KV
# cache (a copy of the model with a small cache batches few sequences).
THROUGHPUT_WEIGHT_SHARE = 0.5
# For latency only the weights and a working KV cache must fit.
LATENCY_WEIGHT_SHARE = 0.85


@dataclass(frozen=True)
class Layout:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_replicas: int
    reason: str


def estimate_weight_bytes(cfg: ModelConfig, bytes_per_weight: float) -> int:
    """Weights of a Llama-shaped model: embeddings, attention, gated MLP (OPT is close enough)."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return int((cfg.num_layers * (attn + mlp) + embed) * bytes_per_weight)


def valid_tp_sizes(cfg: ModelConfig, max_size: int) -> list[int]:
    """Powers of two that split the heads (KV heads split, or replicated when fewer)."""
    sizes, tp = [], 1
    while tp <= max_size:
        if cfg.num_heads % tp == 0 and (cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0):
            sizes.append(tp)
        tp *= 2
    return sizes


def choose_layout(cfg: ModelConfig, bytes_per_weight: float, num_gpus: int, gpu_bytes: int,
                  goal: str) -> Layout:
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {', '.join(GOALS)}, got {goal!r}")
    gib = 2**30
    weights = estimate_weight_bytes(cfg, bytes_per_weight)
    if num_gpus <= 1:
        where = "the CPU" if num_gpus == 0 else "one GPU"
        return Layout(1, 1, 1, f"one process on {where}: nothing to split across "
                      f"(weights about {weights / gib:.1f} GiB)")
    tps = valid_tp_sizes(cfg, num_gpus)
    share = LATENCY_WEIGHT_SHARE if goal == "latency" else THROUGHPUT_WEIGHT_SHARE
    fitting = [tp for tp in tps if weights / tp <= share * gpu_bytes]
    size = f"weights about {weights / gib:.1f} GiB, {num_gpus} GPUs of {gpu_bytes / gib:.0f} GiB usable"
    if not fitting:
        tp = tps[-1]
        pp = 2
        while pp * tp <= num_gpus and weights / (tp * pp) > share * gpu_bytes:
            pp += 1
        if tp * pp > num_gpus or cfg.num_layers < pp:
            raise ValueError(f"the model does not fit these GPUs: {size}; tensor parallel {tp} "
                             f"would need {pp} pipeline stages")
        return Layout(tp, pp, 1, f"{size}: the widest tensor-parallel group the heads allow ({tp}) "
                      f"still leaves too little room, so {pp} pipeline stages split the layers")
    if goal == "latency":
        tp = fitting[-1]
        return Layout(tp, 1, 1, f"goal latency, {size}: tensor parallel {tp}, the widest the "
                      f"{cfg.num_heads} heads and {cfg.num_kv_heads} KV heads allow, so each GPU reads "
                      f"1/{tp} of the weights per token")
    tp = fitting[0]
    replicas = num_gpus // tp
    why = (f"goal throughput, {size}: tensor parallel {tp}, the fewest GPUs that hold a copy with "
           f"at least half their memory left for the KV cache (no all-reduce or pipeline bubble beyond that)")
    if replicas > 1:
        why += f"; the other GPUs hold copies of it: {replicas} data-parallel replicas"
    return Layout(tp, 1, replicas, why)
