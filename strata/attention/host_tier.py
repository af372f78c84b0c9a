"""Attention for a layer whose KV cache lives in host RAM (offloading's KV tier, FlexGen's CPU
delegation): the cache never crosses PCIe, only this step's q, k, v and the output do.

The layer's q, k, v are computed (and rotated) on the compute device. Then:
- k and v go down to the host and are written into the host cache at the step's slots (the same
  block tables address every layer's cache, whichever tier holds it);
- rows whose whole context is this step's query (a fresh prompt) attend on the device, over the
  k and v already there;
- every other row (decodes, a prompt chunk after a cached prefix) sends its queries down and
  attends on the CPU over its cached context (attention/torch_ref.py), and the output goes up.
On a CPU-only machine both "tiers" are RAM: the same steps run, which is how the tests check
them against the resident cache.
"""

from __future__ import annotations

import torch

from strata.attention import torch_ref
from strata.attention.backend import AttentionMetadata


class HostStaging:
    """A reused pinned buffer for device -> host copies (pinning memory per call costs more than
    the copy); grown when a step needs more. One per process: layers run one after another."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def to_host(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Host copies of xs (views into the buffer, valid until the next call)."""
        if all(x.device.type == "cpu" for x in xs):
            return [x.contiguous() for x in xs]
        sizes = [-(-x.numel() * x.element_size() // 64) * 64 for x in xs]
        if self._buf is None or self._buf.numel() < sum(sizes):
            grown = 2 * (0 if self._buf is None else self._buf.numel())
            self._buf = torch.empty(max(sum(sizes), grown), dtype=torch.uint8, pin_memory=True)
        outs, offset = [], 0
        for x, size in zip(xs, sizes):
            out = self._buf[offset: offset + x.numel() * x.element_size()].view(x.dtype).view(x.shape)
            out.copy_(x, non_blocking=True)
            outs.append(out)
            offset += size
        torch.cuda.current_stream(xs[0].device).synchronize()
        return outs


STAGING = HostStaging()
GATHER = torch_ref.Workspace()   # the decode rows' context, gathered on the host


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [n, heads, head_dim], k/v [n, kv_heads, head_dim] (rotated, on the compute device);
    kv_cache [2, num_blocks, block_size, kv_heads, head_dim] in host RAM -> [n, heads, head_dim]
    on the compute device."""
    groups = q.shape[1] // k.shape[1]
    host = _host_copies(meta)
    k_host, v_host = STAGING.to_host(k, v)
    torch_ref.write_kv(kv_cache, k_host, v_host, host["slot_mapping"])
    out = torch.empty_like(q)
    starts = meta.query_start_loc_cpu
    others = []
    for row, (q_len, ctx_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len > 1 and q_len == ctx_len:   # a fresh prompt: its context is on the device already
            a, b = starts[row], starts[row + 1]
            mask = torch.ones(q_len, q_len, dtype=torch.bool, device=q.device).tril()
            out[a:b] = torch_ref._sdpa(q[a:b], k[a:b], v[a:b], mask, scale, groups)
        else:
            others.append(row)
    if others:
        _attend_on_host(q, kv_cache, meta, host, others, scale, out)
    return out


def _attend_on_host(q, kv_cache, meta, host, rows, scale, out) -> None:
    starts = meta.query_start_loc_cpu
    if rows == list(range(meta.num_seqs)):
        token_index = None
        (q_host,) = STAGING.to_host(q)
    else:
        token_index = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in rows]).to(q.device)
        (q_host,) = STAGING.to_host(q[token_index])
    query_lens = [meta.query_lens_cpu[r] for r in rows]
    sub_starts = [0]
    for n in query_lens:
        sub_starts.append(sub_starts[-1] + n)
    sub = AttentionMetadata(
        num_tokens=sub_starts[-1], slot_mapping=host["slot_mapping"][:0], block_tables=host["block_tables"][rows],
        seq_lens=host["seq_lens"][rows], query_start_loc=torch.tensor(sub_starts, dtype=torch.int32),
        seq_lens_cpu=[meta.seq_lens_cpu[r] for r in rows], query_lens_cpu=query_lens,
        query_start_loc_cpu=sub_starts, block_size=meta.block_size,
        decode_rows=[i for i, n in enumerate(query_lens) if n == 1],
        prefill_rows=[i for i, n in enumerate(query_lens) if n != 1], max_query_len=max(query_lens))
    result = torch_ref.paged_attention(q_host, kv_cache, sub, scale, workspace=GATHER).to(out.device)
    if token_index is None:
        out.copy_(result)
    else:
        out[token_index] = result


def _host_copies(meta: AttentionMetadata) -> dict:
    """Host copies of the step's slot mapping and block tables, made once per step (every layer
    with a host cache shares them)."""
    if not meta.host_copies:
        meta.host_copies.update(slot_mapping=meta.slot_mapping.to("cpu"), block_tables=meta.block_tables.to("cpu"),
                                seq_lens=meta.seq_lens.to("cpu"))
    return meta.host_copies
