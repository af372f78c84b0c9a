"""strata.kernels.int4_gemv (the one-row int4 decode kernel, reached through
quant_matmul.w4a16_matmul) against dequantize-then-F.linear in fp32, and its sm_90 build.

Every x dtype and group size; K slices (SPLIT_K) of whole and partial steps, odd N (masked rows),
bias, reuse of the split-K workspace; and in the sm_90 SASS, the instructions a weight in the K
loop and 16-byte weight loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import SASS_LOOP, V4_LOADS_BUILD, run_without_interpreter  # noqa: E402
from test_quant_matmul import CUDA, DEVICE, _assert_close, _int4_weight  # noqa: E402

from strata.kernels import int4_gemv  # noqa: E402
from strata.kernels import quant_matmul as qm  # noqa: E402


def gemv(block_n=32, kw=8, split_k=None, num_warps=2):
    return dict(GEMV4=True, BLOCK_N=block_n, KW=kw, SPLIT_K=split_k, num_warps=num_warps)


def _check(x, weight, group_size, bias=None, config=None, out=None):
    got = qm.w4a16_matmul(x, *weight, group_size, bias, out=out, config=config)
    want = qm.w4a16_matmul_ref(x, *weight, group_size, bias)
    _assert_close(got, want, x, qm.dequantize_int4(*weight, group_size))
    return got


# (dtype, group size, N, K, config): whole steps and a partial last one (K = 96, 320 with 64-weight
# steps), one K slice and several (3 slices of 2 steps; 2 slices with a partial one; the automatic
# choice), odd N (masked rows), 4-word steps (one chunk a row).
CASES = [
    (torch.bfloat16, 128, 96, 512, gemv(split_k=1)),
    (torch.float16, 32, 33, 96, gemv(split_k=1)),
    (torch.float32, 64, 40, 768, gemv(split_k=3)),
    (torch.bfloat16, 32, 70, 320, gemv(split_k=2)),
    (torch.float16, 256, 48, 256, gemv(kw=4, split_k=None, num_warps=1)),
    (torch.bfloat16, 64, 24, 256, gemv(block_n=16, kw=16, split_k=2)),
]


@pytest.mark.parametrize("dtype,group_size,n,k,config", CASES)
def test_gemv_matches_reference(dtype, group_size, n, k, config):
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    weight = _int4_weight(n, k, group_size, dtype)
    _check(x, weight, group_size, bias, config)
    _check(x, weight, group_size, None, config)


def test_gemv_extreme_values_stay_exact():
    """Every nibble value in every position, x from 2**-30 to 2**40 (the prescale's range), fp32
    scales: the fp32 result equals the reference to fp32 rounding."""
    k, n = 256, 16
    q = torch.arange(n * k, device=DEVICE).remainder(16).to(torch.uint8).view(n, k)
    q = q[torch.randperm(n, device=DEVICE)]
    scales = torch.rand(n, k // 32, device=DEVICE) + 0.5
    mins = -7.5 * scales
    x = torch.randn(1, k, device=DEVICE) * torch.exp2(torch.randint(-30, 41, (1, k), device=DEVICE))
    _check(x, (qm.pack_int4(q), scales, mins), 32, config=gemv(split_k=2))


def test_split_k_workspace_is_reset_and_reused():
    """The last program of a row block resets its counter: a second call (and a call of another
    shape) finds the workspace as the first did, and out= receives the result."""
    x = torch.randn(1, 512, device=DEVICE).to(torch.bfloat16)
    weight = _int4_weight(40, 512, 128, torch.bfloat16)
    first = _check(x, weight, 128, config=gemv(split_k=4))
    _, counters = int4_gemv.workspace(x.device)
    assert int(counters.abs().sum()) == 0
    _check(x[:, :256].contiguous(), _int4_weight(64, 256, 64, torch.bfloat16), 64,
           config=gemv(split_k=2))
    out = torch.empty(1, 40, device=DEVICE, dtype=torch.bfloat16)
    again = _check(x, weight, 128, config=gemv(split_k=4), out=out)
    assert again is out and torch.equal(first, again)
    assert int(counters.abs().sum()) == 0


def test_one_row_int4_takes_the_gemv_and_fma_on_request(monkeypatch):
    """The word-wise kernel is the default for one row (faster on the H100 and H200); the
    element-wise tile stays available (INT4_DECODE = "fma", bench/gpu_quant.py --int4-decode)."""
    assert qm.INT4_DECODE == "gemv"
    fma = qm.default_config(1, 4096, 4096, 4, torch.bfloat16, 128, "fma")
    assert not fma.get("GEMV4") and not fma["USE_DOT"]
    gemv = qm.default_config(1, 4096, 4096, 4, torch.bfloat16, 128, "gemv")
    assert gemv["GEMV4"] and gemv["SPLIT_K"] == 1 and gemv == int4_gemv.GEMV_INT4_TUNED[(4096, 4096)]
    assert qm.default_config(1, 4096, 14336, 4, torch.bfloat16, 128, "gemv")["SPLIT_K"] == 2
    assert not qm.default_config(2, 4096, 4096, 4, torch.bfloat16, 128, "gemv").get("GEMV4")
    assert not qm.default_config(1, 4096, 4096, 8, torch.bfloat16, None, "gemv").get("GEMV4")
    # The module switch reaches calls without a config.
    x = torch.randn(1, 128, device=DEVICE).to(torch.float16)
    weight = _int4_weight(20, 128, 32, torch.float16)
    launched = []
    monkeypatch.setattr(int4_gemv, "w4_gemv", lambda *a: launched.append(a))
    qm.w4a16_matmul(x, *weight, 32)
    assert launched
    launched.clear()
    monkeypatch.setattr(qm, "INT4_DECODE", "fma")
    _check(x, weight, 32)
    assert not launched


def test_split_k_choice():
    cpu = torch.device("cpu")           # counts as 132 SMs, an H100's
    # 16 blocks of 256 rows: 16 slices (of 4 steps, the least) toward 2 programs an SM
    assert int4_gemv._split_k(4096, 4096, 256, 8, cpu) == 16
    assert int4_gemv._split_k(28672, 4096, 256, 8, cpu) == 3
    assert int4_gemv._split_k(128256, 4096, 256, 8, cpu) == 1
    assert int4_gemv._split_k(4096, 256, 256, 8, cpu) == 1


def test_gemv_config_errors_name_the_config():
    x = torch.randn(2, 64, device=DEVICE).to(torch.bfloat16)
    weight = _int4_weight(16, 64, 32, torch.bfloat16)
    cases = [(x, gemv()), (x[:1], gemv(kw=2)), (x[:1], gemv(block_n=24)),
             (x[:1], gemv(split_k=0)), (x[:1], dict(GEMV4=True))]
    for rows, bad in cases:
        with pytest.raises(ValueError, match=r": config\b"):
            qm.w4a16_matmul(rows, *weight, 32, config=bad)


# The rule's one-warp tile (2 rows x 128 words: gemv_config of an untuned narrow matrix) in the
# sm_90 build: the K loop's instructions a weight (a thread's share of a step is
# BLOCK_N * KW * 8 / (32 * num_warps) weights) and its 16-byte weight loads; fp16/fp32 x with odd
# N, a partial step, bias and split-K only need to compile.
_SASS_SCRIPT = r"""
from strata.kernels import int4_gemv as g, quant_matmul as qm
cfg = g.gemv_config(8192, 4096)
meta = dict(GROUP_SIZE=128, HAS_BIAS=False, EVEN_N=True, EVEN_K=True, SPLIT=True, X_KIND=0,
            EVICT="evict_first", BLOCK_N=cfg["BLOCK_N"], KW=cfg["KW"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

def types(xt):
    return dict(x_ptr="*i32", q_ptr="*i32", s_ptr="*fp32", mn_ptr="*fp32", bias_ptr="*" + xt,
                out_ptr="*" + xt, ws_ptr="*fp32", cnt_ptr="*i32")
loop = loop_sass(g._w4_gemv_kernel, meta, types("bf16"))
res = dict(instrs=len(loop), weights=cfg["BLOCK_N"] * cfg["KW"] * 8 // (32 * cfg["num_warps"]),
           rows=cfg["BLOCK_N"] * cfg["KW"] // (4 * 32 * cfg["num_warps"]),
           ldg128=sum(bool(re.search(r"\bLDG\.E[.\w]*\.128\b", i)) for i in loop),
           barriers=sum(i.startswith("BAR") for i in loop),
           lds128=sum(i.startswith("LDS.128") for i in loop),
           ops=sorted({re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in loop}))
for x_kind, xt in ((1, "fp16"), (2, "fp32")):
    loop_sass(g._w4_gemv_kernel, dict(meta, HAS_BIAS=True, EVEN_N=False, EVEN_K=False,
                                      X_KIND=x_kind), types(xt))
print(json.dumps(res))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_sm90_loop_instructions_per_weight():
    """The one-warp tile's K loop (2 rows x 128 words): x is loaded in the weights'
    layout and converted once for the rows a thread holds, so no layout conversion of x goes
    through shared memory (only the scales' and mins', one a step: at most 4 barriers); under 5.5
    SASS instructions a weight (4.95 now; 6.4 when each row converted x again, 7.4 for the
    element-wise tile of quant_matmul); 16-byte weight loads."""
    found = run_without_interpreter(V4_LOADS_BUILD + SASS_LOOP + _SASS_SCRIPT)
    assert found["instrs"] / found["weights"] < 5.5, found
    assert found["barriers"] <= 4 and found["lds128"] == 0, found
    assert found["ldg128"] >= 1, found      # the words come in 16-byte loads
