"""The multi-process executor: one worker process per rank on this machine, started with
torch.multiprocessing (spawn), joined by torch.distributed (NCCL on CUDA, gloo on the CPU).

The engine process schedules; it takes part in no collective, so it can always watch the
ranks. Each step it pickles the SchedulerOutput once and writes it to every rank's pipe. Every
rank answers when its step is done; the driver's answer is the RunnerOutput.

Who samples: with one pipeline stage every rank holds the whole (all-gathered) logits, so every
rank runs the sampler, with the same seeds and the same random state, and keeps the tokens on
its device for its next step; the other ranks' answers carry their tokens only so that the
engine can check they agree. With pipeline stages only the driver has logits: its tokens ride
along in the next step's message, and the other ranks append them to their request states.

Async scheduling (one pipeline stage): `launch` writes step N+1 and returns; each rank queues
N+1 on its device and only then waits for N's tokens and answers for N, so the engine's host
work for N+1 overlaps the device work of N. A rank answers for its last step when the next
message arrives: a later step, or "flush" when the engine wants that step's result now.

Failure handling: while it waits the engine watches each process (a rank that exits is seen at
once), a heartbeat each rank writes to shared memory every 0.5 s from a thread (still beating
while the rank waits inside a collective: a silent heartbeat means the process is stopped or
wedged) and a deadline per step. Any of these stops every rank and raises ``WorkerFailure``
naming the rank; the engine refuses further steps with the same error.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing import connection

import torch

from strata.config import ParallelConfig
from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.distributed.parallel_state import CUDA_SAFE_ENV
from strata.engine.arg_utils import EngineArgs
from strata.executor.executor import WorkerFailure
from strata.executor.worker import KVPlan, ModelFacts

HEARTBEAT_S = 0.5
# After the first failure, how long to wait for the other ranks' news (which rank died first).
SETTLE_S = 1.0


@dataclass
class WorkerSpec:
    rank: int
    tp_size: int
    pp_size: int
    backend: str
    init_method: str
    device_type: str
    num_threads: int
    collective_timeout_s: float
    args: EngineArgs
    eos_token_ids: frozenset
    progress: bool


class MultiprocExecutor:
    def __init__(self, args: EngineArgs, parallel: ParallelConfig, device: torch.device,
                 eos_token_ids: frozenset[int]):
        import torch.multiprocessing as mp
        self.parallel = parallel
        self.world_size = parallel.world_size
        self.driver = parallel.driver_rank
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and torch.cuda.device_count() < self.world_size:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} GPUs, "
                             f"but {torch.cuda.device_count()} are visible")
        if device.type == "cuda":
            os.environ.update(CUDA_SAFE_ENV)   # inherited by every rank spawned below
        self.failure: WorkerFailure | None = None
        # One pipeline stage: every rank samples its own tokens (no tokens in the messages) and a
        # step may be launched before the one before it finishes.
        self.supports_async = parallel.pipeline_parallel_size == 1
        self._last_sampled: dict[str, list[int]] = {}
        self._in_flight: list[str] = []          # launched steps, oldest first: replies come in order
        self._unrequested: str | None = None     # the newest step, if its ranks still hold its reply
        self._finished: dict[str, RunnerOutput] = {}   # replies drained before their finish()
        ctx = mp.get_context("spawn")
        self.heartbeats = ctx.Array("d", self.world_size, lock=False)   # 0.0: not beating yet
        threads = max(1, torch.get_num_threads() // self.world_size)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs, self.conns = [], []
        for rank in range(self.world_size):
            spec = WorkerSpec(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                              self.backend, init_method, device.type, threads, parallel.step_timeout_s,
                              args, eos_token_ids, progress=False)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(spec, child, self.heartbeats),
                               name=f"strata-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        self.plan, self.facts = self._start(parallel.startup_timeout_s)

    # ---- startup -----------------------------------------------------------------------------
    def _start(self, timeout_s: float) -> tuple[KVPlan, ModelFacts]:
        reports = self._gather("startup (loading the model)", timeout_s)
        prints = {r: rep["fingerprint"] for r, rep in reports.items()}
        if len(set(prints.values())) != 1:
            self._fail(f"the ranks do not see the same model and configuration (fingerprints {prints}): "
                       "every rank must read the same checkpoint with the same options")
        plans = [rep["plan"] for rep in reports.values()]
        num_blocks = min(p.num_blocks for p in plans)
        max_model_len = min(p.max_model_len for p in plans)
        self._broadcast(("allocate", num_blocks, max_model_len))
        self._gather("KV cache allocation", timeout_s)
        facts = [rep["facts"] for rep in reports.values()]
        total = ModelFacts(num_parameters=sum(f.num_parameters for f in facts),
                           weight_bytes=facts[0].weight_bytes, quant_summary=facts[0].quant_summary,
                           kv_block_bytes=facts[0].kv_block_bytes,
                           lm_head_quantized=facts[0].lm_head_quantized, all_reduce=facts[0].all_reduce)
        return KVPlan(num_blocks, max_model_len, reports[0]["plan"].memory_plan), total

    # ---- steps -------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.finish(self._launch(sched, defer=False))

    def launch(self, sched: SchedulerOutput) -> str:
        """Send the step and return at once; the ranks answer when the next message arrives."""
        return self._launch(sched, defer=True)

    def _launch(self, sched: SchedulerOutput, defer: bool) -> str:
        if self.failure is not None:
            raise self.failure
        if self._in_flight and not self.supports_async:
            raise RuntimeError("with pipeline stages the multi-process executor runs one step at a time "
                               "(the other stages learn the tokens from the next step's message)")
        if len(self._in_flight) > 1:
            raise RuntimeError(f"steps {self._in_flight} are in flight: finish the oldest first "
                               "(async scheduling runs one step ahead)")
        sampled = {} if self.supports_async else self._last_sampled
        self._broadcast(("step", sched, sampled, defer))
        handle = f"step {sched.step_id}"
        self._in_flight.append(handle)
        self._unrequested = handle if defer else None   # this message asked for the one before
        return handle

    def finish(self, handle: str) -> RunnerOutput:
        if handle in self._finished:
            return self._finished.pop(handle)
        if not self._in_flight or self._in_flight[0] != handle:
            raise RuntimeError(f"finish({handle!r}): the oldest step in flight is "
                               f"{self._in_flight[0] if self._in_flight else None!r}")
        if self._unrequested == handle:   # nothing launched after it: ask for its reply now
            self._broadcast(("flush",))
            self._unrequested = None
        try:
            replies = self._gather(handle, self.parallel.step_timeout_s)
        finally:
            self._in_flight.pop(0)
        out: RunnerOutput = replies[self.driver]
        self._check_same_tokens(handle, replies)
        self._last_sampled = {r: t for r, t in out.sampled_token_ids.items() if t}
        return out

    def _check_same_tokens(self, handle: str, replies: dict) -> None:
        """Ranks that sample must have drawn the driver's tokens: else their KV caches now hold
        other tokens than the ones the engine returns (a random state that diverged)."""
        want = replies[self.driver].sampled_token_ids
        for rank, got in sorted(replies.items()):
            if rank != self.driver and got is not None and got != want:
                bad = next((r for r in want if got.get(r) != want[r]), None)
                self._fail(f"during {handle}: rank {rank} sampled {got.get(bad)} for request {bad!r} "
                           f"where the driver (rank {self.driver}) sampled {want.get(bad)} (the ranks' "
                           "random states differ)")

    def _drain(self) -> None:
        """Take the replies of every launched step, kept for their finish(): before a message
        whose own reply would otherwise come after theirs."""
        for handle in list(self._in_flight):
            self._finished[handle] = self.finish(handle)

    def start_profile(self) -> None:
        self.call("start_profile")

    def stop_profile(self, trace_dir: str | None = None) -> dict[int, str]:
        """Every rank's table of profiled kernels, by rank."""
        return self.call("stop_profile", trace_dir)

    def call(self, method: str, *args, timeout_s: float | None = None) -> dict:
        """Run a Worker method on every rank (benchmarks: all-reduce timing); replies by rank."""
        self._drain()
        self._broadcast(("call", method, args))
        return self._gather(f"call {method}", timeout_s or self.parallel.step_timeout_s)

    def shutdown(self) -> None:
        self._finalizer()

    # ---- messages and failure detection --------------------------------------------------------
    def _broadcast(self, message) -> None:
        if self.failure is not None:
            raise self.failure
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self._fail(f"rank {rank} is gone (its pipe closed)")

    def _gather(self, what: str, timeout_s: float) -> dict:
        pending = set(range(self.world_size))
        replies: dict = {}
        deadline = time.monotonic() + timeout_s
        by_conn = {id(c): r for r, c in enumerate(self.conns)}
        while pending:
            waitables = [self.conns[r] for r in sorted(pending)] + [p.sentinel for p in self.procs]
            for ready in connection.wait(waitables, timeout=HEARTBEAT_S):
                rank = by_conn.get(id(ready))
                if rank is None:   # a process sentinel: that rank exited
                    self._fail(f"during {what}")
                try:
                    status, payload = ready.recv()
                except (EOFError, OSError):
                    self._fail(f"during {what}")
                if status == "error":
                    self._fail(f"during {what}", first_error=(rank, payload))
                replies[rank] = payload
                pending.discard(rank)
            now = time.monotonic()
            stale = [r for r in sorted(pending) if self.heartbeats[r] and now - self.heartbeats[r] > self.parallel.worker_timeout_s]
            if stale:
                self._fail(f"during {what}: rank {stale[0]} (pid {self.procs[stale[0]].pid}) has not "
                           f"responded for more than {self.parallel.worker_timeout_s:g}s (hung or stopped)")
            if now > deadline and pending:
                self._fail(f"{what} did not finish within {timeout_s:g}s on rank(s) {sorted(pending)} "
                           "(every rank alive: a deadlock or a very slow step)")
        return replies

    def _fail(self, what: str, first_error: tuple[int, tuple] | None = None):
        """Stop every rank and raise one error that names the rank at fault: a rank that died is
        the cause over one that failed after it (its collective lost a peer)."""
        settle = time.monotonic() + SETTLE_S
        errors = dict([first_error]) if first_error else {}
        while time.monotonic() < settle and not any(p.exitcode not in (None, 1) for p in self.procs):
            for rank, conn in enumerate(self.conns):   # errors other ranks reported meanwhile
                try:
                    while rank not in errors and conn.poll():
                        status, payload = conn.recv()
                        if status == "error":
                            errors[rank] = payload
                except (EOFError, OSError):
                    pass
            time.sleep(0.05)
        parts = []
        for rank, proc in enumerate(self.procs):
            if proc.exitcode is not None and rank not in errors:
                parts.append(f"rank {rank} (pid {proc.pid}) died: {_exit_reason(proc.exitcode)}")
        for rank, (kind, message, _tb) in sorted(errors.items()):
            parts.append(f"rank {rank} (pid {self.procs[rank].pid}) raised {kind}: {message}")
        text = f"worker failure {what}" + (": " + "; ".join(parts) if parts else "")
        self._finalizer.detach()
        _stop_workers(self.procs, self.conns, graceful=False)
        self.failure = WorkerFailure(text + ". The engine has stopped every rank.")
        if first_error is not None and first_error[1][0] == "ValueError" and not any("died" in p for p in parts):
            raise ValueError(f"rank {first_error[0]}: {first_error[1][1]}")   # a user error at startup
        raise self.failure


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop_workers(procs, conns, graceful: bool = True) -> None:
    """Ask every rank to stop, then make sure: a stopped (SIGSTOP) or wedged rank is killed.
    After a failure (graceful=False) the ranks are killed at once: the survivors may sit in a
    collective that will never complete."""
    if graceful:
        for conn in conns:
            try:
                conn.send_bytes(pickle.dumps(("shutdown",)))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()   # SIGKILL: a stopped process would not act on SIGTERM until continued
            proc.join(timeout=5.0)
    for conn in conns:
        conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the worker process ------------------------------------------------------------------------
def worker_main(spec: WorkerSpec, conn, heartbeats) -> None:
    if spec.device_type == "cuda":
        os.environ.update(CUDA_SAFE_ENV)
    beat = threading.Thread(target=heartbeat, args=(heartbeats, spec.rank), daemon=True)
    beat.start()
    try:
        worker = _start_worker(spec)
        conn.send(("ok", {"fingerprint": worker.fingerprint(), "plan": worker.plan(),
                          "facts": worker.facts()}))
        serve(worker, conn.recv_bytes, lambda status, payload: conn.send((status, payload)))
    except BaseException as e:   # told to the engine, which names this rank in its error
        try:
            conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


def heartbeat(heartbeats, rank: int) -> None:
    """Stamp heartbeats[rank] every HEARTBEAT_S (a daemon thread of a worker or replica process)."""
    while True:
        heartbeats[rank] = time.monotonic()
        time.sleep(HEARTBEAT_S)


def _start_worker(spec: WorkerSpec):
    from strata.distributed import parallel_state as ps
    from strata.executor.worker import Worker
    if spec.device_type == "cuda":
        local_rank = spec.rank % torch.cuda.device_count()
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(spec.num_threads)
        device = torch.device("cpu")
    ps.init_distributed(spec.rank, spec.tp_size, spec.pp_size, spec.backend, spec.init_method,
                        spec.collective_timeout_s)
    return Worker(spec.args, device, spec.eos_token_ids, progress=spec.progress)


def serve(worker, recv_bytes, send) -> None:
    """Answer the engine's messages until it says shutdown. A deferred step (async scheduling) is
    answered once the next message has arrived, after the next step (if that is one) is queued
    on the device: so the device never waits for this host between steps."""
    runner = worker.runner
    pending = None   # a launched step whose answer waits for the next message
    while True:
        message = pickle.loads(recv_bytes())
        kind = message[0]
        if kind == "step":
            _, sched, sampled, defer = message
            runner.apply_sampled(sampled)
            handle = runner.launch(sched)
            if pending is not None:
                _answer_step(runner, pending, send)
            pending = handle
            if not defer:
                _answer_step(runner, pending, send)
                pending = None
            continue
        if kind == "shutdown":   # nobody reads a pending step's answer any more
            _destroy_process_group()
            return
        if pending is not None:   # every other message answers the step before first
            _answer_step(runner, pending, send)
            pending = None
        if kind == "allocate":
            send("ok", worker.allocate(message[1], message[2]))
        elif kind == "call":
            send("ok", getattr(worker, message[1])(*message[2]))


def _answer_step(runner, handle, send) -> None:
    """The driver answers with the RunnerOutput; another rank that samples with its tokens (for
    the engine's check that they agree), a rank that does not with None."""
    out = runner.finish(handle)
    if runner.is_driver:
        send("ok", out)
    else:
        send("ok", out.sampled_token_ids if runner.samples else None)


def _destroy_process_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
