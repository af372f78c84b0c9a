"""Token embeddings and the LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.distributed import parallel_state as ps


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.vocab_size = vocab_size
        # Pad so every rank holds the same number of rows; padded rows are never looked up.
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.dtype = dtype
        self.packed: nn.Module | None = None   # set by use_packed

    def use_packed(self, packed: nn.Module) -> None:
        """Hold the table quantized (GGUF blocks kept packed, quant/gguf.py) instead of the float
        weight: ``packed.rows(ids)`` dequantizes just the rows a lookup reads, and ``packed(x)``
        is ``x @ table^T`` for an LM head."""
        if self.tp_size != 1:
            raise ValueError(f"a packed vocabulary table needs tensor_parallel_size 1, got {self.tp_size}")
        del self.weight
        self.packed = packed

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit vocab "
                             f"{self.vocab_size} x hidden {param.shape[1]}")
        rows = loaded[self.vocab_start: self.vocab_start + self.rows_per_rank]
        param.data[: rows.shape[0]].copy_(rows)
        param.data[rows.shape[0]:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:   # [num_tokens] -> [num_tokens, hidden]
        if self.packed is not None:
            return self.packed.rows(input_ids).to(self.dtype)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return ps.tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to logits; each rank computes its slice of the vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 bias: bool = False):
        super().__init__(vocab_size, hidden_size, dtype)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.rows_per_rank, dtype=dtype), requires_grad=False)

    def use_packed(self, packed: nn.Module) -> None:
        """As the embedding's, at any tensor_parallel_size: a head only multiplies by its
        vocabulary slice (no row lookup), and per-row scales are the same in every slice."""
        del self.weight
        self.packed = packed

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:   # [n, hidden] -> [n, vocab]
        if self.packed is not None:
            logits = self.packed(hidden)
            logits = logits + self.bias if self.bias is not None else logits
        else:
            logits = F.linear(hidden, self.weight, self.bias)
        logits = ps.tensor_model_parallel_all_gather(logits)
        return logits[..., : self.vocab_size]
