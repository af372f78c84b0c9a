"""strata.kernels.rotary against the torch layer's math (strata.layers.rotary) and write_kv.

The kernel computes in fp32 and rounds once; the torch layer rounds cos/sin to the dtype and
rounds after each operation. So fp32 is compared tightly, and bf16/fp16 twice: tightly against
the same math done in fp32 and rounded once, loosely (~1e-2 relative) against the layer itself.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.attention import torch_ref  # noqa: E402
from strata.kernels import rotary  # noqa: E402
from strata.layers.rotary import RotaryEmbedding  # noqa: E402
from strata.quant.kv import quantize_kv  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MAX_POS = 512
# (heads, kv_heads, head_dim, rot_dim): GQA, partial rotary with odd sizes, tiny heads, and more
# q heads than one head block holds.
CONFIGS = [(4, 2, 64, 64), (3, 1, 80, 32), (2, 2, 12, 8), (40, 8, 128, 128)]


def _tables(head_dim, rot_dim):
    # The layer stays on the CPU (its _apply helper shadows nn.Module._apply, so .to() fails);
    # its tables travel alone.
    emb = RotaryEmbedding(head_dim, MAX_POS, 10000.0, rot_dim=rot_dim)
    return emb, emb.cos_cached.to(DEVICE), emb.sin_cached.to(DEVICE)


def _fused_qkv(num_tokens, heads, kv_heads, head_dim, dtype):
    """q, k, v as views of one [T, (H + 2 KVH) * D + pad] tensor, as the qkv projection gives."""
    qd, kd = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(num_tokens, qd + 2 * kd + 8, device=DEVICE).to(dtype)
    q = qkv[:, :qd].view(num_tokens, heads, head_dim)
    k = qkv[:, qd:qd + kd].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, qd + kd:qd + 2 * kd].view(num_tokens, kv_heads, head_dim)
    return qkv, q, k, v


def _views(qkv, heads, kv_heads, head_dim):
    qd, kd, t = heads * head_dim, kv_heads * head_dim, qkv.shape[0]
    return (qkv[:, :qd].view(t, heads, head_dim), qkv[:, qd:qd + kd].view(t, kv_heads, head_dim),
            qkv[:, qd + kd:qd + 2 * kd].view(t, kv_heads, head_dim))


def _slots(num_tokens, num_slots, pad_rows, dtype=torch.int64):
    """A non-contiguous slot mapping (every other entry of a shuffled list), -1 at pad_rows."""
    slots = torch.randperm(num_slots, device=DEVICE)[: 2 * num_tokens].to(dtype)[::2]
    slots[list(pad_rows)] = -1
    return slots


def _tol(dtype):
    return dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)


def _rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS)
def test_rotary_write_kv_matches_reference(dtype, config):
    heads, kv_heads, head_dim, rot_dim = config
    num_tokens, num_blocks, block_size = 9, 6, 4
    _, cos, sin = _tables(head_dim, rot_dim)
    qkv, q, k, v = _fused_qkv(num_tokens, heads, kv_heads, head_dim, dtype)
    positions = torch.randint(0, MAX_POS, (2 * num_tokens,), device=DEVICE)[1::2]   # strided too
    slots = _slots(num_tokens, num_blocks * block_size, pad_rows=(2, 7))
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), device=DEVICE,
                       dtype=dtype)

    qkv_ref, cache_ref = qkv.clone(), cache.clone()
    q_ref, k_ref, v_ref = _views(qkv_ref, heads, kv_heads, head_dim)
    rotary.rotary_write_kv_ref(positions, q_ref, k_ref, v_ref, cos, sin, cache_ref, slots)
    # The same math in fp32, rounded once: what the kernel computes.
    q32, k32 = rotary.rotary_ref(positions, q.float(), k.float(), cos, sin)

    got_q, got_k = rotary.rotary_write_kv(positions, q, k, v, cos, sin, cache, slots)
    assert got_q is q and got_k is k
    torch.testing.assert_close(q, q32.to(dtype), **_tol(dtype))
    torch.testing.assert_close(k, k32.to(dtype), **_tol(dtype))
    if dtype != torch.float32:
        assert _rel_err(q, q_ref) < 1e-2 and _rel_err(k, k_ref) < 1e-2
    # Only q and k changed in the fused tensor; v and the padding columns are as they were.
    qd = heads * head_dim + kv_heads * head_dim
    assert torch.equal(qkv[:, qd:], qkv_ref[:, qd:])

    # The cache: padding rows' slots and all unused slots still hold the poison; written slots
    # hold exactly the kernel's k and the input v.
    assert torch.equal(cache.isnan(), cache_ref.isnan())
    flat = cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    keep = slots >= 0
    assert torch.equal(flat[0, slots[keep]], k[keep])
    assert torch.equal(flat[1, slots[keep]], v[keep])


def test_reference_is_the_layer_and_write_kv():
    """Pure torch, on the CPU: the references are the layer's math and torch_ref.write_kv."""
    heads, kv_heads, head_dim, rot_dim = 4, 2, 64, 32
    emb = RotaryEmbedding(head_dim, MAX_POS, 10000.0, rot_dim=rot_dim)
    positions = torch.randint(0, MAX_POS, (5,))
    q = torch.randn(5, heads, head_dim, dtype=torch.bfloat16)
    k = torch.randn(5, kv_heads, head_dim, dtype=torch.bfloat16)
    for got, want in zip(rotary.rotary_ref(positions, q, k, emb.cos_cached, emb.sin_cached),
                         emb(positions, q, k)):
        assert torch.equal(got, want)
    cache_a = torch.randn(2, 3, 4, kv_heads, head_dim)
    cache_b = cache_a.clone()
    slots = torch.tensor([5, 0, 11, 3, 7])
    kf, vf = torch.randn(5, kv_heads, head_dim), torch.randn(5, kv_heads, head_dim)
    rotary.write_kv_ref(cache_a, kf, vf, slots)
    torch_ref.write_kv(cache_b, kf, vf, slots)
    assert torch.equal(cache_a, cache_b)


def test_int32_indices_and_one_token():
    heads, kv_heads, head_dim = 8, 2, 64
    _, cos, sin = _tables(head_dim, head_dim)
    _, q, k, v = _fused_qkv(1, heads, kv_heads, head_dim, torch.bfloat16)
    positions = torch.tensor([MAX_POS - 1], device=DEVICE, dtype=torch.int32)
    slots = torch.tensor([6], device=DEVICE, dtype=torch.int32)
    cache = torch.full((2, 2, 4, kv_heads, head_dim), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    q32, k32 = rotary.rotary_ref(positions.long(), q.float(), k.float(), cos, sin)
    v0 = v.clone()
    rotary.rotary_write_kv(positions, q, k, v, cos, sin, cache, slots)
    torch.testing.assert_close(q, q32.to(torch.bfloat16), **_tol(torch.bfloat16))
    torch.testing.assert_close(k, k32.to(torch.bfloat16), **_tol(torch.bfloat16))
    assert torch.equal(cache[0, 1, 2], k[0]) and torch.equal(cache[1, 1, 2], v0[0])
    assert int((~cache.isnan()).sum()) == 2 * kv_heads * head_dim


def test_rotate_only_without_cache():
    heads, kv_heads, head_dim, rot_dim = 4, 2, 64, 48
    _, cos, sin = _tables(head_dim, rot_dim)
    _, q, k, v = _fused_qkv(6, heads, kv_heads, head_dim, torch.float32)
    positions = torch.randint(0, MAX_POS, (6,), device=DEVICE)
    q_want, k_want = rotary.rotary_ref(positions, q, k, cos, sin)
    rotary.rotary_write_kv(positions, q, k, v, cos, sin, None, None)
    torch.testing.assert_close(q, q_want, **_tol(torch.float32))
    torch.testing.assert_close(k, k_want, **_tol(torch.float32))


# (dtype, config): GQA in bf16, partial rotary with a tail in fp32 and fp16, more q heads than
# one head block in bf16.
QUANT_WRITE_CASES = [(torch.bfloat16, CONFIGS[0]), (torch.float32, CONFIGS[1]), (torch.float16, CONFIGS[1]),
                     (torch.bfloat16, CONFIGS[3])]


def _write_quantized_case(dtype, config, code_dtype):
    """Run the kernel on a quantized cache; return what it wrote and what strata.quant.kv says."""
    heads, kv_heads, head_dim, rot_dim = config
    num_tokens, num_blocks, block_size = 9, 6, 4
    _, cos, sin = _tables(head_dim, rot_dim)
    _, q, k, v = _fused_qkv(num_tokens, heads, kv_heads, head_dim, dtype)
    k[4] = 0.0                                                  # an all-zero key: scale 0, no 0/0
    positions = torch.randint(0, MAX_POS, (num_tokens,), device=DEVICE)
    slots = _slots(num_tokens, num_blocks * block_size, pad_rows=(2, 7))
    codes = torch.full((2, num_blocks, block_size, kv_heads, head_dim), 99, dtype=torch.int8,
                       device=DEVICE).view(torch.uint8).view(code_dtype) if code_dtype != torch.int8 else \
        torch.full((2, num_blocks, block_size, kv_heads, head_dim), 99, dtype=torch.int8, device=DEVICE)
    scales = torch.full((2, num_blocks, block_size, kv_heads), float("nan"), device=DEVICE)
    q32, k32 = rotary.rotary_ref(positions, q.float(), k.float(), cos, sin)
    v0 = v.clone()
    rotary.rotary_write_kv(positions, q, k, v, cos, sin, codes, slots, scales)
    # q and k are rotated in place exactly as without quantization.
    torch.testing.assert_close(q, q32.to(dtype), **_tol(dtype))
    torch.testing.assert_close(k, k32.to(dtype), **_tol(dtype))
    keep = slots >= 0
    want = [quantize_kv(x[keep], code_dtype) for x in (k, v0)]   # from the rotated k the kernel kept
    flat, flat_scales = codes.flatten(1, 2), scales.flatten(1, 2)
    got = [(flat[p, slots[keep]], flat_scales[p, slots[keep]]) for p in (0, 1)]
    # Every other slot is untouched.
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[keep]] = False
    assert (flat.view(torch.uint8)[:, untouched] == 99).all() and flat_scales[:, untouched].isnan().all()
    return got, want


@pytest.mark.parametrize("dtype,config", QUANT_WRITE_CASES,
                         ids=[f"{str(d)[6:]}-{c[0]}x{c[1]}x{c[2]}-rot{c[3]}" for d, c in QUANT_WRITE_CASES])
def test_rotary_writes_int8_cache(dtype, config):
    """The kernel's codes and scales are strata.quant.kv's, computed the same way in float32 (on
    the GPU a code may differ by one where a division rounds differently)."""
    got, want = _write_quantized_case(dtype, config, torch.int8)
    for (codes, scales), (want_codes, want_scales) in zip(got, want):
        diff = (codes.int() - want_codes.int()).abs()
        assert diff.max() <= (1 if CUDA else 0), f"{int((diff > 0).sum())} codes differ"
        torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)


@pytest.mark.skipif(not CUDA, reason="the interpreter's float32 -> float8 conversion drops the carry of "
                                     "its rounding (0.49999997 becomes 0.25, not 0.5)")
@pytest.mark.parametrize("dtype,config", QUANT_WRITE_CASES[:2],
                         ids=[f"{str(d)[6:]}-rot{c[3]}" for d, c in QUANT_WRITE_CASES[:2]])
def test_rotary_writes_fp8_cache(dtype, config):
    got, want = _write_quantized_case(dtype, config, torch.float8_e4m3fn)
    for (codes, scales), (want_codes, want_scales) in zip(got, want):
        torch.testing.assert_close(codes.float(), want_codes.float(), rtol=0.07, atol=2.0 ** -9)
        torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)


def test_bad_arguments_name_the_argument():
    heads, kv_heads, head_dim = 4, 2, 64
    _, cos, sin = _tables(head_dim, head_dim)
    _, q, k, v = _fused_qkv(3, heads, kv_heads, head_dim, torch.bfloat16)
    pos = torch.zeros(3, dtype=torch.long, device=DEVICE)
    cache = torch.zeros(2, 2, 4, kv_heads, head_dim, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    good = dict(positions=pos, q=q, k=k, v=v, cos_cache=cos, sin_cache=sin, kv_cache=cache,
                slot_mapping=slots)
    cases = {
        "positions": dict(positions=pos.float()),
        "slot_mapping": dict(slot_mapping=slots[:2]),
        "q": dict(q=q.transpose(1, 2)),
        "k": dict(k=k.float()),
        "v": dict(v=v[:, :1]),
        "cos_cache": dict(cos_cache=cos.half()),
        "sin_cache": dict(sin_cache=sin[:, :32]),
        "rot_dim": dict(cos_cache=cos[:, :31], sin_cache=sin[:, :31]),
        "kv_cache": dict(kv_cache=cache.float()),
        "kv_scales": dict(kv_cache=cache.to(torch.int8), kv_scales=torch.zeros(2, 2, 4, 1, device=DEVICE)),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=name):
            rotary.rotary_write_kv(**{**good, **bad})
    _, big_cos, big_sin = _tables(128, 128)                     # rot_dim 128 > head_dim 64
    with pytest.raises(ValueError, match="rot_dim"):
        rotary.rotary_write_kv(**{**good, "cos_cache": big_cos, "sin_cache": big_sin})
    scales = torch.zeros(2, 2, 4, kv_heads, device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache"):           # scales beside a float cache
        rotary.rotary_write_kv(**good, kv_scales=scales)
    with pytest.raises(ValueError, match="kv_cache"):           # codes without their scales
        rotary.rotary_write_kv(**{**good, "kv_cache": cache.to(torch.int8)})


@pytest.mark.skipif(not CUDA, reason="realistic sizes need a GPU")
@pytest.mark.parametrize("num_tokens", [1, 256, 8192])
def test_gpu_model_sizes(num_tokens):
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    num_blocks = 2 * num_tokens // block_size + 8      # _slots draws from twice the tokens
    _, cos, sin = _tables(head_dim, head_dim)
    qkv, q, k, v = _fused_qkv(num_tokens, heads, kv_heads, head_dim, torch.bfloat16)
    positions = torch.randint(0, MAX_POS, (num_tokens,), device=DEVICE)
    slots = _slots(num_tokens, num_blocks * block_size, pad_rows=(0,) if num_tokens > 1 else ())
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), device=DEVICE,
                       dtype=torch.bfloat16)
    qkv_ref, cache_ref = qkv.clone(), cache.clone()
    q_ref, k_ref, v_ref = _views(qkv_ref, heads, kv_heads, head_dim)
    rotary.rotary_write_kv_ref(positions, q_ref, k_ref, v_ref, cos, sin, cache_ref, slots)
    q32, _ = rotary.rotary_ref(positions, q.float(), k.float(), cos, sin)
    rotary.rotary_write_kv(positions, q, k, v, cos, sin, cache, slots)
    torch.testing.assert_close(q, q32.to(torch.bfloat16), **_tol(torch.bfloat16))
    assert _rel_err(q, q_ref) < 1e-2 and _rel_err(k, k_ref) < 1e-2
    assert torch.equal(cache.isnan(), cache_ref.isnan())
    assert _rel_err(cache.nan_to_num(), cache_ref.nan_to_num()) < 1e-2


# --------------------------------------------------------------------------------------------
# Compiled for Hopper without a GPU: the interpreter never runs Triton's compiler, so errors
# that only compilation finds (and unvectorised loads) would otherwise wait for a GPU machine.
# --------------------------------------------------------------------------------------------

_ROTARY_SCRIPT = r"""
from strata.kernels import rotary
types = dict(pos_ptr="*i64", q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", cos_ptr="*fp32",
             sin_ptr="*fp32", cache_ptr="*bf16", slot_ptr="*i64", scale_ptr="*fp32")
int8 = dict(types, cache_ptr="*i8")
fp8 = dict(types, cache_ptr="*fp8e4nv")
print(json.dumps({
    "llama_gqa": build(rotary._rotary_kv_kernel, rotary._rotary_meta(32, 8, 128, 128, True)[1], types),
    "partial": build(rotary._rotary_kv_kernel, rotary._rotary_meta(32, 32, 80, 32, True)[1], types),
    "rotate_only": build(rotary._rotary_kv_kernel, rotary._rotary_meta(40, 8, 128, 128, False)[1], types),
    "int8_cache": build(rotary._rotary_kv_kernel,
                        rotary._rotary_meta(32, 8, 128, 128, True, torch.int8)[1], int8),
    "int8_partial": build(rotary._rotary_kv_kernel,
                          rotary._rotary_meta(32, 32, 80, 32, True, torch.int8)[1], int8),
    "fp8_cache": build(rotary._rotary_kv_kernel,
                       rotary._rotary_meta(32, 8, 128, 128, True, torch.float8_e4m3fn)[1], fp8),
}))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_kernel_compiles_for_hopper_with_16_byte_loads():
    v4_loads = run_without_interpreter(V4_LOADS_BUILD + _ROTARY_SCRIPT)
    # Both halves of q / k and of cos / sin come in as 16-byte vectors.
    assert all(n >= 4 for n in v4_loads.values()), v4_loads
