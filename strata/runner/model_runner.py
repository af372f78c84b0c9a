"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

It keeps each request's tokens and block table between steps (the scheduler sends diffs),
owns the KV cache tensors and binds them to the attention layers, measures the activation
memory of the largest step (the memory plan) and, on CUDA, replays captured graphs for decode
steps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from strata.config import ModelConfig
from strata.core.sched_output import PromptLogprobs, RunnerOutput, SchedulerOutput
from strata.forward_context import set_forward_context
from strata.layers.attention import Attention
from strata.runner.cuda_graph import CudaGraphRunner
from strata.runner.input_batch import CachedRequestState, StepInputs, build_step_inputs, dummy_prefill_inputs
from strata.sample.sampler import Sampler, SamplingMetadata, SamplingRow, make_generator

# Prompt positions whose logits are computed at once for prompt logprobs.
PROMPT_LOGPROB_ROWS = 256


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, block_size: int,
                 device: torch.device, eos_token_ids: frozenset[int] = frozenset()):
        self.model = model
        self.model_config = model_config
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.states: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.graphs: CudaGraphRunner | None = None

    # ---- KV cache ----------------------------------------------------------------------------
    def kv_cache_block_bytes(self) -> int:
        """Bytes of one block over all layers."""
        a = self.attn_layers[0]
        elem = torch.empty((), dtype=self.model_config.dtype).element_size()
        return 2 * self.block_size * a.num_kv_heads * a.head_dim * elem * len(self.attn_layers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """num_blocks for requests plus one scratch block at the end that no request owns: the
        padding rows of a CUDA graph write their keys and values there."""
        self.free_kv_cache()
        self.num_blocks = num_blocks
        for layer in self.attn_layers:
            shape = (2, num_blocks + 1, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.kv_cache = self._zeros(shape)
            self.kv_caches.append(layer.kv_cache)

    def free_kv_cache(self) -> None:
        self.graphs = None
        for layer in self.attn_layers:
            layer.kv_cache = None
        self.kv_caches = []

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    def _zeros(self, shape) -> torch.Tensor:
        if self.device.type == "cpu" and self.model_config.dtype in (torch.float32, torch.float16):
            # calloc'd pages: zero without touching them, so an unused cache costs no RAM.
            np_dtype = np.float32 if self.model_config.dtype == torch.float32 else np.float16
            return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
        return torch.zeros(shape, dtype=self.model_config.dtype, device=self.device)

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        for src, dst in sched.block_copies:
            for cache in self.kv_caches:
                cache[:, dst].copy_(cache[:, src])
        if sched.is_empty:
            return RunnerOutput()
        inputs = build_step_inputs(sched, self.states, self.block_size, self.device)
        if self.graphs is not None and self.graphs.can_run(inputs.attn):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.attn)
        else:
            with set_forward_context(inputs.attn):
                hidden = self.model(inputs.input_ids, inputs.positions)   # [num_tokens, hidden]
        out = RunnerOutput({req_id: [] for req_id in inputs.req_ids})
        self._prompt_logprobs(hidden, inputs, out)
        if inputs.sample_rows:
            self._sample(hidden, inputs, out)
        for req_id in inputs.req_ids:
            self.states[req_id].num_computed_tokens += sched.num_scheduled_tokens[req_id]
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
            hidden = self.model(inputs.input_ids, inputs.positions)
        rows = hidden[-1:].expand(num_seqs, -1)
        logits = self.model.compute_logits(rows).float()
        self.sampler(logits, self._profile_sampling_metadata(num_seqs, logits.shape[-1]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden, rows, logits
        self.free_kv_cache()
        torch.cuda.empty_cache()
        return peak

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

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, out: RunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()   # [rows, vocab]
        rows = []
        for row in inputs.sample_rows:
            state = self.states[inputs.req_ids[row]]
            params = state.sampling_params
            generator = None
            if params.seed is not None and params.temperature >= 1e-5:
                generator = make_generator(params.seed, state.sequence_index, len(state.output_token_ids))
            mask = None
            if len(state.output_token_ids) < params.min_tokens:
                mask = set(self.eos_token_ids) | set(params.stop_token_ids or ())
            rows.append(SamplingRow(params, state.prompt_token_ids, state.output_token_ids, generator, mask))
        metadata = SamplingMetadata.from_rows(rows, logits.shape[-1], logits.device)
        result = self.sampler(logits, metadata)
        # One device->host copy for the tokens and their logprobs: the step's only wait.
        sampled, lp_ids, lp_vals, lp_ranks = result.to_lists()
        lp = result.logprobs
        for i, row in enumerate(inputs.sample_rows):
            req_id = inputs.req_ids[row]
            state = self.states[req_id]
            state.output_token_ids.append(sampled[i])
            out.sampled_token_ids[req_id] = [sampled[i]]
            k = state.sampling_params.logprobs
            if lp is not None and k is not None:
                out.logprobs[req_id] = [(lp_ids[i][: k + 1], lp_vals[i][: k + 1], lp_ranks[i])]

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, out: RunnerOutput) -> None:
        for row, flat_start, first_pos, count in inputs.prompt_logprob_spans:
            state = self.states[inputs.req_ids[row]]
            k = state.sampling_params.prompt_logprobs
            ids, vals, ranks = [], [], []
            # Pieces of at most PROMPT_LOGPROB_ROWS positions: a whole chunk's logits (tokens x
            # vocab floats, twice over) could outgrow the memory the plan measured for one step.
            for offset in range(0, count, PROMPT_LOGPROB_ROWS):
                n = min(PROMPT_LOGPROB_ROWS, count - offset)
                logits = self.model.compute_logits(hidden[flat_start + offset: flat_start + offset + n]).float()
                logprobs = torch.log_softmax(logits, dim=-1)                        # [n, vocab]
                pos = first_pos + offset
                targets = torch.tensor(state.prompt_token_ids[pos + 1: pos + 1 + n], device=logprobs.device)
                target_lp = logprobs.gather(1, targets[:, None])                    # [n, 1]
                top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], targets[:, None][:, :0])
                ids += torch.cat([targets[:, None], top_ids], 1).tolist()
                vals += torch.cat([target_lp, top_vals], 1).tolist()
                ranks += ((logprobs > target_lp).sum(-1) + 1).tolist()
            out.prompt_logprobs[state.req_id] = PromptLogprobs(first_pos, ids, vals, ranks)
            state.num_prompt_logprobs_done = first_pos + count
