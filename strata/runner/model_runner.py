"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

It keeps each request's tokens and block table between steps (the scheduler sends diffs),
owns the KV cache tensors and binds them to the attention layers, measures the activation
memory of the largest step (the memory plan) and, on CUDA, replays captured graphs for decode
steps.

A step is `launch` (queue the device work, start the copy of the sampled ids to the host) then
`finish` (wait for that copy, hand the tokens over). `execute` does both at once; an engine with
async scheduling launches step N+1 before it finishes step N, so the host prepares N+1 and
processes N's results while the device computes. Tokens sampled by a launched step are
placeholders (-1) in the states until it finishes; the next step reads them on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from strata.attention import host_tier
from strata.config import ModelConfig
from strata.core.sched_output import PromptLogprobs, RunnerOutput, SchedulerOutput
from strata.forward_context import set_forward_context
from strata.layers.attention import Attention
from strata.quant.kv import SCALE_DTYPE, KVCacheFormat, kv_cache_bytes_per_slot
from strata.runner.cuda_graph import CudaGraphRunner
from strata.runner.input_batch import CachedRequestState, StepInputs, build_step_inputs, dummy_prefill_inputs
from strata.sample.sampler import (HostCopy, HostSamplerOutput, MetadataCache, Sampler, SamplingMetadata,
                                   SamplingRow, host_to_device, make_generator, pack_ranked, unpack_ranked)

# Prompt positions whose logits are computed at once for prompt logprobs.
PROMPT_LOGPROB_ROWS = 256
# Cache dtypes numpy can calloc (bfloat16 and fp8 have no numpy type).
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int8: np.int8}


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, block_size: int,
                 device: torch.device, eos_token_ids: frozenset[int] = frozenset(),
                 kv_format: KVCacheFormat | None = None, kv_host_layers: frozenset[int] = frozenset()):
        self.model = model
        self.model_config = model_config
        self.block_size = block_size
        self.device = device
        self.kv_format = kv_format       # None: K/V in the model dtype
        # Offloading's KV tier: these decoder layers keep their cache in host RAM (CPU attention).
        self.kv_host_layers = kv_host_layers
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self._sampling_metadata = MetadataCache()
        self.states: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.graphs: CudaGraphRunner | None = None
        self._step_id = 0
        # The last step that sampled, and its sampled ids [rows]: where placeholders point.
        self._last_step: int | None = None
        self._last_sampled: torch.Tensor | None = None

    # ---- KV cache ----------------------------------------------------------------------------
    def kv_cache_block_bytes(self) -> int:
        """Bytes of one block over all layers (codes and scales for a quantized cache)."""
        return self.block_size * sum(
            kv_cache_bytes_per_slot(a.num_kv_heads, a.head_dim, self.model_config.dtype, self.kv_format)
            for a in self.attn_layers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """num_blocks for requests plus one scratch block at the end that no request owns: the
        padding rows of a CUDA graph write their keys and values there."""
        self.free_kv_cache()
        self.num_blocks = num_blocks
        fmt = self.kv_format
        for index, layer in enumerate(self.attn_layers):
            shape = (2, num_blocks + 1, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.kv_on_host = index in self.kv_host_layers
            # a host-tier layer's cache and scales: head-major blocks in host RAM (host_tier.zeros_cache)
            zeros = host_tier.zeros_cache if layer.kv_on_host else functools.partial(self._zeros, device=self.device)
            layer.kv_cache = zeros(shape, self.model_config.dtype if fmt is None else fmt.dtype)
            self.kv_caches.append(layer.kv_cache)
            if fmt is not None:   # beside its codes
                layer.kv_scales = zeros(shape[:-1], SCALE_DTYPE)
                self.kv_caches.append(layer.kv_scales)   # block copies move the scales too

    def free_kv_cache(self) -> None:
        self.graphs = None
        for layer in self.attn_layers:
            layer.kv_cache = None
            layer.kv_scales = None
        self.kv_caches = []

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if device.type == "cpu" and np_dtype is not None:
            # calloc'd pages: zero without touching them, so an unused cache costs no RAM.
            return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
        return torch.zeros(shape, dtype=dtype, device=device)

    # ---- one step ----------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.finish(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Queue one step's work on the device and return without waiting for it. Sampled tokens
        become placeholders in the request states until `finish`; a step launched before then
        reads them from this step's sampled tensor on the device."""
        self._update_states(sched)
        for src, dst in sched.block_copies:
            for cache in self.kv_caches:
                cache[:, dst].copy_(cache[:, src])
        self._step_id += 1
        handle = StepHandle(self._step_id, list(sched.num_scheduled_tokens))
        if sched.is_empty:
            return handle
        inputs = build_step_inputs(sched, self.states, self.block_size, self.device, self._last_step)
        placeholders = self._fill_placeholders(inputs) if inputs.placeholder_index else None
        hidden = self._forward(sched, inputs)
        if hidden is not None:   # None on a pipeline stage before the last
            self._outputs(hidden, inputs, handle, placeholders)
        for req_id in inputs.req_ids:
            self.states[req_id].num_computed_tokens += sched.num_scheduled_tokens[req_id]
        return handle

    def _forward(self, sched: SchedulerOutput, inputs: StepInputs) -> torch.Tensor | None:
        if self.graphs is not None and self.graphs.can_run(inputs.attn):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.attn)
        with set_forward_context(inputs.attn):
            return self.model(inputs.input_ids, inputs.positions)   # [num_tokens, hidden]

    def _outputs(self, hidden: torch.Tensor, inputs: StepInputs, handle: StepHandle,
                 placeholders: torch.Tensor | None) -> None:
        """Logits, prompt logprobs and sampled tokens of the step."""
        self._prompt_logprobs(hidden, inputs, handle)
        if inputs.sample_rows:
            self._sample(hidden, inputs, handle, placeholders)

    def _fill_placeholders(self, inputs: StepInputs) -> torch.Tensor:  # [num_placeholders] int64
        """Put the ids behind this step's placeholder inputs (the last step's sampled tokens) into
        input_ids, on the device. In a steady decode batch the rows keep their order and every
        input is a placeholder: the sampled tensor is then the input as it is, with no op at all."""
        source, index = inputs.placeholder_source, inputs.placeholder_index
        if source == list(range(len(source))):
            placeholders = self._last_sampled[: len(source)]
        else:
            placeholders = self._last_sampled[host_to_device(source, torch.int64, self.device)]
        if index == list(range(inputs.attn.num_tokens)):
            inputs.input_ids = placeholders
        else:
            inputs.input_ids.index_copy_(0, host_to_device(index, torch.int64, self.device), placeholders)
        return placeholders

    def finish(self, handle: StepHandle) -> RunnerOutput:
        """Wait for a launched step's tokens (one device->host copy), fill in its placeholders and
        return them. States dropped since the launch (finished, preempted) are filled harmlessly."""
        out = RunnerOutput({req_id: [] for req_id in handle.req_ids})
        for req_id, first_pos, copy in handle.prompt_logprobs:
            ids, vals, ranks = unpack_ranked(copy.numpy())
            out.prompt_logprobs[req_id] = PromptLogprobs(first_pos, ids, vals, ranks)
        if handle.sampled is None:
            return out
        sampled, lp_ids, lp_vals, lp_ranks = handle.sampled.lists()
        for i, (state, index, num_logprobs) in enumerate(handle.sampled_rows):
            token = sampled[i]
            state.output_token_ids[index] = token
            if state.pending_step == handle.step_id:
                state.pending_step = None
            out.sampled_token_ids[state.req_id] = [token]
            if lp_ids is not None and num_logprobs is not None:
                k = num_logprobs + 1
                out.logprobs[state.req_id] = [(lp_ids[i][:k], lp_vals[i][:k], lp_ranks[i])]
        return out

    # ---- startup: memory plan and graphs -------------------------------------------------------
    @torch.inference_mode()
    def profile_activation_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """Peak memory of the largest step beyond what is allocated now: a forward pass over
        num_tokens prompt tokens in num_seqs sequences, then logits and sampling for num_seqs rows
        (the most a step samples). Runs on a temporary KV cache just large enough."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        inputs = dummy_prefill_inputs(num_tokens, num_seqs, self.block_size, self.model_config.vocab_size,
                                      self.device)
        self.allocate_kv_cache(int(inputs.attn.block_tables.max()) + 1)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with set_forward_context(inputs.attn):
            hidden = self._profile_forward(inputs)
        if not isinstance(hidden, tuple):   # a pipeline stage before the last returns its carry
            rows = hidden[-1:].expand(num_seqs, -1)
            logits = self.model.compute_logits(rows).float()
            self.sampler(logits, self._profile_sampling_metadata(num_seqs, logits.shape[-1]))
            del rows, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden
        self.free_kv_cache()
        torch.cuda.empty_cache()
        return peak

    def _profile_forward(self, inputs: StepInputs):
        return self.model(inputs.input_ids, inputs.positions)

    def _profile_sampling_metadata(self, rows: int, vocab: int) -> SamplingMetadata:
        """Random sampling with every truncation and penalty on: the sampler's largest footprint."""
        from strata.sampling_params import SamplingParams
        params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.1,
                                repetition_penalty=1.1, logprobs=5)
        return SamplingMetadata.from_rows(
            [SamplingRow(params, [1, 2, 3], [4], None, None) for _ in range(rows)], vocab, self.device)

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int) -> CudaGraphRunner:
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = CudaGraphRunner(self.model, max_batch, max_blocks, self.block_size,
                                      self.scratch_slot, self.device)
        self.graphs.capture()
        return self.graphs

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            self.states.pop(req_id, None)
        for new in sched.new_requests:
            self.states[new.req_id] = CachedRequestState.from_new(new)
        for cached in sched.cached_requests:
            state = self.states[cached.req_id]
            for index, block_id in cached.replaced_block_ids.items():
                state.block_ids[index] = block_id
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, handle: StepHandle,
                placeholders: torch.Tensor | None) -> None:
        logits = self.model.compute_logits(_rows(hidden, inputs.logits_indices)).float()   # [rows, vocab]
        rows = []
        for row in inputs.sample_rows:
            state = self.states[inputs.req_ids[row]]
            params = state.sampling_params
            generator = None
            # Placeholders count: the position is known even where the token is not yet.
            num_output = len(state.output_token_ids)
            if params.seed is not None and params.temperature >= 1e-5:
                generator = make_generator(params.seed, state.sequence_index, num_output)
            mask = None
            if num_output < params.min_tokens:
                mask = set(self.eos_token_ids) | set(params.stop_token_ids or ())
            rows.append(SamplingRow(params, state.prompt_token_ids, state.output_token_ids, generator, mask,
                                    device_token=inputs.placeholder_slot.get(row)))
        metadata = self._sampling_metadata.get(rows, logits.shape[-1], logits.device, placeholders)
        result = self.sampler(logits, metadata)
        handle.sampled = result.to_host()   # the copy starts now; finish() waits for it
        self._last_sampled, self._last_step = result.sampled_token_ids, handle.step_id
        for i, row in enumerate(inputs.sample_rows):
            state = self.states[inputs.req_ids[row]]
            state.output_token_ids.append(-1)
            state.pending_step, state.pending_row = handle.step_id, i
            handle.sampled_rows.append((state, len(state.output_token_ids) - 1,
                                        state.sampling_params.logprobs))

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, handle: StepHandle) -> None:
        for row, flat_start, first_pos, count in inputs.prompt_logprob_spans:
            state = self.states[inputs.req_ids[row]]
            k = state.sampling_params.prompt_logprobs
            pieces = []
            # Pieces of at most PROMPT_LOGPROB_ROWS positions: a whole chunk's logits (tokens x
            # vocab floats, twice over) could outgrow the memory the plan measured for one step.
            for offset in range(0, count, PROMPT_LOGPROB_ROWS):
                n = min(PROMPT_LOGPROB_ROWS, count - offset)
                logits = self.model.compute_logits(hidden[flat_start + offset: flat_start + offset + n]).float()
                logprobs = torch.log_softmax(logits, dim=-1)                        # [n, vocab]
                pos = first_pos + offset
                targets = host_to_device(state.prompt_token_ids[pos + 1: pos + 1 + n], torch.int64,
                                         logprobs.device)
                target_lp = logprobs.gather(1, targets[:, None])                    # [n, 1]
                top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], targets[:, None][:, :0])
                pieces.append(pack_ranked(torch.cat([targets[:, None], top_ids], 1),
                                          torch.cat([target_lp, top_vals], 1),
                                          (logprobs > target_lp).sum(-1) + 1))
            handle.prompt_logprobs.append((state.req_id, first_pos, HostCopy(torch.cat(pieces))))
            state.num_prompt_logprobs_done = first_pos + count


@dataclass
class StepHandle:
    """A launched step: what `ModelRunner.finish` needs to hand its results over."""

    step_id: int
    req_ids: list[str]                       # the scheduled rows
    sampled: HostSamplerOutput | None = None   # sampled ids (and logprobs) on their way to the host
    # Per sampled row: its state, the index of its placeholder in output_token_ids, params.logprobs.
    sampled_rows: list[tuple[CachedRequestState, int, int | None]] = field(default_factory=list)
    prompt_logprobs: list[tuple[str, int, HostCopy]] = field(default_factory=list)   # req_id, first position


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index] for a host list of row indices, without a host<->device sync: indexing a CUDA
    tensor with a Python list copies the list from pageable memory, which waits for all queued
    work (with async scheduling, the whole step before). Decode steps take a leading slice."""
    if index == list(range(len(index))):
        return t[: len(index)]
    return t[host_to_device(index, torch.int64, t.device)]
