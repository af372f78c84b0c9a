"""Logits processors that change the scores before a token is chosen: bias, min_tokens, penalties.

These run for greedy and random rows alike (they can move the argmax), before temperature and
truncation, in vLLM v1's order: logit_bias, min_tokens mask, then repetition, frequency and
presence penalties.
"""

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from strata.sample.sampler import SamplingMetadata


def apply_logits_processors(
    logits: torch.Tensor,  # [num_reqs, vocab]
    metadata: "SamplingMetadata",
) -> torch.Tensor:  # [num_reqs, vocab] float32, a new tensor; `logits` is left untouched
    """All processors in order; public so that tests can check processed values directly."""
    logits = logits.to(torch.float32, copy=True)
    apply_logit_bias(logits, metadata.logit_bias)
    apply_min_tokens_mask(logits, metadata.min_tokens_masks)
    if not metadata.no_penalties:
        apply_penalties(logits, metadata)
    return logits


def apply_logit_bias(
    logits: torch.Tensor,  # [num_reqs, vocab], changed in place
    logit_bias: list[dict[int, float] | None],
) -> None:
    rows, cols, values = [], [], []
    for row, bias in enumerate(logit_bias):
        for token_id, value in (bias or {}).items():
            rows.append(row)
            cols.append(token_id)
            values.append(value)
    if not rows:
        return
    # One scatter for the whole batch instead of one small kernel per row.
    index = _index_tensors(rows, cols, logits.device)
    logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device),
                      accumulate=True)


def apply_min_tokens_mask(
    logits: torch.Tensor,  # [num_reqs, vocab], changed in place
    min_tokens_masks: list[set[int] | None],
) -> None:
    rows, cols = [], []
    for row, forbidden in enumerate(min_tokens_masks):
        for token_id in forbidden or ():
            rows.append(row)
            cols.append(token_id)
    if rows:
        logits[_index_tensors(rows, cols, logits.device)] = float("-inf")


def apply_penalties(
    logits: torch.Tensor,  # [num_reqs, vocab], changed in place
    metadata: "SamplingMetadata",
) -> None:
    num_reqs, vocab_size = logits.shape
    output_counts = token_counts(metadata.output_token_ids, num_reqs, vocab_size, logits.device)
    output_mask = output_counts > 0  # [num_reqs, vocab]

    # Repetition penalty (CTRL paper, as in HF and vLLM): every token seen in the prompt or the
    # output is pushed towards "less likely" whatever its sign, so divide positive logits and
    # multiply negative ones.
    seen = output_mask
    if metadata.prompt_token_ids is not None:
        seen = seen | prompt_mask(metadata.prompt_token_ids, vocab_size)
    rep = metadata.repetition_penalties.unsqueeze(1).expand_as(logits)  # [num_reqs, vocab]
    rep = torch.where(seen, rep, torch.ones_like(rep))
    logits.copy_(torch.where(logits > 0, logits / rep, logits * rep))

    # Frequency and presence penalties (OpenAI): only the generated output counts.
    logits -= metadata.frequency_penalties.unsqueeze(1) * output_counts
    logits -= metadata.presence_penalties.unsqueeze(1) * output_mask.to(logits.dtype)


def token_counts(
    token_ids: list[list[int]], num_reqs: int, vocab_size: int, device
) -> torch.Tensor:  # [num_reqs, vocab] float32
    """How often each token occurs in each row's list."""
    counts = torch.zeros(num_reqs, vocab_size + 1, dtype=torch.float32, device=device)
    # Pad with vocab_size: the padding lands in an extra column that is then cut off.
    padded = pad_token_ids(token_ids, vocab_size, device)  # [num_reqs, max_len]
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def prompt_mask(
    prompt_token_ids: torch.Tensor,  # [num_reqs, max_prompt_len] int64, padded with vocab_size
    vocab_size: int,
) -> torch.Tensor:  # [num_reqs, vocab] bool
    num_reqs = prompt_token_ids.shape[0]
    mask = torch.zeros(num_reqs, vocab_size + 1, dtype=torch.bool, device=prompt_token_ids.device)
    mask.scatter_(1, prompt_token_ids, True)
    return mask[:, :vocab_size]


def pad_token_ids(
    token_ids: list[list[int]], pad_id: int, device
) -> torch.Tensor:  # [num_reqs, max_len] int64
    max_len = max((len(ids) for ids in token_ids), default=0)
    padded = torch.full((len(token_ids), max_len), pad_id, dtype=torch.int64)
    for row, ids in enumerate(token_ids):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    # Built on the host and copied once: one transfer instead of one per row.
    return padded.to(device)


def _index_tensors(rows: list[int], cols: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(cols, dtype=torch.int64, device=device),
    )
