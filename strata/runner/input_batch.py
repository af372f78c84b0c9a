"""What the runner remembers of each request between steps, and the flat inputs of one step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from strata.attention.backend import AttentionMetadata
from strata.core.sched_output import NewRequestData, SchedulerOutput
from strata.sample.sampler import host_to_device
from strata.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    sequence_index: int
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_logprobs_done: int = 0
    # A launched step sampled this request's last output token, still a placeholder (-1) here
    # until that step finishes: its id is row `pending_row` of step `pending_step`'s sampled
    # tensor. Async scheduling computes the next step from that tensor on the device.
    pending_step: int | None = None
    pending_row: int = -1

    @classmethod
    def from_new(cls, new: NewRequestData) -> "CachedRequestState":
        return cls(new.req_id, list(new.prompt_token_ids), list(new.output_token_ids),
                   new.sampling_params, new.sequence_index, list(new.block_ids),
                   new.num_computed_tokens, new.num_prompt_logprobs_done)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:   # decodes: no copy of the whole sequence
            return self.output_token_ids[start - n: end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


@dataclass
class StepInputs:
    input_ids: torch.Tensor           # [num_tokens]
    positions: torch.Tensor           # [num_tokens]
    attn: AttentionMetadata
    req_ids: list[str]                # row order
    sample_rows: list[int]            # rows whose last token yields the next token
    logits_indices: list[int]         # flat token index of each sampled row's last token
    # Per row wanting prompt logprobs: (row, flat index of the first position, first prompt
    # position, number of positions) for this step's chunk.
    prompt_logprob_spans: list[tuple[int, int, int, int]] = field(default_factory=list)
    # Async scheduling: input tokens that are placeholders, filled on the device from the sampled
    # tensor of the step before. For each: its flat token index, and its row in that tensor.
    placeholder_index: list[int] = field(default_factory=list)
    placeholder_source: list[int] = field(default_factory=list)
    placeholder_slot: dict[int, int] = field(default_factory=dict)   # row -> its placeholder's slot


def build_step_inputs(sched: SchedulerOutput, states: dict[str, CachedRequestState],
                      block_size: int, device: torch.device, last_step: int | None = None) -> StepInputs:
    """`last_step`: the launched step whose sampled tensor placeholders may name (no other can)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seq_lens, query_lens, starts = [], [], [0]
    tables: list[list[int]] = []
    sample_rows, logits_indices, spans = [], [], []
    placeholder_index, placeholder_source, placeholder_slot = [], [], {}
    req_ids = list(sched.num_scheduled_tokens)
    for row, req_id in enumerate(req_ids):
        state = states[req_id]
        num_new = sched.num_scheduled_tokens[req_id]
        start = state.num_computed_tokens
        end = start + num_new
        input_ids.extend(state.tokens(start, end))
        positions.extend(range(start, end))
        table = state.block_ids
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        flat_start = starts[-1]
        if state.sampling_params.prompt_logprobs is not None:
            last = min(end, len(state.prompt_token_ids) - 1)   # the last prompt token predicts no prompt token
            first = max(start, state.num_prompt_logprobs_done)
            if last > first:
                spans.append((row, flat_start + first - start, first, last - first))
        if end == state.num_tokens:
            sample_rows.append(row)
            logits_indices.append(flat_start + num_new - 1)
            if state.pending_step is not None:   # only ever the last token, so only in rows that sample
                if state.pending_step != last_step:
                    raise RuntimeError(f"request {req_id}: its last token comes from step "
                                       f"{state.pending_step}, which was never finished (the last "
                                       f"step that sampled is {last_step})")
                placeholder_slot[row] = len(placeholder_index)
                placeholder_index.append(flat_start + num_new - 1)
                placeholder_source.append(state.pending_row)
        seq_lens.append(end)
        query_lens.append(num_new)
        starts.append(flat_start + num_new)
        tables.append(table)
    max_blocks = max(len(t) for t in tables)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    decode_rows = [r for r, n in enumerate(query_lens) if n == 1]
    prefill_rows = [r for r, n in enumerate(query_lens) if n != 1]

    def tensor(values, dtype=torch.int64):
        return host_to_device(values, dtype, device)

    # Host copies too, for layers whose KV cache is in host RAM (offloading): reading the device
    # tensors back would wait for the GPU work queued before.
    host = {"slot_mapping": torch.tensor(slots, dtype=torch.int64),
            "block_tables": torch.tensor(padded, dtype=torch.int32), "seq_lens": torch.tensor(seq_lens, dtype=torch.int32)}

    def upload(name):
        return host[name] if device.type != "cuda" else host[name].pin_memory().to(device, non_blocking=True)

    attn = AttentionMetadata(
        num_tokens=len(input_ids), slot_mapping=upload("slot_mapping"), block_tables=upload("block_tables"),
        seq_lens=upload("seq_lens"), query_start_loc=tensor(starts, torch.int32),
        seq_lens_cpu=seq_lens, query_lens_cpu=query_lens, query_start_loc_cpu=starts,
        block_size=block_size, decode_rows=decode_rows, prefill_rows=prefill_rows,
        max_query_len=max(query_lens), host_copies=host)
    return StepInputs(tensor(input_ids), tensor(positions), attn, req_ids, sample_rows,
                      logits_indices, spans, placeholder_index, placeholder_source, placeholder_slot)


def dummy_prefill_inputs(num_tokens: int, num_seqs: int, block_size: int, vocab_size: int,
                         device: torch.device) -> StepInputs:
    """A prompt-only step of num_tokens random tokens in num_seqs sequences of (nearly) equal
    length, each on its own blocks 0, 1, 2, ...: the memory plan's profiling step."""
    lengths = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
    gen = torch.Generator().manual_seed(0)
    positions, slots, tables, starts = [], [], [], [0]
    next_block = 0
    for n in lengths:
        blocks = list(range(next_block, next_block + -(-n // block_size)))
        next_block += len(blocks)
        positions.extend(range(n))
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(n))
        tables.append(blocks)
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def tensor(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype).to(device)

    attn = AttentionMetadata(
        num_tokens=num_tokens, slot_mapping=tensor(slots), block_tables=tensor(padded, torch.int32),
        seq_lens=tensor(lengths, torch.int32), query_start_loc=tensor(starts, torch.int32),
        seq_lens_cpu=lengths, query_lens_cpu=lengths, query_start_loc_cpu=starts, block_size=block_size,
        decode_rows=[r for r, n in enumerate(lengths) if n == 1],
        prefill_rows=[r for r, n in enumerate(lengths) if n != 1], max_query_len=max(lengths))
    input_ids = torch.randint(0, vocab_size, (num_tokens,), generator=gen).to(device)
    req_ids = [f"profile-{i}" for i in range(num_seqs)]
    return StepInputs(input_ids, tensor(positions), attn, req_ids, list(range(num_seqs)),
                      [s - 1 for s in starts[1:]])
