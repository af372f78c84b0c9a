"""Logits processors that change the scores before a token is chosen: bias, min_tokens, penalties.

These run for greedy and random rows alike (they can move the argmax), before temperature and
truncation, in vLLM v1's order: logit_bias, min_tokens mask, then repetition, frequency and
presence penalties.

Each is a fixed handful of ops over the whole batch, whatever the number of rows, and none reads
device memory on the host: the metadata carries flat positions `row * vocab + token_id` built on
the host, so bias is one index_add, the min_tokens mask one index_fill, and the penalties touch
only the positions of tokens the rows have seen (a gather, a little arithmetic, a scatter)
instead of whole [num_reqs, vocab] passes.
"""

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from strata.sample.sampler import SamplingMetadata


def apply_logits_processors(
    logits: torch.Tensor,  # [num_reqs, vocab]
    metadata: "SamplingMetadata",
) -> torch.Tensor:  # [num_reqs, vocab] float32; `logits` itself is left untouched
    """All processors in order; public so that tests can check processed values directly.

    Returns `logits` as float32 without a copy when no processor applies to any row.
    """
    if (metadata.logit_bias_index is None and metadata.min_tokens_index is None
            and metadata.no_penalties):
        return logits.float()
    logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    flat = logits.view(-1)
    if metadata.logit_bias_index is not None:
        flat.index_add_(0, metadata.logit_bias_index, metadata.logit_bias_values)
    if metadata.min_tokens_index is not None:
        flat.index_fill_(0, metadata.min_tokens_index, float("-inf"))
    if not metadata.no_penalties:
        apply_penalties(logits, metadata)
    return logits


def apply_penalties(
    logits: torch.Tensor,  # [num_reqs, vocab] float32 contiguous, changed in place
    metadata: "SamplingMetadata",
) -> None:
    """Repetition (CTRL paper, as in HF and vLLM), then frequency and presence (OpenAI).

    Only seen tokens change, so the work is on their positions: `seen` lists the output tokens of
    every penalised row and the prompt tokens of rows with a repetition penalty, with repeats.
    Repeated positions compute the same value, so the final scatter writes agree. The arithmetic
    is the same, op for op, as applying the penalties to the whole [num_reqs, vocab] tensor.
    """
    vocab_size = logits.shape[1]
    flat = logits.view(-1)
    output_index = metadata.output_token_index  # [num_output_tokens] flat
    seen = output_index
    if metadata.prompt_token_index is not None:
        seen = torch.cat([output_index, metadata.prompt_token_index])
    if seen.numel() == 0:
        return
    # How often each seen position occurs in the output, by binary search in the sorted output
    # positions: no [num_reqs, vocab] count tensor and no data-dependent shapes (no host sync).
    output_sorted = output_index.sort().values
    counts = (torch.searchsorted(output_sorted, seen, right=True)
              - torch.searchsorted(output_sorted, seen)).to(torch.float32)
    rows = torch.div(seen, vocab_size, rounding_mode="floor")
    values = flat[seen]
    # Every seen token is pushed towards "less likely" whatever its sign: divide positive logits
    # and multiply negative ones. Frequency and presence count the generated output only.
    rep = metadata.repetition_penalties[rows]
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - metadata.frequency_penalties[rows] * counts
    values = values - metadata.presence_penalties[rows] * (counts > 0).to(torch.float32)
    flat[seen] = values
