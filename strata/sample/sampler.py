"""The batched sampler: one row per request, logits in, one token id (and logprobs) out.

Order of operations follows vLLM v1:
  1. logprobs for the output come from the RAW model logits (log_softmax before bias, penalties,
     temperature or truncation), as vLLM v1's default `raw_logprobs` mode does: they describe what
     the model predicted, not the distribution this request's settings sampled from;
  2. logits processors that may move the argmax (logit_bias, min_tokens mask, penalties);
  3. greedy rows take the argmax; random rows go through temperature, top_k, top_p, min_p and
     then the exponential race `argmax(probs / q)`, q ~ Exp(1), which draws from `probs`
     exactly without a cumulative sum and lets each seeded row draw its own noise.

Two implementations of step 3, chosen by the device of the logits:
  * CUDA: one Triton kernel (strata.kernels.sampling) does temperature, truncation and the draw
    for every row, with Philox noise from a per-row seed. Nothing in the step reads device memory
    on the host; `SamplerOutput.to_lists` brings ids and logprobs back in one copy.
  * CPU: torch ops with a sort for top-k/top-p, seeded rows drawing from their CPU generators.
Seeded requests are reproducible on each, but a seed gives different tokens on CPU and GPU.

`SamplingMetadata.from_rows` turns the rows into a few flat arrays on the host in one go and
copies them to the device in one transfer per dtype; features no row uses stay None.
"""

import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from strata.sample.logits_processors import apply_logits_processors
from strata.sampling_params import SAMPLING_EPS, SamplingParams

_MASK64 = (1 << 64) - 1
_SEED_BITS = 63  # torch.manual_seed and Philox both take these


@dataclass
class SamplingRow:
    """What the model runner knows about one row this step."""

    params: SamplingParams
    # Token lists may also be 1-D int numpy arrays: those are copied without a Python loop.
    prompt_token_ids: "list[int] | np.ndarray"
    output_token_ids: "list[int] | np.ndarray"  # generated so far, for this sequence
    # make_generator(seed, sequence_index, len(output_token_ids)) for seeded requests, else None.
    # The CPU path draws from it; the GPU path needs only its seed (generator.initial_seed()).
    generator: torch.Generator | None
    # eos + stop token ids; applied only while len(output_token_ids) < params.min_tokens.
    min_tokens_mask: set[int] | None
    # row_seed(seed, sequence_index, len(output_token_ids)) for seeded requests: lets a GPU runner
    # skip building a torch.Generator per row. Used when set; else the generator's seed.
    seed: int | None = None
    # Async scheduling: the last entry of output_token_ids is a placeholder for a token the step
    # before sampled and the host has not seen yet; its id is device_tokens[device_token] (see
    # `from_rows`). It counts for min_tokens like any output token and is penalised from the device.
    device_token: int | None = None


@dataclass
class SamplingMetadata:
    """Per-step tensors for the whole batch; built once per step by `from_rows`.

    Token positions are flat indices `row * vocab_size + token_id` into the [num_reqs, vocab]
    logits, so each processor is one scatter or gather over the whole batch.
    """

    temperature: torch.Tensor  # [num_reqs] float32, 0 for greedy rows
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # [num_reqs] int64, vocab_size = off; None when no row uses it
    top_p: torch.Tensor | None  # [num_reqs] float32, 1 = off
    min_p: torch.Tensor | None  # [num_reqs] float32, 0 = off
    generators: dict[int, torch.Generator]  # row -> CPU generator, seeded random rows (CPU path)
    seeds: torch.Tensor | None  # [num_reqs] int64 Philox seeds (kernel path, not all greedy)
    presence_penalties: torch.Tensor | None  # [num_reqs] float32
    frequency_penalties: torch.Tensor | None  # [num_reqs] float32
    repetition_penalties: torch.Tensor | None  # [num_reqs] float32
    # Output tokens of the rows with any penalty, and prompt tokens of the rows with a repetition
    # penalty (only it looks at the prompt); other rows' tokens cannot change their logits.
    output_token_index: torch.Tensor | None  # [num_output_tokens] int64 flat index
    prompt_token_index: torch.Tensor | None  # [num_prompt_tokens] int64 flat index
    logit_bias_index: torch.Tensor | None  # [num_biases] int64 flat index
    logit_bias_values: torch.Tensor | None  # [num_biases] float32
    min_tokens_index: torch.Tensor | None  # [num_banned] int64 flat index, rows below min_tokens
    max_num_logprobs: int | None  # max over rows of params.logprobs; None if no row wants any
    no_penalties: bool

    @classmethod
    def from_rows(cls, rows: list[SamplingRow], vocab_size: int, device,
                  device_tokens: torch.Tensor | None = None) -> "SamplingMetadata":
        """`device_tokens` [num_placeholders] int64 on `device`: the ids behind rows' placeholders
        (SamplingRow.device_token), read on the device only, so the host never waits for them."""
        device = torch.device(device)
        kernel = kernel_path(device)
        params = [row.params for row in rows]
        temps = [p.temperature if p.temperature >= SAMPLING_EPS else 0.0 for p in params]
        num_greedy = temps.count(0.0)
        up = _Upload(device)

        # Greedy rows have top_k/top_p/min_p reset by SamplingParams, so they never switch these on.
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        fields = {
            "temperature": up.add(temps, np.float32),
            "top_k": up.add(top_ks, np.int64) if min(top_ks, default=vocab_size) < vocab_size else None,
            "top_p": up.add(top_ps, np.float32) if min(top_ps, default=1.0) < 1.0 else None,
            "min_p": up.add(min_ps, np.float32) if max(min_ps, default=0.0) > 0.0 else None,
            "seeds": None,
        }
        generators = {i: row.generator for i, row in enumerate(rows)
                      if temps[i] and row.generator is not None}
        if kernel and num_greedy < len(rows):
            fields["seeds"] = up.add(_row_seeds(rows, temps), np.int64)

        no_penalties = _add_penalties(up, fields, rows, params, vocab_size)
        _add_bias_and_min_tokens(up, fields, rows, params, vocab_size)
        tensors = up.finish()
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        values = {name: None if slot is None else tensors[slot] for name, slot in fields.items()}
        if not no_penalties:
            values["output_token_index"] = _with_device_tokens(
                values["output_token_index"], rows, params, vocab_size, device_tokens)
        return cls(
            **values,
            all_greedy=num_greedy == len(rows),
            all_random=num_greedy == 0,
            generators=generators,
            max_num_logprobs=max(logprobs) if logprobs else None,
            no_penalties=no_penalties,
        )


class MetadataCache:
    """The last step's metadata, handed out again while the batch asks for the same thing.

    A steady decode batch mostly repeats itself: the same requests in the same rows, with the
    same settings. Where nothing in the metadata can change from one step to the next, that is
    the whole key: each row's SamplingParams (held here, so it is the same object and not a new
    one at a recycled address), whether its min_tokens mask applies, and the vocabulary and
    device. Rows whose metadata moves every step are never reused: penalties (their seen tokens
    grow), random rows with a seed (a new draw per position) and random rows on the sampling
    kernel (fresh Philox seeds each step). Building the metadata anew costs ~40 us warm and
    ~250 in a CPU decode step, whose weights have pushed the interpreter's data out of the caches.
    """

    def __init__(self):
        self._key: tuple | None = None            # None: the last metadata is not to be reused
        self._params: list[SamplingParams] = []
        self._metadata: SamplingMetadata | None = None

    def get(self, rows: list[SamplingRow], vocab_size: int, device,
            device_tokens: torch.Tensor | None = None) -> SamplingMetadata:
        device = torch.device(device)
        kernel = kernel_path(device)
        key, params = None, [row.params for row in rows]
        if all(_repeatable(row, kernel) for row in rows):
            key = (vocab_size, device, tuple(bool(row.min_tokens_mask) for row in rows))
            if key == self._key and len(params) == len(self._params) and all(
                    a is b for a, b in zip(params, self._params)):   # a params object never changes
                return self._metadata
        metadata = SamplingMetadata.from_rows(rows, vocab_size, device, device_tokens)
        self._key, self._params, self._metadata = key, params, metadata
        return metadata


def _repeatable(row: SamplingRow, kernel: bool) -> bool:
    p = row.params
    if _penalised(p):
        return False
    greedy = p.temperature < SAMPLING_EPS
    return greedy or (not kernel and row.generator is None and row.seed is None)


def kernel_path(device: torch.device) -> bool:
    """Whether sampling on `device` runs the Triton kernel (strata.kernels.use_triton's rule)."""
    if os.environ.get("STRATA_DISABLE_TRITON") == "1":
        return False
    if device.type != "cuda" and os.environ.get("STRATA_FORCE_TRITON") != "1":
        return False
    from strata.kernels import HAS_TRITON
    return HAS_TRITON


_TORCH_DTYPES = {np.float32: torch.float32, np.int64: torch.int64}


class _Upload:
    """Host arrays collected while building the metadata, moved to the device in one copy per
    dtype (a pinned buffer and a non-blocking copy on CUDA: the host never waits for the GPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.arrays: list[np.ndarray] = []

    def add(self, values, dtype) -> int:
        self.arrays.append(np.asarray(values, dtype=dtype))
        return len(self.arrays) - 1

    def finish(self) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.arrays)
        for dtype in (np.float32, np.int64):
            slots = [i for i, a in enumerate(self.arrays) if a.dtype == dtype]
            if not slots:
                continue
            sizes = [self.arrays[i].size for i in slots]
            pinned = self.device.type == "cuda"
            host = torch.empty(sum(sizes), dtype=_TORCH_DTYPES[dtype], pin_memory=pinned)
            np.concatenate([self.arrays[i] for i in slots], out=host.numpy())
            buffer = host.to(self.device, non_blocking=True) if pinned else host.to(self.device)
            for slot, piece in zip(slots, buffer.split(sizes)):
                out[slot] = piece
        return out


def _row_seeds(rows: list[SamplingRow], temps: list[float]) -> list[int]:
    """Philox seeds: a seeded row's comes from (seed, sequence index, position) via row_seed, so
    it is the same whatever the batch; unseeded rows share one fresh draw per step, offset by
    their row (Philox keys that differ by one give unrelated streams)."""
    base = int(torch.randint(1 << 62, ()))  # the CPU generator: follows torch.manual_seed
    seeds = []
    for i, row in enumerate(rows):
        if row.seed is not None:
            seeds.append(row.seed)
        elif row.generator is not None and temps[i]:
            seeds.append(row.generator.initial_seed())
        else:
            seeds.append((base + i) & ((1 << _SEED_BITS) - 1))
    return seeds


def _add_penalties(up: _Upload, fields: dict, rows, params, vocab_size: int) -> bool:
    penalised = [i for i, p in enumerate(params) if _penalised(p)]
    fields.update(presence_penalties=None, frequency_penalties=None, repetition_penalties=None,
                  output_token_index=None, prompt_token_index=None)
    if not penalised:
        return True
    fields["presence_penalties"] = up.add([p.presence_penalty for p in params], np.float32)
    fields["frequency_penalties"] = up.add([p.frequency_penalty for p in params], np.float32)
    fields["repetition_penalties"] = up.add([p.repetition_penalty for p in params], np.float32)
    # A placeholder's id is still on the device: _with_device_tokens adds it there.
    outputs = [rows[i].output_token_ids if rows[i].device_token is None
               else rows[i].output_token_ids[:-1] for i in penalised]
    fields["output_token_index"] = up.add(flat_token_index(outputs, penalised, vocab_size), np.int64)
    repeating = [i for i in penalised if params[i].repetition_penalty != 1.0]
    if repeating:
        fields["prompt_token_index"] = up.add(
            flat_token_index([rows[i].prompt_token_ids for i in repeating], repeating, vocab_size),
            np.int64)
    return False


def _penalised(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _with_device_tokens(
    output_index: torch.Tensor,  # [num_output_tokens] int64 flat, built on the host
    rows: list[SamplingRow], params: list[SamplingParams], vocab_size: int,
    device_tokens: torch.Tensor | None,
) -> torch.Tensor:  # [num_output_tokens + placeholders of penalised rows] int64 flat
    """Penalised rows' placeholder tokens, as flat positions computed on the device (a gather and
    an add): the penalties see exactly the tokens the synchronous engine would have shown them."""
    rows_ids = [i for i, row in enumerate(rows) if row.device_token is not None and _penalised(params[i])]
    if not rows_ids:
        return output_index
    if device_tokens is None:
        raise ValueError("rows name device tokens (SamplingRow.device_token) but from_rows got none")
    device = output_index.device
    slots, offsets = host_to_device([[rows[i].device_token for i in rows_ids],
                                     [i * vocab_size for i in rows_ids]], torch.int64, device)
    return torch.cat([output_index, device_tokens[slots] + offsets])


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`. On CUDA through pinned memory and a non-blocking copy:
    a copy from pageable memory may wait for the work already queued on the stream, and with
    async scheduling that work is the step before."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _add_bias_and_min_tokens(up: _Upload, fields: dict, rows, params, vocab_size: int) -> None:
    bias_index, bias_values, banned = [], [], []
    for i, (row, p) in enumerate(zip(rows, params)):
        if p.logit_bias:
            bias_index.extend(i * vocab_size + token_id for token_id in p.logit_bias)
            bias_values.extend(p.logit_bias.values())
        if row.min_tokens_mask and len(row.output_token_ids) < p.min_tokens:
            banned.extend(i * vocab_size + token_id for token_id in row.min_tokens_mask)
    fields["logit_bias_index"] = up.add(bias_index, np.int64) if bias_index else None
    fields["logit_bias_values"] = up.add(bias_values, np.float32) if bias_index else None
    fields["min_tokens_index"] = up.add(banned, np.int64) if banned else None


def flat_token_index(
    token_ids: list, row_ids: list[int], vocab_size: int
) -> np.ndarray:  # [total tokens] int64, row * vocab_size + token id
    """All rows' token ids as flat positions, built without a per-row array or tensor."""
    lengths = np.fromiter((len(ids) for ids in token_ids), np.int64, count=len(token_ids))
    if all(isinstance(ids, np.ndarray) for ids in token_ids):
        flat = np.concatenate(token_ids).astype(np.int64, copy=False) if token_ids else \
            np.empty(0, np.int64)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(token_ids), np.int64,
                           count=int(lengths.sum()))
    return flat + np.repeat(np.asarray(row_ids, np.int64) * vocab_size, lengths)


@dataclass
class LogprobsTensors:
    # Column 0 is the sampled token, then the top-k by raw logprob, best first. Rows asking for
    # fewer than max_num_logprobs keep their first 1 + params.logprobs columns.
    token_ids: torch.Tensor  # [num_reqs, 1 + max_num_logprobs] int64
    logprobs: torch.Tensor  # [num_reqs, 1 + max_num_logprobs] float32
    ranks: torch.Tensor  # [num_reqs] int64, rank of the sampled token, 1 = most likely


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    logprobs: LogprobsTensors | None

    def to_lists(self) -> tuple[list[int], list[list[int]] | None, list[list[float]] | None,
                                list[int] | None]:
        """(token ids, logprob token ids, logprobs, ranks) as host lists, in ONE device->host copy:
        the only point of a sampling step where the host waits for the device."""
        return self.to_host().lists()

    def to_host(self) -> "HostSamplerOutput":
        """Start the one device->host copy without waiting for it (see HostCopy)."""
        lp = self.logprobs
        if lp is None:
            return HostSamplerOutput(HostCopy(self.sampled_token_ids), False)
        ranked = pack_ranked(lp.token_ids, lp.logprobs, lp.ranks)
        packed = torch.cat([self.sampled_token_ids[:, None], ranked], dim=1)
        return HostSamplerOutput(HostCopy(packed), True)


@dataclass
class HostSamplerOutput:
    copy: "HostCopy"   # [num_reqs] sampled ids, or [num_reqs, 1 + packed logprobs] (pack_ranked)
    has_logprobs: bool

    def lists(self) -> tuple[list[int], list[list[int]] | None, list[list[float]] | None,
                             list[int] | None]:
        """SamplerOutput.to_lists' result; waits for the copy."""
        packed = self.copy.numpy()
        if not self.has_logprobs:
            return packed.tolist(), None, None, None
        ids, values, ranks = unpack_ranked(packed[:, 1:])
        return packed[:, 0].tolist(), ids, values, ranks


def pack_ranked(
    token_ids: torch.Tensor,  # [rows, cols] int64
    logprobs: torch.Tensor,  # [rows, cols] float32
    ranks: torch.Tensor,  # [rows] int64
) -> torch.Tensor:  # [rows, 1 + 2 * cols] int64: rank, token ids, logprob bits
    """Logprobs rows as one int64 tensor, so that they reach the host in one copy: the float32 bits
    ride along as int64 (sign-extended int32), undone by unpack_ranked."""
    return torch.cat([ranks[:, None], token_ids, logprobs.view(torch.int32).to(torch.int64)], dim=1)


def unpack_ranked(packed: np.ndarray) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """pack_ranked's rows on the host: (token ids, logprobs, ranks)."""
    num_cols = (packed.shape[1] - 1) // 2
    values = packed[:, 1 + num_cols:].astype(np.int32).view(np.float32)
    return packed[:, 1: 1 + num_cols].tolist(), values.tolist(), packed[:, 0].tolist()


class HostCopy:
    """A device tensor on its way to the host.

    On CUDA the copy goes into pinned memory behind the work queued so far and an event marks its
    end, so `numpy()` waits for this copy only: not for work queued after it, like the next step
    an async-scheduling engine has already launched. Elsewhere the tensor is on the host already.
    """

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.cpu()

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class Sampler(torch.nn.Module):
    def forward(
        self,
        logits: torch.Tensor,  # [num_reqs, vocab]
        metadata: SamplingMetadata,
    ) -> SamplerOutput:
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_reqs, vocab]
        logits = apply_logits_processors(logits, metadata)
        sampled = sample(logits, metadata)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)


def sample(
    logits: torch.Tensor,  # [num_reqs, vocab] float32, after the logits processors
    metadata: SamplingMetadata,
) -> torch.Tensor:  # [num_reqs] int64
    on_kernels = kernel_path(logits.device)
    if metadata.all_greedy:
        if on_kernels:
            from strata.kernels.sampling import greedy_tokens
            return greedy_tokens(logits.contiguous())
        return greedy_torch(logits)
    if on_kernels:
        from strata.kernels.sampling import sample_tokens
        if metadata.seeds is None:
            raise ValueError("metadata built for a device without the sampling kernel "
                             f"({logits.device}): rebuild it with from_rows for this device")
        return sample_tokens(logits.contiguous(), metadata.temperature, metadata.top_k,
                             metadata.top_p, metadata.min_p, metadata.seeds)
    return sample_torch(logits, metadata)


def greedy_torch(logits: torch.Tensor) -> torch.Tensor:  # [num_reqs] int64
    """The argmax of each row off the sampling kernel: strata's C kernel for float32 on the CPU
    (torch's CPU argmax spends ~45 us on a 49,152-word row), else torch's."""
    from strata.kernels import cpu_ops
    if logits.dim() == 2 and cpu_ops.available(logits):
        return cpu_ops.argmax(logits)
    return logits.argmax(dim=-1)


def sample_torch(
    logits: torch.Tensor,  # [num_reqs, vocab] float32, after the logits processors
    metadata: SamplingMetadata,
) -> torch.Tensor:  # [num_reqs] int64
    """The CPU path: sort-based truncation, noise from the rows' CPU generators."""
    greedy = None if metadata.all_random else greedy_torch(logits)
    # Mixed batches run the random path on every row and pick per row: one batched pass is
    # cheaper than gathering the random rows into a new tensor and scattering back.
    is_greedy = metadata.temperature < SAMPLING_EPS  # [num_reqs]
    temperature = torch.where(is_greedy, torch.ones_like(metadata.temperature),
                              metadata.temperature)
    logits = logits / temperature.unsqueeze(1)
    if metadata.top_k is not None or metadata.top_p is not None:
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
    if metadata.min_p is not None:
        logits = apply_min_p(logits, metadata.min_p)
    probs = logits.softmax(dim=-1)  # [num_reqs, vocab]
    noise = exponential_noise(probs.shape, metadata.generators, probs.device)
    sampled = (probs / noise).argmax(dim=-1)
    if metadata.all_random:
        return sampled
    return torch.where(is_greedy, greedy, sampled)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [num_reqs, vocab]
    top_k: torch.Tensor | None,  # [num_reqs] int64 in [1, vocab]
    top_p: torch.Tensor | None,  # [num_reqs] float32 in (0, 1]
) -> torch.Tensor:  # [num_reqs, vocab], dropped tokens at -inf
    vocab_size = logits.shape[1]
    logits_sort, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        # The k-th largest value sits at ascending position vocab - k; ties with it are kept.
        kth = logits_sort.gather(1, (vocab_size - top_k).unsqueeze(1))  # [num_reqs, 1]
        logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    if top_p is not None:
        # Ascending order: drop a token when everything at or below it has mass <= 1 - top_p, so
        # the kept top tokens are the smallest set whose mass reaches top_p. Renormalised after
        # top_k, as vLLM and HF do.
        cum_probs = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        drop = cum_probs <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        logits_sort.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, logits_sort)


def apply_min_p(
    logits: torch.Tensor,  # [num_reqs, vocab]
    min_p: torch.Tensor,  # [num_reqs] float32 in [0, 1]
) -> torch.Tensor:  # [num_reqs, vocab]
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [num_reqs, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def exponential_noise(
    shape: torch.Size, generators: dict[int, torch.Generator], device
) -> torch.Tensor:  # [num_reqs, vocab] float32, Exp(1)
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    if generators:
        # Seeded rows draw a whole row from their own CPU generator, so the draw depends only on
        # the seed and position, not on the batch, the device or the other rows' randomness.
        rows = list(generators)
        seeded = torch.stack([torch.empty(shape[1], dtype=torch.float32).exponential_(generator=g)
                              for g in generators.values()])
        if noise.is_cuda:   # pinned and non-blocking, so the host does not wait for queued work
            seeded = seeded.pin_memory().to(device, non_blocking=True)
        noise[host_to_device(rows, torch.int64, device)] = seeded
    # Exp(1) can round to 0, and 0/0 = nan would win the argmax with a forbidden token.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def gather_logprobs(
    raw_logprobs: torch.Tensor,  # [num_reqs, vocab] log_softmax of the raw logits
    sampled: torch.Tensor,  # [num_reqs] int64
    num_logprobs: int,
) -> LogprobsTensors:
    sampled_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1))  # [num_reqs, 1]
    top_logprobs, top_ids = raw_logprobs.topk(min(num_logprobs, raw_logprobs.shape[1]), dim=-1)
    ranks = (raw_logprobs > sampled_logprobs).sum(dim=-1) + 1  # [num_reqs]
    return LogprobsTensors(
        token_ids=torch.cat([sampled.unsqueeze(1), top_ids], dim=1),
        logprobs=torch.cat([sampled_logprobs, top_logprobs], dim=1),
        ranks=ranks,
    )


def make_generator(seed: int, sequence_index: int, step: int) -> torch.Generator:
    """A CPU generator for one seeded sequence at one output position.

    Stateless on purpose: a generator carried along with the request would advance once per
    draw, so its state would depend on how the request was scheduled (a preempted request that is
    recomputed, a speculative token that is rejected, a step on another worker). Deriving the seed
    from (request seed, index of the sequence within an n > 1 request, output position) gives the
    same token at the same position however the request was batched, and different positions or
    sibling sequences different draws. The CPU path draws from the generator; the GPU kernel
    keys Philox with the same seed (`row_seed`), so the two streams differ.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(row_seed(seed, sequence_index, step))
    return generator


def row_seed(seed: int, sequence_index: int, step: int) -> int:
    """The 63-bit seed of one seeded sequence at one output position (fits every torch seed)."""
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (sequence_index & _MASK64))
    mixed = _splitmix64(mixed ^ (step & _MASK64))
    return mixed >> (64 - _SEED_BITS)


def _splitmix64(x: int) -> int:
    # A good 64-bit mixer: nearby inputs (step 7 vs 8) give unrelated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
