"""strata.kernels.activation against its torch references (strata.layers.activation's math).

Without a GPU the kernels run in Triton's interpreter, which rounds fp32 -> bf16 by truncation:
bf16 results may then be one unit in the last place further from torch than on a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import activation as act  # noqa: E402
from strata.layers.activation import SiluAndMul, get_act_fn  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 33), (5, 4097), (2, 3, 64)]      # shape of the output (d = last dim)


def _tol(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-6, atol=1e-6)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=1e-5)
    return dict(rtol=1.6e-2 if CUDA else 2.5e-2, atol=1e-5)


def _gelu_want(x, approximate="none"):
    """gelu in float64, rounded once to x's dtype: torch's own float32 erf on the CPU (2.13) is off
    by ~1e-3 relative near -3 and gives NaN at +inf, so the reference is computed wider."""
    return act.gelu_ref(x.double(), approximate).to(x.dtype)


def _rand(shape, dtype):
    return (3 * torch.randn(shape, device=DEVICE)).to(dtype)    # reaches both tails of silu/gelu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul(dtype, shape):
    x = _rand(shape[:-1] + (2 * shape[-1],), dtype)
    out = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)   # poison
    assert act.silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, act.silu_and_mul_ref(x), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu"])
def test_pointwise(dtype, shape, name):
    x = _rand(shape, dtype)
    out = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)
    if name == "relu":
        got, want = act.relu(x, out=out), act.relu_ref(x)
    else:
        approximate = "tanh" if name == "gelu_tanh" else "none"
        got, want = act.gelu(x, approximate, out=out), _gelu_want(x, approximate)
    assert got is out
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_references_are_the_layers():
    x = (3 * torch.randn(4, 64)).to(torch.bfloat16)           # pure torch: on the CPU
    assert torch.equal(act.silu_and_mul_ref(x), SiluAndMul()(x))
    assert torch.equal(act.gelu_ref(x), get_act_fn("gelu")(x))
    assert torch.equal(act.gelu_ref(x, "tanh"), get_act_fn("gelu_new")(x))
    assert torch.equal(act.relu_ref(x), get_act_fn("relu")(x))


def test_strided_rows_and_default_output():
    big = _rand((6, 300), torch.float32)
    x = big[:, 7:7 + 2 * 100]                                  # row stride 300
    got = act.silu_and_mul(x)
    assert got.shape == (6, 100) and got.is_contiguous()
    torch.testing.assert_close(got, act.silu_and_mul_ref(x), **_tol(torch.float32))
    out_big = torch.full((6, 256), float("nan"), device=DEVICE)
    out = out_big[:, 3:103]                                    # strided destination
    act.gelu(x[:, :100], out=out)
    torch.testing.assert_close(out, _gelu_want(x[:, :100]), **_tol(torch.float32))
    assert out_big[:, :3].isnan().all() and out_big[:, 103:].isnan().all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy on inf * 0
def test_special_values_match_torch():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 100.0, -100.0, 1e-30, -20.0],
                     device=DEVICE)
    for got, want in ((act.relu(x), act.relu_ref(x)), (act.gelu(x), _gelu_want(x)),
                      (act.gelu(x, "tanh"), _gelu_want(x, "tanh"))):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)
    gate_up = torch.stack([x.nan_to_num(), torch.full_like(x, 2.0)]).reshape(1, -1)   # finite gates
    torch.testing.assert_close(act.silu_and_mul(gate_up), act.silu_and_mul_ref(gate_up), rtol=1e-6, atol=1e-6)


def test_no_rows():
    assert act.silu_and_mul(torch.empty(0, 64, device=DEVICE)).shape == (0, 32)
    assert act.relu(torch.empty(0, 64, device=DEVICE)).shape == (0, 64)


def test_bad_arguments_name_the_argument():
    x = _rand((4, 64), torch.bfloat16)
    cases = [
        (lambda: act.silu_and_mul(x[:, :63]), "last dim must be even"),
        (lambda: act.silu_and_mul(x, out=x[:, :16]), "out"),
        (lambda: act.silu_and_mul(x, out=x[:, :32].float()), "out"),
        (lambda: act.relu(x.int()), "x"),
        (lambda: act.relu(x.t()), "x"),
        (lambda: act.gelu(x, "erf"), "approximate"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.skipif(not CUDA, reason="realistic sizes need a GPU")
@pytest.mark.parametrize("num_tokens", [1, 256, 8192])
def test_gpu_model_sizes(num_tokens):
    x = _rand((num_tokens, 2 * 14336), torch.bfloat16)                 # Llama-3-8B's MLP
    torch.testing.assert_close(act.silu_and_mul(x), act.silu_and_mul_ref(x), **_tol(torch.bfloat16))
    y = _rand((num_tokens, 4 * 4096), torch.bfloat16)                   # an OPT-style fc1 output
    torch.testing.assert_close(act.gelu(y), act.gelu_ref(y), **_tol(torch.bfloat16))
    torch.testing.assert_close(act.relu(y), act.relu_ref(y), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Compiled for Hopper without a GPU: the interpreter never runs Triton's compiler, so errors
# that only compilation finds (and unvectorised loads) would otherwise wait for a GPU machine.
# --------------------------------------------------------------------------------------------

_ACT_SCRIPT = r"""
from strata.kernels import activation as act
types = dict(x_ptr="*bf16", out_ptr="*bf16")
meta = lambda which: dict(ACT=which, BLOCK=act._BLOCK, num_warps=act._NUM_WARPS)
print(json.dumps({name: build(act._act_kernel, meta(which), types) for name, which in
                  (("silu_and_mul", act._SILU_AND_MUL), ("gelu", act._GELU),
                   ("gelu_tanh", act._GELU_TANH), ("relu", act._RELU))}))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_kernel_compiles_for_hopper_with_16_byte_loads():
    v4_loads = run_without_interpreter(V4_LOADS_BUILD + _ACT_SCRIPT)
    assert v4_loads["silu_and_mul"] >= 2, v4_loads            # gate and up
    assert all(n >= 1 for n in v4_loads.values()), v4_loads
