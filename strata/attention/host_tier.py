"""Attention for a layer whose KV cache lives in host RAM (offloading's KV tier, FlexGen's CPU
delegation): the cache never crosses PCIe, only this step's q, k, v and the output do.

The layer's q, k, v are computed (and rotated) on the compute device. Then ``start`` queues:
- rows whose whole context is this step's query (a fresh prompt) attend on the device at once,
  over the k and v already there;
- on a side stream, k and v (and the other rows' queries, as float32) go down into a pinned
  staging buffer, and an event marks their arrival;
- one worker thread (FIFO, so each layer's cache writes and reads keep the step order) waits for
  that event, writes k and v into the host cache at the step's slots (the same block tables
  address every layer's cache, whichever tier holds it), and for every other row (decodes, a
  prompt chunk after a cached prefix) attends on the CPU over its cached context
  (kernels/cpu_host_attention.c reads a 16-bit cache, or kv_cache_dtype int8's codes and
  scales, in place with several threads; torch_ref where the C kernels are not built or a chunk
  is long) into the staging buffer. An int8 cache's k and v are quantized on the device, so
  codes and scales are what go down.
``start`` returns at once: the GPU goes on with other micro-batches (runner/offload_loop.py runs
the next micro-batch's q/k/v and this one's MLP while the CPU attends). ``result()`` waits for the
worker, then queues the copy of the CPU rows' output up on the compute stream, so the o_proj
after it never reads it before it arrives; a micro-batch of fresh prompts only has no CPU rows
and does not wait (nothing reads its cache write before the worker's next task). A staging
buffer is reused only after its task is done and (GPU) its output has left it.

On a CPU-only machine both "tiers" are RAM: the same steps run through the worker thread (no
copies, no events), which is how the tests check them, with a delay injected, against the
resident cache.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from strata.attention import torch_ref
from strata.attention.backend import AttentionMetadata
from strata.core.offload_policy import HOST_STAGING_BUFFERS
from strata.kernels import cpu_ops
from strata.quant.kv import KVCacheFormat, dequantize_kv, quantize_kv
from strata.runner.host_memory import host_buffer
from strata.sample.sampler import host_to_device

C_MAX_QUERY = 64   # query tokens per sequence up to which the CPU attends with the C kernel
ALIGN = 64
# buffers in flight: two micro-batches' results plus fresh prompts' KV writes (the plan counts them)
MAX_STAGING = HOST_STAGING_BUFFERS


class _Staging:
    """A pinned host buffer (pageable on a CPU-only machine) and what still uses it."""

    def __init__(self, nbytes: int, pinned: bool):
        # exactly nbytes, unpinned when replaced (runner/host_memory.py; the offload plan counts
        # MAX_STAGING of them: core/offload_policy.host_step_bytes)
        self.buf = host_buffer(nbytes, pinned)
        self.task: Future | None = None          # the worker's task reading / writing it
        self.consumed: torch.cuda.Event | None = None   # the H2D copy of its output, on the device
        self.awaiting_result = False             # its output has not been taken by result() yet

    def free(self) -> bool:
        return (not self.awaiting_result and (self.task is None or self.task.done())
                and (self.consumed is None or self.consumed.query()))

    def wait(self) -> None:
        if self.task is not None:
            self.task.exception()   # errors surface at result() / drain(), not here
        if self.consumed is not None:
            self.consumed.synchronize()

    def views(self, shapes_dtypes) -> list[torch.Tensor]:
        outs, offset = [], 0
        for shape, dtype in shapes_dtypes:
            nbytes = _nbytes(shape, dtype)
            outs.append(self.buf[offset: offset + nbytes].view(dtype).view(shape))
            offset += -(-nbytes // ALIGN) * ALIGN
        return outs


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class PendingAttention:
    """One micro-batch's host-tier attention in flight; ``result()`` -> [n, heads, head_dim] on
    the compute device, usable by the kernels queued after the call."""

    def __init__(self, out: torch.Tensor, task: Future, staging: _Staging, out_host: torch.Tensor | None,
                 token_index: torch.Tensor | None):
        self.out = out
        self.task = task
        self.staging = staging
        self.out_host = out_host        # the CPU rows' output, written by the task
        self.token_index = token_index  # their tokens in out (None: every token)

    @property
    def waits_for_cpu(self) -> bool:
        """Whether result() waits for the CPU's attention (some rows attend there)."""
        return self.out_host is not None

    def result(self) -> torch.Tensor:
        if self.out_host is None:
            # Fresh prompts only: their output was computed on the device, and the task only
            # writes their K/V into the host cache, which nothing reads before the worker (FIFO)
            # has done so. Waiting for it here held the host thread until the GPU had reached
            # this micro-batch and left it nothing queued: a prefill ran at the sum of the
            # host's and the GPU's time. Its errors surface at drain(), at the pass's end.
            return self.out
        try:
            self.task.result()   # raises what the worker raised
        finally:
            self.staging.awaiting_result = False
        rows = self.out_host.to(self.out.device, non_blocking=True).to(self.out.dtype)
        if self.out.is_cuda:   # the staging buffer is free once this copy has read it
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.out.device))
            self.staging.consumed = event
        if self.token_index is None:
            self.out.copy_(rows)
        else:
            self.out[self.token_index] = rows
        return self.out


class HostAttentionWorker:
    """The host side of host-tier attention: one thread, staging buffers, a D2H stream.
    ``delay_s`` makes every task slow on purpose (tests: nothing may use a result before it is
    there)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-host-attn")
        self._staging: list[_Staging] = []
        self._tasks: deque[Future] = deque()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self.tasks_run = 0
        # Where the worker's time goes (benchmarks compare the rate it reached with the policy's
        # startup probe): seconds waiting for the copies down, writing K/V, attending; KV bytes read.
        self.stats = {"wait_s": 0.0, "write_s": 0.0, "attend_s": 0.0, "attend_bytes": 0}
        self._lock = threading.Lock()

    def start(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
              meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> PendingAttention:
        """q [n, heads, head_dim], k/v [n, kv_heads, head_dim] (rotated, on the compute device);
        kv_cache [2, num_blocks, block_size, kv_heads, head_dim] in host RAM, int8 codes when
        kv_scales [2, num_blocks, block_size, kv_heads] (float32, host RAM) is given: k and v are
        then quantized on the device (strata.quant.kv, as a device cache's writer does), their
        codes and scales go down, and fresh prompts attend over the dequantized values, as they
        would over a quantized device cache."""
        host = host_copies(meta)
        out = torch.empty_like(q)
        writes = [k, v]   # what goes down and into the cache: values, or codes then scales
        if kv_scales is not None:
            (kc, ks), (vc, vs) = quantize_kv(k, kv_cache.dtype), quantize_kv(v, kv_cache.dtype)
            writes = [kc, vc, ks, vs]
        # which rows attend where: the same in every layer of the step, so worked out once
        split = host.get("host_tier_split")
        if split is None:
            split = host["host_tier_split"] = _split_rows(meta, host, q.device)
        rows, fresh, token_index, sub = split
        if fresh and kv_scales is not None:   # they see the values the cache keeps
            k, v = dequantize_kv(kc, ks, k.dtype), dequantize_kv(vc, vs, v.dtype)
        for a, n, length in fresh:
            fresh_prompts_attention(q, k, v, out, a, n, length, scale)
        q_rows = (q if token_index is None else q[token_index]) if rows else None
        shapes = [(tuple(t.shape), t.dtype) for t in writes]
        if rows:
            shapes += [(tuple(q_rows.shape), torch.float32)] * 2   # queries down, output up
        staging = self._acquire(sum(-(-_nbytes(s, d) // ALIGN) * ALIGN for s, d in shapes), q.is_cuda)
        views = staging.views(shapes)
        arrived = None
        sources = writes + ([q_rows.float()] if rows else [])
        if q.is_cuda:
            arrived = self._copy_down(q.device, sources, views)
            sources = views[:len(sources)]
        out_host = views[-1] if rows else None
        task = self._pool.submit(self._run, arrived, sources, out_host, kv_cache, kv_scales, host["slot_mapping"],
                                 sub, scale, q.is_cuda)
        staging.task, staging.awaiting_result = task, rows != []
        with self._lock:
            self._tasks.append(task)
        return PendingAttention(out, task, staging, out_host, token_index)

    def _copy_down(self, device: torch.device, srcs: list[torch.Tensor], dsts: list[torch.Tensor]):
        """srcs (device) -> dsts (pinned) on a side stream, after the work queued so far on the
        compute stream; returns the arrival event."""
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        produced = torch.cuda.Event()
        produced.record(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            stream.wait_event(produced)
            for src, dst in zip(srcs, dsts):
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)   # its memory is not reused before the copy has read it
            arrived = torch.cuda.Event()
            arrived.record(stream)
        return arrived

    def _run(self, arrived, sources, out_host, kv_cache, kv_scales, slot_mapping, sub, scale, on_cuda) -> None:
        """Worker thread: wait for the copies, write the cache (sources: k, v, [k and v scales],
        [queries]), attend for the CPU rows. (Inference mode is per thread: the step's tensors and
        the cache may be inference tensors.)"""
        if self.delay_s:
            time.sleep(self.delay_s)
        t0 = time.perf_counter()
        if arrived is not None:
            arrived.synchronize()
        t1 = time.perf_counter()
        threads = attention_threads(on_cuda)
        with torch.inference_mode():
            write_kv(kv_cache, sources[0], sources[1], slot_mapping, threads)
            if kv_scales is not None:   # a scale per (slot, head): rows of one "element" of kv_heads
                write_kv(kv_scales.unsqueeze(-1), sources[2].unsqueeze(-1), sources[3].unsqueeze(-1), slot_mapping,
                         threads)
            t2 = time.perf_counter()
            if sub is not None:
                out_host.copy_(cpu_attend(sources[-1], kv_cache, sub, scale, threads, kv_scales))
        t3 = time.perf_counter()
        stats = self.stats
        stats["wait_s"] += t1 - t0
        stats["write_s"] += t2 - t1
        stats["attend_s"] += t3 - t2
        if sub is not None:
            _, _, _, kv_heads, head_dim = kv_cache.shape
            token_bytes = 2 * kv_heads * (head_dim * kv_cache.element_size() + (4 if kv_scales is not None else 0))
            stats["attend_bytes"] += sum(sub.seq_lens_cpu) * token_bytes
        self.tasks_run += 1

    def _acquire(self, nbytes: int, pinned: bool) -> _Staging:
        """A free staging buffer of at least nbytes; when all are busy, the oldest whose output
        is not waiting for a result() call is waited for."""
        while True:
            free = [s for s in self._staging if s.free()]
            for s in free:
                if s.buf.numel() >= nbytes:
                    s.task, s.consumed = None, None
                    return s
            if free or len(self._staging) < MAX_STAGING:
                if free:   # too small: a larger one in its place
                    self._staging.remove(free[0])
                s = _Staging(max([nbytes] + [2 * f.buf.numel() for f in free[:1]]), pinned)
                self._staging.append(s)
                return s
            waitable = [s for s in self._staging if not s.awaiting_result]
            if not waitable:
                raise RuntimeError(f"host attention: all {MAX_STAGING} staging buffers hold outputs no "
                                   "result() has taken (too many micro-batches in flight)")
            waitable[0].wait()
            self._staging.remove(waitable[0])
            self._staging.append(waitable[0])

    def thread_id(self) -> int:
        """The worker thread's native id (benchmarks account its CPU time; /proc/self/task/ID)."""
        return self._pool.submit(threading.get_native_id).result()

    def drain(self) -> None:
        """Wait for every task queued so far; raise the first error one hit."""
        error = None
        with self._lock:
            tasks, self._tasks = list(self._tasks), deque()
        for task in tasks:
            exc = task.exception()
            error = error or exc
        if error is not None:
            raise error

    def reset(self) -> None:
        """After a pass that failed half way: let the tasks in flight finish, forget their
        outputs (no result() will take them) and their errors."""
        with self._lock:
            tasks, self._tasks = list(self._tasks), deque()
        for task in tasks:
            task.exception()
        for s in self._staging:
            s.awaiting_result = False


_WORKER: list[HostAttentionWorker] = []   # one per process, made on first use


def worker() -> HostAttentionWorker:
    if not _WORKER:
        _WORKER.append(HostAttentionWorker())
    return _WORKER[0]


def stores(kv_format: KVCacheFormat | None) -> bool:
    """Whether the host tier keeps a cache of this format (kv_cache_dtype): the model dtype, or int8
    codes with their scales (the CPU reads them in place); not fp8, which the CPU has no
    conversion for in registers."""
    return kv_format is None or kv_format.dtype == torch.int8


def zeros_cache(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A host-tier cache [2, blocks, block_size, kv_heads, head_dim] (or its int8 scales
    [2, blocks, block_size, kv_heads]) of zeros, each block head-major: a view of [2, blocks,
    kv_heads, block_size, ...], so a decode's attention reads a head's keys in a block as one run
    (4 KiB for 16 bf16 keys of 128 values) where token-major blocks spread them over the
    block's 32 KiB (cpu_ops.block_strides; on an H100 host's 15 threads 60.1 against 56.4 GiB/s,
    bf16; int8's scales come to one line a block from eight). A float32 cache (a float32 model's)
    stays token-major: the CPU reads it with the resident path's kernel, which takes no other.

    The pages are written here (torch.zeros), so that no step pays their first-touch faults: the
    plan sized the cache for the batch it runs. (Transparent huge pages, which numpy's calloc asks
    for, attended no faster on an H100 host and took several times as long to fault in.)"""
    two, blocks, block_size, kv_heads, *rest = shape
    if dtype == torch.float32 and rest:
        return torch.zeros(shape, dtype=dtype)
    return torch.zeros(two, blocks, kv_heads, block_size, *rest, dtype=dtype).transpose(2, 3)


def attention_threads(on_cuda: bool) -> int:
    """CPU threads of the host attention: all of torch's, less one for the thread that keeps
    queueing GPU work meanwhile."""
    n = torch.get_num_threads()
    return max(1, n - 1) if on_cuda else n


def fresh_prompts_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, a: int, n: int,
                            length: int, scale: float) -> None:
    """Causal attention of n consecutive fresh prompts of `length` tokens each, from token a of
    q [tokens, heads, d] / k, v [tokens, kv_heads, d], into out: one batched call (a prefill
    micro-batch of equal prompts is one kernel, where a call per prompt with a mask tensor kept
    the host busier than the GPU: 22 of a layer's 60 ms at 94 x 512 tokens on an H100)."""
    b, heads, kv_heads, d = a + n * length, q.shape[1], k.shape[1], q.shape[2]

    def batched(t):
        return t[a:b].reshape(n, length, t.shape[1], d).transpose(1, 2)

    with sdpa_backends(q):
        o = F.scaled_dot_product_attention(batched(q), batched(k), batched(v), scale=scale, is_causal=True,
                                           enable_gqa=heads != kv_heads)
    out[a:b] = o.transpose(1, 2).reshape(n * length, heads, d)


# Fresh prompts' attention on a GPU: every backend but cuDNN's, which torch prefers on Hopper and
# which builds a graph per new shape (a prefill micro-batch holds a varying number of prompts): a
# first prefill wave's 256 calls held the host 0.12 s and the GPU 0.014 s (bench/offload_timeline.py
# --profile and --kernels, H100, 2026-11-23), and the host thread is what a prefill waits for.
_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def sdpa_backends(q: torch.Tensor):
    if not q.is_cuda:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, name) for name in _SDPA_BACKENDS])


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             threads: int) -> None:
    """The host cache's write: row copies over threads (cpu_ops.write_kv_rows), else torch_ref's
    index_copy_ (about 1.3 GiB/s: a prefill's K and V, every layer, on the CPU's critical path)."""
    if cpu_ops.library() is not None and cpu_ops.block_strides(kv_cache) is not None \
            and k.stride(-1) == 1 and v.stride(-1) == 1:
        cpu_ops.write_kv_rows(kv_cache, k, v, slot_mapping, threads)
    else:
        torch_ref.write_kv(kv_cache, k, v, slot_mapping)


def cpu_attend(q_host: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               threads: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q_host [m, heads, head_dim] float32 over a host cache -> float32 output: the C kernel (a
    16-bit cache, or int8 codes with their kv_scales, read in place), else (no C kernels, or long
    prompt chunks, where torch's SDPA is blocked like a GEMM) torch_ref."""
    if cpu_ops.library() is not None and meta.max_query_len <= C_MAX_QUERY and (
            kv_cache.dtype in (torch.float32, torch.bfloat16, torch.float16) if kv_scales is None
            else kv_cache.dtype == torch.int8):
        return cpu_ops.host_paged_attention(q_host, kv_cache, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, scale, threads, kv_scales)
    if kv_scales is not None:   # codes dequantized to the query's float32
        return torch_ref.paged_attention(q_host, kv_cache, meta, scale, kv_scales)
    return torch_ref.paged_attention(q_host.to(kv_cache.dtype), kv_cache, meta, scale).float()


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """start(...).result(): for callers with nothing to overlap."""
    return worker().start(q, k, v, kv_cache, meta, scale, kv_scales).result()


def _split_rows(meta: AttentionMetadata, host: dict, device: torch.device):
    """(rows, fresh, token_index, sub) of a step's (micro-batch's) metadata: the rows that attend
    on the CPU (decodes, chunks after a cached prefix), runs of fresh prompts [first token,
    prompts, length] (the device attends for them), the CPU rows' tokens on the device (None when
    they are all the tokens) and their metadata on host tensors (None without CPU rows)."""
    starts = meta.query_start_loc_cpu
    rows, fresh = [], []
    for row, (q_len, ctx_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len > 1 and q_len == ctx_len:   # a fresh prompt: its context is on the device already
            if fresh and fresh[-1][2] == q_len and fresh[-1][0] + fresh[-1][1] * q_len == starts[row]:
                fresh[-1][1] += 1
            else:
                fresh.append([starts[row], 1, q_len])
        else:
            rows.append(row)
    token_index = None
    if rows and rows != list(range(meta.num_seqs)):
        # through pinned memory: a pageable copy would wait for the GPU work queued so far
        token_index = host_to_device([t for r in rows for t in range(starts[r], starts[r + 1])], torch.int64, device)
    return rows, fresh, token_index, _sub_metadata(meta, host, rows) if rows else None


def _sub_metadata(meta: AttentionMetadata, host: dict, rows: list[int]) -> AttentionMetadata:
    """The CPU rows' metadata, on host tensors."""
    query_lens = [meta.query_lens_cpu[r] for r in rows]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    index = torch.tensor(rows)
    return AttentionMetadata(
        num_tokens=starts[-1], slot_mapping=host["slot_mapping"][:0],
        block_tables=host["block_tables"].index_select(0, index).contiguous(),
        seq_lens=host["seq_lens"].index_select(0, index), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens_cpu=[meta.seq_lens_cpu[r] for r in rows], query_lens_cpu=query_lens,
        query_start_loc_cpu=starts, block_size=meta.block_size,
        decode_rows=[i for i, n in enumerate(query_lens) if n == 1],
        prefill_rows=[i for i, n in enumerate(query_lens) if n != 1], max_query_len=max(query_lens))


def host_copies(meta: AttentionMetadata) -> dict:
    """Host copies of the step's slot mapping, block tables and sequence lengths. The runner
    fills them as it builds the step (runner/input_batch.py, offload_loop.split_metadata); made
    here only for metadata built elsewhere (a blocking copy)."""
    if not meta.host_copies:
        meta.host_copies.update(slot_mapping=meta.slot_mapping.to("cpu"), block_tables=meta.block_tables.to("cpu"),
                                seq_lens=meta.seq_lens.to("cpu"))
    return meta.host_copies
