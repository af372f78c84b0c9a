"""Completions and chat completions on top of the AsyncEngine: prompts in, OpenAI bodies or
Server-Sent Events out."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import AsyncIterator

from strata.core.scheduler import QueueFull
from strata.entrypoints.openai import protocol as P
from strata.outputs import RequestOutput


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or error_kind(status)


# The openai client's exception class for each status, which clients match on.
_ERROR_KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "MethodNotAllowedError", 409: "ConflictError",
                413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError", 422: "UnprocessableEntityError",
                429: "RateLimitError", 499: "ClientClosedRequestError", 503: "ServiceUnavailableError"}


def error_kind(status: int) -> str:
    """The `type` of an OpenAI error body for an HTTP status."""
    return _ERROR_KINDS.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


class OpenAIServing:
    def __init__(self, engine, model_name: str, metrics=None):
        self.engine = engine                       # AsyncEngine
        self.model_name = model_name
        self.metrics = metrics
        self.max_model_len = engine.engine.scheduler_config.max_model_len
        self.tokenizer = engine.engine.tokenizer
        self.vocab_size = engine.engine.model_config.vocab_size

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model")

    # ---- shared --------------------------------------------------------------------------------
    def _check_fits_context(self, prompt_len: int, requested: int | None) -> None:
        """400 unless the prompt, plus the completion tokens asked for, fits the context."""
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                f"the prompt has {prompt_len} tokens", param="prompt")
        if requested is not None and prompt_len + requested > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                f"However, you requested {prompt_len + requested} tokens ({prompt_len} in "
                                f"the prompt, {requested} for the completion)", param="max_tokens")

    def _params(self, request: P.SamplingFields, max_tokens, logprobs, prompt_logprobs=None):
        try:
            params = request.sampling_params(max_tokens, logprobs, prompt_logprobs)
            params.check_token_ids(self.vocab_size)   # here, so the 400 names the parameter
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        return params

    async def _run(self, prompts: list[list[int]], params, request_id: str) -> list[AsyncIterator[RequestOutput]]:
        """Admit every prompt (or none), returning one output stream per prompt."""
        on_finished = self.metrics.record_finished if self.metrics is not None else None
        streams, ids = [], []
        try:
            for i, prompt_ids in enumerate(prompts):
                ids.append(f"{request_id}-{i}")
                streams.append(await self.engine.add_request(ids[-1], {"prompt_token_ids": prompt_ids}, params,
                                                             on_finished))
        except BaseException as e:   # CancelledError included: the prompts admitted so far must go
            for rid in ids:
                self.engine.abort(rid)
            if isinstance(e, Exception):
                raise _as_api_error(e) from None
            raise
        return streams

    # ---- /v1/completions -----------------------------------------------------------------------
    async def completions(self, request: P.CompletionRequest):
        self.check_model(request.model)
        prompts = self._completion_prompts(request.prompt)
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, f"best_of must equal n ({request.n}), got {request.best_of}", param="best_of")
        k = request.logprobs
        if k is not None and not 0 <= k <= 20:
            raise APIError(400, f"logprobs must be in [0, 20], got {k}", param="logprobs")
        for ids in prompts:
            self._check_fits_context(len(ids), request.max_tokens)
        params = self._params(request, request.max_tokens, k, k if (request.echo and k is not None) else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._run(prompts, params, rid)
        if request.stream:
            return self._stream_completions(request, rid, streams)
        finals = await asyncio.gather(*(_last(s) for s in streams))
        choices = []
        for p, out in enumerate(finals):
            for comp in out.outputs:
                text = comp.text
                logprobs = self._completion_logprobs(comp.token_ids, comp.logprobs, 0) if k is not None else None
                if request.echo:
                    prompt_text = self._decode(out.prompt_token_ids)
                    text = prompt_text + text
                    if logprobs is not None:
                        logprobs = self._echo_logprobs(out, logprobs)
                choices.append(P.CompletionChoice(index=p * request.n + comp.index, text=text, logprobs=logprobs,
                                                  finish_reason=comp.finish_reason, stop_reason=comp.stop_reason))
        return P.CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=_usage(finals))

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise APIError(400, "this server has no tokenizer: send prompts as token ids", param="prompt")
                p = self.tokenizer.encode(p)
            if not p:
                raise APIError(400, "prompt must not be empty", param="prompt")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                               param="prompt")
            out.append(list(p))
        return out

    async def _stream_completions(self, request, rid, streams) -> AsyncIterator[str]:
        n = request.n
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        text_offsets: dict[int, int] = {}   # where the next chunk's tokens start in the whole text
        finals: dict[int, RequestOutput] = {}
        async for p, out in _merge(streams):
            for comp in out.outputs:
                index = p * n + comp.index
                start = sent_text.get(index, 0)
                tok_start = sent_tokens.get(index, 0)
                delta = comp.text[start:]
                if not delta and comp.finish_reason is None and index in sent_text:
                    continue   # nothing new to say (tokens with no whole character yet, or held back)
                if request.echo and index not in sent_text:
                    prompt_text = self._decode(out.prompt_token_ids)
                    delta = prompt_text + delta
                    text_offsets[index] = len(prompt_text)
                logprobs = None
                if request.logprobs is not None and comp.logprobs is not None:
                    offset = text_offsets.get(index, 0)
                    logprobs = self._completion_logprobs(comp.token_ids[tok_start:], comp.logprobs[tok_start:],
                                                         offset)
                    text_offsets[index] = offset + sum(len(t) for t in logprobs.tokens)
                sent_text[index] = len(comp.text)
                sent_tokens[index] = len(comp.token_ids)
                chunk = P.CompletionChunk(id=rid, model=self.model_name, choices=[P.CompletionChoice(
                    index=index, text=delta, logprobs=logprobs, finish_reason=comp.finish_reason,
                    stop_reason=comp.stop_reason)])
                yield _sse(chunk)
            if out.finished:
                finals[p] = out
        if request.stream_options and request.stream_options.include_usage:
            yield _sse(P.CompletionChunk(id=rid, model=self.model_name, choices=[],
                                         usage=_usage(list(finals.values()))))
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions ------------------------------------------------------------------
    async def chat(self, request: P.ChatCompletionRequest):
        self.check_model(request.model)
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so it cannot apply a chat template", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=request.add_generation_prompt,
                                                     tokenize=True)
        except Exception as e:   # a template that raises on this conversation
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        k = None
        if request.logprobs:
            k = request.top_logprobs or 0
            if not 0 <= k <= 20:
                raise APIError(400, f"top_logprobs must be in [0, 20], got {k}", param="top_logprobs")
        elif request.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        self._check_fits_context(len(ids), requested)
        params = self._params(request, requested, k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        (stream,) = await self._run([ids], params, rid)
        if request.stream:
            return self._stream_chat(request, rid, stream)
        out = await _last(stream)
        choices = [P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.text),
                                logprobs=self._chat_logprobs(c.logprobs, k) if k is not None else None,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in out.outputs]
        return P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices, usage=_usage([out]))

    async def _stream_chat(self, request, rid, stream) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        final = None
        for i in range(request.n):
            yield _sse(P.ChatCompletionChunk(id=rid, model=self.model_name, choices=[P.ChatStreamChoice(
                index=i, delta=P.DeltaMessage(role="assistant", content=""))]))
        async for out in stream:
            for comp in out.outputs:
                start, tok_start = sent_text.get(comp.index, 0), sent_tokens.get(comp.index, 0)
                delta = comp.text[start:]
                if not delta and comp.finish_reason is None:
                    continue
                logprobs = None
                if request.logprobs and comp.logprobs is not None:
                    logprobs = self._chat_logprobs(comp.logprobs[tok_start:], request.top_logprobs or 0)
                sent_text[comp.index], sent_tokens[comp.index] = len(comp.text), len(comp.token_ids)
                yield _sse(P.ChatCompletionChunk(id=rid, model=self.model_name, choices=[P.ChatStreamChoice(
                    index=comp.index, delta=P.DeltaMessage(content=delta), logprobs=logprobs,
                    finish_reason=comp.finish_reason)]))
            final = out
        if request.stream_options and request.stream_options.include_usage:
            yield _sse(P.ChatCompletionChunk(id=rid, model=self.model_name, choices=[], usage=_usage([final])))
        yield "data: [DONE]\n\n"

    # ---- logprobs formats ----------------------------------------------------------------------
    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else ""

    @staticmethod
    def _token_text(entry, token_id) -> str:
        lp = entry[token_id]
        return lp.decoded_token if lp.decoded_token is not None else str(token_id)

    def _completion_logprobs(self, token_ids, logprobs, offset: int) -> P.CompletionLogprobs:
        result = P.CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs or []):
            text = self._token_text(entry, token_id)
            result.tokens.append(text)
            result.token_logprobs.append(entry[token_id].logprob)
            result.top_logprobs.append({self._token_text(entry, t): lp.logprob for t, lp in entry.items()})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _echo_logprobs(self, out: RequestOutput, completion: P.CompletionLogprobs) -> P.CompletionLogprobs:
        prompt = P.CompletionLogprobs()
        offset = 0
        for i, token_id in enumerate(out.prompt_token_ids):
            text = self._decode([token_id])
            entry = out.prompt_logprobs[i] if out.prompt_logprobs else None
            prompt.tokens.append(text)
            prompt.token_logprobs.append(entry[token_id].logprob if entry else None)
            prompt.top_logprobs.append({self._token_text(entry, t): lp.logprob for t, lp in entry.items()}
                                       if entry else None)
            prompt.text_offset.append(offset)
            offset += len(text)
        return P.CompletionLogprobs(
            tokens=prompt.tokens + completion.tokens,
            token_logprobs=prompt.token_logprobs + completion.token_logprobs,
            top_logprobs=prompt.top_logprobs + completion.top_logprobs,
            text_offset=prompt.text_offset + [o + offset for o in completion.text_offset])

    def _chat_logprobs(self, logprobs, k: int) -> P.ChatLogprobs:
        """Each entry holds the sampled token first, then the top k by rank."""
        content = []
        for entry in logprobs or []:
            token_id, chosen = next(iter(entry.items()))
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
            top = [P.TopLogprob(token=self._token_text(entry, t), logprob=lp.logprob,
                                bytes=list(self._token_text(entry, t).encode())) for t, lp in ranked]
            text = self._token_text(entry, token_id)
            content.append(P.ChatTokenLogprob(token=text, logprob=chosen.logprob, bytes=list(text.encode()),
                                              top_logprobs=top))
        return P.ChatLogprobs(content=content)


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(503, str(e))
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {e}")


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in stream:
        pass
    return out


async def _merge(streams: list[AsyncIterator[RequestOutput]]):
    """Interleave several prompts' outputs as they come, tagged with the prompt's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _usage(finals: list[RequestOutput]) -> P.UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals if o is not None)
    completion = sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals if o is not None)
    return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))


def _sse(model) -> str:
    return f"data: {json.dumps(model.model_dump(exclude_none=False), ensure_ascii=False)}\n\n"
