"""How long the tensor-parallel all-reduces of one step take on this rank (for benchmarks):
``ops`` all-reduces of [num_tokens, hidden], timed eagerly and, on CUDA, replayed from one CUDA
graph the way a captured decode step runs them; through NCCL (gloo on the CPU) and, where this
group has it, symmetric memory (symm_all_reduce.py), side by side; and where the fused
all-reduce + RMSNorm takes the size, that kernel against the symmetric-memory all-reduce followed
by the norm kernel it replaces. Every rank of the group must call it."""

from __future__ import annotations

import statistics
import time

import torch

from strata.distributed import parallel_state as ps


def time_all_reduce_step(num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
                         ops: int, reps: int = 10) -> dict:
    """{"ops_per_step", "used": the path the model takes at this size, and per path
    {"eager_ms", "graph_ms"[, "graph_error"]} under "nccl", (if it can run) "symm_mem", and (if
    the fused kernel takes the size) "symm_mem_norm" (all-reduce, then the residual add and norm)
    and "fused_norm" (the one kernel doing both)}."""
    import torch.distributed as dist
    groups = ps.get_groups()
    x = torch.ones(num_tokens, hidden, dtype=dtype, device=device)
    paths = {"nccl": lambda: dist.all_reduce(x, group=groups.tp_group)}
    fast = groups.fast_all_reduce
    if fast is not None and fast.can_run(x):
        paths["symm_mem"] = lambda: fast(x)
    fused = getattr(fast, "norm", None)
    if fused is not None and fused.can_run(x):
        from strata.kernels.norm import rms_norm
        residual, weight = torch.ones_like(x), torch.ones(hidden, dtype=dtype, device=device)
        paths["symm_mem_norm"] = lambda: rms_norm(fast(x), weight, 1e-5, residual)
        paths["fused_norm"] = lambda: fused(x, residual, weight, 1e-5)
    result: dict = {"ops_per_step": ops, "used": "symm_mem" if "symm_mem" in paths else "nccl"}
    for name, one in paths.items():
        def step(one=one):
            for _ in range(ops):
                one()
        result[name] = _time_step(step, reps, device)
    return result


def _time_step(step, reps: int, device: torch.device) -> dict:
    timing = {"eager_ms": _median_ms(step, reps, device), "graph_ms": float("nan")}
    if device.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            timing["graph_ms"] = _median_ms(graph.replay, reps, device)
        except RuntimeError as e:   # every rank fails alike: the eager figure still stands
            timing["graph_error"] = str(e).splitlines()[0]
    return timing


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
