"""The model runner of one rank among several (tensor and/or pipeline parallel).

Every rank receives the same SchedulerOutput and keeps the same request states. With one
pipeline stage every rank samples: the LM head's all-gather gives each the same logits, the
sampler gets the same seeds (and the same global random state, seeded alike on every rank when
the KV cache is allocated), so each draws the driver's tokens and feeds them to its next step
from its own device, as one process does (async scheduling included). With pipeline stages
only the driver (tensor rank 0 of the last stage) has logits and samples; the other ranks learn
the tokens from the next step's message (``apply_sampled``), and the other ranks of the last
stage take part in every all-gather of the LM head the driver makes, in the same order.

With pipeline stages a step's rows are cut into micro-batches: a stage receives a micro-batch's
(hidden, residual) from the stage before, runs its layers and sends the result on without
waiting, so consecutive stages work on consecutive micro-batches at the same time.
"""

from __future__ import annotations

import torch

from strata.core.sched_output import SchedulerOutput
from strata.distributed import parallel_state as ps
from strata.distributed.pipeline import recv_from_prev_stage, send_to_next_stage, split_rows
from strata.forward_context import set_forward_context
from strata.runner.input_batch import StepInputs, build_step_inputs
from strata.runner.model_runner import PROMPT_LOGPROB_ROWS, ModelRunner, StepHandle, _rows


class ParallelModelRunner(ModelRunner):
    def __init__(self, *args, num_micro_batches: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        groups = ps.get_groups()
        self.groups = groups
        self.is_driver = groups.is_last_stage and groups.tp_rank == 0
        self.samples = self.is_driver or groups.pp_size == 1
        # As many micro-batches as stages keeps every stage busy once the pipeline is full.
        self.num_micro_batches = num_micro_batches or groups.pp_size

    def apply_sampled(self, sampled: dict[str, list[int]]) -> None:
        """The driver's tokens of the step before (a no-op on a rank that sampled them itself)."""
        if self.samples:
            return
        for req_id, tokens in sampled.items():
            state = self.states.get(req_id)
            if state is not None:
                state.output_token_ids.extend(tokens)

    def _forward(self, sched: SchedulerOutput, inputs: StepInputs) -> torch.Tensor | None:
        if self.groups.pp_size == 1:
            return super()._forward(sched, inputs)
        counts = [sched.num_scheduled_tokens[r] for r in inputs.req_ids]
        hidden_size = self.model_config.hidden_size
        pieces, sends = [], []
        for r0, r1 in split_rows(counts, self.num_micro_batches):
            part = SchedulerOutput(num_scheduled_tokens={r: sched.num_scheduled_tokens[r]
                                                         for r in inputs.req_ids[r0:r1]})
            micro = build_step_inputs(part, self.states, self.block_size, self.device)
            intermediate = None
            if not self.groups.is_first_stage:
                intermediate = recv_from_prev_stage(micro.attn.num_tokens, hidden_size,
                                                    self.model_config.dtype, self.device)
            with set_forward_context(micro.attn):
                out = self.model(micro.input_ids, micro.positions, intermediate)
            if self.groups.is_last_stage:
                pieces.append(out)
            else:
                sends.append(send_to_next_stage(*out))   # kept alive until the send completes
        for request, _payload in sends:
            request.wait()
        return torch.cat(pieces) if pieces else None

    def _profile_forward(self, inputs: StepInputs):
        if self.groups.is_first_stage:
            return super()._profile_forward(inputs)
        # A later stage starts from a carry: the stage before's (hidden, residual).
        carry = torch.zeros(2, inputs.attn.num_tokens, self.model_config.hidden_size,
                            dtype=self.model_config.dtype, device=self.device)
        return self.model(inputs.input_ids, inputs.positions, (carry[0], carry[1]))

    def _outputs(self, hidden: torch.Tensor, inputs: StepInputs, handle: StepHandle,
                 placeholders: torch.Tensor | None) -> None:
        if self.is_driver:
            return super()._outputs(hidden, inputs, handle, placeholders)
        # The LM head's all-gather needs every rank of the group: the same calls as the driver.
        for row, flat_start, first_pos, count in inputs.prompt_logprob_spans:
            for offset in range(0, count, PROMPT_LOGPROB_ROWS):
                n = min(PROMPT_LOGPROB_ROWS, count - offset)
                self.model.compute_logits(hidden[flat_start + offset: flat_start + offset + n])
            self.states[inputs.req_ids[row]].num_prompt_logprobs_done = first_pos + count
        if inputs.sample_rows and self.samples:
            self._sample(hidden, inputs, handle, placeholders)
        elif inputs.sample_rows:
            self.model.compute_logits(_rows(hidden, inputs.logits_indices))
