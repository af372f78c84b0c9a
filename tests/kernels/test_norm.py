"""strata.kernels.norm against its torch references (the math of strata.layers.norm).

Without a GPU the kernels run in Triton's interpreter, which rounds fp32 -> bf16 by truncation
rather than to nearest even: bf16 results may then differ from torch by one more unit in the last
place than on a GPU, hence the looser bf16 tolerance there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import norm  # noqa: E402
from strata.layers.norm import LayerNorm, RMSNorm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 33), (5, 4097), (2, 3, 256)]


def _tol(dtype):
    if dtype == torch.float32:
        return dict(rtol=2e-6, atol=2e-6)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=1e-3)
    return dict(rtol=1.6e-2 if CUDA else 2.5e-2, atol=1e-2)


def _assert_residual(got, want):
    # One rounding of the same fp32 sum: exact, except the interpreter's truncating bf16 cast.
    if want.dtype == torch.bfloat16 and not CUDA:
        torch.testing.assert_close(got, want, rtol=8e-3, atol=0)
    else:
        assert torch.equal(got, want)


def _check_fused(got, want_fn, x, residual, dtype):
    """got = (out, new_residual): new_residual against x + residual, out against the reference norm
    of the kernel's own new_residual (so an interpreter rounding of the sum does not propagate)."""
    out, new_res = got
    _assert_residual(new_res, x + residual)
    torch.testing.assert_close(out, want_fn(new_res), **_tol(dtype))


def _rand(shape, dtype):
    return torch.randn(shape, dtype=torch.float32, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    x, w = _rand(shape, dtype), _rand(shape[-1:], dtype)
    residual = _rand(shape, dtype) if with_residual else None
    out = torch.full_like(x, float("nan"))                  # poison: every element must be written
    res_out = torch.full_like(x, float("nan")) if with_residual else None
    got = norm.rms_norm(x, w, 1e-6, residual, out=out, residual_out=res_out)
    want = norm.rms_norm_ref(x, w, 1e-6) if residual is None else None
    if with_residual:
        assert got[0] is out and got[1] is res_out
        _check_fused(got, lambda h: norm.rms_norm_ref(h, w, 1e-6), x, residual, dtype)
    else:
        assert got is out
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_reference(dtype, shape, with_residual):
    # An offset mean checks that the variance is taken about the mean.
    x = (_rand(shape, torch.float32) + 3.0).to(dtype)
    w, b = _rand(shape[-1:], dtype), _rand(shape[-1:], dtype)
    residual = _rand(shape, dtype) if with_residual else None
    out = torch.full_like(x, float("nan"))
    got = norm.layer_norm(x, w, b, 1e-5, residual, out=out)
    if with_residual:
        _check_fused(got, lambda h: norm.layer_norm_ref(h, w, b, 1e-5), x, residual, dtype)
    else:
        want = norm.layer_norm_ref(x, w, b, 1e-5)
        assert got is out
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_weight_and_bias(affine):
    x = _rand((3, 100), torch.float32)
    w = _rand((100,), torch.float32) if affine[0] else None
    b = _rand((100,), torch.float32) if affine[1] else None
    torch.testing.assert_close(norm.layer_norm(x, w, b, 1e-5), norm.layer_norm_ref(x, w, b, 1e-5),
                               **_tol(torch.float32))


def test_references_are_the_layers():
    x, r = _rand((4, 64), torch.bfloat16), _rand((4, 64), torch.bfloat16)
    rms = RMSNorm(64, 1e-6, torch.bfloat16).to(DEVICE)
    rms.weight.data.copy_(_rand((64,), torch.bfloat16))
    for got, want in zip(norm.rms_norm_ref(x, rms.weight, 1e-6, r), rms(x, r)):
        assert torch.equal(got, want)
    ln = LayerNorm(64, 1e-5, torch.bfloat16).to(DEVICE)
    ln.weight.data.copy_(_rand((64,), torch.bfloat16))
    ln.bias.data.copy_(_rand((64,), torch.bfloat16))
    for got, want in zip(norm.layer_norm_ref(x, ln.weight, ln.bias, 1e-5, r), ln(x, r)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_wide_rows_take_the_chunked_path(monkeypatch, dtype, with_residual):
    monkeypatch.setattr(norm, "_MAX_SINGLE_PASS", 256)
    monkeypatch.setattr(norm, "_CHUNK", 128)
    x, w, b = _rand((3, 1000), dtype), _rand((1000,), dtype), _rand((1000,), dtype)
    residual = _rand((3, 1000), dtype) if with_residual else None
    for fn, ref, args in ((norm.rms_norm, norm.rms_norm_ref, (w,)),
                          (norm.layer_norm, norm.layer_norm_ref, (w, b))):
        out = torch.full_like(x, float("nan"))
        got = fn(x, *args, 1e-6, residual, out=out)
        if with_residual:
            _check_fused(got, lambda h: ref(h, *args, 1e-6), x, residual, dtype)
        else:
            torch.testing.assert_close(got, ref(x, *args, 1e-6), **_tol(dtype))


@pytest.mark.parametrize("fn", ["rms_norm", "layer_norm"])
def test_in_place(fn):
    """out=x, residual_out=residual: the layout the CUDA-graph path uses."""
    x, r, w = _rand((6, 300), torch.bfloat16), _rand((6, 300), torch.bfloat16), _rand((300,), torch.bfloat16)
    args = (w,) if fn == "rms_norm" else (w, None)
    x0, r0 = x.clone(), r.clone()
    got = getattr(norm, fn)(x, *args, 1e-6, r, out=x, residual_out=r)
    assert got[0] is x and got[1] is r
    _check_fused(got, lambda h: getattr(norm, fn + "_ref")(h, *args, 1e-6), x0, r0, torch.bfloat16)


def test_per_head_norm_in_place_on_strided_view():
    """Qwen3's q norm: q [T, H, D] sliced out of the fused qkv output, normalised in place."""
    T, H, KVH, D = 37, 4, 2, 64          # 148 rows of 64: several rows a program, the last partial
    qkv = _rand((T, (H + 2 * KVH) * D + 16), torch.bfloat16)
    before = qkv.clone()
    q = qkv[:, : H * D].view(T, H, D)
    w = _rand((D,), torch.bfloat16)
    want = norm.rms_norm_ref(q.clone(), w, 1e-6)
    norm.rms_norm(q, w, 1e-6, out=q)
    torch.testing.assert_close(q, want, **_tol(torch.bfloat16))
    assert torch.equal(qkv[:, H * D:], before[:, H * D:])      # k, v and the padding untouched


def test_strided_rows_and_default_outputs():
    big = _rand((7, 200), torch.float32)
    x = big[:, 10:138]                                         # row stride 200
    r = _rand((7, 128), torch.float32)
    w = _rand((128,), torch.float32)
    out, new_res = norm.rms_norm(x, w, 1e-5, r)
    want_out, want_res = norm.rms_norm_ref(x, w, 1e-5, r)
    assert out.is_contiguous() and new_res.is_contiguous()
    torch.testing.assert_close(out, want_out, **_tol(torch.float32))
    assert torch.equal(new_res, want_res)


def test_no_rows():
    x, w = torch.empty((0, 64), device=DEVICE), _rand((64,), torch.float32)
    assert norm.rms_norm(x, w, 1e-6).shape == (0, 64)
    assert norm.layer_norm(x, w, w, 1e-6, x)[1].shape == (0, 64)


def test_bad_arguments_name_the_argument():
    x, w = _rand((4, 64), torch.bfloat16), _rand((64,), torch.bfloat16)
    cases = [
        (lambda: norm.rms_norm(x, w.float(), 1e-6), "weight"),
        (lambda: norm.rms_norm(x, w[:32], 1e-6), "weight"),
        (lambda: norm.rms_norm(x, None, 1e-6), "weight"),
        (lambda: norm.rms_norm(x, w, 1e-6, x.float()), "residual"),
        (lambda: norm.rms_norm(x, w, 1e-6, x[:2]), "residual"),
        (lambda: norm.rms_norm(x.t(), w[:4], 1e-6), "x"),
        (lambda: norm.rms_norm(x.int(), w.int(), 1e-6), "x"),
        (lambda: norm.rms_norm(x, w, 1e-6, out=x[:, :32]), "out"),
        (lambda: norm.rms_norm(x, w, 1e-6, residual_out=x.clone()), "residual_out"),
        (lambda: norm.layer_norm(x, w, w.half(), 1e-6), "bias"),
        (lambda: norm.rms_norm(x, w[:1].expand(64), 1e-6), "weight"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.skipif(not CUDA, reason="realistic sizes need a GPU")
@pytest.mark.parametrize("num_tokens", [1, 256, 8192])
@pytest.mark.parametrize("hidden", [4096, 8192, 20480])        # 20480: the chunked path
def test_gpu_model_sizes(num_tokens, hidden):
    x, r, w = (_rand((num_tokens, hidden), torch.bfloat16), _rand((num_tokens, hidden), torch.bfloat16),
               _rand((hidden,), torch.bfloat16))
    b = _rand((hidden,), torch.bfloat16)
    for got, want in ((norm.rms_norm(x, w, 1e-5, r), norm.rms_norm_ref(x, w, 1e-5, r)),
                      (norm.layer_norm(x, w, b, 1e-5, r), norm.layer_norm_ref(x, w, b, 1e-5, r))):
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], **_tol(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Compiled for Hopper without a GPU: the interpreter never runs Triton's compiler, so errors
# that only compilation finds (and unvectorised loads) would otherwise wait for a GPU machine.
# --------------------------------------------------------------------------------------------

_NORM_SCRIPT = r"""
from strata.kernels import norm
bf = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16",
          res_out_ptr="*bf16", eps="fp32")
f32 = {k: "*fp32" if v != "fp32" else v for k, v in bf.items()}

def meta(x, with_residual, **flags):
    return dict(norm._launch_args(x, x if with_residual else None, x, x if with_residual else None)[-1],
                HAS_RES=with_residual, **flags)

hidden, wide = (torch.empty(4, n, dtype=torch.bfloat16) for n in (4096, 20480))
heads = torch.empty(8, 32, 128, dtype=torch.bfloat16)
print(json.dumps({
    "rms_residual": build(norm._rms_norm_kernel, meta(hidden, True), bf),
    "rms_per_head": build(norm._rms_norm_kernel, meta(heads, False), bf),
    "rms_chunked": build(norm._rms_norm_kernel, meta(wide, True), bf),
    "ln_residual": build(norm._layer_norm_kernel, meta(hidden, True, HAS_W=True, HAS_B=True), bf),
    "ln_chunked_fp32": build(norm._layer_norm_kernel,
                             meta(wide.float(), False, HAS_W=False, HAS_B=True), f32),
}))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_kernels_compile_for_hopper_with_16_byte_loads():
    v4_loads = run_without_interpreter(V4_LOADS_BUILD + _NORM_SCRIPT)
    # x, residual and weight (+ bias) each come in as 16-byte vectors.
    assert v4_loads["rms_residual"] >= 3 and v4_loads["ln_residual"] >= 4, v4_loads
    assert v4_loads["rms_per_head"] >= 2, v4_loads
    assert v4_loads["rms_chunked"] >= 3 and v4_loads["ln_chunked_fp32"] >= 2, v4_loads
