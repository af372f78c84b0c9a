"""strata.kernels.w8_grouped_matmul (int8 codes, a scale and optional offset per group of inputs)
against dequantize-then-F.linear in fp32: every path (one-row CUDA cores, 16-row tensor-core
tile, GEMM tile, default configs), groups of 16 (Q6_K) to 128, tiles inside one group and across
several, K not a multiple of the tile, bias, out=, and a build for Hopper."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import w8_grouped_matmul as wg  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CONFIGS = {
    "fma": dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, USE_DOT=False, num_warps=4, num_stages=1),
    "fma-in-group": dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=16, USE_DOT=False, num_warps=4, num_stages=1),
    "dot": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True, num_warps=4, num_stages=2),
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, USE_DOT=True, num_warps=4, num_stages=2, GROUP_M=2),
    "default": None,
}
# (config, m, n, k, group)
CASES = [("fma", 1, 40, 96, 16), ("fma", 2, 33, 128, 32), ("fma-in-group", 1, 24, 96, 32),
         ("dot", 3, 40, 128, 32), ("dot", 17, 24, 96, 16), ("gemm", 70, 40, 128, 64),
         ("default", 1, 40, 256, 128), ("default", 9, 24, 64, 16), ("default", 40, 40, 96, 32)]
DTYPES = [torch.float32, torch.bfloat16]


def _weight(n, k, group, offsets: bool):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scales = (torch.rand(n, k // group, device=DEVICE) + 0.5) / (127 * k ** 0.5)
    off = (torch.rand_like(scales) - 0.5) * 50 * scales if offsets else None
    return q, scales, off


def _check(x, q, scales, off, group, bias=None, out=None, config=None):
    got = wg.w8g_matmul(x, q, scales, off, group, bias, out=out, config=config)
    want = wg.w8g_matmul_ref(x, q, scales, off, group, bias)
    w = wg.dequantize_w8g(q, scales, off, group)
    bound_scale = x.float().abs() @ w.abs().t()
    eps = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7}[x.dtype]
    err = (got.float() - want.float()).abs()
    assert got.dtype == x.dtype
    assert (err <= eps * bound_scale + eps * want.float().abs() + 1e-6).all(), f"max err {err.max():.3g}"
    return got


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config,m,n,k,group", CASES)
def test_matches_reference(config, m, n, k, group, dtype, offsets):
    torch.manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    _check(x, *_weight(n, k, group, offsets), group, config=CONFIGS[config])


def test_bias_and_out():
    x = torch.randn(3, 64, device=DEVICE)
    q, s, o = _weight(20, 64, 16, True)
    bias = torch.randn(20, device=DEVICE)
    out = torch.empty(3, 20, device=DEVICE)
    got = _check(x, q, s, o, 16, bias=bias, out=out, config=CONFIGS["fma"])
    assert got.data_ptr() == out.data_ptr()


def test_bad_arguments_name_the_argument():
    x = torch.randn(1, 64, device=DEVICE)
    q, s, _ = _weight(8, 64, 16, False)
    with pytest.raises(ValueError, match="group_size"):
        wg.w8g_matmul(x, q, s, None, 24)
    with pytest.raises(ValueError, match="scales"):
        wg.w8g_matmul(x, q, s[:, :2], None, 16)
    with pytest.raises(ValueError, match="qweight"):
        wg.w8g_matmul(x, q.to(torch.int16), s, None, 16)


_BUILD = r"""
from strata.kernels import quant_matmul as qm, w8_grouped_matmul as wg
res = {}
types = dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", o_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16")
for m in (1, 4):
    meta = dict(qm.default_config(m, 4096, 4096, 8))
    meta.update(GROUP_SIZE=32, HAS_OFFSETS=True, HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
                DOT_PRECISION="tf32", EVICT="evict_first", s_stride_g=1, o_stride_g=1)
    ptx = build(wg._w8g_kernel, meta, types, ptx=True)
    res[str(m)] = dict(v4=len(re.findall(r"ld\.global[^ ]*\.v4", ptx)),
                       cp16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)))
print(json.dumps(res))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernel for real")
def test_compiles_for_hopper_with_16_byte_loads():
    found = run_without_interpreter(V4_LOADS_BUILD + _BUILD)
    assert found["1"]["v4"] >= 1 and found["4"]["cp16"] >= 1, found
