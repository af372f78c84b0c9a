"""How long the tensor-parallel all-reduces of one step take on this rank (for benchmarks):
``ops`` all-reduces of [num_tokens, hidden], timed eagerly and, on CUDA, replayed from one CUDA
graph the way a captured decode step runs them. Every rank of the group must call it."""

from __future__ import annotations

import statistics
import time

import torch

from strata.distributed import parallel_state as ps


def time_all_reduce_step(num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
                         ops: int, reps: int = 10) -> dict:
    x = torch.ones(num_tokens, hidden, dtype=dtype, device=device)

    def step():
        for _ in range(ops):
            ps.tensor_model_parallel_all_reduce(x)

    result = {"ops_per_step": ops, "eager_ms": _median_ms(step, reps, device), "graph_ms": float("nan")}
    if device.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            result["graph_ms"] = _median_ms(graph.replay, reps, device)
        except RuntimeError as e:   # every rank fails alike: the eager figure still stands
            result["graph_error"] = str(e).splitlines()[0]
    return result


def _median_ms(fn, reps: int, device: torch.device) -> float:
    fn()   # warm-up (and NCCL's first-use setup)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
