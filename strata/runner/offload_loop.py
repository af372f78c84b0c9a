"""The layer loop of an offloaded model, and what the offload policy needs to know about the
model and the machine.

``OffloadLayerLoop`` replaces the model's plain loop (models/layer_loop.py). A step's sequences
are cut into micro-batches of at most ``micro_batch_tokens`` tokens (a sequence is never cut);
every micro-batch passes layer i before any passes layer i+1, so layer i's weights are fetched
once per step for all of them (FlexGen's block schedule) while the activations of only one
micro-batch are alive inside a layer. Each micro-batch attends with its own slice of the step's
attention metadata.
"""

from __future__ import annotations

import itertools
import mmap
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from strata.attention import host_tier
from strata.attention.backend import AttentionMetadata
from strata.config import ModelConfig
from strata.core.offload_policy import Hardware, ModelSpec
from strata.forward_context import get_attn_metadata, set_forward_context
from strata.quant.kv import KVCacheFormat, kv_cache_bytes_per_slot, quantize_kv
from strata.runner.host_memory import host_buffer
from strata.runner.offload_mover import OffloadMover, layer_layout
from strata.sample.sampler import host_to_device


class OffloadLayerLoop:
    """split_single_part: cut a step that fits one micro-batch into two when layers keep their KV
    cache in host RAM, so that the CPU attends for one half while the GPU computes the other's
    projections (on a GPU; on the CPU both halves would compete for the same cores)."""

    def __init__(self, mover: OffloadMover, micro_batch_tokens: int, split_single_part: bool = False):
        self.mover = mover
        self.micro_batch_tokens = micro_batch_tokens
        self.split_single_part = split_single_part

    def run(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
            intermediate: Carry | None = None) -> torch.Tensor:
        if intermediate is not None:   # the engine refuses offloading with pipeline stages
            raise RuntimeError("offloading runs the whole model in one process (no pipeline stages)")
        meta = get_attn_metadata()
        host_kv = any(_kv_on_host(model, layer) for layer in model.layers)
        # With host-KV layers, rows that attend on the CPU (decodes, chunks after a cached prefix)
        # and fresh prompts (the GPU attends) go to separate micro-batches: in a mixed one the
        # decode rows' queries would reach the CPU only after the prompts' projections, and their
        # output would hold up the prompts' MLP (a stream's prefill wave step: decode rows first,
        # then the prompts, which the GPU runs while the CPU attends for the decodes).
        spans = micro_batch_spans(meta.query_lens_cpu, self.micro_batch_tokens,
                                  _fresh_rows(meta) if host_kv else None)
        if len(spans) == 1 and meta.num_seqs > 1 and self.split_single_part and host_kv:
            spans = [(0, meta.num_seqs // 2), (meta.num_seqs // 2, meta.num_seqs)]
        # Each part embeds its own tokens: its embedding output is freed as soon as layer 0 has
        # replaced it, where views of one step-wide output kept it all alive through layer 0 (a
        # third copy of the step's hidden states at its end; core/offload_policy.activation_bytes).
        if len(spans) == 1:
            parts = [(meta, positions, model.embed(input_ids, positions))]
        else:
            parts = []
            for a, b in spans:
                part_pos = _slice(positions, meta, a, b)
                parts.append((split_metadata(meta, a, b, positions.device), part_pos,
                              model.embed(_slice(input_ids, meta, a, b), part_pos)))
        mover = self.mover
        try:
            mover.begin_pass()
            pipeline = _HostKVPipeline(model, parts, mover)
            for index, layer in enumerate(model.layers):
                mover.before_layer(index)
                if _kv_on_host(model, layer):
                    pipeline.layer(index, layer)   # its after_layer comes with its last output
                    continue
                pipeline.flush()
                for k, (part_meta, part_pos, part_carry) in enumerate(parts):
                    with set_forward_context(part_meta):
                        parts[k] = (part_meta, part_pos, model.layer_forward(layer, part_pos, part_carry))
                mover.after_layer(index)
            pipeline.flush()
            host_tier.worker().drain()   # the last host-cache writes are done and none failed
        except BaseException:
            mover.reset()
            host_tier.worker().reset()
            raise
        return _finish(model, parts)


def _kv_on_host(model: nn.Module, layer: nn.Module) -> bool:
    attn = getattr(getattr(layer, "self_attn", None), "attn", None)
    return getattr(attn, "kv_on_host", False) and hasattr(model, "split_layer_forward")


class _HostKVPipeline:
    """Layers whose KV cache is in host RAM, FlexGen's CPU delegation overlapped: each part's
    q/k/v are computed and its host side queued (attention/host_tier.py: copies down on a side
    stream, the CPU attends in a worker thread) before the output of a part that waits for the
    CPU is taken, so the CPU attends for one part while the GPU computes the next one's
    projections and the previous one's MLP, and the copy stream brings the next layers' weights.

    Which outputs are taken when: a part of fresh prompts only waits for nothing (the GPU
    attended for it; the CPU only writes its K/V), so its output is taken as soon as it has
    started. Of the parts that wait for the CPU (decode rows, chunks after a cached prefix) the
    newest stays pending and the one before it is taken. A part that waits therefore stays in
    flight through every fresh part after it (a prefill wave's step: its decode rows attend on
    the CPU while the GPU runs the wave's prompts), and the overlap runs on across consecutive
    host-KV layers: part 0 of layer i+1 starts before the last waiting part of layer i is taken,
    so the worker always has the next task queued. A layer's weight slot is released (by
    after_layer) once all its parts are taken. A part is never started before its own previous
    layer's output is taken. Each output is taken with result(), which queues its copy up before
    the o_proj that reads it (no use before arrival)."""

    def __init__(self, model: nn.Module, parts: list, mover: OffloadMover):
        self.model, self.parts, self.mover = model, parts, mover
        self.pending = []   # [(layer index, part index, PendingAttention, resume)], oldest first
        self.untaken = {}   # layer index -> its parts not taken yet

    def layer(self, index: int, layer: nn.Module) -> None:
        parts = self.parts
        self.untaken[index] = len(parts)
        for k, (part_meta, part_pos, part_carry) in enumerate(parts):
            for item in [p for p in self.pending if p[1] == k]:
                self._take(item)   # this part's input is the output still pending
                part_carry = parts[k][2]
            with set_forward_context(part_meta):
                attn, (q, key, value), resume = self.model.split_layer_forward(layer, part_pos, part_carry)
                self.pending.append((index, k, attn.start(q, key, value, part_pos), resume))
            parts[k] = (part_meta, part_pos, None)   # resume holds what it needs of the carry
            del q, key, value, part_carry
            waiting = [p for p in self.pending if p[2].waits_for_cpu]
            for item in [p for p in self.pending if not p[2].waits_for_cpu] + waiting[:-1]:
                self._take(item)

    def flush(self) -> None:
        for item in list(self.pending):
            self._take(item)

    def _take(self, item) -> None:
        index, k, handle, resume = item
        self.pending.remove(item)
        part_meta, part_pos, _ = self.parts[k]
        with set_forward_context(part_meta):
            self.parts[k] = (part_meta, part_pos, resume(handle.result().flatten(1)))
        self.untaken[index] -= 1
        if not self.untaken[index]:   # the layer's last output: its weights are free
            del self.untaken[index]
            self.mover.after_layer(index)


def _fresh_rows(meta: AttentionMetadata) -> list[bool]:
    """Per row: a fresh prompt (its whole context is this step's query), which attends on the
    device even in a host-KV layer (attention/host_tier.py's rule)."""
    return [q > 1 and q == ctx for q, ctx in zip(meta.query_lens_cpu, meta.seq_lens_cpu)]


def micro_batch_spans(query_lens: list[int], max_tokens: int,
                      kinds: list | None = None) -> list[tuple[int, int]]:
    """Consecutive rows [a, b) holding at most max_tokens tokens each (a longer row alone);
    kinds: per row, a key that also starts a new span wherever it changes."""
    spans, start, tokens = [], 0, 0
    for row, n in enumerate(query_lens):
        if row > start and (tokens + n > max_tokens or (kinds is not None and kinds[row] != kinds[row - 1])):
            spans.append((start, row))
            start, tokens = row, 0
        tokens += n
    spans.append((start, len(query_lens)))
    return spans


def split_metadata(meta: AttentionMetadata, a: int, b: int, device: torch.device) -> AttentionMetadata:
    t0, t1 = meta.query_start_loc_cpu[a], meta.query_start_loc_cpu[b]
    query_lens = meta.query_lens_cpu[a:b]
    starts = [s - t0 for s in meta.query_start_loc_cpu[a: b + 1]]
    host = meta.host_copies
    return AttentionMetadata(
        num_tokens=t1 - t0, slot_mapping=meta.slot_mapping[t0:t1], block_tables=meta.block_tables[a:b],
        seq_lens=meta.seq_lens[a:b], query_start_loc=host_to_device(starts, torch.int32, device),
        seq_lens_cpu=meta.seq_lens_cpu[a:b], query_lens_cpu=query_lens, query_start_loc_cpu=starts,
        block_size=meta.block_size, decode_rows=[r for r, n in enumerate(query_lens) if n == 1],
        prefill_rows=[r for r, n in enumerate(query_lens) if n != 1], max_query_len=max(query_lens),
        host_copies={} if not host else dict(slot_mapping=host["slot_mapping"][t0:t1],
                                             block_tables=host["block_tables"][a:b], seq_lens=host["seq_lens"][a:b]))


def _slice(t: torch.Tensor | None, meta: AttentionMetadata, a: int, b: int) -> torch.Tensor | None:
    return None if t is None else t[meta.query_start_loc_cpu[a]: meta.query_start_loc_cpu[b]]


def _finish(model: nn.Module, parts: list) -> torch.Tensor:
    """The final norm part by part, each part's carry freed as soon as it is done: concatenating
    the carries first held two more copies of the step's hidden states at once (the 0.27 GiB by
    which a 4 GiB budget was overrun at a prefill of 23 x 512 tokens)."""
    outs = []
    for k in range(len(parts)):
        carry = parts[k][2]
        parts[k] = None
        outs.append(model.finish(carry))
        del carry
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class HostEmbedding(nn.Module):
    """An untied token embedding kept in host RAM: a lookup reads num_tokens rows there and sends
    only those to the device (Llama-3-8B's table is 1 GiB of bf16 that a GPU budget can spare).

    The rows are gathered straight into a page-locked buffer made once for the largest step
    (``max_tokens``) and copied up from it asynchronously: pinning each step's rows instead cost
    a 394 MB page-locked allocation (0.27 s on an H100 host) in the first large prefill, and a
    second pass over the rows in every step."""

    def __init__(self, embedding: nn.Module, device: torch.device, max_tokens: int = 0):
        super().__init__()
        self.inner = embedding
        self.device = device
        self._rows: torch.Tensor | None = None   # [capacity, hidden], pinned
        self._next = 0                           # where the next lookup writes
        self._sent: torch.cuda.Event | None = None   # the last copy up has read its rows
        if device.type == "cuda" and max_tokens > 0:
            self._reserve(max_tokens)

    def _reserve(self, num_tokens: int) -> None:
        weight = self.inner.weight
        if self._sent is not None:
            self._sent.synchronize()   # the old buffer's last copy is done before it goes
        self._rows, self._next = None, 0
        nbytes = num_tokens * weight.shape[1] * weight.element_size()
        self._rows = host_buffer(nbytes, pinned=True).view(weight.dtype).view(num_tokens, weight.shape[1])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        if self.device.type != "cuda":
            return self.inner(ids).to(self.device)
        n = ids.numel()
        if self._rows is None or self._rows.shape[0] < n:
            self._reserve(n)
        if self._next + n > self._rows.shape[0]:
            # Back to the start: every copy up so far (one stream, in order) must have read its rows.
            if self._sent is not None:
                self._sent.synchronize()
            self._next = 0
        rows = self._rows[self._next: self._next + n]
        self._next += n   # a step's parts, looked up one after another, take successive regions
        torch.index_select(self.inner.weight, 0, ids, out=rows)
        out = rows.to(self.device, non_blocking=True)
        self._sent = torch.cuda.Event()
        self._sent.record()
        return out


def host_embedding_ok(model: nn.Module, device: torch.device) -> bool:
    """The embedding may stay on the host when the model runs on a GPU and the LM head does not
    share its table."""
    emb = getattr(model, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    return (device.type == "cuda" and emb is not None and getattr(emb, "packed", None) is None
            and (head is None or getattr(head, "weight", None) is not emb.weight))   # a quantized head has none


def place_outside_layers(model: nn.Module, device: torch.device, embed_on_host: bool, max_tokens: int = 0) -> None:
    """Everything but the decoder layers goes to the device (the embedding maybe kept on host,
    with a staging buffer for steps of up to max_tokens tokens)."""
    for name, child in model.named_children():
        if name == "layers" or (name == "embed_tokens" and embed_on_host):
            continue
        child.to(device)
    if embed_on_host:
        model.embed_tokens = HostEmbedding(model.embed_tokens, device, max_tokens)


def model_spec(model: nn.Module, cfg: ModelConfig, embed_on_host: bool,
               template: nn.Module | None = None, kv_format: KVCacheFormat | None = None) -> ModelSpec:
    """template: a loaded, finished layer (its quantized form is what streams); default the first.
    kv_format: a quantized KV cache (kv_cache_dtype), both tiers' bytes per token."""
    template = template if template is not None else model.layers[0]
    _, layer_bytes = layer_layout(template)
    layer_params = sum(p.numel() for p in template.parameters())
    layer_ids = {id(p) for p in model.layers.parameters()}
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in layer_ids]
    host = sum(p.numel() * p.element_size() for n, p in others if embed_on_host and n.startswith("embed_tokens"))
    buffers = {id(b): b.numel() * b.element_size() for b in model.buffers()}   # shared tables once
    device = sum(p.numel() * p.element_size() for _, p in others) - host + sum(buffers.values())
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    return ModelSpec(num_layers=len(model.layers), layer_bytes=layer_bytes, layer_params=layer_params,
                     device_bytes=device, host_bytes=host, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                     kv_bytes_per_token=cfg.num_layers * kv_cache_bytes_per_slot(cfg.num_kv_heads, cfg.head_dim,
                                                                                 cfg.dtype, kv_format),
                     dtype_bytes=elem, kv_dim=cfg.num_kv_heads * cfg.head_dim)


def measure_hardware(device: torch.device, dtype: torch.dtype, offload_dir: str | None,
                     disk_probe_bytes: int = 16 * 2**20, cfg: ModelConfig | None = None,
                     kv_format: KVCacheFormat | None = None) -> Hardware:
    """Quick measurements at startup: pinned host -> device copies, the disk tier's read rate
    (disk_read_rate: one layer's bytes through the mover's own read path, when the disk tier may
    be used), a matmul, a device copy and (GPU, given the model's heads) the CPU's decode
    attention over a host KV cache (stored as kv_format says)."""
    disk = disk_read_rate(offload_dir, disk_probe_bytes, pinned=device.type == "cuda")
    if device.type != "cuda":
        n = 512
        a = torch.randn(n, n, dtype=torch.float32)
        flops = 2 * n**3 / _median_s(lambda: a @ a)
        # Exact mappings, unmapped when done: clones from malloc stayed in its heap as RSS.
        src, dst = host_buffer(8 * 2**20, False), host_buffer(8 * 2**20, False)
        src.fill_(1)
        mem = 2 * src.numel() / _median_s(lambda: dst.copy_(src))
        del src, dst
        return Hardware("cpu", float("inf"), disk, flops, mem)
    # host_memory: freed for real when done (torch's pinned allocator would keep it cached)
    host = host_buffer(256 * 2**20, pinned=True)
    dev = torch.empty_like(host, device=device)
    h2d = host.numel() / _median_cuda_s(lambda: dev.copy_(host, non_blocking=True))
    mem = 2 * dev.numel() / _median_cuda_s(lambda: dev.clone())
    n = 4096
    a = torch.randn(n, n, dtype=dtype, device=device)
    flops = 2 * n**3 / _median_cuda_s(lambda: a @ a)
    del a
    cpu_attn = contended = cpu_write = 0.0
    if cfg is not None:
        # While the weight stream runs, as it does in a step: the copies read host memory too,
        # and the first 16 are timed: the copy rate while the host attends (on an H100 host the
        # steps' copies ran well below the idle rate beside an attention at 29 GiB/s). They read
        # STREAM_SOURCE_BYTES of distinct buffers, as a step's copies read GiBs of layers from
        # memory: one 256 MiB buffer copied again and again could be served by a last-level
        # cache (300 MiB on the H100 hosts) and leave the attention's memory alone.
        sources = [host] + [host_buffer(host.numel(), pinned=True)
                            for _ in range(STREAM_SOURCE_BYTES // host.numel() - 1)]
        side = torch.cuda.Stream(device)
        first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def stream_weights():
            with torch.cuda.stream(side):
                # ~0.6 s of copies at 50 GiB/s: longer than the timed calls (4 reads of the
                # probe's 1 GiB at the 15-36 GiB/s hosts have measured)
                first.record(side)
                for i in range(128):
                    dev.copy_(sources[i % len(sources)], non_blocking=True)
                    if i == 15:
                        last.record(side)

        cpu_attn = cpu_attention_rate(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype, during=stream_weights,
                                      kv_format=kv_format)
        cpu_write = cpu_write_rate(cfg.num_kv_heads, cfg.head_dim, dtype, kv_format)   # the copies still run
        side.synchronize()
        contended = 16 * host.numel() / max(first.elapsed_time(last) / 1e3, 1e-9)
        del sources
    del host, dev
    torch.cuda.empty_cache()
    return Hardware("cuda", h2d, disk, flops, mem, cpu_attn, contended, cpu_write)


# Host KV the CPU-attention probe reads per timed call: more than a host's last-level cache.
CPU_ATTENTION_PROBE_BYTES = 1 << 30
# Host memory the weight copies beside it read from, for the same reason.
STREAM_SOURCE_BYTES = 1 << 30


def cpu_attention_rate(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       batch: int = 32, context: int = 512, block_size: int = 16, during=None,
                       kv_format: KVCacheFormat | None = None, shuffle: bool = False, threads: int | None = None,
                       reps: int = 3, token_major: bool = False) -> float:
    """KV bytes/s the host reads when decode rows attend over a host cache: layers of `batch`
    rows of `context` tokens, through the host tier's own call (attention/host_tier.cpu_attend,
    with the threads its worker uses beside a GPU). during(): started after a warm-up call and
    before the timed ones (the GPU caller queues weight copies there). kv_format: a quantized
    cache (kv_cache_dtype; its codes and scales are the bytes counted), else `dtype` values.
    shuffle: the rows' blocks in random order, not the pool's (bench/host_attention.py); threads:
    default the worker's; reps: timed calls, the median taken. The caches are laid out as the
    host tier's (host_tier.zeros_cache: head-major blocks); token_major: contiguous blocks
    instead (bench/host_attention.py compares them).

    The layers' caches add up to CPU_ATTENTION_PROBE_BYTES, so that the reads come from memory
    as a step's do: one 64 MiB layer read again and again stayed in a large last-level cache
    (three H100 runs measured 3.9, 15.9 and 36.1 GiB/s, and the plan made of 36.1 ran at 0.60
    of its prediction)."""
    from strata.attention.host_tier import attention_threads, cpu_attend, zeros_cache
    blocks = context // block_size
    values = torch.randn(2, batch * blocks + 1, block_size, num_kv_heads, head_dim)
    first = (values.to(dtype), None) if kv_format is None else quantize_kv(values, kv_format.dtype)
    del values
    layer_bytes = batch * context * kv_cache_bytes_per_slot(num_kv_heads, head_dim, dtype, kv_format)

    def laid_out(t):
        return t if t is None else t.clone() if token_major else zeros_cache(t.shape, t.dtype).copy_(t)

    caches = [tuple(laid_out(t) for t in first) for _ in range(-(-CPU_ATTENTION_PROBE_BYTES // layer_bytes))]
    del first
    ids = torch.randperm(batch * blocks) if shuffle else torch.arange(batch * blocks)
    tables = ids.to(torch.int32).view(batch, blocks)
    q = torch.randn(batch, num_heads, head_dim)
    meta = AttentionMetadata(
        num_tokens=batch, slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=tables,
        seq_lens=torch.full((batch,), context, dtype=torch.int32),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens_cpu=[context] * batch, query_lens_cpu=[1] * batch, query_start_loc_cpu=list(range(batch + 1)),
        block_size=block_size, decode_rows=list(range(batch)), prefill_rows=[])
    threads = threads or attention_threads(on_cuda=True)

    def attend():
        for cache, scales in caches:
            cpu_attend(q, cache, meta, head_dim ** -0.5, threads, scales)

    attend()
    if during is not None:
        during()
    seconds = _median_s(attend, reps=reps)
    return len(caches) * layer_bytes / seconds


def cpu_write_rate(num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_format: KVCacheFormat | None = None,
                   prompts: int = 0, prompt_len: int = 512, block_size: int = 16, reps: int = 3) -> float:
    """KV bytes/s the host tier files fresh prompts' K and V at (host_tier.write_kv: rows
    scattered over the worker's threads) into a cache of CPU_ATTENTION_PROBE_BYTES, each prompt
    into its own run of blocks at a random place, as a prefill's are. A quantized cache
    (kv_format) is timed on its codes; the cache is laid out as the host tier's
    (host_tier.zeros_cache). prompts: per timed call, default enough for a quarter of the cache,
    more than a last-level cache holds. (It reads 14-34 GiB/s on the H100 hosts; in a stream the
    engine's own writes went at 2.4-2.9 until the scatter took dynamic chunks: docs/benchmarks.md.)"""
    from strata.attention.host_tier import attention_threads, write_kv, zeros_cache
    store = dtype if kv_format is None else kv_format.dtype
    row = num_kv_heads * head_dim * torch.empty((), dtype=store).element_size()
    blocks = max(CPU_ATTENTION_PROBE_BYTES // (2 * row * block_size), 2 * prompts * prompt_len // block_size,
                 2 * prompt_len)
    cache = zeros_cache((2, blocks, block_size, num_kv_heads, head_dim), store)
    prompts = prompts or max(1, blocks // 4 // -(-prompt_len // block_size))
    tokens = prompts * prompt_len
    k, v = (torch.ones(tokens, num_kv_heads, head_dim, dtype=store) for _ in range(2))   # memcpy: any bytes
    per_prompt = -(-prompt_len // block_size)
    gen = torch.Generator().manual_seed(0)
    threads = attention_threads(on_cuda=True)

    def slots():
        starts = torch.randint(0, blocks - per_prompt, (prompts,), generator=gen) * block_size
        return (starts[:, None] + torch.arange(prompt_len)[None, :]).flatten()

    mappings = itertools.cycle([slots() for _ in range(reps + 1)])   # a new place each call
    seconds = _median_s(lambda: write_kv(cache, k, v, next(mappings), threads), reps=reps)
    return 2 * tokens * row / seconds


def _median_s(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(statistics.median(times), 1e-9)


def _median_cuda_s(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return max(statistics.median(times), 1e-9)


def disk_read_rate(folder: str | None, nbytes: int, reads: int = 3, pinned: bool = False) -> float:
    """Bytes/s of the disk tier's read (offload_mover.read_mapped: mmap, copy into a staging
    buffer, pages dropped) of an nbytes file written and flushed the way the mover writes a layer;
    the best of `reads` reads, each from the disk (a single short read caught the disk slow: the
    policy once predicted 1.28 GiB/s where the mover's reads ran at 1.48)."""
    from strata.runner.offload_mover import read_mapped
    folder = folder or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    nbytes = max(1 << 20, nbytes >> 20 << 20)
    fd, path = tempfile.mkstemp(prefix="strata-disk-probe-", dir=folder)
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(os.dup(fd), "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        staging = host_buffer(nbytes, pinned)
        best = 0.0
        with mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) as mm:
            for _ in range(reads):
                t0 = time.perf_counter()
                read_mapped(fd, mm, staging)
                best = max(best, nbytes / max(time.perf_counter() - t0, 1e-9))
        return best
    finally:
        os.close(fd)
        os.unlink(path)


# Of the host RAM the offload plan may fill when no budget is given. 0.85 planned 104.9 GiB for
# OPT-30B on a 128 GiB H100 host and the process was killed for memory (2026-11-21), and so was
# 0.7's 86.3 GiB plan: torch's pinned allocator held each 1.15 GiB layer of the CPU tier in a
# 2 GiB block (92 GiB for 46 layers). The tiers are now exact (runner/host_memory.py) and the
# plan counts the step's host buffers; what remains outside it is the process itself (CUDA
# context, libraries, Python: a few GiB), hence the share below 1.
HOST_MEMORY_UTILIZATION = 0.7


def host_memory_room(held: int, meminfo: str = "/proc/meminfo") -> int | None:
    """Host RAM an offload plan may use without a cpu_memory_budget (GPU): a share of what is
    available now plus ``held``, the weight bytes loaded but not yet placed (the tiers take their
    place). Without it a fast CPU attention let the policy grow a host KV cache past the
    machine's RAM (OPT-30B: 714 MiB of KV per 544-token sequence beside 60 GB of weights).
    None: RAM unknown."""
    try:
        with open(meminfo) as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except (OSError, ValueError, IndexError):
        return None
    return int((info.get("MemAvailable", 0) + held) * HOST_MEMORY_UTILIZATION)


class LayerPlacer:
    """Carries out offloading while the model loads (build_model's layer_sink): the first
    finished layer gives the layout the plan is searched with (core/offload_policy.search_policy,
    fed by measured rates); it and every later one go to their tier at once, so host RAM holds
    the tiers and the layers in flight, never the whole model. ``finish`` then places the rest
    (embedding, norm, LM head) and puts the offload loop in place."""

    def __init__(self, cfg: ModelConfig, offload, device: torch.device, workload,
                 gpu_memory_utilization: float = 0.9, kv_format: KVCacheFormat | None = None):
        if device.type != "cuda" and offload.gpu_memory_budget is not None:
            raise ValueError(f"gpu_memory_budget ({offload.gpu_memory_budget} bytes) needs a CUDA device; "
                             f"this engine runs on {device} (use cpu_memory_budget)")
        self.cfg, self.offload, self.device, self.workload = cfg, offload, device, workload
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_format = kv_format   # a quantized KV cache (kv_cache_dtype): its bytes, its CPU attention
        self.plan = self.mover = self.hardware = self.spec = None
        self.embed_on_host = False

    def __call__(self, model: nn.Module, index: int, layer: nn.Module) -> None:
        if self.mover is None:
            # The weights in host RAM that the tiers will take the place of: this first layer.
            self._plan(model, layer, held=sum(p.numel() * p.element_size() for p in layer.parameters()))
        self.mover.place_layer(index, layer)

    def _plan(self, model: nn.Module, template: nn.Module, held: int) -> None:
        from strata.core.offload_policy import search_policy
        offload, cfg, device = self.offload, self.cfg, self.device
        self.embed_on_host = host_embedding_ok(model, device)
        spec = self.spec = model_spec(model, cfg, self.embed_on_host, template, self.kv_format)
        policy = offload.policy or {}
        # One layer's read, as the mover reads it, when the disk tier may hold layers; else a probe.
        disk_possible = offload.cpu_memory_budget is not None or policy.get("w_disk", 0) > 0
        probe = min(max(spec.layer_bytes, 16 * 2**20), 2**30) if disk_possible else 16 * 2**20
        # A KV format the host tier cannot store: no CPU-attention probe, so the auto policy
        # keeps the cache on the device (and an explicit kv_cpu is refused below).
        host_kv_ok = host_tier.stores(self.kv_format)
        self.hardware = measure_hardware(device, cfg.dtype, offload.offload_dir, probe, cfg if host_kv_ok else None,
                                         self.kv_format)
        gpu_budget = offload.gpu_memory_budget
        if device.type == "cuda" and gpu_budget is None:
            gpu_budget = int(torch.cuda.mem_get_info(device)[0] * self.gpu_memory_utilization)
        cpu_budget = offload.cpu_memory_budget
        if device.type == "cuda" and cpu_budget is None:
            cpu_budget = host_memory_room(held)
        self.plan = search_policy(spec, self.hardware, self.workload, gpu_budget, cpu_budget, offload.policy)
        if self.plan.kv_host_layers and not host_kv_ok:
            raise ValueError(f"kv_cache_dtype={self.kv_format.name!r} with the KV cache of {self.plan.kv_host_layers} "
                             "layers in host RAM (offload_policy kv_cpu): the host tier stores the model dtype or "
                             "int8; use kv_cache_dtype='int8' or 'auto', or kv_cpu=0")
        if offload.offload_dir is not None:
            os.makedirs(offload.offload_dir, exist_ok=True)
        self.mover = OffloadMover(model, self.plan, device, offload.offload_dir, template=template, place=False)

    def step_tokens(self) -> int:
        """A step's token budget under the plan: its whole batch of prompts at once, so each
        layer's weights cross PCIe once for all of them, or one prefill wave of them and the
        others' decodes (core/offload_policy.step_tokens)."""
        from strata.core.offload_policy import step_tokens
        return step_tokens(self.plan.batch_size, self.plan.prefill_waves, self.workload.max_model_len)

    def finish(self, model: nn.Module):
        """After loading: the parts outside the layers to the device, the offload loop in place.
        Returns (plan, mover, hardware, spec)."""
        unplaced = sorted(set(range(len(model.layers))) - (self.mover.placed if self.mover else set()))
        if unplaced:
            raise RuntimeError(f"offload: layers {unplaced[:5]} were never placed")
        place_outside_layers(model, self.device, self.embed_on_host, self.step_tokens())
        model.layer_loop = OffloadLayerLoop(self.mover, self.plan.micro_batch_tokens,
                                            split_single_part=self.device.type == "cuda")
        return self.plan, self.mover, self.hardware, self.spec

