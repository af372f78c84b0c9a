"""A request as the scheduler sees it: token ids, progress and status. No torch here."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from strata.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_FORK = "waiting_for_fork"   # an n>1 sibling waiting for the shared prompt
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self._finished   # precomputed below: this runs for every request on every step

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


for _status in RequestStatus:
    _status._finished = _status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                                    RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestTimes:
    arrival: float = field(default_factory=time.time)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Request:
    """One sequence being generated. An ``n>1`` request becomes n of these (siblings)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), *, parent_id: str | None = None,
                 sequence_index: int = 0, arrival_time: float | None = None):
        self.request_id = request_id
        self.parent_id = parent_id or request_id   # the user's request id
        self.sequence_index = sequence_index       # which of the n samples this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        # Tokens sampled by scheduled steps whose ids the scheduler has not seen yet. The update of
        # a step brings them; with async scheduling the next step is scheduled before that, and
        # counts them as tokens of the sequence already (the runner has their ids on the device).
        self.num_placeholders = 0
        # Tokens (prompt + output) at which the request ends by length; the scheduler caps it at
        # the context length when it admits the request.
        max_tokens = sampling_params.max_tokens
        self.max_num_tokens = len(self.prompt_token_ids) + (max_tokens if max_tokens is not None else 1 << 62)
        self.num_cached_tokens = -1                # prompt tokens served by the prefix cache (-1: not yet known)
        self.num_preemptions = 0
        self.times = RequestTimes(arrival=arrival_time or time.time())
        # Filled in by the engine for sampled logprobs / prompt logprobs; opaque to the scheduler.
        self.logprobs: list = []
        self.prompt_logprobs: list = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={len(self.output_token_ids)}+{self.num_placeholders}, "
                f"computed={self.num_computed_tokens})")
