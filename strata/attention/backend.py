"""Attention metadata for one step, built by the runner and read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    slot_mapping: torch.Tensor        # [num_tokens] int64: block_id * block_size + offset
    block_tables: torch.Tensor        # [num_seqs, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor            # [num_seqs] int32: context length after this step
    query_start_loc: torch.Tensor     # [num_seqs + 1] int32
    # Host copies: the torch reference loops over sequences without syncing the device.
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    block_size: int
    # Rows with a single query token (decodes), attended to as one padded batch.
    decode_rows: list[int]
    prefill_rows: list[int]
    max_query_len: int = 1
    # Host copies of the tensors above, made once per step by layers whose KV cache is in host
    # RAM (attention/host_tier.py).
    host_copies: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
