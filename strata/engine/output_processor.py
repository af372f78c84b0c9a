"""From scheduler updates to RequestOutputs: detokenize, find stop strings, gather logprobs and
metrics, and group the n samples of a request back together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from strata.core.request import Request, RequestStatus
from strata.core.sched_output import RunnerOutput
from strata.core.scheduler import Scheduler, StepUpdate
from strata.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from strata.sampling_params import RequestOutputKind


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    siblings: list[Request]
    detokenizers: list  # IncrementalDetokenizer | None per sample
    logprobs: list[list | None]
    cumulative_logprobs: list[float]
    prompt_logprobs: list | None
    emitted_text_len: list[int] = field(default_factory=list)
    final_only: bool = False    # RequestOutputKind.FINAL_ONLY: no output until finished


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.states: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt: str | None, siblings: list[Request]) -> None:
        params = siblings[0].sampling_params
        from strata.engine.detokenizer import IncrementalDetokenizer
        detoks = []
        for sib in siblings:
            if self.tokenizer is None or not params.detokenize:
                detoks.append(None)
                continue
            detoks.append(IncrementalDetokenizer(
                self.tokenizer, sib.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
                stop=params.stop or [], include_stop_str_in_output=params.include_stop_str_in_output))
        n = len(siblings)
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] * siblings[0].num_prompt_tokens
        self.states[request_id] = RequestState(
            request_id, prompt, siblings[0].prompt_token_ids, siblings, detoks,
            [[] if params.logprobs is not None else None for _ in range(n)], [0.0] * n, prompt_lp,
            final_only=params.output_kind == RequestOutputKind.FINAL_ONLY)

    def process(self, updates: list[StepUpdate], result: RunnerOutput) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        now = time.time()
        for upd in updates:
            req = upd.request
            state = self.states.get(req.parent_id)
            if state is None:
                continue
            touched[state.request_id] = state
            self._take_prompt_logprobs(state, req, result)
            if not upd.new_token_ids:
                continue
            if req.times.first_token is None:
                req.times.first_token = now
            req.times.last_token = now
            self._take_tokens(state, req, upd)
        return [self._make_output(s) for s in touched.values()
                if not s.final_only or all(sib.is_finished for sib in s.siblings)]

    def _take_tokens(self, state: RequestState, req: Request, upd: StepUpdate) -> None:
        i = req.sequence_index
        detok = state.detokenizers[i]
        if state.logprobs[i] is not None:
            for ids, vals, rank in upd.new_logprobs:
                state.logprobs[i].append(self._logprob_entry(ids, vals, rank))
                state.cumulative_logprobs[i] += vals[0]
        if detok is not None:
            detok.update(upd.new_token_ids)
            if detok.stop_reason is not None and not req.is_finished:
                req.stop_reason = detok.stop_reason
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if req.is_finished and detok is not None:
            detok.flush()

    def _take_prompt_logprobs(self, state: RequestState, req: Request, result: RunnerOutput) -> None:
        chunk = result.prompt_logprobs.get(req.request_id)
        if chunk is None or state.prompt_logprobs is None:
            return
        for offset, (ids, vals, rank) in enumerate(zip(chunk.token_ids, chunk.logprobs, chunk.ranks)):
            pos = chunk.start + offset + 1          # the prompt token these logits predict
            state.prompt_logprobs[pos] = self._logprob_entry(ids, vals, rank)
            req.prompt_logprobs.append(pos)

    def _logprob_entry(self, ids: list[int], vals: list[float], rank: int) -> dict[int, Logprob]:
        """The chosen token (with its rank) first, then the top-k ranked 1..k."""
        entry: dict[int, Logprob] = {}
        for j, (tid, val) in enumerate(zip(ids, vals)):
            decoded = self.tokenizer.decode([tid], skip_special_tokens=False) if self.tokenizer else None
            entry.setdefault(tid, Logprob(val, rank if j == 0 else j, decoded))
        return entry

    def _make_output(self, state: RequestState) -> RequestOutput:
        outputs = []
        for i, sib in enumerate(state.siblings):
            detok = state.detokenizers[i]
            outputs.append(CompletionOutput(
                index=i, text=detok.output_text if detok is not None else "",
                token_ids=list(sib.output_token_ids),
                cumulative_logprob=state.cumulative_logprobs[i] if state.logprobs[i] is not None else None,
                logprobs=state.logprobs[i], finish_reason=sib.status.finish_reason,
                stop_reason=sib.stop_reason))
        finished = all(s.is_finished for s in state.siblings)
        first = state.siblings[0]
        metrics = RequestMetrics(
            arrival_time=first.times.arrival, first_scheduled_time=first.times.first_scheduled,
            first_token_time=min((s.times.first_token for s in state.siblings if s.times.first_token), default=None),
            last_token_time=max((s.times.last_token for s in state.siblings if s.times.last_token), default=None),
            finished_time=time.time() if finished else None,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generation_tokens=sum(len(s.output_token_ids) for s in state.siblings),
            num_cached_tokens=max(first.num_cached_tokens, 0))
        if finished:
            del self.states[state.request_id]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                             state.prompt_logprobs, outputs, finished, metrics,
                             num_cached_tokens=max(first.num_cached_tokens, 0))

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.states.get(request_id)
        if state is None:
            return None
        for sib in reversed(state.siblings):
            self.scheduler.finish_request(sib.request_id, RequestStatus.FINISHED_ABORTED)
        return self._make_output(state)
