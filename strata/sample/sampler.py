"""The batched sampler: one row per request, logits in, one token id (and logprobs) out.

Order of operations follows vLLM v1:
  1. logprobs for the output come from the RAW model logits (log_softmax before bias, penalties,
     temperature or truncation), as vLLM v1's default `raw_logprobs` mode does: they describe what
     the model predicted, not the distribution this request's settings sampled from;
  2. logits processors that may move the argmax (logit_bias, min_tokens mask, penalties);
  3. greedy rows take the argmax; random rows go through temperature, top_k, top_p, min_p and
     then the exponential race `argmax(probs / q)`, q ~ Exp(1), which draws from `probs`
     exactly without a cumulative sum and lets each seeded row draw its own noise.
Everything is vectorised over rows; the only per-row Python loops build index lists and draw the
noise of seeded rows from their own generators.
"""

from dataclasses import dataclass

import torch

from strata.sample.logits_processors import apply_logits_processors, pad_token_ids
from strata.sampling_params import SAMPLING_EPS, SamplingParams, SamplingType

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """What the model runner knows about one row this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, for this sequence
    # make_generator(seed, sequence_index, len(output_token_ids)) for seeded requests, else None.
    generator: torch.Generator | None
    # eos + stop token ids; applied only while len(output_token_ids) < params.min_tokens.
    min_tokens_mask: set[int] | None


@dataclass
class SamplingMetadata:
    """Per-step tensors for the whole batch; built once per step by `from_rows`."""

    temperature: torch.Tensor  # [num_reqs] float32, 0 for greedy rows
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # [num_reqs] int64, vocab_size = off; None when no row uses it
    top_p: torch.Tensor | None  # [num_reqs] float32, 1 = off
    min_p: torch.Tensor | None  # [num_reqs] float32, 0 = off
    generators: dict[int, torch.Generator]  # row -> CPU generator, seeded random rows only
    presence_penalties: torch.Tensor | None  # [num_reqs] float32
    frequency_penalties: torch.Tensor | None  # [num_reqs] float32
    repetition_penalties: torch.Tensor | None  # [num_reqs] float32
    prompt_token_ids: torch.Tensor | None  # [num_reqs, max_prompt_len] int64, pad = vocab_size
    output_token_ids: list[list[int]]
    logit_bias: list[dict[int, float] | None]
    min_tokens_masks: list[set[int] | None]  # None for rows that have reached min_tokens
    max_num_logprobs: int | None  # max over rows of params.logprobs; None if no row wants any
    no_penalties: bool

    @classmethod
    def from_rows(cls, rows: list[SamplingRow], vocab_size: int, device) -> "SamplingMetadata":
        params = [row.params for row in rows]
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]

        def floats(values) -> torch.Tensor:  # [num_reqs]
            return torch.tensor(values, dtype=torch.float32, device=device)

        # Greedy rows have top_k/top_p/min_p reset by SamplingParams, so they never switch these on.
        top_k = None
        if any(0 < p.top_k < vocab_size for p in params):
            top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size
                                  for p in params], dtype=torch.int64, device=device)
        top_p = floats([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None
        min_p = floats([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None

        no_penalties = all(p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                           and p.repetition_penalty == 1.0 for p in params)
        presence = frequency = repetition = prompt_ids = None
        if not no_penalties:
            presence = floats([p.presence_penalty for p in params])
            frequency = floats([p.frequency_penalty for p in params])
            repetition = floats([p.repetition_penalty for p in params])
            if any(p.repetition_penalty != 1.0 for p in params):  # only it looks at the prompt
                prompt_ids = pad_token_ids([row.prompt_token_ids for row in rows], vocab_size, device)

        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=floats([0.0 if g else p.temperature for p, g in zip(params, greedy)]),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generators={i: row.generator for i, row in enumerate(rows)
                        if not greedy[i] and row.generator is not None},
            presence_penalties=presence,
            frequency_penalties=frequency,
            repetition_penalties=repetition,
            prompt_token_ids=prompt_ids,
            output_token_ids=[row.output_token_ids for row in rows],
            logit_bias=[p.logit_bias or None for p in params],
            min_tokens_masks=[
                row.min_tokens_mask
                if row.min_tokens_mask and len(row.output_token_ids) < row.params.min_tokens
                else None
                for row in rows
            ],
            max_num_logprobs=max(logprobs) if logprobs else None,
            no_penalties=no_penalties,
        )


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
    if metadata.all_greedy:
        return logits.argmax(dim=-1)
    greedy = None if metadata.all_random else logits.argmax(dim=-1)
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
        noise[torch.tensor(rows, device=device)] = seeded.to(device)
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
    sibling sequences different draws. CPU so the stream is the same on every device.
    """
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (sequence_index & _MASK64))
    mixed = _splitmix64(mixed ^ (step & _MASK64))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mixed >> 1)  # 63 bits: fits every torch seed range
    return generator


def _splitmix64(x: int) -> int:
    # A good 64-bit mixer: nearby inputs (step 7 vs 8) give unrelated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)

