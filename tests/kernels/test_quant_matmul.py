"""strata.kernels.quant_matmul (int8 / packed int4 weight-only matmuls) against dequantize-then-
F.linear in fp32.

Every code path runs on every dtype: one-row CUDA-core FMAs, the 16-row tensor-core decode tile,
the GEMM tile (several row blocks, grouped), and the default configs; odd row and column counts,
K not a multiple of the tile, int4 tiles inside one group and across several, bias, strided
rows and scales, out=.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import quant_matmul as qm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FMA = dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, USE_DOT=False, num_warps=4, num_stages=1)
DOT = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True, num_warps=4, num_stages=2)
GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, USE_DOT=True, num_warps=4, num_stages=2, GROUP_M=2)
CONFIGS = {"fma": FMA, "dot": DOT, "gemm": GEMM, "default": None}
# (config, m, n, k): each path on the row counts it serves, and one beyond.
CASES = [("fma", 1, 40, 96), ("fma", 3, 33, 64), ("dot", 3, 40, 128), ("dot", 17, 48, 64),
         ("gemm", 70, 40, 96), ("gemm", 16, 64, 128), ("default", 1, 40, 128),
         ("default", 16, 24, 64), ("default", 70, 40, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_close(got, want, x, w):
    """got vs the reference, within a bound scaled by sum_k |x_k w_k| (the size of the rounding
    errors of a dot product, whatever the cancellation) with w the dequantized fp32 weight."""
    scale = x.float().abs() @ w.abs().t()
    eps = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[x.dtype]
    err = (got.float() - want.float()).abs()
    bound = eps * scale + eps * want.float().abs() + 1e-6
    assert got.dtype == x.dtype
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"


def _int8_weight(n, k, dtype):
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scales = (torch.rand(n, device=DEVICE) + 0.5) / (127 * k ** 0.5)
    return qweight, scales.to(dtype)


def _int4_weight(n, k, group_size, dtype):
    """Packed weight, scales and mins centring each group's 0..15 near zero."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(n, k // group_size, device=DEVICE) + 0.5) / (8 * k ** 0.5)
    mins = -scales * (6 + 3 * torch.rand_like(scales))
    return qm.pack_int4(q), scales.to(dtype), mins.to(dtype)


def _check_int8(x, qweight, scales, bias=None, out=None, config=None):
    got = qm.w8a16_matmul(x, qweight, scales, bias, out=out, config=config)
    want = qm.w8a16_matmul_ref(x, qweight, scales, bias)
    _assert_close(got, want, x, qweight.float() * scales.float()[:, None])
    return got


def _check_int4(x, qweight, scales, mins, group_size, bias=None, out=None, config=None):
    got = qm.w4a16_matmul(x, qweight, scales, mins, group_size, bias, out=out, config=config)
    want = qm.w4a16_matmul_ref(x, qweight, scales, mins, group_size, bias)
    _assert_close(got, want, x, qm.dequantize_int4(qweight, scales, mins, group_size))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config,m,n,k", CASES)
def test_int8_matches_reference(config, m, n, k, dtype):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    _check_int8(x, *_int8_weight(n, k, dtype), config=CONFIGS[config])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config,m,n,k", CASES)
def test_int4_matches_reference(config, m, n, k, dtype):
    # 32-wide groups: the 64-deep tiles span two, the 32-deep ones one, 96 is a partial tile
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    _check_int4(x, *_int4_weight(n, k, 32, dtype), 32, config=CONFIGS[config])


FAST = dict(BLOCK_M=16, BLOCK_N=32, USE_DOT=True, FAST_INT4=True, num_warps=4, num_stages=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size,block_k", [(32, 32), (64, 32), (128, 64)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_int4_magic_number_tile(m, group_size, block_k, dtype):
    """FAST_INT4 (the interpreter runs its plain-Triton unpacking): one or half a group a step,
    odd N, bias, masked rows."""
    k, n = 2 * group_size, 33
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    _check_int4(x, *_int4_weight(n, k, group_size, dtype), group_size, bias,
                config=dict(FAST, BLOCK_K=block_k))


def test_int4_default_config_keeps_the_measured_faster_path():
    # The magic-number tile measured slower end to end on an H100 (see default_config).
    for args in ((1, 4096, 4096, 4, torch.bfloat16, 128), (16, 4096, 4096, 4, torch.float16, 128),
                 (1, 4096, 4096, 4, torch.float32, 128), (1, 4096, 4096, 8, torch.bfloat16)):
        assert not qm.default_config(*args).get("FAST_INT4"), args
    assert qm.magic_int4_config(4096, 128)["FAST_INT4"]
    x = torch.randn(3, 256, device=DEVICE).to(torch.bfloat16)
    _check_int4(x, *_int4_weight(40, 256, 128, torch.float32), 128)     # fp32 scales


@pytest.mark.parametrize("config", ["fma", "dot", "gemm"])
@pytest.mark.parametrize("group_size,k", [(64, 192), (128, 256), (256, 256)])
def test_int4_group_sizes(config, group_size, k):
    """Tiles of a group, a fraction of one, and several (192 = a partial 128-deep tile)."""
    cfg = dict(CONFIGS[config], BLOCK_K=128) if config == "gemm" else CONFIGS[config]
    x = torch.randn(3 if config != "gemm" else 40, k, device=DEVICE).to(torch.bfloat16)
    _check_int4(x, *_int4_weight(24, k, group_size, torch.bfloat16), group_size, config=cfg)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("config", ["fma", "dot", "gemm"])
def test_bias_strided_rows_and_out(bits, config):
    m, n, k = (3 if config != "gemm" else 40), 40, 64
    big = torch.randn(m, k + 10, device=DEVICE).to(torch.bfloat16)
    x = big[:, 5:5 + k]                                       # row stride k+10
    bias = torch.randn(n, device=DEVICE)                      # fp32 bias under bf16 x
    out_big = torch.full((m, n + 8), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out = out_big[:, 4:4 + n]
    if bits == 8:
        got = _check_int8(x, *_int8_weight(n, k, torch.float32), bias, out, CONFIGS[config])
    else:
        got = _check_int4(x, *_int4_weight(n, k, 32, torch.float16), 32, bias, out,
                          CONFIGS[config])
    assert got is out
    assert out_big[:, :4].isnan().all() and out_big[:, 4 + n:].isnan().all()


def test_int4_scales_of_any_stride_and_dtype():
    """Scales as a column slice of a wider table and mins transposed, each of its own dtype."""
    n, k, g = 24, 128, 32
    qweight, scales, mins = _int4_weight(n, k, g, torch.float32)
    wide = torch.zeros(n, 2 * (k // g), device=DEVICE)
    wide[:, 1::2] = scales
    mins_t = mins.to(torch.bfloat16).t().contiguous().t()
    x = torch.randn(2, k, device=DEVICE).to(torch.float16)
    for config in (FMA, DOT):
        _check_int4(x, qweight, wide[:, 1::2], mins_t, g, config=config)


def test_pack_unpack_int4():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = qm.pack_int4(q)
    assert packed.shape == (5, 32) and torch.equal(qm.unpack_int4(packed), q)
    # element 2j in the low nibble of byte j, element 2j+1 in the high one
    assert qm.pack_int4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    w = qm.dequantize_int4(qm.pack_int4(torch.tensor([[3] * 32 + [5] * 32], dtype=torch.uint8)),
                           torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 1.0]]), 32,
                           torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w[0, :32].eq(0.5).all() and w[0, 32:].eq(11.0).all()


def test_no_rows():
    x = torch.empty(0, 64, device=DEVICE)
    assert qm.w8a16_matmul(x, *_int8_weight(16, 64, torch.float32)).shape == (0, 16)
    assert qm.w4a16_matmul(x, *_int4_weight(16, 64, 32, torch.float32), 32).shape == (0, 16)


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 64, device=DEVICE).to(torch.bfloat16)
    q8, s8 = _int8_weight(16, 64, torch.bfloat16)
    q4, s4, m4 = _int4_weight(16, 64, 32, torch.bfloat16)
    w8, w4 = qm.w8a16_matmul, qm.w4a16_matmul
    cases = [
        (lambda: w8(x.to(torch.int32), q8, s8), "x"),
        (lambda: w8(x[:, :63], q8, s8), "x"),
        (lambda: w8(x.t(), q8[:, :2].contiguous(), s8), "x"),
        (lambda: w8(x, q8.float(), s8), "qweight"),
        (lambda: w8(x, q8.t().contiguous().t(), s8), "qweight"),
        (lambda: w8(x, q8, s8[:15]), "scales"),
        (lambda: w8(x, q8, s8.to(torch.int32)), "scales"),
        (lambda: w8(x, q8, s8, bias=s8[:8]), "bias"),
        (lambda: w8(x, q8, s8, out=x), "out"),
        (lambda: w8(x, q8, s8, config=dict(DOT, BLOCK_K=8)), "config"),
        (lambda: w8(x, q8, s8, config=dict(FMA, BLOCK_M=2)), "config"),
        (lambda: w8(x, q8, s8, config=dict(BLOCK_M=16)), "config"),
        (lambda: w8(x, q8, s8, config=dict(FAST, BLOCK_K=32)), "config"),
        (lambda: w4(x.float(), q4, s4, m4, 32, config=dict(FAST, BLOCK_K=32)), "config"),
        (lambda: w4(x, q4, s4, m4, 32, config=dict(FAST, BLOCK_K=64)), "config"),
        (lambda: w4(x, q4, s4, m4, 32, config=dict(FMA, FAST_INT4=True)), "config"),
        (lambda: w4(x, q8, s4, m4, 32), "qweight"),
        (lambda: w4(x, q4, s4, m4, 48), "group_size"),
        (lambda: w4(x[:, :32], q4[:, :16].contiguous(), s4, m4, 64), "group_size"),
        (lambda: w4(x, q4, s4[:, :1], m4, 32), "scales"),
        (lambda: w4(x, q4, s4, m4.to(torch.int8), 32), "mins"),
        (lambda: w4(x[:, :32], q4, s4, m4, 32), "x"),
        (lambda: qm.pack_int4(torch.full((2, 4), 16, dtype=torch.uint8)), "q"),
        (lambda: qm.pack_int4(torch.zeros(2, 3, dtype=torch.uint8)), "q"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf": {name}\b"):
            call()


@pytest.mark.skipif(not CUDA, reason="realistic sizes need a GPU")
@pytest.mark.parametrize("m", [1, 4, 16, 300])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_gpu_model_sizes(m, n, k):
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    _check_int8(x, *_int8_weight(n, k, torch.bfloat16))
    _check_int4(x, *_int4_weight(n, k, 128, torch.bfloat16), 128)


# The decode kernels stream the weights with 16-byte accesses: ld.global...v4 on the one-row
# CUDA-core path, 16-byte cp.async into shared memory (pipelined) on the tensor-core paths. The
# masked variants (odd N and K, with bias) only need to compile. (An fp32 GEMM tile takes ptxas
# 14 s: left to the GPU tests.)
_BUILD_SCRIPT = r"""
from strata.kernels import quant_matmul as qm
res = {}
for bits, kernel in ((8, qm._w8_kernel), (4, qm._w4_kernel)):
    types = dict(x_ptr="*bf16", q_ptr="*i8" if bits == 8 else "*u8", s_ptr="*bf16", mn_ptr="*fp32",
                 bias_ptr="*bf16", out_ptr="*bf16")
    for m, even in ((1, True), (4, True), (256, True), (1, False), (256, False)):
        meta = dict(qm.default_config(m, 6144, 4096, bits, None, 128, "fma"))   # _w4_kernel's
        meta.update(HAS_BIAS=not even, EVEN_N=even, EVEN_K=even, DOT_PRECISION="tf32",
                    EVICT="evict_first" if m == 1 else "")
        if bits == 4:
            meta.update(GROUP_SIZE=128, s_stride_g=1, mn_stride_g=1)
        ptx = build(kernel, meta, types, ptx=True)
        res[f"{bits}-{m}-{even}"] = dict(
            v4=len(re.findall(r"ld\.global[^ ]*\.v4", ptx)),
            cp16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)))
# The magic-number int4 tile with its inline PTX, fp16, odd N and bias (the interpreter runs
# only the plain-Triton unpacking).
meta = dict(qm.magic_int4_config(4096, 128))
del meta["FAST_INT4"], meta["USE_DOT"]
meta.update(HAS_BIAS=True, EVEN_N=False, EVICT="evict_first", GROUP_SIZE=128, s_stride_g=1,
            mn_stride_g=1, X_BF16=False)
ptx = build(qm._w4_magic_kernel, meta, dict(x_ptr="*fp16", q_ptr="*u8", s_ptr="*fp16",
                                             mn_ptr="*fp32", bias_ptr="*fp16", out_ptr="*fp16"),
            ptx=True)
res["magic"] = dict(cp16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)),
                    lop3=len(re.findall(r"lop3\.b32[^;]*0x64006400", ptx)),
                    mma=len(re.findall(r"mma\.sync", ptx)))
print(json.dumps(res))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_kernels_compile_for_hopper_with_16_byte_loads():
    found = run_without_interpreter(V4_LOADS_BUILD + _BUILD_SCRIPT)
    for bits in (8, 4):
        assert found[f"{bits}-1-True"]["v4"] >= 1, found
        assert found[f"{bits}-4-True"]["cp16"] >= 1, found
        assert found[f"{bits}-256-True"]["cp16"] >= 1, found
    magic = found["magic"]
    assert magic["cp16"] >= 1 and magic["mma"] >= 1 and magic["lop3"] >= 1, found
