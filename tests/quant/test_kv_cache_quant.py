"""The quantized KV cache's format and its torch path (strata.quant.kv, strata.attention.torch_ref):
codes within half a step of the values, writes that store exactly quantize_kv's codes and scales,
attention over codes equal to attention over their dequantized values, and the option's checks."""

from __future__ import annotations

import pytest
import torch

from strata.attention import torch_ref
from strata.attention.backend import AttentionMetadata
from strata.config import KV_CACHE_DTYPES, CacheConfig
from strata.quant.kv import (
    KV_FORMATS,
    dequantize_kv,
    kv_cache_bytes_per_slot,
    quantize_kv,
    resolve_kv_format,
)

CODE_DTYPES = [torch.int8, torch.float8_e4m3fn]


def _heads(gen, n=64, head_dim=40):
    """Head vectors over six orders of magnitude, one all-zero and one with a single non-zero."""
    x = torch.randn(n, head_dim, generator=gen) * torch.logspace(-4, 2, n)[:, None]
    x[3] = 0.0
    x[5] = 0.0
    x[5, 7] = -3.0
    return x


def test_int8_round_trip_within_half_a_step():
    x = _heads(torch.Generator().manual_seed(0))
    codes, scales = quantize_kv(x, torch.int8)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (64,)
    assert codes.abs().max() <= 127
    err = (dequantize_kv(codes, scales, torch.float32) - x).abs()
    # Half a step, plus float32 rounding of x * (127 / max|x|).
    assert (err <= scales[:, None] * (0.5 + 1e-5)).all(), (err / scales[:, None].clamp_min(1e-30)).max()
    nonzero = x.abs().amax(dim=1) > 0
    assert (codes[nonzero].abs().amax(dim=1) == 127).all()      # every head uses its whole range
    assert (codes[3] == 0).all() and scales[3] == 0                # zero head: no 0/0


def test_fp8_round_trip_within_half_a_step():
    """e4m3 codes: the step at a code is its float8 spacing (3 mantissa bits; subnormal below 2**-6)."""
    x = _heads(torch.Generator().manual_seed(1))
    codes, scales = quantize_kv(x, torch.float8_e4m3fn)
    y = x / torch.where(scales > 0, scales, 1.0)[:, None]           # values in code units
    exponent = torch.floor(torch.log2(y.abs().clamp_min(2.0 ** -6)))
    step = 2.0 ** (exponent - 3)
    err = (codes.float() - y).abs()
    assert (err <= step * (0.5 + 1e-5)).all(), (err / step).max()
    assert codes.float().abs().max() <= 448
    assert torch.isfinite(dequantize_kv(codes, scales, torch.float32)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_are_exact_in_the_query_dtype(dtype):
    """The kernels convert codes to q's dtype before the dot: int8 codes and e4m3 values must
    be exact there."""
    codes = torch.arange(-127, 128, dtype=torch.int8)
    assert torch.equal(codes.to(dtype).float(), codes.float())
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = torch.isfinite(fp8.float())
    assert torch.equal(fp8[finite].to(dtype).float(), fp8[finite].float())


def _meta(ctx_q_lens, block_size, tables):
    """Metadata for rows of (context length, query length): decode rows have one query."""
    starts = [0]
    for _, n in ctx_q_lens:
        starts.append(starts[-1] + n)
    decode = [i for i, (_, n) in enumerate(ctx_q_lens) if n == 1]
    return AttentionMetadata(
        num_tokens=starts[-1], slot_mapping=torch.zeros(0, dtype=torch.long), block_tables=tables,
        seq_lens=torch.tensor([c for c, _ in ctx_q_lens], dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens_cpu=[c for c, _ in ctx_q_lens], query_lens_cpu=[n for _, n in ctx_q_lens],
        query_start_loc_cpu=starts, block_size=block_size, decode_rows=decode,
        prefill_rows=[i for i in range(len(ctx_q_lens)) if i not in decode],
        max_query_len=max(n for _, n in ctx_q_lens))


@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=["int8", "fp8"])
def test_torch_path_writes_codes_and_attends_over_their_values(code_dtype):
    gen = torch.Generator().manual_seed(2)
    num_blocks, block_size, kv_heads, head_dim, heads = 6, 4, 2, 16, 4
    k = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen) * 3
    v = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=code_dtype)
    scales = torch.zeros(2, num_blocks, block_size, kv_heads)
    torch_ref.write_kv(cache, k, v, slots, scales)

    flat, flat_scales = cache.flatten(1, 2), scales.flatten(1, 2)
    for plane, x in enumerate((k, v)):
        want_codes, want_scales = quantize_kv(x, code_dtype)
        assert torch.equal(flat[plane, slots].view(torch.uint8), want_codes.view(torch.uint8))
        assert torch.equal(flat_scales[plane, slots], want_scales)

    # A decode row and two prompt chunks (one after a cached prefix) over shuffled blocks.
    tables = torch.tensor([[4, 1, 0], [2, 5, 3], [0, 3, 1]], dtype=torch.int32)
    meta = _meta([(9, 1), (11, 5), (7, 7)], block_size, tables)
    q = torch.randn(meta.num_tokens, heads, head_dim, generator=gen)
    got = torch_ref.paged_attention(q, cache, meta, 0.25, scales)
    dequantized = dequantize_kv(cache, scales, torch.float32)
    want = torch_ref.paged_attention(q, dequantized, meta, 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_block_bytes_count_codes_and_scales():
    # Llama-3-8B's attention: 8 KV heads of 128. int8 codes + a float32 scale per head.
    bf16 = kv_cache_bytes_per_slot(8, 128, torch.bfloat16, None)
    int8 = kv_cache_bytes_per_slot(8, 128, torch.bfloat16, KV_FORMATS["int8"])
    assert (bf16, int8) == (2 * 8 * 128 * 2, 2 * 8 * (128 + 4))
    assert bf16 / int8 == pytest.approx(1.94, abs=0.01)
    assert kv_cache_bytes_per_slot(8, 128, torch.float32, None) / int8 == pytest.approx(3.88, abs=0.01)


def test_option_values():
    assert set(KV_CACHE_DTYPES) == {"auto"} | set(KV_FORMATS)
    assert CacheConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"     # vLLM's name
    for bad in ("int4", "fp8_e5m2", "bfloat16", ""):
        with pytest.raises(ValueError, match="kv_cache_dtype") as info:
            CacheConfig(kv_cache_dtype=bad)
        assert repr(bad) in str(info.value)
    assert resolve_kv_format("auto", torch.device("cpu")) is None
    assert resolve_kv_format("int8", torch.device("cpu")) is KV_FORMATS["int8"]


def test_fp8_needs_a_recent_gpu():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8'.*8\.9"):
        resolve_kv_format("fp8", torch.device("cpu"))
