"""Continuous batching by token budget.

Every request carries ``num_computed_tokens``; each step hands out ``max_num_batched_tokens``
across running requests first (decodes and unfinished prompt chunks), then waiting ones, first
come first served. Chunked prefill, prefix-cache hits and recompute after preemption all follow
from that one rule. Pure Python: tested on the CPU without a model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from strata.config import CacheConfig, SchedulerConfig
from strata.core.kv_cache_manager import KVCacheManager, cdiv
from strata.core.request import Request, RequestStatus
from strata.core.sched_output import CachedRequestData, NewRequestData, RunnerOutput, SchedulerOutput


class RequestRejected(ValueError):
    """A request that can never be served (too long for the context or for the cache)."""


class QueueFull(RequestRejected):
    """Admission control: too many requests are already waiting (the server answers 503)."""


@dataclass
class StepUpdate:
    """What one step did to one request, for the engine to detokenize and report."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list
    finished: bool


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int, block_size: int, num_blocks: int) -> None:
    """Raise RequestRejected for a prompt no schedule could ever run."""
    if num_prompt_tokens == 0:
        raise RequestRejected("the prompt is empty: at least one token is needed")
    if num_prompt_tokens >= max_model_len:
        raise RequestRejected(
            f"the prompt has {num_prompt_tokens} tokens, but the context holds {max_model_len} "
            f"(max_model_len) including at least one generated token")
    need = cdiv(num_prompt_tokens + 1, block_size)
    if need > num_blocks:
        raise RequestRejected(
            f"the prompt needs {need} KV blocks ({num_prompt_tokens} tokens) but the cache "
            f"has only {num_blocks} blocks of {block_size} tokens")


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int):
        self.config = config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._fork_waiters: dict[str, list[Request]] = {}   # first sibling id -> siblings to fork
        # Block tables as the runner last saw them; a request absent here is new to the runner.
        self._runner_block_ids: dict[str, list[int]] = {}
        self._finished_since_last_step: set[str] = set()
        self.num_preemptions = 0
        # The requests each scheduled step ran, until its update: ids alone could name a newer
        # request that reused the id of one that finished while the step was in flight.
        self._step_requests: dict[int, list[Request]] = {}
        self._num_steps = 0

    # ---- admission -------------------------------------------------------------------------
    def check_request(self, num_prompt_tokens: int) -> None:
        check_prompt_fits(num_prompt_tokens, self.config.max_model_len, self.block_size, self.kv.num_blocks)

    def add_request(self, siblings: list[Request]) -> None:
        """Admit the n samples of one user request. Sibling 0 computes the prompt; the others
        fork its blocks when that is done, sharing them copy-on-write."""
        self.check_request(siblings[0].num_prompt_tokens)
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        for req in siblings:
            self.requests[req.request_id] = req
            req.max_num_tokens = min(req.max_num_tokens, self.config.max_model_len)
        self.waiting.append(siblings[0])
        if len(siblings) > 1:
            for sib in siblings[1:]:
                sib.status = RequestStatus.WAITING_FOR_FORK
            self._fork_waiters[siblings[0].request_id] = siblings[1:]

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The next step. With async scheduling the step before may still be running: its
        sampled tokens are placeholders here, scheduled as inputs like known tokens."""
        self._num_steps += 1
        out = SchedulerOutput(step_id=self._num_steps, finished_req_ids=self._finished_since_last_step)
        self._finished_since_last_step = set()
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        preempted: list[Request] = []
        if self._fork_waiters:
            self._fork_computed_prompts()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_tokens = req.num_tokens + req.num_placeholders
            if req.num_placeholders and num_tokens >= req.max_num_tokens:
                # Its placeholders bring it to max_tokens or the context: their update ends it,
                # and there is nothing to compute before.
                if req.num_placeholders == 1 and req.request_id not in self._fork_waiters:
                    # Only the step in flight's token is unknown, so every token whose KV it has
                    # is known: its seat and blocks go to waiting requests now, not a step later
                    # (in a stream each finishing wave left the step after it short of those
                    # sequences). Steps run in order: the one in flight writes its last KV
                    # before this one can write a new request's into the same blocks.
                    self.running.pop(i)
                    self.kv.cache_computed_blocks(req)
                    self.kv.free(req)
                    continue
                i += 1
                continue
            num_new = min(num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break   # it preempted itself: it was the newest one left
            scheduled.append(req)
            out.num_scheduled_tokens[req.request_id] = num_new
            budget -= num_new
            i += 1

        # Admitting while running requests were just preempted would only thrash.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_placeholders:
                break   # preempted while its last token was in flight: resumed once it is known
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit_tokens
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            if req.times.first_scheduled is None:
                req.times.first_scheduled = time.time()
            self.running.append(req)
            scheduled.append(req)
            out.num_scheduled_tokens[req.request_id] = num_new
            budget -= num_new

        for req in scheduled:
            self._describe(req, out)
            req.num_computed_tokens += out.num_scheduled_tokens[req.request_id]
            if req.num_computed_tokens == req.num_tokens + req.num_placeholders:
                req.num_placeholders += 1   # this step samples a token; its id comes with the update
        self._step_requests[out.step_id] = scheduled
        out.preempted_req_ids = {r.request_id for r in preempted}
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _describe(self, req: Request, out: SchedulerOutput) -> None:
        block_ids = self.kv.block_ids(req.request_id)
        sent = self._runner_block_ids.get(req.request_id)
        self._runner_block_ids[req.request_id] = block_ids
        if sent is None:
            out.new_requests.append(NewRequestData(
                req.request_id, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                req.sequence_index, block_ids, req.num_computed_tokens, len(req.prompt_logprobs)))
            return
        replaced = {}
        if block_ids[: len(sent)] != sent:   # a copy-on-write replaced a block (rare)
            replaced = {j: b for j, b in enumerate(block_ids[: len(sent)]) if sent[j] != b}
        out.cached_requests.append(CachedRequestData(
            req.request_id, block_ids[len(sent):], replaced, req.num_computed_tokens))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._runner_block_ids.pop(req.request_id, None)
        self.waiting.appendleft(req)

    # ---- after the step --------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[StepUpdate]:
        """Take a step's sampled tokens. With async scheduling the step after it has been
        scheduled already; requests that finished or were aborted since have their tokens
        dropped here, and a request preempted since still takes its token (it was sampled)."""
        scheduled = self._step_requests.pop(sched.step_id, None)
        if scheduled is None:
            raise ValueError(f"step {sched.step_id} was not scheduled here, or was updated already")
        updates = []
        for req in scheduled:
            if req.is_finished:
                continue
            req_id = req.request_id
            new_tokens = result.sampled_token_ids.get(req_id, [])
            new_logprobs = result.logprobs.get(req_id, [])
            req.num_placeholders -= len(new_tokens)
            for token in new_tokens:
                req.output_token_ids.append(token)
                if self._check_stop(req, token):
                    break
            if req_id in self._fork_waiters and req.num_computed_tokens >= req.num_prompt_tokens:
                self._fork_siblings(req)
            if req.is_finished:
                self._free(req)
            updates.append(StepUpdate(req, new_tokens, new_logprobs, req.is_finished))
        return updates

    def _check_stop(self, req: Request, token: int) -> bool:
        params = req.sampling_params
        num_out = len(req.output_token_ids)
        if num_out >= params.min_tokens:
            if token in req.eos_token_ids and not params.ignore_eos:
                req.status = RequestStatus.FINISHED_STOPPED
            elif params.stop_token_ids and token in params.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = token
        if not req.is_finished and (num_out >= params.max_tokens
                                    or req.num_tokens >= self.config.max_model_len):
            req.status = RequestStatus.FINISHED_LENGTH
        return req.is_finished

    def _fork_computed_prompts(self) -> None:
        """Async scheduling: a first sibling's prompt step may still be running (no update yet),
        but the step scheduled now runs after it, so the siblings can share its blocks already,
        as they would after the update in the synchronous engine."""
        for first_id in list(self._fork_waiters):
            first = self.requests.get(first_id)
            if (first is not None and first.status is RequestStatus.RUNNING
                    and first.num_computed_tokens >= first.num_prompt_tokens):
                self._fork_siblings(first)

    def _fork_siblings(self, first: Request) -> None:
        """Siblings share every block of the prompt but its last token, which each recomputes
        for its own logits; the shared partial block is copied on its first write."""
        for sib in self._fork_waiters.pop(first.request_id):
            if sib.is_finished:
                continue
            self.kv.fork(first, sib, sib.num_prompt_tokens - 1)
            sib.num_computed_tokens = sib.num_prompt_tokens - 1
            sib.num_cached_tokens = first.num_cached_tokens
            sib.status = RequestStatus.RUNNING
            sib.times.first_scheduled = time.time()
            self.running.append(sib)

    def finish_request(self, req_id: str, status: RequestStatus) -> None:
        """Finish from outside the step (stop string, abort); frees blocks at once."""
        req = self.requests.get(req_id)
        if req is None or req.is_finished:
            return
        req.status = status
        for sib in self._fork_waiters.pop(req_id, []):
            # Siblings never forked: they are served from scratch (their prompt blocks are
            # likely in the prefix cache) unless they are being finished too.
            if not sib.is_finished:
                sib.status = RequestStatus.WAITING
                self.waiting.append(sib)
        self._free(req)

    def _free(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.times.finished = time.time()
        self.kv.cache_computed_blocks(req)
        self.kv.free(req)
        self.kv.forget(req)
        self.requests.pop(req.request_id, None)
        if self._runner_block_ids.pop(req.request_id, None) is not None:
            self._finished_since_last_step.add(req.request_id)
