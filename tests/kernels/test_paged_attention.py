"""Triton paged attention (decode and prefill) against its float32 torch references.

On a machine without CUDA the kernels run under the Triton interpreter with small shapes; with
CUDA the same cases run on the GPU, plus realistic sizes (32 heads / 8 KV heads, head_dim 128,
contexts up to 4096, bf16). Every case draws fresh random inputs from a seed of its own, poisons
``out`` with NaN and checks that every element was written.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Imported after TRITON_INTERPRET is set: @triton.jit reads it when the kernels are defined.
import pytest

from sm90 import run_without_interpreter  # noqa: E402
from strata.kernels.paged_attention import (
    choose_num_splits,
    paged_decode,
    paged_decode_ref,
    paged_prefill,
    paged_prefill_ref,
)
from strata.quant.kv import quantize_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# Relative error of the whole output: catches a systematic bias that an element-wise tolerance
# would let through where softmax is flat and the outputs are small.
REL_NORM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (num_heads, num_kv_heads): MHA, GQA 2 and 4, MQA with a group that is not a power of two.
HEADS = {"mha": (2, 2), "gqa2": (4, 2), "gqa4": (8, 2), "mqa": (5, 1)}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randn(*shape, gen, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=gen) * std).to(dtype).to(DEVICE)


def make_cache_and_tables(ctx_lens, block_size, num_kv_heads, head_dim, dtype, gen):
    """A random cache and block tables whose rows own disjoint, shuffled blocks.

    Entries past a row's last block hold random (valid) block ids: a kernel that reads them
    attends to the wrong keys and fails the comparison.
    """
    need = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(need) + 3
    max_blocks = max(need, default=0) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(ctx_lens), max_blocks), generator=gen)
    at = 0
    for row, n in enumerate(need):
        tables[row, :n] = perm[at:at + n]
        at += n
    kv_cache = _randn(2, num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    return kv_cache, tables.to(torch.int32).to(DEVICE)


def _int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_matches(out, ref, dtype, where=""):
    """Every element written (no NaN poison left) and close to the fp32 reference."""
    assert torch.isfinite(out).all(), f"{where}: unwritten (NaN) or non-finite elements"
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype], msg=lambda m: f"{where}: {m}")
    rel = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
    assert rel <= REL_NORM_TOL[dtype], f"{where}: relative error {rel:.2e}"


def quantized(kv_cache, code_dtype):
    """(cache, kv_scales): the cache itself, or its codes and scales (strata.quant.kv)."""
    if code_dtype is None:
        return kv_cache, None
    return quantize_kv(kv_cache, code_dtype)


def run_decode(ctx_lens, heads, head_dim, block_size, dtype, gen, num_splits_list, code_dtype=None):
    num_heads, num_kv_heads = heads
    kv_cache, tables = make_cache_and_tables(ctx_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    kv_cache, kv_scales = quantized(kv_cache, code_dtype)
    q = _randn(len(ctx_lens), num_heads, head_dim, gen=gen, dtype=dtype, std=2.0)
    seq_lens = _int32(ctx_lens)
    scale = head_dim ** -0.5
    ref = paged_decode_ref(q, kv_cache, tables, seq_lens, scale, kv_scales=kv_scales)
    ref32 = torch.zeros(q.shape, dtype=torch.float32, device=DEVICE)
    # The reference in fp32 from the same (rounded) inputs: bf16 output rounding is the only gap.
    paged_decode_ref(q.float(), kv_cache if code_dtype else kv_cache.float(), tables, seq_lens, scale,
                     out=ref32, kv_scales=kv_scales)
    assert ref.dtype == dtype
    for num_splits in num_splits_list:
        out = torch.full_like(q, float("nan"))
        got = paged_decode(q, kv_cache, tables, seq_lens, scale, out=out, num_splits=num_splits,
                           kv_scales=kv_scales)
        assert got is out
        assert_matches(out, ref32, dtype, f"num_splits={num_splits}")
        pad = seq_lens == 0
        assert (out[pad] == 0).all(), "padding rows must be zeros"


def run_prefill(seqs, heads, head_dim, block_size, dtype, gen, code_dtype=None):
    """seqs: (context length, query length) per sequence; queries are the context's last ones."""
    num_heads, num_kv_heads = heads
    ctx_lens = [c for c, _ in seqs]
    q_lens = [n for _, n in seqs]
    kv_cache, tables = make_cache_and_tables(ctx_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    kv_cache, kv_scales = quantized(kv_cache, code_dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = _randn(starts[-1], num_heads, head_dim, gen=gen, dtype=dtype, std=2.0)
    args = (tables, _int32(ctx_lens), _int32(starts), max(q_lens), head_dim ** -0.5)
    ref32 = paged_prefill_ref(q.float(), kv_cache if code_dtype else kv_cache.float(), *args,
                              kv_scales=kv_scales)
    out = torch.full_like(q, float("nan"))
    got = paged_prefill(q, kv_cache, *args, out=out, kv_scales=kv_scales)
    assert got is out
    assert_matches(out, ref32, dtype, f"seqs={seqs}")


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------

# (heads, head_dim, block_size, dtype): every head layout in both dtypes, then head sizes.
DECODE_CASES = [(h, 32, 16, dt) for h in HEADS for dt in (torch.float32, torch.bfloat16)] + [
    ("gqa4", 16, 4, torch.float32), ("gqa4", 64, 4, torch.float32), ("gqa2", 64, 4, torch.bfloat16),
    ("gqa4", 80, 16, torch.float32), ("mqa", 80, 4, torch.bfloat16), ("gqa4", 32, 16, torch.float16),
]


@pytest.mark.parametrize("heads,head_dim,block_size,dtype", DECODE_CASES,
                         ids=[f"{h}-d{d}-bs{b}-{str(t)[6:]}" for h, d, b, t in DECODE_CASES])
def test_decode_matches_reference(heads, head_dim, block_size, dtype, gen):
    bs = block_size
    # One token, a block minus one, a block, a block plus one, padding, longer odd contexts.
    ctx_lens = [1, bs - 1, bs, bs + 1, 0, 3 * bs + 5, 151]
    # Each head layout runs the split path in fp32 and the single-split path in bf16 (the
    # interpreter is slow; test_decode_num_splits covers the rest).
    num_splits = {torch.float32: 3, torch.float16: 2}.get(dtype, 1)
    run_decode(ctx_lens, HEADS[heads], head_dim, block_size, dtype, gen, [num_splits])


@pytest.mark.parametrize("num_splits,dtype", [
    (None, torch.float32), (1, torch.float32), (2, torch.float32), (3, torch.float32),
    (3, torch.bfloat16), (8, torch.float32)])
def test_decode_num_splits(num_splits, dtype, gen):
    # 151 tokens in 3 splits are uneven (64, 64, 23 with 32- or 64-token tiles); 8 splits leave
    # some empty and outnumber the tokens of every short row.
    run_decode([1, 7, 0, 65, 151], HEADS["mqa"], 16, 4, dtype, gen, [num_splits])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (12, 1)])   # the merge unrolled / looped
def test_split_decode_merges_in_one_launch_or_two(gen, monkeypatch, num_heads, num_kv_heads):
    """The last split of each (row, KV head) merges (its counters back to zero after every
    launch); with no counters to hand, a second launch merges, to the same result."""
    import strata.kernels.paged_attention as pa
    kv_cache, tables = make_cache_and_tables([7, 0, 151], 4, num_kv_heads, 32, torch.float32, gen)
    q = _randn(3, num_heads, 32, gen=gen)
    args = (q, kv_cache, tables, _int32([7, 0, 151]), 0.2)
    one = paged_decode(*args, num_splits=4)
    assert not pa._counters[q.device].any()
    again = paged_decode(*args, num_splits=4)
    monkeypatch.setattr(pa, "_split_counters", lambda device, needed: None)
    two = paged_decode(*args, num_splits=4)
    assert torch.equal(one, again)
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_all_padding_rows_write_zeros(num_splits, gen):
    kv_cache, tables = make_cache_and_tables([5, 9], 4, 2, 32, torch.float32, gen)
    q = _randn(2, 4, 32, gen=gen)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, kv_cache, tables, _int32([0, 0]), 0.2, out=out, num_splits=num_splits)
    assert (out == 0).all()


def test_decode_strided_q_and_out(gen):
    """q sliced out of a fused qkv projection, out a view into a wider buffer."""
    num_heads, num_kv_heads, head_dim, bs = 4, 2, 32, 4
    ctx_lens = [9, 0, 21]
    kv_cache, tables = make_cache_and_tables(ctx_lens, bs, num_kv_heads, head_dim, torch.float32, gen)
    qkv = _randn(3, (num_heads + 2 * num_kv_heads) * head_dim, gen=gen)
    q = qkv[:, :num_heads * head_dim].view(3, num_heads, head_dim)
    assert not q.is_contiguous()
    wide = torch.full((3, num_heads + 1, head_dim), float("nan"), device=DEVICE)
    out = wide[:, 1:]
    seq_lens = _int32(ctx_lens)
    ref = paged_decode_ref(q.contiguous(), kv_cache, tables, seq_lens, 0.3)
    for num_splits in (1, 2):
        paged_decode(q, kv_cache, tables, seq_lens, 0.3, out=out, num_splits=num_splits)
        assert_matches(out, ref, torch.float32, f"num_splits={num_splits}")
        assert wide[:, 0].isnan().all(), "wrote outside out"


def test_choose_num_splits():
    # Short contexts and full batches: one split (no reduction launch).
    assert choose_num_splits(1, 8, 8, 16) == 1
    assert choose_num_splits(256, 8, 256, 16) == 1
    # Batch-1 long context: enough programs to cover the SMs several times over.
    splits = choose_num_splits(1, 8, 256, 16)
    assert 8 * splits >= 132 and splits <= 4096 // 128
    assert choose_num_splits(1, 8, 256, 16) >= choose_num_splits(8, 8, 256, 16) >= 1


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------

PREFILL_CASES = [(h, 32, 16, dt) for h in HEADS for dt in (torch.float32, torch.bfloat16)] + [
    ("gqa4", 16, 4, torch.float32), ("gqa2", 64, 4, torch.bfloat16), ("mqa", 80, 16, torch.float32),
    ("gqa2", 32, 4, torch.float16),
]


@pytest.mark.parametrize("heads,head_dim,block_size,dtype", PREFILL_CASES,
                         ids=[f"{h}-d{d}-bs{b}-{str(t)[6:]}" for h, d, b, t in PREFILL_CASES])
def test_prefill_matches_reference(heads, head_dim, block_size, dtype, gen):
    bs = block_size
    seqs = [
        (bs - 1, bs - 1),          # whole prompt, shorter than a block
        (3 * bs + 5, 1),           # a decode row inside a chunked-prefill step
        (2 * bs + 3, bs),          # new chunk after a cached prefix that is not block-aligned
        (1, 1),                    # one-token prompt
        (bs + 1, bs + 1),          # whole prompt, a block plus one
        (151, 40),                 # long prefix and a query spanning several query tiles
        (2 * bs, bs),              # prefix of exactly one block
    ]
    run_prefill(seqs, HEADS[heads], head_dim, block_size, dtype, gen)


def test_prefill_long_prompt_without_prefix(gen):
    """Key tiles both fully visible (no mask) and on the diagonal, several query tiles."""
    run_prefill([(150, 150), (70, 70)], HEADS["gqa2"], 32, 16, torch.float32, gen)


def test_prefill_strided_q(gen):
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    seqs = [(20, 6), (9, 9)]
    kv_cache, tables = make_cache_and_tables([20, 9], 4, num_kv_heads, head_dim, torch.float32, gen)
    qkv = _randn(15, (num_heads + 2 * num_kv_heads) * head_dim, gen=gen)
    q = qkv[:, :num_heads * head_dim].view(15, num_heads, head_dim)
    args = (tables, _int32([c for c, _ in seqs]), _int32([0, 6, 15]), 9, 0.25)
    ref = paged_prefill_ref(q.contiguous(), kv_cache, *args)
    assert_matches(paged_prefill(q, kv_cache, *args), ref, torch.float32, "strided q")


# --------------------------------------------------------------------------------------------
# Quantized KV cache: 8-bit codes and a float32 scale per (slot, KV head), read by the kernels
# --------------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
# (heads, head_dim, block_size, dtype, codes): both code types in fp32 and bf16, a head size that
# is not a power of two (masked head_dim loads), fp16 (V dequantized in registers, not folded).
QUANT_CASES = [
    ("gqa4", 32, 16, torch.float32, torch.int8), ("gqa2", 32, 16, torch.bfloat16, torch.int8),
    ("mqa", 80, 4, torch.bfloat16, torch.int8), ("gqa4", 32, 4, torch.float16, torch.int8),
    ("gqa2", 32, 16, torch.float32, FP8), ("mha", 64, 4, torch.bfloat16, FP8),
]
QUANT_IDS = [f"{h}-d{d}-bs{b}-{str(t)[6:]}-{'fp8' if c == FP8 else 'int8'}" for h, d, b, t, c in QUANT_CASES]


@pytest.mark.parametrize("heads,head_dim,block_size,dtype,codes", QUANT_CASES, ids=QUANT_IDS)
def test_decode_reads_quantized_cache(heads, head_dim, block_size, dtype, codes, gen):
    bs = block_size
    num_splits = 3 if dtype == torch.float32 else 1
    run_decode([1, bs - 1, bs + 1, 0, 3 * bs + 5, 151], HEADS[heads], head_dim, block_size, dtype, gen,
               [num_splits], code_dtype=codes)


@pytest.mark.parametrize("heads,head_dim,block_size,dtype,codes", QUANT_CASES, ids=QUANT_IDS)
def test_prefill_reads_quantized_cache(heads, head_dim, block_size, dtype, codes, gen):
    bs = block_size
    run_prefill([(bs - 1, bs - 1), (3 * bs + 5, 1), (2 * bs + 3, bs), (151, 40)], HEADS[heads], head_dim,
                block_size, dtype, gen, code_dtype=codes)


def test_quantized_cache_arguments_are_checked(gen):
    args = _decode_args(gen)
    codes, scales = quantize_kv(args["kv_cache"], torch.int8)
    for fn in (paged_decode, paged_decode_ref):
        with pytest.raises(ValueError, match="`kv_cache`"):          # codes without their scales
            fn(**{**args, "kv_cache": codes})
        with pytest.raises(ValueError, match="`kv_cache`"):          # scales for a float cache
            fn(**args, kv_scales=scales)
        with pytest.raises(ValueError, match="`kv_scales`"):
            fn(**{**args, "kv_cache": codes}, kv_scales=scales[..., :1])
        with pytest.raises(ValueError, match="`kv_scales`"):
            fn(**{**args, "kv_cache": codes}, kv_scales=scales.half())
    q = _randn(4, 4, 16, gen=gen)
    with pytest.raises(ValueError, match="`kv_scales`"):
        paged_prefill(q, codes, args["block_tables"], args["seq_lens"], _int32([0, 1, 4]), 3, 0.25,
                      kv_scales=scales.transpose(2, 3).contiguous().transpose(2, 3))


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

def _decode_args(gen):
    kv_cache, tables = make_cache_and_tables([5, 3], 4, 2, 16, torch.float32, gen)
    return dict(q=_randn(2, 4, 16, gen=gen), kv_cache=kv_cache, block_tables=tables,
                seq_lens=_int32([5, 3]), scale=0.25)


@pytest.mark.parametrize("change,name", [
    (lambda a: a.update(q=a["q"].to(torch.float64)), "q"),
    (lambda a: a.update(q=a["q"][..., :8]), "kv_cache"),          # head_dim 8 vs the cache's 16
    (lambda a: a.update(q=a["q"][..., ::2]), "q"),                  # not contiguous in head_dim
    (lambda a: a.update(q=a["q"][:, :3]), "kv_cache"),             # 3 heads over 2 KV heads
    (lambda a: a.update(kv_cache=a["kv_cache"].to(torch.float16)), "kv_cache"),
    (lambda a: a.update(kv_cache=a["kv_cache"].transpose(3, 4)), "kv_cache"),
    (lambda a: a.update(block_tables=a["block_tables"].long()), "block_tables"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), "block_tables"),
    (lambda a: a.update(seq_lens=a["seq_lens"].long()), "seq_lens"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens"),
    (lambda a: a.update(out=torch.empty(2, 4, 8, device=DEVICE)), "out"),
    (lambda a: a.update(out=torch.empty(2, 4, 16, dtype=torch.bfloat16, device=DEVICE)), "out"),
    (lambda a: a.update(num_splits=0), "num_splits"),
    (lambda a: a.update(scale=float("nan")), "scale"),
])
def test_decode_rejects_bad_arguments(change, name, gen):
    args = _decode_args(gen)
    change(args)
    for fn in (paged_decode, paged_decode_ref):
        with pytest.raises(ValueError, match=f"`{name}`"):
            fn(**args)


def test_prefill_rejects_bad_arguments(gen):
    args = _decode_args(gen)
    args.pop("q")
    q = _randn(4, 4, 16, gen=gen)
    qsl = _int32([0, 1, 4])
    with pytest.raises(ValueError, match="`query_start_loc`"):
        paged_prefill(q, query_start_loc=qsl[:2], max_query_len=3, **args)
    with pytest.raises(ValueError, match="`query_start_loc`"):
        paged_prefill(q, query_start_loc=qsl.long(), max_query_len=3, **args)
    with pytest.raises(ValueError, match="`max_query_len`"):
        paged_prefill(q, query_start_loc=qsl, max_query_len=-1, **args)


# --------------------------------------------------------------------------------------------
# Compiled for Hopper without a GPU: the interpreter never runs Triton's compiler
# --------------------------------------------------------------------------------------------

# Runs in a subprocess without TRITON_INTERPRET (under it, @triton.jit gives interpreted
# functions that cannot be compiled). Builds each kernel for sm_90 from the wrappers' own
# parameters and reports shared memory, 16-byte async copies (coalesced K/V loads) and wgmma.
_SM90_SCRIPT = r"""
import json, re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import strata.kernels.paged_attention as pa

def build(fn, meta, ptrs):
    # Constexprs left out keep their defaults (else they would build as i32 arguments).
    meta = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **meta)
    opts = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages", 1))
    sig = {n: ptrs.get(n, "constexpr" if n in meta else "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    # As the launcher specialises torch's allocations: 16-byte aligned, strides multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] not in ("constexpr", "fp32")}
    k = triton.compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    ptx = k.asm["ptx"]
    return dict(shared=k.metadata.shared, wgmma="wgmma" in ptx,
                cp_async_16b=len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*\], 0x10\b", ptx)))

def decode(h, kvh, d, dt, splits, kv=None):
    t = "*" + {torch.bfloat16: "bf16", torch.float32: "fp32"}[dt]
    ptrs = dict(q_ptr=t, kv_ptr=kv or t, out_ptr=t, bt_ptr="*i32", seq_lens_ptr="*i32",
                ws_acc_ptr="*fp32", ws_m_ptr="*fp32", ws_l_ptr="*fp32", s_ptr="*fp32", count_ptr="*i32")
    meta = pa._decode_meta(h, kvh, d, 16, dt, splits, kv is not None)
    if splits > 1:   # the last split merges, as paged_decode launches it
        meta.update(MERGE=True, BLOCK_S=triton.next_power_of_2(splits))
    return build(pa._decode_kernel, meta, ptrs)

def prefill(h, kvh, d, dt, kv=None):
    t = "*" + {torch.bfloat16: "bf16", torch.float32: "fp32"}[dt]
    ptrs = dict(q_ptr=t, kv_ptr=kv or t, out_ptr=t, bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
                s_ptr="*fp32")
    return build(pa._prefill_kernel, pa._prefill_meta(h, kvh, d, 16, dt, kv is not None), ptrs)

bf16, f32 = torch.bfloat16, torch.float32
print(json.dumps({
    "decode": decode(32, 8, 128, bf16, 1), "decode_splits": decode(32, 8, 128, bf16, 8),
    "decode_splits_group16": decode(16, 1, 128, bf16, 4),
    "reduce": build(pa._decode_reduce_kernel, pa._reduce_meta(32, 128, 8),
                    dict(ws_acc_ptr="*fp32", ws_m_ptr="*fp32", ws_l_ptr="*fp32", out_ptr="*bf16")),
    "prefill": prefill(32, 8, 128, bf16),
    "decode_fp32_d80": decode(5, 1, 80, f32, 3), "prefill_fp32_d80": prefill(5, 1, 80, f32),
    "decode_int8": decode(32, 8, 128, bf16, 1, "*i8"), "prefill_int8": prefill(32, 8, 128, bf16, "*i8"),
    "decode_fp8": decode(32, 8, 128, bf16, 8, "*fp8e4nv"), "prefill_fp8": prefill(32, 8, 128, bf16, "*fp8e4nv"),
}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
def test_kernels_compile_for_hopper():
    stats = run_without_interpreter(_SM90_SCRIPT)
    for name, s in stats.items():
        assert s["shared"] <= 227 * 1024, f"{name}: {s['shared']} B of shared memory"
        if name != "reduce":
            assert s["cp_async_16b"] > 0, f"{name}: K/V loads are not 16-byte copies"
    for name in ("prefill", "prefill_int8", "prefill_fp8"):
        assert stats[name]["wgmma"], f"{name}: bf16 prefill should use Hopper's wgmma"


# --------------------------------------------------------------------------------------------
# Realistic sizes (GPU only): Llama-3-8B attention, bf16, block_size 16
# --------------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes need CUDA")
LLAMA_HEADS, LLAMA_HEAD_DIM = (32, 8), 128


@gpu_only
@pytest.mark.parametrize("batch,num_splits", [(64, None), (64, 1), (64, 8), (1, None), (3, 1)])
def test_decode_realistic_gpu(batch, num_splits, gen):
    ctx_lens = torch.randint(1, 4097, (batch,), generator=gen).tolist()
    ctx_lens[0] = 4096
    if batch > 2:
        ctx_lens[1] = 1
        ctx_lens[-1] = 0                        # a CUDA-graph padding row
    run_decode(ctx_lens, LLAMA_HEADS, LLAMA_HEAD_DIM, 16, torch.bfloat16, gen, [num_splits])


@gpu_only
def test_prefill_realistic_gpu(gen):
    seqs = [(4096, 1024), (1024, 1024), (3000, 1), (2049, 17), (777, 777), (4096, 1), (530, 512)]
    seqs += [(int(c), int(torch.randint(1, int(c) + 1, (1,), generator=gen)))
             for c in torch.randint(1, 4097, (9,), generator=gen)]
    run_prefill(seqs, LLAMA_HEADS, LLAMA_HEAD_DIM, 16, torch.bfloat16, gen)
