"""Ranks started by torchrun (several machines): every process runs the same program, torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says which rank it is.

Rank 0 runs the engine and its own rank's worker in-process; every other rank turns into a
follower inside ``LLM(...)`` (or ``strata serve``): it serves steps until rank 0 shuts down, then
exits. Each step rank 0 broadcasts the message over a gloo group of all ranks; the driver (TP
rank 0 of the last stage) sends its RunnerOutput back to rank 0 when it is not rank 0 itself.

Failures: gloo's collectives time out after ``step_timeout``, and a peer that died breaks them at
once; rank 0 raises WorkerFailure with gloo's message. torchrun's agent stops the remaining
processes when one fails.
"""

from __future__ import annotations

import os
import sys

import torch

from strata.config import ParallelConfig
from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.distributed import parallel_state as ps
from strata.engine.arg_utils import EngineArgs
from strata.executor.executor import WorkerFailure
from strata.executor.worker import KVPlan, ModelFacts, Worker


def torchrun_rank() -> int | None:
    """This process's rank when started by torchrun (or with its variables set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"])
    return None


def _join(args: EngineArgs, parallel: ParallelConfig, device: torch.device,
          eos_token_ids: frozenset[int]) -> tuple[Worker, KVPlan, list]:
    """Join the process group, build this rank's worker and agree on the KV cache size."""
    import torch.distributed as dist
    world = int(os.environ["WORLD_SIZE"])
    if world != parallel.world_size:
        raise ValueError(f"torchrun started {world} processes but tensor_parallel_size x "
                         f"pipeline_parallel_size = {parallel.world_size}")
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        os.environ.update(ps.CUDA_SAFE_ENV)
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    groups = ps.init_distributed(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                 backend, "env://", parallel.step_timeout_s)
    worker = Worker(args, device, eos_token_ids, progress=rank == 0)
    reports: list = [None] * world
    dist.all_gather_object(reports, (worker.fingerprint(), worker.plan(), worker.facts()),
                           group=groups.world_group)
    prints = {r: rep[0] for r, rep in enumerate(reports)}
    if len(set(prints.values())) != 1:
        raise ValueError(f"the ranks do not see the same model and configuration (fingerprints "
                         f"{prints}): every rank must read the same checkpoint with the same options")
    plan = KVPlan(min(rep[1].num_blocks for rep in reports), min(rep[1].max_model_len for rep in reports),
                  reports[0][1].memory_plan)
    worker.allocate(plan.num_blocks, plan.max_model_len)
    return worker, plan, reports


def run_follower(args: EngineArgs, parallel: ParallelConfig, device: torch.device,
                 eos_token_ids: frozenset[int]) -> None:
    """A rank other than 0: serve rank 0's steps, then end the process."""
    import torch.distributed as dist
    worker, _, _ = _join(args, parallel, device, eos_token_ids)
    group = ps.get_groups().world_group
    runner = worker.runner
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        message = box[0]
        if message[0] == "shutdown":
            dist.barrier(group=group)   # see TorchrunExecutor.shutdown
            break
        if message[0] == "step":
            runner.apply_sampled(message[2])
            out = runner.execute(message[1])
            if runner.is_driver:
                dist.send_object_list([out], dst=0, group=group)
        elif message[0] == "call":
            getattr(worker, message[1])(*message[2])
    dist.destroy_process_group()
    sys.exit(0)


class TorchrunExecutor:
    """Rank 0's side: the engine's executor, with this process as rank 0."""

    def __init__(self, args: EngineArgs, parallel: ParallelConfig, device: torch.device,
                 eos_token_ids: frozenset[int]):
        self.parallel = parallel
        self.driver = parallel.driver_rank
        self.backend = ("nccl" if device.type == "cuda" else "gloo") + ", under torchrun"
        self.worker, self.plan, reports = _join(args, parallel, device, eos_token_ids)
        facts = [rep[2] for rep in reports]
        self.facts = ModelFacts(sum(f.num_parameters for f in facts), facts[0].weight_bytes,
                                facts[0].quant_summary, facts[0].kv_block_bytes, facts[0].lm_head_quantized,
                                facts[0].all_reduce)
        self.failure: WorkerFailure | None = None
        self.supports_async = False   # every step is one broadcast and one answer, in order
        self._last_sampled: dict[str, list[int]] = {}
        self._closed = False

    def _broadcast(self, message) -> None:
        import torch.distributed as dist
        if self.failure is not None:
            raise self.failure
        dist.broadcast_object_list([message], src=0, group=ps.get_groups().world_group)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        import torch.distributed as dist
        try:
            self._broadcast(("step", sched, self._last_sampled))
            runner = self.worker.runner
            runner.apply_sampled(self._last_sampled)
            out = runner.execute(sched)
            if self.driver != 0:
                box = [None]
                dist.recv_object_list(box, src=self.driver, group=ps.get_groups().world_group)
                out = box[0]
        except WorkerFailure:
            raise
        except Exception as e:   # gloo: a peer died or timed out
            self.failure = WorkerFailure(f"worker failure during step {sched.step_id} under torchrun: "
                                         f"{type(e).__name__}: {e}")
            raise self.failure from e
        self._last_sampled = {r: t for r, t in out.sampled_token_ids.items() if t}
        return out

    def launch(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.execute(sched)

    def finish(self, handle: RunnerOutput) -> RunnerOutput:
        return handle

    def start_profile(self) -> None:
        self.call("start_profile")

    def stop_profile(self, trace_dir: str | None = None) -> dict[int, str]:
        """Rank 0's table of profiled kernels ({0: table}): the other ranks profile too, but
        under torchrun only their traces (with ``trace_dir``) come out."""
        return self.call("stop_profile", trace_dir)

    def call(self, method: str, *args, timeout_s: float | None = None) -> dict:
        self._broadcast(("call", method, args))
        return {0: getattr(self.worker, method)(*args)}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import torch.distributed as dist
        if self.failure is None:
            try:
                self._broadcast(("shutdown",))
                # Every rank has the message before any tears its group down: a peer's sockets
                # closing under a rank still in the broadcast aborted that rank at exit.
                dist.barrier(group=ps.get_groups().world_group)
            except Exception:
                pass
        if dist.is_initialized():
            dist.destroy_process_group()
