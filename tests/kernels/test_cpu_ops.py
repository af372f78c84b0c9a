"""strata's CPU kernels (cpu_ops.c) against the torch code they replace, on fresh random inputs.

The rotation and the cache write are exact (same operations in the same order); the norm,
softmax and SiLU sum or exponentiate in another order or with another exp, so they agree to a few
float32 ulps (tolerances below)."""

from __future__ import annotations

import functools
import zlib
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from strata.attention import host_tier, torch_ref
from strata.attention.backend import AttentionMetadata
from strata.kernels import cpu_ops
from strata.layers.norm import RMSNorm
from strata.layers.rotary import RotaryEmbedding
from strata.quant.kv import quantize_kv

pytestmark = pytest.mark.skipif(cpu_ops.library() is None, reason="strata's CPU kernels could not be built")


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws the same inputs on every run, so a tolerance that holds once holds always."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("n, d", [(1, 576), (5, 64), (300, 576), (3, 13)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(n, d, with_residual):
    norm = RMSNorm(d, eps=1e-5)
    norm.weight.data = torch.randn(d)
    x, residual = torch.randn(n, d) * 3, torch.randn(n, d)
    want = norm._norm(x + residual if with_residual else x)
    got = cpu_ops.rms_norm(x, norm.weight, norm.eps, residual if with_residual else None)
    if with_residual:
        got, new_residual = got
        assert torch.equal(new_residual, x + residual)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (37, 2 * 24), (2, 2 * 5)])
def test_silu_and_mul_matches_torch(shape):
    x = torch.randn(shape) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])   # exp's clamped ends
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


def _cache(num_blocks, block_size, kv_heads, d):
    return torch.zeros(2, num_blocks, block_size, kv_heads, d)


@pytest.mark.parametrize("rot_dim", [64, 32, None])
def test_rope_write_kv_is_exact(rot_dim):
    n, heads, kv_heads, d, block_size = 7, 9, 3, 64, 4
    rope = RotaryEmbedding(d, 256, 10000.0, rot_dim=rot_dim) if rot_dim else None
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(n, heads, d), k.view(n, kv_heads, d), v.view(n, kv_heads, d)
    positions = torch.tensor([0, 1, 2, 200, 31, 5, 6])
    slots = torch.randperm(8 * block_size)[:n]
    want_q, want_k = rope(positions, q, k) if rope else (q.clone(), k)
    want_cache = _cache(8, block_size, kv_heads, d)
    torch_ref.write_kv(want_cache, want_k, v, slots)
    cache = _cache(8, block_size, kv_heads, d)
    got_q = cpu_ops.rope_write_kv(q, k, v, positions if rope else None, rope.cos_cached if rope else None,
                                  rope.sin_cached if rope else None, cache, slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache, want_cache)


def _metadata(seqs, block_size, num_blocks):
    """seqs: (context length after the step, query length) per sequence, random block tables."""
    perm = torch.randperm(num_blocks).tolist()
    tables, slots, starts = [], [], [0]
    for ctx, q_len in seqs:
        blocks = [perm.pop() for _ in range(-(-ctx // block_size))]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    q_lens = [q for _, q in seqs]
    return AttentionMetadata(
        num_tokens=starts[-1], slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens_cpu=[c for c, _ in seqs],
        query_lens_cpu=q_lens, query_start_loc_cpu=starts, block_size=block_size,
        decode_rows=[r for r, q in enumerate(q_lens) if q == 1],
        prefill_rows=[r for r, q in enumerate(q_lens) if q != 1], max_query_len=max(q_lens))


def _check_attention(kernel, seqs, heads, kv_heads, d, block_size, atol):
    meta = _metadata(seqs, block_size, 64)
    cache = torch.randn(2, 64, block_size, kv_heads, d)
    q = torch.randn(meta.num_tokens, heads + 2 * kv_heads, d)[:, :heads]   # strided rows, as from qkv
    want = torch_ref.paged_attention(q, cache, meta, d ** -0.5)
    got = kernel(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, d ** -0.5)
    # An output row is a weighted mean of value rows of size ~1: its rounding error is a few ulps of
    # 1.0 whatever the output's own size, so the bound is absolute (an output near 0 keeps it).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("seqs", [
    [(1, 1)], [(37, 1), (5, 1), (16, 1)],            # decodes
    [(40, 40)], [(30, 7), (9, 9)],                     # prompts, one with a cached prefix
    [(33, 1), (20, 20), (17, 1), (50, 3)],             # mixed
])
# d=20: the scalar dot products; d=136: 8-key score blocks, values through the scalar path;
# d=64 with 3, 4 and 5 query heads a KV head: three heads a pass, then a last pass of 1 or 2.
@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (8, 2, 64), (10, 2, 64), (4, 4, 24), (2, 1, 20),
                                                (2, 2, 136)])
def test_paged_attention_matches_torch(seqs, heads, kv_heads, d):
    _check_attention(cpu_ops.paged_attention, seqs, heads, kv_heads, d, block_size=8, atol=4e-6)


@pytest.mark.parametrize("seqs", [
    [(1, 1)], [(37, 1), (5, 1), (16, 1)],              # decodes only: all on the row kernel
    [(40, 40)], [(300, 300)], [(16, 16)], [(17, 17)],   # prompts: whole and partial tiles, the threshold
    [(30, 7), (9, 9), (130, 97)],                       # chunks after a cached prefix; short ones by rows
    [(33, 1), (20, 20), (17, 1), (50, 3)],              # mixed
])
@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (4, 4, 16), (2, 1, 32), (3, 1, 128)])
def test_tiled_attention_matches_torch(seqs, heads, kv_heads, d):
    _check_attention(cpu_ops.tiled_attention, seqs, heads, kv_heads, d, block_size=16, atol=1e-5)
    # A gather budget of one byte: each sequence in a window of its own.
    one_by_one = functools.partial(cpu_ops.tiled_attention, max_gather_bytes=1)
    _check_attention(one_by_one, seqs, heads, kv_heads, d, block_size=16, atol=1e-5)


def _head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values [2, blocks, block_size, kv_heads, ...] with each block's heads apart."""
    return cache.transpose(2, 3).contiguous().transpose(2, 3)


def test_host_paged_attention_refuses_other_layouts():
    meta = _metadata([(20, 1)], 8, 8)
    q = torch.randn(1, 4, 16)
    cache = torch.randn(2, 8, 8, 2, 16).bfloat16()
    assert cpu_ops.block_strides(cache) == (32, 16) and cpu_ops.block_strides(_head_major(cache)) == (16, 128)
    for bad in (cache.transpose(1, 2), cache[..., ::2]):   # blocks interleaved; a strided head row
        with pytest.raises(ValueError, match="contiguous or with head-major blocks"):
            cpu_ops.host_paged_attention(q[..., :bad.shape[-1]], bad, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, 1.0)
    with pytest.raises(ValueError, match="float32 cache must be contiguous"):
        cpu_ops.host_paged_attention(q, _head_major(cache.float()), meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, 1.0)


@pytest.mark.parametrize("seqs", [
    [(37, 1), (5, 1), (16, 1), (1, 1)],                 # decodes
    [(30, 7), (9, 9), (33, 1)],                          # prompt chunks after a cached prefix, a decode
])
@pytest.mark.parametrize("heads, kv_heads, d", [(8, 2, 64), (3, 3, 20), (4, 1, 16), (14, 2, 32), (24, 2, 16),
                                                (4, 4, 32), (6, 3, 48), (2, 1, 272)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_paged_attention_reads_16_bit_caches(seqs, heads, kv_heads, d, dtype):
    """Offloading's host tier: the cache stays in bfloat16 / float16 and is converted as it is
    read; the reference attends in float32 over the same (rounded) values. d=20: the scalar tail;
    7 query heads per KV head: the register path with a run-time group count; 12: the scalar one.
    bfloat16 with 1, 2 or 4 query heads per KV head and d a multiple of 16 up to 256: the
    even/odd-lane path (d=272: past it, the 8-wide one), d=32 and 64 the AVX-512 BF16 one where
    the CPU has it."""
    block_size = 8
    meta = _metadata(seqs, block_size, 64)
    cache = torch.randn(2, 64, block_size, kv_heads, d).to(dtype)
    # The host tier's queries: the model dtype's values, sent down as float32 (the AVX-512 BF16
    # path, d a multiple of 32 and G = 1, 2, 4 on a CPU that has it, takes them as bfloat16)
    q = torch.randn(meta.num_tokens, heads, d).to(dtype).float()
    want = torch_ref.paged_attention(q, cache.float(), meta, d ** -0.5)
    got = cpu_ops.host_paged_attention(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, d ** -0.5,
                                       num_threads=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    # Head-major blocks (the host tier's own layout): the same arithmetic over other addresses.
    assert torch.equal(cpu_ops.host_paged_attention(q, _head_major(cache), meta.block_tables, meta.seq_lens,
                                                    meta.query_start_loc, d ** -0.5, num_threads=2), got)
    # A float32 cache goes to the resident path's kernel: the same values bit for bit.
    same = cpu_ops.host_paged_attention(q, cache.float(), meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                        d ** -0.5)
    assert torch.equal(same, cpu_ops.paged_attention(q, cache.float(), meta.block_tables, meta.seq_lens,
                                                     meta.query_start_loc, d ** -0.5))
    with pytest.raises(ValueError, match="q must be float32"):
        cpu_ops.host_paged_attention(q.to(dtype), cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 1.0)


@pytest.mark.parametrize("seqs", [
    [(37, 1), (5, 1), (16, 1), (1, 1), (70, 1)],         # decodes, contexts across blocks
    [(30, 7), (9, 9), (33, 1)],                          # prompt chunks after a cached prefix, a decode
])
@pytest.mark.parametrize("heads, kv_heads, d", [(8, 2, 64), (3, 3, 20), (4, 1, 16), (14, 2, 32), (24, 2, 16),
                                                (4, 4, 128), (16, 2, 48), (2, 1, 272)])
def test_host_paged_attention_reads_int8_codes(seqs, heads, kv_heads, d):
    """kv_cache_dtype int8 in the host tier: codes and per-(slot, head) scales read in place, the
    scales applied to the scores and the softmax weights; the reference dequantizes the same codes
    to float32 (torch_ref). d=20: the scalar path; 7 query heads per KV head: the register path
    with a run-time group count; 12: the scalar one; 8: the largest compiled one."""
    block_size = 8
    meta = _metadata(seqs, block_size, 64)
    codes, scales = quantize_kv(torch.randn(2, 64, block_size, kv_heads, d) * 3, torch.int8)
    q = torch.randn(meta.num_tokens, heads, d)
    want = torch_ref.paged_attention(q, codes, meta, d ** -0.5, scales)
    got = cpu_ops.host_paged_attention(q, codes, meta.block_tables, meta.seq_lens, meta.query_start_loc, d ** -0.5,
                                       num_threads=2, kv_scales=scales)
    # float32 either way, the scales applied in another order: rounding apart
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The host tier's call takes the same kernel.
    assert torch.equal(host_tier.cpu_attend(q, codes, meta, d ** -0.5, 2, scales), got)
    # Head-major blocks, codes and scales: the same arithmetic over other addresses.
    assert torch.equal(cpu_ops.host_paged_attention(q, _head_major(codes), meta.block_tables, meta.seq_lens,
                                                    meta.query_start_loc, d ** -0.5, num_threads=2,
                                                    kv_scales=_head_major(scales)), got)
    with pytest.raises(ValueError, match="int8 codes .* float32 scales"):
        cpu_ops.host_paged_attention(q, codes, meta.block_tables, meta.seq_lens, meta.query_start_loc, 1.0,
                                     kv_scales=scales.double())
    with pytest.raises(ValueError, match="laid out as the codes") if kv_heads > 1 else nullcontext():
        # head-major codes, token-major scales (one KV head: the layouts are the same)
        cpu_ops.host_paged_attention(q, _head_major(codes), meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                     1.0, kv_scales=scales)
    with pytest.raises(ValueError, match="int8 codes"):
        cpu_ops.host_paged_attention(q, codes.float(), meta.block_tables, meta.seq_lens, meta.query_start_loc, 1.0,
                                     kv_scales=scales)


def test_prefetches_survive_the_build():
    """The host-tier attention and the fused CPU decode prefetch the rows they are about to read.
    GCC 12 deleted every call of a helper whose only effect is a prefetch (it finds it "looping
    const"): the library then had 8 prefetch instructions, none of them in the attention; with
    the helpers always inlined it has dozens. A change that loses them again is slower, not
    wrong, so nothing else would notice."""
    import shutil
    import subprocess

    from strata.kernels import cpu_quant
    lib = cpu_ops.library()
    if lib is None or not lib.strata_has_gemm_tiles() or shutil.which("objdump") is None:
        pytest.skip("needs the AVX2 build of the C kernels and objdump")
    text = subprocess.run(["objdump", "-d", str(cpu_quant._build())], capture_output=True, text=True,
                          check=True).stdout
    assert text.count("prefetch") >= 40


def test_half_conversion_covers_special_values():
    """float16 subnormals, infinities and zeros, bfloat16 extremes, read back through attention
    weights of 1 (a single-token context returns its value): d=8 converts in registers, d=11
    takes the scalar conversion for the last 3 values."""
    specials = {torch.float16: [6e-8, -float("inf"), 1e-5, 0.0, -0.0, 65504.0, 3.14159, -2.5],
                torch.bfloat16: [1e-38, -3e38, 2.0**-130, 0.0, 1.5, -7.0, 100.0, 0.1]}
    for dtype, values in specials.items():
        for d in (8, 11, 16, 32):   # 16: bfloat16's even/odd-lane path; 32: its AVX-512 form
            cache = torch.zeros(2, 1, 1, 1, d, dtype=dtype)
            cache[1, 0, 0, 0] = torch.tensor((values * 4)[:d], dtype=dtype)
            one = torch.ones(1, dtype=torch.int32)
            out = cpu_ops.host_paged_attention(torch.zeros(1, 1, d), cache, torch.zeros(1, 1, dtype=torch.int32),
                                               one, torch.tensor([0, 1], dtype=torch.int32), 1.0)
            assert torch.equal(out[0, 0], cache[1, 0, 0, 0].float()), (dtype, d)


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_rows_matches_index_copy(dtype, head_major):
    """The host tier's cache write: the same cache as torch_ref.write_kv, values strided as they
    come out of a fused qkv projection, into token-major or head-major blocks (the host tier's);
    a slot outside the cache is refused, nothing written."""
    cache = torch.randn(2, 32, 8, 3, 16).to(dtype)
    if head_major:
        cache = _head_major(cache)
    want = cache.clone()
    qkv = torch.randn(300, 5 * 3 * 16).to(dtype)
    k, v = qkv[:, :48].view(300, 3, 16), qkv[:, 48:96].view(300, 3, 16)   # rows 240 elements apart
    slots = torch.randperm(32 * 8)[:300 % 256]
    k, v = k[:slots.numel()], v[:slots.numel()]
    torch_ref.write_kv(want, k, v, slots)
    cpu_ops.write_kv_rows(cache, k, v, slots, num_threads=2)
    assert torch.equal(cache, want) and cache.stride() == want.stride()
    with pytest.raises(ValueError, match="contiguous or with head-major blocks"):
        cpu_ops.write_kv_rows(cache.transpose(1, 2), k, v, slots)
    with pytest.raises(IndexError, match="outside the cache's 256 slots"):
        cpu_ops.write_kv_rows(cache, k[:1], v[:1], torch.tensor([256]))
    assert torch.equal(cache, want)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 49152])
def test_argmax_is_torchs_with_ties_nans_and_infinities(n):
    rows = torch.randn(8, n)
    rows[1] = (rows[1] * 2).round()                    # many ties: the first of them wins
    rows[2, torch.randint(0, n, (2,))] = float("nan")  # NaN counts as the largest
    rows[3] = float("-inf")
    rows[4, -1] = float("inf")
    rows[5] = 0.0
    rows[5, n // 2:] = -0.0                             # -0.0 == 0.0: still the first
    rows[6, -1] = rows[6].max() + 1                     # the tail past the last vector of 8
    for row in rows:
        assert cpu_ops.argmax(row[None]).item() == row.argmax().item()
    assert torch.equal(cpu_ops.argmax(rows), rows.argmax(-1))
    assert cpu_ops.argmax(rows[:, :1].t().contiguous()).dtype == torch.int64


def test_wrappers_reject_wrong_inputs():
    with pytest.raises(ValueError, match="float32"):
        cpu_ops.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight must be float32 \\[8\\]"):
        cpu_ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    cache = _cache(2, 4, 1, 8)
    with pytest.raises(ValueError, match="heads a multiple of 2 KV heads"):
        cpu_ops.paged_attention(torch.randn(1, 3, 8), _cache(2, 4, 2, 8), torch.zeros(1, 1, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        cpu_ops.tiled_attention(torch.randn(1, 2, 8), _cache(2, 4, 2, 8), torch.zeros(1, 1, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 1.0)
    rope = RotaryEmbedding(8, 16, 10000.0)
    x = torch.randn(1, 1, 8)
    with pytest.raises(IndexError, match="outside the rotary tables' 16 positions"):
        cpu_ops.rope_write_kv(x, x, x, torch.tensor([16]), rope.cos_cached, rope.sin_cached, cache,
                              torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        x = torch.randn(1, 1, 8)
        cpu_ops.rope_write_kv(x, x, x, torch.zeros(1, dtype=torch.int64), None, None, cache,
                              torch.zeros(1, dtype=torch.int32))
