"""strata.kernels.skinny_matmul (decode-sized matmuls) against F.linear.

Both inner products (CUDA-core FMAs and tl.dot) run on every case: odd row and column counts,
K not a multiple of the tile, bias, strided rows.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import skinny_matmul as sk  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FMA = dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=64, USE_DOT=False, num_warps=4, num_stages=1)
FMA4 = dict(FMA, BLOCK_M=4, BLOCK_K=32)
DOT = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True, num_warps=4, num_stages=2)
CONFIGS = {"fma": FMA, "fma4": FMA4, "dot": DOT, "default": None}


def _assert_close(got, x, w, bias=None):
    """got vs the reference, within a bound scaled by sum_k |x_k w_k| (the size of the rounding
    errors of a dot product, whatever the cancellation)."""
    want = sk.skinny_matmul_ref(x, w, bias)
    scale = x.float().abs() @ w.float().abs().t()
    eps = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[w.dtype]
    err = (got.float() - want.float()).abs()
    bound = eps * scale + eps * want.float().abs() + 1e-6
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (3, 24, 100), (5, 33, 128), (8, 16, 96), (17, 48, 64)])
def test_matches_linear(config, dtype, m, n, k):
    x, w = _rand(m, k, dtype=dtype), _rand(n, k, dtype=dtype) / k ** 0.5
    _assert_close(sk.skinny_matmul(x, w, config=CONFIGS[config]), x, w)


@pytest.mark.parametrize("config", ["fma", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_and_strided_rows(config, dtype):
    m, n, k = 3, 40, 72
    big = 3 * _rand(m, k + 10, dtype=dtype)
    x = big[:, 5:5 + k]                                       # row stride k+10
    w, b = _rand(n, k, dtype=dtype) / k ** 0.5, _rand(n, dtype=dtype)
    out_big = torch.full((m, n + 8), float("nan"), device=DEVICE, dtype=dtype)
    out = out_big[:, 4:4 + n]
    assert sk.skinny_matmul(x, w, b, out=out, config=CONFIGS[config]) is out
    _assert_close(out, x, w, b)
    assert out_big[:, :4].isnan().all() and out_big[:, 4 + n:].isnan().all()


def test_no_rows():
    w = _rand(16, 32, dtype=torch.float32)
    assert sk.skinny_matmul(torch.empty(0, 32, device=DEVICE), w).shape == (0, 16)


def test_bad_arguments_name_the_argument():
    x, w = _rand(2, 32, dtype=torch.bfloat16), _rand(16, 32, dtype=torch.bfloat16)
    cases = [
        (lambda: sk.skinny_matmul(x.float(), w), "weight"),
        (lambda: sk.skinny_matmul(x[:, :31], w), "x"),
        (lambda: sk.skinny_matmul(x, w, bias=w[0]), "bias"),
        (lambda: sk.skinny_matmul(x, w, out=x), "out"),
        (lambda: sk.skinny_matmul(x, w.t()), "x/weight"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("config", ["fma", "fma4", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_push_sends_each_tile_to_the_peers_slot(config, dtype):
    """With ``push``, every tile of the result also lands in the peers' buffers, in this
    sender's slot of each row's half for its current call (as all_reduce_rms_norm reads them),
    -0.0 sent as +0.0; nothing else in any buffer changes, and the call counts stay."""
    from strata.kernels.all_reduce_norm import EMPTY_FILL, PushTarget, block_for, buffer_numel
    world, rank, max_rows, (m, n, k) = 3, 1, 4, (3, 40, 72)
    x, w = _rand(m, k, dtype=dtype), _rand(n, k, dtype=dtype) / k ** 0.5
    x[1, 0], w[:, 0] = -2.0 ** -70, 2.0 ** -70       # row 1: a product that rounds to -0.0 ...
    x[1, 1:] = 0.0                                   # ... and nothing else
    buffers = [torch.full((buffer_numel(max_rows, world, n),), EMPTY_FILL, dtype=dtype, device=DEVICE)
               for _ in range(world)]
    uses = torch.tensor([0, 1, 3, 6], dtype=torch.int32, device=DEVICE)
    target = PushTarget(torch.tensor([b.data_ptr() for b in buffers], device=DEVICE), uses, max_rows, rank,
                        world, n, dtype)
    out = sk.skinny_matmul(x, w, config=CONFIGS[config], push=target)
    assert torch.equal(out, sk.skinny_matmul(x, w, config=CONFIGS[config]))
    if dtype == torch.float32:
        assert out[1].abs().max() < 2.0 ** -126        # (a float32 row keeps the tiny product)
    else:
        assert torch.equal(out[1].view(torch.int16), torch.full_like(out[1].view(torch.int16), -2 ** 15))
    slot = block_for(n)
    for r, buf in enumerate(buffers):
        want = torch.full_like(buf, EMPTY_FILL)
        if r != rank:
            for row in range(m):
                start = ((int(uses[row]) % 2) * max_rows + row) * world * slot + rank * slot
                want[start:start + n] = out[row] + 0.0     # -0.0 -> +0.0
        assert torch.equal(buf.view(torch.uint8), want.view(torch.uint8)), f"buffer of rank {r}"
    assert uses.tolist() == [0, 1, 3, 6]
    with pytest.raises(ValueError, match="push"):
        sk.skinny_matmul(x[:, :k], w[:n - 1], push=target)       # not the target's row width


@pytest.mark.skipif(not CUDA, reason="realistic sizes need a GPU")
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_gpu_model_sizes(m, n, k):
    x, w = _rand(m, k, dtype=torch.bfloat16), _rand(n, k, dtype=torch.bfloat16) / k ** 0.5
    _assert_close(sk.skinny_matmul(x, w), x, w)


# The weight stream must use 16-byte accesses: ld.global...v4 (evict-first hint and all) on the
# CUDA-core path, 16-byte cp.async into shared memory (pipelined) on the tensor-core path.
_BUILD_SCRIPT = r"""
from strata.kernels import skinny_matmul as sk
types = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16")
res = {}
for m in (1, 4):
    meta = dict(sk.default_config(m, 6144, 4096))
    meta.update(HAS_BIAS=False, EVEN_N=True, EVEN_K=True, DOT_PRECISION="tf32", USE_PDL=False,
                PREFETCH_K=0, LINE=64)
    ptx = build(sk._skinny_kernel, meta, types, ptx=True)
    res[m] = dict(v4=len(re.findall(r"ld\.global[^ ]*\.v4", ptx)),
                  cp16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)))
# Sending the share to the peers (TP=2 o_proj, one row and four), in bf16 and float32.
for m in (1, 4):
    for dt, empty in (("bf16", -2**15), ("fp32", -2**31)):
        push_types = {name: t.replace("bf16", dt) for name, t in types.items()}
        build(sk._skinny_kernel, dict(sk.default_config(m, 4096, 2048), HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
                                      DOT_PRECISION="tf32", PUSH=True, RANK=1, WORLD=2, SLOT=4096,
                                      EMPTY=empty, WIDE=dt == "fp32"),
              dict(push_types, bases_ptr="*i64", uses_ptr="*i32"))
print(json.dumps(res))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_kernel_compiles_for_hopper_with_16_byte_loads():
    found = run_without_interpreter(V4_LOADS_BUILD + _BUILD_SCRIPT)
    assert found["1"]["v4"] >= 1, found
    assert found["4"]["cp16"] >= 1, found


@pytest.mark.skipif(not CUDA, reason="PDL and the L2 prefetch are used only in a CUDA graph")
@pytest.mark.parametrize("n,k", [(3072, 4096), (14336, 4096), (4096, 7168), (1000, 520)])
def test_graph_launch_between_kernels_gives_eager_results(n, k):
    """Captured between a kernel that writes its input and one that reads its output (PDL and
    the L2 prefetch on sm_90+), the matmul gives eager's bits for every input of a replay, and
    the kernel after it reads them whole."""
    from strata.kernels import activation, pdl
    w = _rand(n, k, dtype=torch.bfloat16) / k ** 0.5
    src, x = _rand(1, k, dtype=torch.bfloat16), torch.empty(1, k, dtype=torch.bfloat16, device=DEVICE)
    out, after = (torch.empty(1, n, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))

    def step():
        activation.relu(src, out=x)
        sk.skinny_matmul(x, w, out=out)
        activation.relu(out, out=after)

    step()                                       # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        used = pdl.enabled(x)
        step()
    assert used == (torch.cuda.get_device_capability()[0] >= 9 and pdl.ENABLED)
    for _ in range(3):
        src.copy_(_rand(1, k, dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        want = sk.skinny_matmul(torch.relu(src), w)
        assert torch.equal(out, want) and torch.equal(after, torch.relu(want))
