"""The typed messages between the scheduler and the model runner.

New requests cross in full; requests the runner already holds cross as diffs. ``RunnerOutput``
comes back with the sampled tokens. Nothing else crosses the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen, or one resumed after preemption (its state was dropped)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]      # non-empty only when resumed after preemption
    sampling_params: SamplingParams
    sequence_index: int              # which of the n samples: seeds differ per sample
    block_ids: list[int]
    num_computed_tokens: int         # prefix-cache hits or forked prefix
    num_prompt_logprobs_done: int = 0   # prompt positions whose logprobs were already returned


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]                 # appended to the block table
    replaced_block_ids: dict[int, int]       # table index -> new block id (copy-on-write)
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    step_id: int = 0                 # counts schedule() calls: the scheduler's key for its update
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)   # req_id -> tokens this step
    total_num_scheduled_tokens: int = 0
    block_copies: list[tuple[int, int]] = field(default_factory=list)    # (src, dst) before the forward
    finished_req_ids: set[str] = field(default_factory=set)              # runner drops their state
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class PromptLogprobs:
    start: int                    # first prompt position covered (the logprob of token start+1 ...)
    token_ids: list[list[int]]    # per position: [actual next token, top-k ...]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)   # empty list: mid-prefill
    # Per request: (token ids [1+k], logprobs [1+k], rank of the sampled token) for each new token.
    logprobs: dict[str, list[tuple[list[int], list[float], int]]] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
