"""Data parallelism: ``data_parallel_size=N`` runs N copies of the whole engine, each in a process
of its own with its own GPUs (or its share of the cores), and spreads the requests over them.

For throughput, a model that fits one GPU gains nothing from tensor parallelism's all-reduces:
N independent copies each run at the speed of one (vLLM's data parallelism, DeepSpeed's
replicas). Each copy is an ordinary LLMEngine (scheduler, KV cache, CUDA graphs, its own
tensor/pipeline ranks if asked) so everything one engine does, a copy does.

The front (this process) has the tokenizer and the limits of the copies: it tokenizes and checks
each request as one engine would, so a bad request fails at ``add_request`` and never reaches a
copy, then sends it to the copy with the fewest unfinished sequences (round robin among equals).
Copies step on their own and send each step's outputs as they come; ``step()`` returns whatever
has arrived (waiting a little when nothing has). A copy that exits, fails, stops beating (a
heartbeat thread stamps shared memory; silent for ``worker_timeout``: stopped or wedged) or takes
longer than ``step_timeout`` over one step stops every copy and raises ``WorkerFailure`` naming
it; the engine refuses further work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing import connection

from strata.config import DeviceConfig, LoadConfig
from strata.core.scheduler import QueueFull, check_prompt_fits
from strata.engine.arg_utils import EngineArgs
from strata.engine.engine import LLMEngine, _load_tokenizer, prepare_request
from strata.executor.executor import WorkerFailure
from strata.executor.multiproc import heartbeat
from strata.loader import model_loader
from strata.metrics import EngineStats
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")

# How long step() waits for a copy's news before returning nothing (the caller's loop then takes
# new requests and calls again).
WAIT_S = 0.02


@dataclass
class ReplicaSpec:
    index: int
    args: EngineArgs                 # data_parallel_size 1: the copy's own engine
    layout: object                   # parallel="auto"'s choice, for the copy's startup line
    num_threads: int
    progress: bool


@dataclass
class ReplicaReport:
    """What a copy tells the front once loaded."""

    describe: str
    scheduler_config: object
    num_blocks: int
    kv_block_bytes: int
    facts: object
    parallel_config: object
    kv_dtype: str


class _Replica:
    """The front's view of one copy."""

    def __init__(self, index: int, proc, conn, gpus: str | None):
        self.index, self.proc, self.conn, self.gpus = index, proc, conn, gpus
        self.unfinished = 0          # sequences sent and not yet finished
        self.num_requests = 0        # requests sent, ever
        self.stats = EngineStats()   # as of its last step
        self.waiting = 0             # the copy's queue at its last step, plus what was sent since
        self.step_started = time.monotonic()

    def name(self) -> str:
        where = f", GPUs {self.gpus}" if self.gpus else ""
        return f"data-parallel replica {self.index} (pid {self.proc.pid}{where})"


class DataParallelEngine:
    """The LLMEngine interface (add_request, abort_request, step, ...) over N engine copies."""

    def __init__(self, args: EngineArgs, layout=None, hf_tokenizer=None, use_tqdm: bool = True, source=None):
        import torch
        import torch.multiprocessing as mp
        t0 = time.perf_counter()
        self.args, self.layout = args, layout
        size = args.data_parallel_size
        self.device = DeviceConfig.resolve(args.device).device
        self.source = source or model_loader.resolve_model(args.model, LoadConfig(args.load_format, args.seed))
        _check_data_parallel(args, self.source, self.device)
        self.model_config = model_loader.model_config_for(
            self.source, model_loader.resolve_dtype(args.dtype, self.source, self.device))
        self.tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(args, self.source, hf_tokenizer)
        groups = _gpu_groups(size, args.tensor_parallel_size * args.pipeline_parallel_size, self.device)
        threads = self._threads = max(1, torch.get_num_threads() // size)
        replica_args = dataclasses.replace(args, data_parallel_size=1, parallel=None, max_waiting=None)
        ctx = mp.get_context("spawn")
        # Each replica stamps its slot every HEARTBEAT_S from a thread: a stale stamp means the
        # process is stopped or wedged (it still beats during a long step).
        self.heartbeats = ctx.Array("d", size, lock=False)
        self.replicas: list[_Replica] = []
        for index, gpus in enumerate(groups):
            spec = ReplicaSpec(index, replica_args, layout, threads, progress=use_tqdm and index == 0)
            parent, child = ctx.Pipe()
            # Not a daemon: a copy with tensor/pipeline ranks starts processes of its own.
            proc = ctx.Process(target=replica_main, args=(spec, child, self.heartbeats), name=f"strata-dp{index}",
                               daemon=False)
            with environment(CUDA_VISIBLE_DEVICES=gpus):   # what the child sees from its start
                proc.start()
            child.close()
            self.replicas.append(_Replica(index, proc, parent, gpus))
        self._finalizer = weakref.finalize(self, _stop_replicas, list(self.replicas))
        self.failure: WorkerFailure | None = None
        self._owner: dict[str, tuple[_Replica, int]] = {}   # unfinished request id -> (its copy, n)
        self._pending: list[RequestOutput] = []    # outputs read while waiting for something else
        self._ids = itertools.count()
        self._last = -1                              # the replica the last request went to
        reports = self._start(args.startup_timeout)
        first = reports[0]
        self.scheduler_config = first.scheduler_config
        self.num_blocks = min(r.num_blocks for r in reports)    # per copy
        self.kv_block_bytes, self.facts = first.kv_block_bytes, first.facts
        self.parallel_config, self._kv_dtype = first.parallel_config, first.kv_dtype
        self._replica_describe = first.describe
        self.offload_plan = None
        self.load_seconds = time.perf_counter() - t0
        logger.info(self.describe())

    # ---- startup -----------------------------------------------------------------------------
    def _start(self, timeout_s: float) -> list[ReplicaReport]:
        reports: dict[int, ReplicaReport] = {}
        deadline = time.monotonic() + timeout_s
        while len(reports) < len(self.replicas):
            waiting = [r for r in self.replicas if r.index not in reports]
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(waiting[0], f"did not finish loading within startup_timeout={timeout_s:g}s")
            self._check_heartbeats(waiting)
            for conn in connection.wait([r.conn for r in waiting], timeout=min(left, 1.0)):
                replica = next(r for r in waiting if r.conn is conn)
                kind, payload = self._receive(replica, "while loading")
                if kind != "ready":
                    self._fail(replica, f"failed while loading: {payload}")
                reports[replica.index] = payload
        return [reports[i] for i in range(len(self.replicas))]

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        self._check_alive()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        cfg = self.scheduler_config
        text, token_ids, params = prepare_request(
            self.tokenizer, prompt, params, cfg.max_model_len, self.model_config.vocab_size,
            lambda n: check_prompt_fits(n, cfg.max_model_len, self.args.block_size, self.num_blocks))
        if self.args.max_waiting is not None and sum(r.waiting for r in self.replicas) >= self.args.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.args.max_waiting} requests)")
        # The fewest unfinished sequences; among equals, the one after the last chosen (round robin).
        n = len(self.replicas)
        replica = min(self.replicas, key=lambda r: (r.unfinished, (r.index - self._last - 1) % n))
        self._last = replica.index
        prompt = {"prompt_token_ids": token_ids, "prompt": text}
        self._send(replica, ("add", request_id, prompt, params, arrival_time))
        if replica.unfinished == 0:
            replica.step_started = time.monotonic()
        replica.unfinished += params.n
        replica.waiting += 1
        replica.num_requests += 1
        self._owner[request_id] = (replica, params.n)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request; its copy frees its KV blocks. Nothing more is reported for it."""
        owner = self._owner.pop(str(request_id), None)
        if owner is not None and self.failure is None:
            replica, n = owner
            replica.unfinished -= n
            self._send(replica, ("abort", str(request_id)))
        return None

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._check_alive()
        outputs, self._pending = self._pending, []
        busy = [r for r in self.replicas if r.unfinished > 0]
        if busy and not outputs:
            ready = connection.wait([r.conn for r in busy], timeout=WAIT_S)
            for replica in busy:
                if replica.conn in ready:
                    outputs += self._take(replica, self._receive(replica, "during a step"))
            self._watch(busy)
        return outputs

    def _take(self, replica: _Replica, message) -> list[RequestOutput]:
        kind, payload = message
        if kind == "error":
            self._fail(replica, f"failed: {payload}")
        outputs, replica.stats = payload
        replica.waiting = replica.stats.num_waiting
        replica.step_started = time.monotonic()
        kept = []
        for out in outputs:
            owner = self._owner.get(out.request_id)
            if owner is None or owner[0] is not replica:
                continue    # aborted here after the copy had produced it
            if out.finished:
                del self._owner[out.request_id]
                replica.unfinished -= owner[1]
            kept.append(out)
        return kept

    def stats(self) -> EngineStats:
        """The replicas' gauges summed, as of each one's last step."""
        return sum((r.stats for r in self.replicas), EngineStats())

    def replica_stats(self) -> list[EngineStats]:
        """Each replica's gauges, asked now (`stats` has them as of each one's last step; an
        abort between steps shows here first). Outputs that arrive meanwhile wait for step()."""
        self._check_alive()
        for replica in self.replicas:
            self._send(replica, ("stats",))
        for replica in self.replicas:
            while True:
                kind, payload = self._receive(replica, "answering for its stats")
                if kind == "stats":
                    replica.stats = payload
                    break
                self._pending += self._take(replica, (kind, payload))
        return [r.stats for r in self.replicas]

    def shutdown(self) -> None:
        self._finalizer()

    # ---- failures ----------------------------------------------------------------------------
    def _watch(self, busy: list[_Replica]) -> None:
        now = time.monotonic()
        for replica in busy:
            if replica.proc.exitcode is not None:
                self._fail(replica, f"exited with code {replica.proc.exitcode}")
            if now - replica.step_started > self.args.step_timeout:
                self._fail(replica, f"did not finish a step within step_timeout={self.args.step_timeout:g}s")
        self._check_heartbeats(busy)

    def _check_heartbeats(self, replicas: list[_Replica]) -> None:
        now, limit = time.monotonic(), self.args.worker_timeout
        for replica in replicas:
            beat = self.heartbeats[replica.index]
            if beat and now - beat > limit:
                self._fail(replica, f"has not responded for more than worker_timeout={limit:g}s (hung or stopped)")

    def _send(self, replica: _Replica, message) -> None:
        try:
            replica.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._fail(replica, f"exited with code {replica.proc.exitcode}")

    def _receive(self, replica: _Replica, when: str):
        try:
            return replica.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            replica.proc.join(timeout=5)
            self._fail(replica, f"exited with code {replica.proc.exitcode} {when}")

    def _fail(self, replica: _Replica, what: str):
        self.failure = WorkerFailure(f"{replica.name()} {what}; every replica is stopped")
        if replica.proc.exitcode is None:   # it failed: no orderly stop to wait for
            replica.proc.kill()
        self._owner.clear()
        self._finalizer()
        raise self.failure

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise self.failure

    # ---- reporting ---------------------------------------------------------------------------
    def describe(self) -> str:
        return (f"{self._replica_describe}{self.describe_parallel()}; all started in "
                f"{self.load_seconds:.1f}s")

    def describe_parallel(self) -> str:
        threads = f"CPU, {self._threads} thread{'s' if self._threads != 1 else ''}"
        where = ", ".join(f"{r.index}: {f'GPUs {r.gpus}' if r.gpus else threads}" for r in self.replicas)
        auto = (f", chosen by parallel=auto, goal {self.args.goal}, because {self.layout.reason}"
                if self.layout is not None else "")
        return (f" | data parallel: {len(self.replicas)} replicas as above, each a process with its own "
                f"scheduler and KV cache (replica {where}); a request goes to the one with the fewest "
                f"unfinished sequences, round robin among equals{auto}")

    def describe_kv_dtype(self) -> str:
        return self._kv_dtype


def _check_data_parallel(args: EngineArgs, source, device) -> None:
    size = args.data_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"data_parallel_size must be an int >= 1, got {args.data_parallel_size!r}")
    if source.kind == "hf_object":
        raise ValueError("data parallelism needs a model path (each replica loads its own copy); an "
                         "in-memory transformers model runs in one process")
    if any(v is not None for v in (args.gpu_memory_budget, args.cpu_memory_budget, args.offload_dir)):
        raise ValueError("offloading (gpu_memory_budget / cpu_memory_budget / offload_dir) runs one "
                         f"engine on one device; got data_parallel_size {args.data_parallel_size}")
    if device.type == "cuda" and device.index is not None:
        raise ValueError(f"data parallelism places its replicas on the GPUs itself: use device='cuda', "
                         f"not {str(device)!r} (CUDA_VISIBLE_DEVICES narrows the GPUs it may use)")
    from strata.executor.torchrun import torchrun_rank
    if torchrun_rank() is not None:
        raise ValueError("data_parallel_size > 1 starts its replicas itself; under torchrun run one "
                         "engine per torchrun job instead")


def _gpu_groups(size: int, per_replica: int, device) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each copy: consecutive groups of the GPUs this process sees."""
    if device.type != "cuda":
        return [None] * size
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v.strip() for v in visible.split(",") if v.strip()] if visible
           else [str(i) for i in range(torch.cuda.device_count())])
    if size * per_replica > len(ids):
        raise ValueError(f"data_parallel_size {size} x {per_replica} GPUs per replica (tensor x pipeline "
                         f"parallel) = {size * per_replica} GPUs, but {len(ids)} are visible")
    return [",".join(ids[i * per_replica:(i + 1) * per_replica]) for i in range(size)]


@contextlib.contextmanager
def environment(**values: str | None):
    """Set (or, for None, leave alone) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop_replicas(replicas: list[_Replica]) -> None:
    for r in replicas:
        try:
            r.conn.send(("shutdown",))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
    deadline = time.monotonic() + 10
    for r in replicas:
        r.proc.join(timeout=max(0.1, deadline - time.monotonic()))
        if r.proc.exitcode is None:
            r.proc.kill()
            r.proc.join(timeout=5)
        r.conn.close()


# ---- inside a copy's process ---------------------------------------------------------------------
def replica_main(spec: ReplicaSpec, conn, heartbeats) -> None:
    import threading

    import torch
    threading.Thread(target=heartbeat, args=(heartbeats, spec.index), daemon=True).start()
    torch.set_num_threads(spec.num_threads)
    _setup_replica_logging(spec.index)
    try:
        engine = LLMEngine(spec.args, use_tqdm=spec.progress, layout=spec.layout)
    except BaseException as e:
        conn.send(("error", _summary(e)))
        return
    conn.send(("ready", ReplicaReport(engine.describe(), engine.scheduler_config, engine.num_blocks,
                                      engine.kv_block_bytes, engine.facts, engine.parallel_config,
                                      engine.describe_kv_dtype())))
    try:
        _serve(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass   # the front is gone
    except BaseException as e:
        try:
            conn.send(("error", _summary(e)))
        except OSError:
            pass
    finally:
        engine.shutdown()


def _serve(engine: LLMEngine, conn) -> None:
    while True:
        # Idle: sleep until the front sends something; busy: take what is there and step.
        while conn.poll(None if not engine.has_unfinished_requests() else 0):
            message = conn.recv()
            kind = message[0]
            if kind == "shutdown":
                return
            if kind == "add":
                engine.add_request(*message[1:])
            elif kind == "abort":
                engine.abort_request(message[1])
            elif kind == "stats":
                conn.send(("stats", engine.stats()))
        if engine.has_unfinished_requests():
            outputs = engine.step()
            conn.send(("step", (outputs, engine.stats())))


def _summary(e: BaseException) -> str:
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    return last if not isinstance(e, KeyboardInterrupt) else "interrupted"


def _setup_replica_logging(index: int) -> None:
    root = logging.getLogger("strata")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[replica {index}] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
