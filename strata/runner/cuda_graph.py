"""CUDA graphs for decode steps.

A decode step of an 8B model launches a few hundred small kernels; at batch 1 launching them
from Python costs more than running them. At startup the runner captures one graph per batch
size of a ladder (1, 2, 4, 8, then every 8 up to ``max_num_seqs``), each reading its inputs from
static buffers. A decode-only step of B rows copies its inputs into those buffers and replays the
smallest graph of at least B rows; the padding rows have context length 0 (the attention kernel
writes zeros for them) and write their keys and values into a scratch block no request owns.

Steps with a prompt chunk run eagerly: their shapes vary too much to capture.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from strata.attention.backend import AttentionMetadata
from strata.forward_context import set_forward_context


def capture_sizes(max_batch: int) -> list[int]:
    """The batch-size ladder, ascending: 1, 2, 4, 8, 16, 24, ... and max_batch itself."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, block_size: int,
                 scratch_slot: int, device: torch.device):
        self.model = model
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        n = self.max_batch
        # Static inputs every graph reads; a step writes its rows into the front of each.
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.pool_bytes = 0

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=size, slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[: size + 1],
            seq_lens_cpu=[], query_lens_cpu=[], query_start_loc_cpu=[], block_size=self.block_size,
            decode_rows=[], prefill_rows=[], max_query_len=1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so the shared memory pool is sized once."""
        t0 = time.perf_counter()
        reserved0 = torch.cuda.memory_reserved()
        pool = None
        for size in reversed(self.sizes):
            meta = self._metadata(size)
            with set_forward_context(meta):
                # One eager run first: Triton compiles (and autotunes) outside the capture.
                self.model(self.input_ids[:size], self.positions[:size])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model(self.input_ids[:size], self.positions[:size])
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.pool_bytes = torch.cuda.memory_reserved() - reserved0

    def can_run(self, attn: AttentionMetadata) -> bool:
        return bool(self.graphs) and attn.max_query_len == 1 and attn.num_tokens <= self.max_batch \
            and attn.block_tables.shape[1] <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Replay the graph for this decode step; returns hidden states [rows, hidden]."""
        rows = attn.num_tokens
        size = next(s for s in self.sizes if s >= rows)
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slot_mapping[:rows].copy_(attn.slot_mapping)
        self.slot_mapping[rows:size].fill_(self.scratch_slot)
        self.block_tables[:rows, : attn.block_tables.shape[1]].copy_(attn.block_tables)
        self.seq_lens[:rows].copy_(attn.seq_lens)
        self.seq_lens[rows:size].zero_()
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:rows]
