"""Where each decoder layer's weights live, how far ahead they are fetched and how large a batch
runs: FlexGen's policy search over a cost model (pure Python, no torch; core/ decides, the
runner's offload mover moves).

Tiers: ``resident`` (in the compute device's memory: the GPU, or RAM on a CPU-only machine),
``cpu`` (pinned host memory, copied to the GPU before use) and ``disk`` (a file per layer, read
into a staging buffer). Every streamed layer goes through one of ``prefetch_depth`` staging
slots on the device; a step reads each streamed layer once for the whole batch (the block
schedule: the batch's micro-batches all pass layer i before layer i+1), so the weight traffic
per step does not grow with the batch while the compute does: the search raises the batch until
the KV cache fills the budget, and trades resident layers against KV room.

Cost of one decode step at batch B (seconds; step_costs has the details):
    per layer: compute = max(2 * params * B / flops, layer bytes / memory bandwidth) + its KV read;
               a layer whose KV cache is in host RAM: the longer of that and the CPU's attention
               over the host cache, plus a micro-batch's share of the shorter (they overlap)
               streamed: max(its copy, its compute) (one slot per layer in flight)
    step    = resident layers + streamed layers + LM head (the first streamed layers' copies
              hidden behind the resident compute), at least every copy's time, + overhead
A prefill pass is the same with B * prompt_len tokens. Throughput of one batch = B * gen_len /
(prefill + (gen_len - 1) decode steps): the prefill samples each sequence's first token. Of a
stream (Workload.stream: the engine's own assumption, a queue that keeps the batch full) =
B * gen_len / (W wave steps + (gen_len - W) decode steps): over gen_len passes every sequence is
replaced once, its prompt prefilled in a wave step beside the others' decodes.

Prefill waves: the batch's prompts may be prefilled over W steps of B / W prompts (each step also
decodes the waves before it), so a step's hidden states, which stay on the device through every
layer, are a W-th as large and leave room for larger micro-batches: fewer of them a layer, less
host time per layer (HOST_KV_MICRO_BATCH_S each), at the price of W - 1 more passes of the
weights. Then prefill = W passes of B / W prompts; the decode steps are the same. In a stream
the waves cost no pass of their own: a wave of prompts small enough for the GPU to prefill
within a pass of the weights rides along with the other sequences' decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
# Fraction of a GPU budget kept back for the allocator's rounding and fragmentation.
GPU_RESERVE = 0.05
# Host-side launch cost of one layer per micro-batch (Python, kernel launches, events).
LAYER_OVERHEAD_S = 150e-6
# Host time of one micro-batch in a layer whose KV cache is in host RAM, on a GPU: the split
# forward, the host tier's start (staging, copies down, queuing the worker) and the resume (the
# output's wait, o_proj and the MLP). 1.2-1.4 ms at 2,048 and 4,096 tokens, ~1.6 at a decode
# step, on an H100's host (bench/offload_timeline.py). In a prefill of 24 micro-batches a layer
# it is as long as the layer's matmuls and runs mostly beside them, not under them.
HOST_KV_MICRO_BATCH_S = 1.3e-3
MICRO_BATCH_TOKENS = (256, 512, 1024, 2048, 4096, 8192)
PREFILL_WAVES = (1, 2, 4, 8)
# Pinned staging buffers of the host KV tier (attention/host_tier.py): two micro-batches'
# results in flight plus fresh prompts' KV writes.
HOST_STAGING_BUFFERS = 4


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs of a model, in bytes and counts."""

    num_layers: int
    layer_bytes: int              # one decoder layer's weights (all layers have the same shape)
    layer_params: int
    device_bytes: int             # weights that stay on the compute device (LM head, norms, ...)
    host_bytes: int               # weights kept in host RAM outside the tiers (an untied embedding)
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    kv_bytes_per_token: int       # K and V of one token over all layers, as the cache stores them
    dtype_bytes: int
    # Elements of one token's K (or V) in one layer, kv_heads * head_dim; 0: a cache in the model
    # dtype, derived from kv_bytes_per_token (a quantized cache stores fewer bytes per element).
    kv_dim: int = 0

    @property
    def kv_width(self) -> int:
        return self.kv_dim or self.kv_bytes_per_token // (2 * self.num_layers * self.dtype_bytes)

    @property
    def weight_bytes(self) -> int:
        return self.num_layers * self.layer_bytes + self.device_bytes + self.host_bytes


@dataclass(frozen=True)
class Hardware:
    """Measured (runner/offload_mover.measure_hardware) or given rates, bytes/s and flop/s."""

    device: str                   # "cuda" or "cpu"
    h2d_bytes_per_s: float        # pinned host -> device (inf on a CPU-only machine)
    disk_bytes_per_s: float       # file -> host staging buffer
    flops: float                  # matmul rate of the compute device at the model dtype
    mem_bytes_per_s: float        # compute device memory bandwidth (weights and KV read by a step)
    # KV bytes/s the host reads while attending for decode rows (attention/host_tier.py); 0: not
    # measured, and the auto policy keeps the KV cache on the device.
    cpu_attn_bytes_per_s: float = 0.0
    # Pinned host -> device while the host attends over its KV cache: both read host memory, and
    # the copies slow down (0: not measured, taken as h2d_bytes_per_s).
    h2d_contended_bytes_per_s: float = 0.0
    # KV bytes/s the host writes into its cache for fresh prompts (scattered rows, beside the
    # weight copies; 0: not measured, taken as cpu_attn_bytes_per_s). An H100 host wrote at
    # ~9 GiB/s where it attended at 40-50.
    cpu_write_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class Workload:
    """stream: prompts keep coming (a server, a batch job of many more prompts than the batch), so
    the engine keeps its batch full: each prefill wave runs in a pass beside the other sequences'
    decodes, and every pass yields a token for each sequence. Otherwise one batch of prompts
    arrives at once and is done (FlexGen's benchmark): its prefill passes add to the decodes."""
    max_model_len: int
    prompt_len: int
    gen_len: int
    max_num_seqs: int
    stream: bool = False

    @staticmethod
    def from_max_model_len(max_model_len: int, max_num_seqs: int) -> "Workload":
        # Without a stated workload: FlexGen's shape, a long prompt and a short answer, and an
        # engine that serves a queue of such requests.
        gen_len = max(1, max_model_len // 16)
        return Workload(max_model_len, max(1, max_model_len - gen_len), gen_len, max_num_seqs, stream=True)


@dataclass(frozen=True)
class OffloadPlan:
    placement: tuple[str, ...]    # per decoder layer: "resident", "cpu" or "disk"
    prefetch_depth: int           # staging slots: streamed layers in flight ahead of the compute
    batch_size: int               # sequences of max_model_len the KV allotment holds
    micro_batch_tokens: int       # tokens of one micro-batch through one layer
    kv_bytes: int                 # KV cache on the compute device (0: not budgeted here)
    device_bytes: int             # what the plan puts on the compute device
    host_bytes: int               # what it puts in host RAM (CPU tier, staging, host embedding,
                                  # host KV cache, a step's host buffers: host_step_bytes)
    predicted_tok_s: float        # generated tokens/s for the workload
    step_seconds: float           # one decode step at batch_size
    io_seconds: float
    compute_seconds: float
    reason: str
    explicit: bool = False
    extra: dict = field(default_factory=dict)
    # The last kv_host_layers decoder layers keep their KV cache in host RAM (host_kv_bytes in
    # all, inside host_bytes) and attend on the CPU for decode rows (FlexGen's CPU delegation).
    kv_host_layers: int = 0
    host_kv_bytes: int = 0
    activation_bytes: int = 0
    # Host RAM while loading: each layer goes to its tier as soon as it has loaded (loader/
    # layer_stream.py), so loading holds the plan's host share, a layer in flight and its packed
    # copy, and (GPU) the parts outside the layers until they move to the device.
    load_host_bytes: int = 0
    # The batch's prompts are prefilled over this many steps (a W-th of them each): the engine's
    # token budget holds one wave (step_tokens).
    prefill_waves: int = 1

    def kv_on_host(self, layer: int) -> bool:
        return layer >= len(self.placement) - self.kv_host_layers

    def count(self, tier: str) -> int:
        return sum(1 for p in self.placement if p == tier)

    @property
    def streamed(self) -> list[int]:
        return [i for i, p in enumerate(self.placement) if p != "resident"]

    def describe(self) -> str:
        n = len(self.placement)
        return (f"offload: layers {self.count('resident')}/{n} resident, {self.count('cpu')} CPU, "
                f"{self.count('disk')} disk, prefetch depth {self.prefetch_depth}, "
                + (f"KV cache of {self.kv_host_layers}/{n} layers in host RAM ({self.host_kv_bytes / GIB:.2f} GiB, "
                   "CPU attention), " if self.kv_host_layers else "")
                + f"batch {self.batch_size} "
                + (f"prefilled in {self.prefill_waves} waves " if self.prefill_waves > 1 else "")
                + f"in micro-batches of {self.micro_batch_tokens} tokens; "
                + (f"GPU {self.device_bytes / GIB:.2f} GiB, " if self.device_bytes else "")
                + f"host {self.host_bytes / GIB:.3f} GiB"
                + (f" ({self.load_host_bytes / GIB:.3f} GiB at most while loading)"
                   if self.load_host_bytes > self.host_bytes else "")
                + f"; predicted {self.predicted_tok_s:.1f} tok/s "
                f"(decode step {self.step_seconds * 1e3:.1f} ms: io {self.io_seconds * 1e3:.1f} ms, "
                f"compute {self.compute_seconds * 1e3:.1f} ms) | {self.reason}")


def step_costs(spec: ModelSpec, hw: Hardware, n_res: int, n_cpu: int, n_disk: int, tokens: int,
               context_tokens: int, micro_batches: int, depth: int = 2,
               kv_host_layers: int = 0, prefill: bool = False, fresh_tokens: int = 0) -> tuple[float, float, float]:
    """(io, compute, step) seconds of one forward pass over `tokens` tokens that attend to
    `context_tokens` cached tokens in all, in `micro_batches` micro-batches. prefill: every token
    is a fresh prompt's; else fresh_tokens of them are (a stream's prefill wave beside decodes:
    the GPU attends for them, the CPU writes their K and V into a host cache).

    Layer by layer, in the loop's order (resident layers, then the CPU tier, then disk; the KV
    cache of the last kv_host_layers in host RAM): a streamed layer takes the longer of its copy
    and its compute, since the copy of layer i+1 runs while layer i computes but a slot holds only
    one layer. The first `depth` streamed layers are fetched while the resident layers and the LM
    head compute (the pass starts them; the last layers issue the next pass's), so their copies
    hide behind that much compute. With one slot (depth 1) a fetch waits for the layer before it:
    copies and compute take turns.

    A host-KV layer's compute is its GPU work and the CPU's (decode rows attending over the host
    cache; a prefill's fresh prompts attend on the device and the CPU only writes their K and V),
    overlapped across micro-batches (runner/offload_loop._HostKVPipeline): with K micro-batches
    the CPU works on one while the GPU computes another, so the layer takes the longer of the two
    plus a K-th of the shorter (one micro-batch: their sum), plus the host's time per micro-batch
    (HOST_KV_MICRO_BATCH_S; on a GPU it replaces LAYER_OVERHEAD_S for those layers). A GPU
    prefill's micro-batches wait for nothing on the CPU, so there the host's time, the GPU's and
    the CPU's writes all run side by side: the layer takes the longest."""
    layers = spec.num_layers
    cpu_path = hw.device == "cpu"
    kv_layer = spec.kv_bytes_per_token / layers
    gpu_layer = max(2.0 * spec.layer_params * tokens / hw.flops, spec.layer_bytes / hw.mem_bytes_per_s)
    decode_gpu = max(2.0 * spec.layer_params * (tokens - fresh_tokens) / hw.flops,
                     spec.layer_bytes / hw.mem_bytes_per_s)
    device_kv = context_tokens * kv_layer / hw.mem_bytes_per_s
    host_layer = 0.0
    if kv_host_layers:
        fresh = tokens if prefill else fresh_tokens
        attend_bytes = 0 if prefill else context_tokens * kv_layer
        write_rate = hw.cpu_write_bytes_per_s or hw.cpu_attn_bytes_per_s
        host_layer = attend_bytes / max(hw.cpu_attn_bytes_per_s, 1.0) + fresh * kv_layer / max(write_rate, 1.0)
        if not cpu_path:   # the new K, V down; the decode rows' q (float32) down, their output up
            moved = tokens * kv_layer + (tokens - fresh) * 2 * spec.hidden_size * 4
            host_layer += moved / hw.h2d_bytes_per_s
    k = max(1, micro_batches)
    host_kv_launch = 0.0 if cpu_path else k * HOST_KV_MICRO_BATCH_S
    copy_s = 0.0 if cpu_path else spec.layer_bytes / hw.h2d_bytes_per_s
    # A decode step's host-KV layers copy their weights while the CPU attends: at the contended rate.
    copy_kv_s = copy_s
    if not cpu_path and kv_host_layers and not prefill and hw.h2d_contended_bytes_per_s > 0:
        copy_kv_s = spec.layer_bytes / min(hw.h2d_contended_bytes_per_s, hw.h2d_bytes_per_s)
    disk_s = spec.layer_bytes / hw.disk_bytes_per_s
    compute = resident = streamed = copies = 0.0
    lead = []   # (copy, compute) of the first `depth` streamed layers
    for layer in range(layers):
        if layer >= layers - kv_host_layers:
            if prefill and not cpu_path:
                # Fresh prompts: no micro-batch waits for the CPU (it only writes their K and V),
                # so the host queues micro-batches while the GPU runs the ones before (host_tier's
                # PendingAttention.result): the longest of the three.
                c = max(gpu_layer, host_layer, host_kv_launch)
            elif fresh_tokens and not cpu_path:
                # A wave of prompts beside decode rows: the GPU runs the prompts' micro-batches
                # while the CPU attends for the decode rows' (runner/offload_loop.py puts them in
                # micro-batches of their own), so only the decode rows' own GPU work and host time
                # wait for the CPU's answer.
                c = max(gpu_layer, host_layer, host_kv_launch) + decode_gpu + HOST_KV_MICRO_BATCH_S
            else:
                c = max(gpu_layer, host_layer) + min(gpu_layer, host_layer) / k + host_kv_launch
        else:
            c = gpu_layer + device_kv
        compute += c
        if layer < n_res:
            resident += c
            continue
        copy = copy_kv_s if layer >= layers - kv_host_layers else copy_s
        copies += copy
        fetch = max(copy, disk_s) if layer >= n_res + n_cpu else copy
        if depth < 2:
            streamed += fetch + c
        elif len(lead) < depth:
            lead.append((fetch, c))
        else:
            streamed += max(fetch, c)
    head = max(2.0 * spec.vocab_size * spec.hidden_size * tokens / hw.flops,
               spec.vocab_size * spec.hidden_size * spec.dtype_bytes / hw.mem_bytes_per_s)
    compute += head
    # The lead layers' copies run behind the resident layers and the head, then layer by layer.
    hidden_by = resident + head
    for fetch, c in lead:
        hidden = min(fetch, hidden_by)
        hidden_by -= hidden
        streamed += max(fetch - hidden, c)
    io = max(copies, n_disk * disk_s)   # every streamed layer crosses PCIe; disk layers are read too
    # A host-KV layer launches two halves per micro-batch; on a GPU their host time is in c already.
    launched = layers + kv_host_layers if cpu_path else layers - kv_host_layers
    overhead = launched * k * LAYER_OVERHEAD_S
    return io, compute, max(io, resident + head + streamed) + overhead


def activation_bytes(spec: ModelSpec, step_tokens: int, micro_batch_tokens: int, batch: int,
                     max_query_len: int, host_kv: bool = False) -> int:
    """Device memory of a step's activations (runner/offload_loop.py's block schedule):
    - the carry between layers for every token of the step: hidden state and residual of every
      micro-batch (2 copies; each micro-batch embeds its own tokens, so its embedding output goes
      when layer 0 has replaced it: one micro-batch's more; the final norm then frees the carries
      part by part, so it never holds more);
    - one micro-batch's intermediates inside a layer (q/k/v, attention, the MLP's widest tensors,
      1.5x for what the kernels allocate beside them). A sequence is never cut, so a micro-batch
      holds up to max(micro_batch_tokens, the longest query) tokens;
    - the LM head's logits for the sampled rows (model dtype, float32, the sampler's copies);
    - host_kv (some layers' KV cache in host RAM): a second micro-batch in flight in those layers
      (its q, k, v, and the float32 queries and output that cross PCIe).
    tests/runner/test_offload_activations.py checks these against the live tensors of a step."""
    h, i, e = spec.hidden_size, spec.intermediate_size, spec.dtype_bytes
    inside_tokens = min(step_tokens, max(micro_batch_tokens, max_query_len))
    carry = (2 * step_tokens + inside_tokens) * h * e
    inside = int(1.5 * inside_tokens * (6 * h + 3 * i) * e)
    logits = batch * spec.vocab_size * (e + 4 * 4)
    kv_dim = spec.kv_width
    in_flight = inside_tokens * ((h + 2 * kv_dim) * e + 2 * h * 4) if host_kv else 0
    return carry + inside + logits + in_flight


def host_step_bytes(spec: ModelSpec, step_tokens: int, micro_batch_tokens: int, max_query_len: int,
                    host_kv: bool) -> int:
    """Host RAM of a GPU step's buffers, beside the tiers and the host KV cache:
    - host_kv: the host tier's staging (attention/host_tier.py): up to HOST_STAGING_BUFFERS
      pinned buffers, each a micro-batch's k and v going down plus its float32 queries and
      output, replaced by one twice as large when too small (so up to 2x the largest request);
    - an untied embedding kept in host RAM (spec.host_bytes): the step's rows, pinned by
      torch's caching allocator (power-of-two blocks, freed ones kept: up to 2x the largest
      rounded size)."""
    h, e = spec.hidden_size, spec.dtype_bytes
    kv_dim = spec.kv_width
    total = 0
    if host_kv:
        tokens = min(step_tokens, max(micro_batch_tokens, max_query_len))
        total += HOST_STAGING_BUFFERS * 2 * (tokens * (2 * kv_dim * e + 2 * h * 4) + 4 * 64)
    if spec.host_bytes:
        total += 2 * (1 << max(0, step_tokens * h * e - 1).bit_length())
    return total


def search_policy(spec: ModelSpec, hw: Hardware, workload: Workload, gpu_budget: int | None,
                  cpu_budget: int | None, explicit: dict | None = None) -> OffloadPlan:
    """The plan with the highest predicted throughput inside both budgets (exhaustive over the
    resident layer count, the prefetch depth and the micro-batch size; the CPU tier takes every
    streamed layer host RAM holds, since it is never slower than the disk); an auto plan that is
    compute-bound at that batch then runs the smallest batch within KNEE_TOLERANCE of its
    throughput, in the best placement for that batch. `explicit`: the user's fractions
    (config.parse_offload_policy), checked against the budgets the same way."""
    _check_fits_one_layer(spec, hw, gpu_budget, cpu_budget)

    def search(cap: int | None = None) -> OffloadPlan | None:
        """The best plan at its largest batch, or at exactly `cap` sequences."""
        best = None
        for n_res, n_cpu, depth, mbt, waves in _candidates(spec, hw, workload, cpu_budget, explicit):
            for kv_host in _kv_host_candidates(spec, hw, explicit):
                plan = _evaluate(spec, hw, workload, gpu_budget, cpu_budget, n_res, n_cpu, depth, mbt, kv_host,
                                 cap, waves)
                if plan is not None and (cap is None or plan.batch_size == cap) \
                        and (best is None or plan.predicted_tok_s > best.predicted_tok_s):
                    best = plan
        return best

    best = search()
    if best is None:
        raise ValueError(_no_plan_message(spec, hw, workload, gpu_budget, cpu_budget, explicit))
    if explicit is None and best.compute_seconds > best.io_seconds:
        # The placement with the most throughput at its largest batch, that batch lowered to its
        # knee (kneeing each candidate first and comparing the knees favoured whichever
        # candidate's knee fell higher within the tolerance, not the better placement), then the
        # best placement for the smaller batch, which leaves device memory its largest needed
        # (more resident layers stream fewer bytes).
        knee = _knee(best, lambda cap: _evaluate(
            spec, hw, workload, gpu_budget, cpu_budget, best.count("resident"), best.count("cpu"),
            best.prefetch_depth, best.micro_batch_tokens, best.kv_host_layers, cap, best.prefill_waves))
        if knee.batch_size < best.batch_size:
            placed = search(knee.batch_size)
            best = placed if placed is not None and placed.predicted_tok_s > knee.predicted_tok_s else knee
    if explicit is not None:
        return _with(best, explicit=True, reason="explicit offload_policy " + _fractions(explicit)
                     + "; " + best.reason)
    return best


# A compute-bound auto plan's batch is lowered while its predicted throughput stays within this share
# of the largest batch's: past the point where compute (the host's attention, with KV in host
# RAM) overtakes the weight stream, each sequence more lengthens every step and adds only what
# it amortises of the step's fixed costs, while host KV and every sequence's latency grow. 2%
# was the share before: Llama-8B under 4 GiB on an H100 then ran at batch 231-238, predicted at
# 62-65% of its PCIe bound, where its streams measured 0.76-0.83 of the prediction (the overlap
# the model assumes frays where the CPU and the copies take equally long); 10% stops it near
# where the CPU's attention meets the copies (batch ~160 bf16, ~200 int8: steps a quarter
# shorter, host KV a third smaller). A rule of the marginal gain alone (stop where a sequence adds
# under half its average share) would give up 40% of the throughput on a host attending at 16
# GiB/s, where the step's fixed costs keep the curve rising long after the edge.
KNEE_TOLERANCE = 0.10


def _knee(plan: OffloadPlan, at_batch) -> OffloadPlan:
    """The smallest batch whose plan (at_batch(cap): the same placement with at most cap
    sequences) predicts within KNEE_TOLERANCE of ``plan``'s throughput."""
    floor = plan.predicted_tok_s * (1 - KNEE_TOLERANCE)
    lo, best = 1, plan                   # best meets the floor; find the least batch that does
    while lo < best.batch_size:
        mid = (lo + best.batch_size) // 2
        candidate = at_batch(mid)
        if candidate is not None and candidate.batch_size >= best.batch_size:
            break   # the cap did not lower the batch (a CPU-only plan's is max_num_seqs): nothing smaller
        if candidate is not None and candidate.predicted_tok_s >= floor:
            best = candidate
        else:
            lo = mid + 1
    return best


def _kv_host_candidates(spec, hw, explicit) -> list[int]:
    """Decoder layers whose KV cache may live in host RAM: the user's kv_cpu fraction, else (on a
    GPU, once the CPU's attention rate is measured) none, a quarter ... all of them; none first,
    so that ties keep the cache on the device."""
    layers = spec.num_layers
    if explicit is not None:
        return [round(explicit.get("kv_cpu", 0.0) * layers)]
    if hw.device != "cuda" or hw.cpu_attn_bytes_per_s <= 0:
        return [0]
    return sorted({0, layers // 4, layers // 2, 3 * layers // 4, layers})


def _candidates(spec, hw, workload, cpu_budget, explicit):
    layers = spec.num_layers
    # Auto plans double-buffer at least: one slot would trade overlap for one layer of KV room,
    # which the cost model can favour when I/O dominates, but its copies then wait on compute.
    depths = (2, 3, 4)
    mbts = MICRO_BATCH_TOKENS
    # Waves only pay on a GPU, where the step's hidden states share the budget with the
    # micro-batches (a CPU-only machine's activations live in RAM outside the budget).
    waves_options = PREFILL_WAVES if hw.device == "cuda" else (1,)
    if explicit is not None and "prefill_waves" in explicit:
        waves_options = (explicit["prefill_waves"],)
    if explicit is not None:
        n_res = round(explicit["w_gpu"] * layers)
        n_cpu = round(explicit["w_cpu"] * layers) if hw.device == "cuda" else 0
        if hw.device == "cpu":   # no separate device memory: the CPU tier is resident
            n_res = round((explicit["w_gpu"] + explicit["w_cpu"]) * layers)
        n_cpu = min(n_cpu, layers - n_res)
        if "prefetch_depth" in explicit:
            depths = (explicit["prefetch_depth"],)
        if "micro_batch_tokens" in explicit:
            mbts = (explicit["micro_batch_tokens"],)
        for depth in depths:
            for mbt in mbts:
                for waves in waves_options:
                    yield n_res, n_cpu, depth, mbt, waves
        return
    for n_res in range(layers, -1, -1):   # most resident first: ties keep the least I/O
        streamed = layers - n_res
        for depth in (depths if streamed else (0,)):
            if depth > max(streamed, 2):
                continue
            n_cpu = 0
            if hw.device == "cuda":
                room = (cpu_budget if cpu_budget is not None else float("inf")) - spec.host_bytes
                disk_staging = depth * spec.layer_bytes   # needed only if some layer stays on disk
                fit_all = room // spec.layer_bytes if spec.layer_bytes else streamed
                n_cpu = int(min(streamed, fit_all))
                if n_cpu < streamed:
                    n_cpu = int(max(0, min(streamed, (room - disk_staging) // spec.layer_bytes)))
            for mbt in mbts:
                for waves in waves_options:
                    yield n_res, n_cpu, depth, mbt, waves


def _evaluate(spec, hw, workload, gpu_budget, cpu_budget, n_res, n_cpu, depth, mbt,
              kv_host: int = 0, batch_cap: int | None = None, waves: int = 1) -> OffloadPlan | None:
    layers = spec.num_layers
    n_disk = layers - n_res - n_cpu
    streamed = n_cpu + n_disk
    depth = depth if streamed else 0
    if streamed and depth < 1:
        return None
    staging = depth * spec.layer_bytes
    seq_kv = workload.max_model_len * spec.kv_bytes_per_token   # one sequence, every layer
    host_seq_kv = seq_kv * kv_host // layers
    activations = 0
    if hw.device == "cuda":
        host = spec.host_bytes + n_cpu * spec.layer_bytes + (staging if n_disk else 0)
        weights_on_device = spec.device_bytes + n_res * spec.layer_bytes + staging
        room = (gpu_budget * (1 - GPU_RESERVE) if gpu_budget is not None else float("inf")) - weights_on_device
        host_room = (cpu_budget if cpu_budget is not None else float("inf")) - host
        batch = largest = _largest_batch(spec, workload, room, mbt, seq_kv - host_seq_kv, host_seq_kv, host_room,
                                         waves)
        if batch_cap is not None:
            batch = min(batch, batch_cap)
        if batch < 1:
            return None
        kv_bytes = batch * (seq_kv - host_seq_kv)
        activations = _step_activations(spec, workload, mbt, batch, host_seq_kv > 0, waves)
        device = weights_on_device + kv_bytes + activations
        host += batch * host_seq_kv + _step_host_bytes(spec, workload, mbt, batch, host_seq_kv > 0, waves)
    else:
        # On the CPU the budget covers the weights in RAM; the KV cache has its own (kv_cache_memory).
        host = spec.host_bytes + spec.device_bytes + n_res * spec.layer_bytes + staging
        batch, kv_bytes, device = workload.max_num_seqs, 0, 0
        largest = batch
    if cpu_budget is not None and host > cpu_budget:
        return None
    ctx = batch * workload.max_model_len
    # A decode row is one token: the step's micro-batches are ceil(batch / mbt); on a GPU with
    # host-KV layers a step of one is cut in two, so the CPU attends for one half while the GPU
    # computes the other (runner/offload_loop.OffloadLayerLoop.split_single_part).
    decode_micro = -(-batch // mbt)
    if decode_micro == 1 and kv_host and hw.device == "cuda" and batch > 1:
        decode_micro = 2
    io, compute, step = step_costs(spec, hw, n_res, n_cpu, n_disk, batch, ctx, decode_micro, depth, kv_host)
    waves = max(1, min(waves, batch))
    if waves > 1 and wave_prompts(batch, waves) * waves - batch >= wave_prompts(batch, waves):
        return None   # fewer waves would do: the last one would be empty
    wave = wave_prompts(batch, waves)
    prefill_tokens = wave * workload.prompt_len
    micro = max(1, -(-prefill_tokens // mbt))
    if workload.stream:
        if waves > workload.gen_len:
            return None   # a wave would start before the one it replaces has finished
        # Steady state: over gen_len passes each sequence yields gen_len tokens; in `waves` of
        # them a wave of prompts is prefilled beside the other sequences' decodes.
        others = batch - wave
        context = others * workload.max_model_len
        mixed_micro = -(-others // mbt) + micro
        _, _, wave_step = step_costs(spec, hw, n_res, n_cpu, n_disk, others + prefill_tokens, context, mixed_micro,
                                     depth, kv_host, fresh_tokens=prefill_tokens)
        total = waves * wave_step + (workload.gen_len - waves) * step
    else:
        _, _, prefill = step_costs(spec, hw, n_res, n_cpu, n_disk, prefill_tokens, prefill_tokens, micro, depth,
                                   kv_host, prefill=True)
        # Each wave's prefill samples its sequences' first token; the decodes of the waves before
        # it ride along in its pass, so the decode-only steps are gen_len - 1 as with one wave.
        total = waves * prefill + (workload.gen_len - 1) * step
    tok_s = batch * workload.gen_len / total
    return OffloadPlan(tuple(["resident"] * n_res + ["cpu"] * n_cpu + ["disk"] * n_disk), depth, batch, mbt,
                       kv_bytes, int(device), int(host), tok_s, step, io, compute,
                       _reason(hw, workload, io, compute, batch, n_res, n_cpu, n_disk, depth, kv_host, largest),
                       kv_host_layers=kv_host, host_kv_bytes=batch * host_seq_kv, activation_bytes=activations,
                       load_host_bytes=int(host) + 2 * spec.layer_bytes
                       + (spec.device_bytes if hw.device == "cuda" else 0), prefill_waves=waves)


def _reason(hw, workload, io, compute, batch, n_res, n_cpu, n_disk, depth, kv_host, largest=None) -> str:
    bound = "I/O-bound" if io >= compute else "compute-bound"
    if hw.device == "cuda":
        where = "whose KV fits the GPU budget" if not kv_host else (
            f"whose KV (the device's share, and {kv_host} layers' in host RAM) and activations fit")
        most = largest if largest is not None else batch
        reason = (f"{bound} decode; {most} is the most sequences of {workload.max_model_len} tokens "
                  f"{where} beside {n_res} resident layers and {depth} staging slots")
        if batch < most:
            reason += (f"; batch {batch}: more would add under {KNEE_TOLERANCE:.0%} tok/s "
                       "(compute-bound past it: host KV and latency, not throughput)")
        if kv_host:
            reason += f"; CPU attention reads {hw.cpu_attn_bytes_per_s / GIB:.1f} GiB/s of KV"
    else:
        reason = f"{bound} decode; {n_res} layers fit the RAM budget beside {depth} staging slots"
    if n_disk and hw.device == "cuda":
        reason += f"; host RAM holds {n_cpu} streamed layers"
    if n_disk:
        reason += f"; {n_disk} read from disk at {hw.disk_bytes_per_s / GIB:.2f} GiB/s"
    if workload.stream and hw.device == "cuda":
        reason += "; tok/s of a queue that keeps the batch full (prefill waves beside decodes)"
    if (n_cpu + n_disk) and hw.device == "cuda":
        reason += f"; PCIe {hw.h2d_bytes_per_s / GIB:.1f} GiB/s"
        if kv_host and 0 < hw.h2d_contended_bytes_per_s < hw.h2d_bytes_per_s:
            reason += f" ({hw.h2d_contended_bytes_per_s / GIB:.1f} while the CPU attends)"
    return reason


def _largest_batch(spec, workload, room, mbt, device_seq_kv, host_seq_kv=0, host_room=float("inf"),
                   waves: int = 1) -> int:
    """Most sequences whose KV cache (max_model_len tokens each: device_seq_kv bytes on the
    device, host_seq_kv in host RAM) and activations fit in room, and whose host KV and the
    step's host buffers (host_step_bytes) fit in host_room."""
    lo, hi = 0, workload.max_num_seqs
    if host_seq_kv and host_room != float("inf"):
        hi = int(min(hi, max(0, host_room) // host_seq_kv))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        need = mid * device_seq_kv + _step_activations(spec, workload, mbt, mid, host_seq_kv > 0, waves)
        host_need = mid * host_seq_kv + _step_host_bytes(spec, workload, mbt, mid, host_seq_kv > 0, waves)
        lo, hi = (mid, hi) if need <= room and host_need <= host_room else (lo, mid - 1)
    return lo


def wave_prompts(batch: int, waves: int) -> int:
    """Prompts of one prefill wave (the last may have fewer)."""
    return -(-batch // max(1, waves))


def step_tokens(batch: int, waves: int, max_model_len: int) -> int:
    """The engine's token budget under a plan (the largest step it may run): one wave of prompts
    at max_model_len, and with several waves the decodes of the sequences outside it."""
    wave = wave_prompts(batch, waves)
    return max(256, wave * max_model_len + (batch - wave if waves > 1 else 0))


def _step_host_bytes(spec, workload, mbt, batch, host_kv: bool = False, waves: int = 1) -> int:
    return host_step_bytes(spec, step_tokens(batch, waves, workload.max_model_len), mbt, workload.max_model_len,
                           host_kv)


def _step_activations(spec, workload, mbt, batch, host_kv: bool = False, waves: int = 1) -> int:
    """The largest step of a batch: the engine's token budget (step_tokens) holds a wave of
    sequences at max_model_len (engine._offload), so a step may carry that many tokens."""
    return activation_bytes(spec, step_tokens(batch, waves, workload.max_model_len), mbt, batch,
                            workload.max_model_len, host_kv)


def _check_fits_one_layer(spec, hw, gpu_budget, cpu_budget) -> None:
    one = spec.layer_bytes
    if hw.device == "cuda" and gpu_budget is not None:
        need = spec.device_bytes + one
        if gpu_budget * (1 - GPU_RESERVE) < need:
            raise ValueError(
                f"gpu_memory_budget ({gpu_budget / GIB:.2f} GiB) cannot hold even one layer: the weights "
                f"kept on the GPU ({spec.device_bytes / GIB:.2f} GiB: LM head, norms) plus one decoder "
                f"layer ({one / GIB:.2f} GiB) need {need / GIB:.2f} GiB (+{GPU_RESERVE:.0%} reserve)")
    if hw.device == "cpu" and cpu_budget is not None:
        need = spec.device_bytes + spec.host_bytes + one
        if cpu_budget < need:
            raise ValueError(
                f"cpu_memory_budget ({cpu_budget / 2**20:.1f} MiB) cannot hold even one layer: the weights "
                f"kept in RAM ({(spec.device_bytes + spec.host_bytes) / 2**20:.1f} MiB: embeddings, LM head, "
                f"norms) plus one decoder layer ({one / 2**20:.1f} MiB) need {need / 2**20:.1f} MiB")


def _no_plan_message(spec, hw, workload, gpu_budget, cpu_budget, explicit) -> str:
    what = f"offload_policy {_fractions(explicit)}" if explicit else "no placement"
    return (f"{what} fits the budgets (gpu_memory_budget {_size(gpu_budget)}, cpu_memory_budget "
            f"{_size(cpu_budget)}) for {spec.num_layers} layers of {_size(spec.layer_bytes)} plus "
            f"{_size(spec.device_bytes + spec.host_bytes)} of other weights and tables, and one sequence of "
            f"max_model_len {workload.max_model_len} ({_size(workload.max_model_len * spec.kv_bytes_per_token)} "
            "of KV): raise a budget, lower max_model_len, or put more layers on the disk tier")


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "none"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _fractions(explicit: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in explicit.items())


def _with(plan: OffloadPlan, **changes) -> OffloadPlan:
    import dataclasses
    return dataclasses.replace(plan, **changes)


def predict_throughput(spec: ModelSpec, hw: Hardware, plan: OffloadPlan, workload: Workload) -> OffloadPlan:
    """The cost model's figures for `plan` run on `workload` (batch = workload.max_num_seqs),
    e.g. to set a prediction beside a measured run."""
    n_res, n_cpu = plan.count("resident"), plan.count("cpu")
    result = _evaluate(spec, hw, workload, None, None, n_res, n_cpu, max(plan.prefetch_depth, 0),
                       plan.micro_batch_tokens, plan.kv_host_layers, waves=plan.prefill_waves)
    if result is None:
        raise ValueError("the plan does not run this workload")
    return result
