"""Perplexity of a model on a text, computed by the engine itself (llama.cpp's ``llama-perplexity``).

The text is cut into windows of ``context_len`` tokens; each window is one prompt, and the engine
returns the log-probability of every prompt token given the tokens before it in that window
(``prompt_logprobs``). Perplexity is ``exp(mean negative log-likelihood)`` over the scored tokens.
Running the windows through ``LLM.generate`` rather than a separate forward means the figure
measures what serving computes: the same loader, quantization, attention backend and KV cache,
which is what an accuracy gate for quantized weights or a quantized KV cache has to see.

Windows (``stride`` in tokens of text, default ``context_len``):
  * ``stride == context_len`` (default): non-overlapping windows, as llama.cpp's chunks. Every
    token but each window's first is scored, with 0 to ``context_len - 1`` tokens of context.
  * ``stride < context_len``: windows start every ``stride`` tokens and each scores only the
    tokens the previous window did not (the last ``stride``), so every token after the first
    window sees at least ``context_len - stride`` tokens of context. ``stride = context_len // 2``
    is llama.cpp's rule of scoring the second half of each window, except that llama.cpp's
    windows do not overlap and so skip the first half of each; here the halves overlap and every
    token is scored once.
Only full windows are used (a short last window would be scored with less context than the rest).
A text is tokenized without special tokens; if the model's tokenizer adds BOS to a prompt (Llama
style), each window starts with BOS followed by ``context_len - 1`` text tokens, as llama.cpp
does. Token ids are scored exactly as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float           # exp(nll_mean)
    nll_mean: float      # mean negative log-likelihood per scored token, in nats
    num_tokens: int      # scored tokens
    num_windows: int


@dataclass(frozen=True)
class Window:
    token_ids: list[int]   # the prompt: [BOS] + text tokens
    first_scored: int      # positions first_scored.. are scored (each predicted by those before)


def perplexity(llm, text_or_token_ids: str | Sequence[int], context_len: int = 512,
               stride: int | None = None, max_windows: int | None = None,
               use_tqdm: bool = False) -> PerplexityResult:
    """Perplexity of ``llm`` on a text (tokenized with the model's tokenizer) or on token ids."""
    _check_args(context_len, max_windows)
    max_model_len = llm.llm_engine.scheduler_config.max_model_len
    if context_len >= max_model_len:
        raise ValueError(f"context_len ({context_len}) must be below max_model_len ({max_model_len}): "
                         "a window is a prompt plus one generated token; raise --max-model-len")
    token_ids, bos_token_id = _tokenize(llm, text_or_token_ids)
    windows = make_windows(token_ids, context_len, stride, bos_token_id)
    if max_windows is not None:
        windows = windows[:max_windows]

    from strata.sampling_params import SamplingParams
    # One generated token is the least a request can ask for; it is not scored. No detokenizing:
    # only the prompt logprobs are read.
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": w.token_ids} for w in windows], params, use_tqdm=use_tqdm)
    nll_terms = []
    for window, out in zip(windows, outputs):
        for pos in range(window.first_scored, len(window.token_ids)):
            nll_terms.append(-out.prompt_logprobs[pos][window.token_ids[pos]].logprob)
    nll_mean = math.fsum(nll_terms) / len(nll_terms)
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, num_tokens=len(nll_terms),
                            num_windows=len(windows))


def make_windows(token_ids: Sequence[int], context_len: int, stride: int | None = None,
                 bos_token_id: int | None = None) -> list[Window]:
    """The full windows over ``token_ids`` and which positions of each are scored (module doc)."""
    prefix = [] if bos_token_id is None else [bos_token_id]
    body = context_len - len(prefix)               # text tokens per window
    stride = body if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= body:
        raise ValueError(f"stride must be an int in [1, {body}] (the text tokens of one window), "
                         f"got {stride!r}")
    if len(token_ids) < body:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of "
                         f"context_len={context_len}: pass a longer text or a smaller context_len")
    # Without BOS the first token of the text has nothing to predict it.
    unpredicted = 0 if prefix else 1
    windows, scored_end = [], 0
    for start in range(0, len(token_ids) - body + 1, stride):
        first = max(scored_end, start + unpredicted)
        windows.append(Window(prefix + list(token_ids[start:start + body]), first - start + len(prefix)))
        scored_end = start + body
    return windows


def _check_args(context_len, max_windows) -> None:
    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 2:
        raise ValueError(f"context_len must be an int >= 2 (one token predicts the next), got {context_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or isinstance(max_windows, bool)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")


def _tokenize(llm, text_or_token_ids) -> tuple[list[int], int | None]:
    """(token ids, BOS id to start each window with, or None)."""
    if isinstance(text_or_token_ids, str):
        if not text_or_token_ids.strip():
            raise ValueError("text_or_token_ids is an empty text: nothing to score")
        tokenizer = llm.get_tokenizer()
        if tokenizer is None:
            raise ValueError("text_or_token_ids is a text, but this LLM has no tokenizer "
                             "(skip_tokenizer_init=True): pass token ids")
        return tokenizer.encode(text_or_token_ids, add_special_tokens=False), _bos_if_added(tokenizer)
    token_ids = [int(t) for t in text_or_token_ids]
    if not token_ids:
        raise ValueError("text_or_token_ids is an empty list of token ids: nothing to score")
    return token_ids, None


def _bos_if_added(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one before every prompt, so windows look like prompts."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos = tokenizer.bos_token_id
    return bos if bos is not None and full[:1] == [bos] and plain[:1] != [bos] else None
