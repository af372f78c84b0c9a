"""RMSNorm and LayerNorm as Triton kernels, each optionally fused with the residual add.

``rms_norm(x, w, eps, residual)`` does what ``strata.layers.norm.RMSNorm(x, residual)`` does:
``new_residual = x + residual`` (rounded to the model dtype, as the torch add does), then the norm of
``new_residual``. One program handles one row and reads ``x`` and ``residual`` once, writing
``new_residual`` and ``out``, instead of the four passes the torch layer makes.

Rounding follows the layer exactly, so bf16/fp16 results match torch's up to the order of the
sum of squares: RMSNorm rounds the normalised row to the dtype before multiplying by the weight
(as HF's LlamaRMSNorm does); LayerNorm computes ``(x - mean) * rstd * w + b`` in fp32 and rounds
once (as ``F.layer_norm`` does).

Layout and speed (these run twice per layer on every token, so they matter on an H100):

* One program per row. A whole row fits in registers up to ``_MAX_SINGLE_PASS`` elements
  (16384: Llama-405B's hidden is 16384), so x and residual are read from memory once. Wider rows
  fall back to a loop over ``_CHUNK``-wide slices that re-reads the row (from L2, mostly).
  Narrow rows (per-head q/k norms over head_dim 128) are grouped, ``_MIN_TILE`` elements a
  program: one program per 128-wide row ran at a quarter of the bandwidth.
* ``num_warps`` is chosen so that each thread holds about 8 elements: with bf16 that is one
  16-byte vector load per thread per tensor, and 4096 wide rows get 16 warps, enough loads in
  flight to cover memory latency even at decode batch sizes (few rows). 8 and 16 elements a
  thread measured the same on an H200.
* Measured on an H200 (bf16, hidden 4096, CUDA-graph replay; device copy 4.2 TB/s): with the
  residual, 8192 rows 68 us (3.9 TB/s; the torch layer 475 us), 256 rows 3.1 us, 1 row 2.1 us;
  per-head q norm in place on [8192, 32, 128] 35 us (torch 472 us).
* Inputs may be strided: any tensor whose last dim is contiguous and whose leading dims collapse
  into at most two strides, e.g. q of shape [tokens, heads, head_dim] sliced out of a fused qkv
  output (Qwen3's per-head q/k norm), can be normalised in place (``out=q``).
* ``out=`` / ``residual_out=`` write into preallocated tensors (CUDA graphs; in place with
  ``out=x, residual_out=residual``). Nothing here reads tensor data on the host, so the wrappers
  are safe to capture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from strata.kernels import pdl

_MAX_SINGLE_PASS = 16384   # widest row kept whole in registers; wider rows are looped over
_CHUNK = 4096              # slice width of the looped path
_ELEMS_PER_THREAD = 8      # sets num_warps: 8 bf16 elements are one 16-byte vector load
_MIN_TILE = 2048           # narrower rows are grouped so that a program handles this many elements
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _row_offsets(rows, inner, s0, s1):
    """Element offsets [ROWS, 1] of rows of a [outer, inner, n] view with row strides (s0, s1)."""
    rows = rows.to(tl.int64)
    outer_idx = rows // inner
    return (outer_idx * s0 + (rows - outer_idx * inner) * s1)[:, None]


@triton.jit
def _load_add_residual(x_ptrs, res_ptrs, res_out_ptrs, mask, HAS_RES: tl.constexpr):
    """x (+ residual, rounded to the dtype and stored as the new residual), in fp32."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptrs.dtype.element_ty)      # the residual lives in the model dtype
        tl.store(res_out_ptrs, x, mask=mask)
        x = x.to(tl.float32)
    return x


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, inner, n_cols, eps,
                     xs0, xs1, rs0, rs1, os0, os1, ros0, ros1,
                     HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     NUM_CHUNKS: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl.trigger(USE_PDL)
    pdl.wait(USE_PDL)
    # A [ROWS, BLOCK] tile: ROWS > 1 only for narrow rows (per-head norms), NUM_CHUNKS > 1 only
    # for rows wider than one block (then ROWS == 1).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = (rows < n_rows)[:, None]
    x_ptr += _row_offsets(rows, inner, xs0, xs1)
    out_ptr += _row_offsets(rows, inner, os0, os1)
    res_ptr += _row_offsets(rows, inner, rs0, rs1)
    res_out_ptr += _row_offsets(rows, inner, ros0, ros1)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)[None, :]

    if NUM_CHUNKS == 1:
        mask = row_ok & (cols < n_cols)
        x = _load_add_residual(x_ptr + cols, res_ptr + cols, res_out_ptr + cols, mask, HAS_RES)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)[:, None]
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = (x * rstd).to(dtype).to(tl.float32) * w
        tl.store(out_ptr + cols, y.to(dtype), mask=mask)
    else:
        # Pass 1: the residual add (written out) and the sum of squares.
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK + cols
            mask = row_ok & (c < n_cols)
            x = _load_add_residual(x_ptr + c, res_ptr + c, res_out_ptr + c, mask, HAS_RES)
            acc += x * x
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)[:, None]
        if HAS_RES:
            tl.debug_barrier()   # pass 2 re-reads what other threads of this program stored
            x_ptr = res_out_ptr
        # Pass 2: normalise. Reads x (or the stored residual) again, from L2 mostly.
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK + cols
            mask = row_ok & (c < n_cols)
            x = tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            y = (x * rstd).to(dtype).to(tl.float32) * w
            tl.store(out_ptr + c, y.to(dtype), mask=mask)


@triton.jit
def _layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, n_rows, inner, n_cols, eps,
                       xs0, xs1, rs0, rs1, os0, os1, ros0, ros1,
                       HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = (rows < n_rows)[:, None]
    x_ptr += _row_offsets(rows, inner, xs0, xs1)
    out_ptr += _row_offsets(rows, inner, os0, os1)
    res_ptr += _row_offsets(rows, inner, rs0, rs1)
    res_out_ptr += _row_offsets(rows, inner, ros0, ros1)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)[None, :]

    if NUM_CHUNKS == 1:
        mask = row_ok & (cols < n_cols)
        x = _load_add_residual(x_ptr + cols, res_ptr + cols, res_out_ptr + cols, mask, HAS_RES)
        mean = (tl.sum(x, axis=1) / n_cols)[:, None]
        # Variance about the mean (two passes over registers): no cancellation for offset rows.
        d = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(d * d, axis=1) / n_cols + eps)[:, None]
        y = d * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, y.to(dtype), mask=mask)
    else:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK + cols
            mask = row_ok & (c < n_cols)
            acc += _load_add_residual(x_ptr + c, res_ptr + c, res_out_ptr + c, mask, HAS_RES)
        mean = (tl.sum(acc, axis=1) / n_cols)[:, None]
        if HAS_RES:
            tl.debug_barrier()
            x_ptr = res_out_ptr
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK + cols
            mask = row_ok & (c < n_cols)
            d = tl.where(mask, tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)[:, None]
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK + cols
            mask = row_ok & (c < n_cols)
            y = (tl.load(x_ptr + c, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(w_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(b_ptr + c, mask=c < n_cols, other=0.0).to(tl.float32)
            tl.store(out_ptr + c, y.to(dtype), mask=mask)


# ---------------------------------------------------------------------------------- wrappers

def _rows(t: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    """(outer, inner, s0, s1): t seen as [outer, inner, n] with a contiguous last dim.

    Reads shape and strides once: this runs four times a call, on the host, on every layer.
    """
    shape, strides = t.shape, t.stride()
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if strides[-1] != 1 and shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {strides}")
    if ndim == 1:
        return 1, 1, 0, 0
    if ndim == 2:
        outer, inner, s0, s1 = 1, shape[0], 0, strides[0]
    elif ndim == 3:
        outer, inner, s0, s1 = shape[0], shape[1], strides[0], strides[1]
    else:
        try:
            v = t.view(-1, shape[-2], shape[-1])
        except RuntimeError:
            raise ValueError(f"{name}: leading dims of shape {tuple(shape)} and strides {strides} do not "
                             "collapse into one; pass a contiguous tensor") from None
        outer, inner, s0, s1 = v.shape[0], v.shape[1], v.stride(0), v.stride(1)
    # A stride over a dim of size 1 is never used; zero keeps Triton's alignment analysis
    # (strides divisible by 16 => vectorised loads) from being spoiled by it.
    return outer, inner, s0 if outer > 1 else 0, s1 if inner > 1 else 0


def _check_like(t: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected x's {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")


def _check_param(p: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if p is None:
        return
    if p.shape != x.shape[-1:]:
        raise ValueError(f"{name} has shape {tuple(p.shape)}, expected ({x.shape[-1]},)")
    if p.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {p.dtype}, expected x's {x.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device}, expected x's device {x.device}")
    if p.shape[0] > 1 and p.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {p.stride(0)}")


def _prepare(x, residual, out, residual_out):
    """Validate the tensors shared by both norms; allocate missing outputs (by shape only)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: {', '.join(map(str, _DTYPES))}")
    _check_like(residual, x, "residual")
    _check_like(out, x, "out")
    _check_like(residual_out, x, "residual_out")
    if residual is None and residual_out is not None:
        raise ValueError("residual_out given without residual")
    if out is None:
        out = torch.empty_like(x)
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(x)
    if residual_out is not None and x.numel() and residual_out.data_ptr() == out.data_ptr():
        raise ValueError("out and residual_out must be different tensors")
    return out, residual_out


def _launch_args(x, residual, out, residual_out):
    """Grid, residual pointers, sizes, strides and meta-parameters shared by both norms."""
    outer, inner, xs0, xs1 = _rows(x, "x")
    _, _, os0, os1 = _rows(out, "out")
    if residual is None:                      # never read: HAS_RES is False
        residual, residual_out, (rs0, rs1, ros0, ros1) = x, x, (xs0, xs1, xs0, xs1)
    else:
        rs0, rs1 = _rows(residual, "residual")[2:]
        ros0, ros1 = _rows(residual_out, "residual_out")[2:]
    n_rows, n_cols = outer * inner, x.shape[-1]
    if n_cols <= _MAX_SINGLE_PASS:
        block, num_chunks = triton.next_power_of_2(n_cols), 1
    else:
        block, num_chunks = _CHUNK, triton.cdiv(n_cols, _CHUNK)
    # Narrow rows (per-head norms over head_dim) share a program, so each still moves a few KB.
    rows_per_program = min(max(_MIN_TILE // block, 1), triton.next_power_of_2(max(n_rows, 1)))
    tile = rows_per_program * block
    meta = dict(ROWS=rows_per_program, BLOCK=block, NUM_CHUNKS=num_chunks,
                num_warps=min(max(tile // (32 * _ELEMS_PER_THREAD), 1), 16))
    strides = (xs0, xs1, rs0, rs1, os0, os1, ros0, ros1)
    grid = (triton.cdiv(n_rows, rows_per_program),)
    return grid, residual, residual_out, n_rows, inner, n_cols, strides, meta


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             *, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """RMSNorm over the last dim of x [..., hidden], fused with the residual add.

    Returns ``out`` when residual is None, else ``(out, new_residual)`` with
    ``new_residual = x + residual``. ``out`` / ``residual_out`` may be preallocated (and may be
    ``x`` / ``residual`` themselves for in-place use).
    """
    _check_param(weight, x, "weight")
    if weight is None:
        raise ValueError("weight is required for rms_norm")
    out, residual_out = _prepare(x, residual, out, residual_out)
    grid, res, res_out, n_rows, inner, n_cols, strides, meta = _launch_args(x, residual, out, residual_out)
    if n_rows > 0 and n_cols > 0:
        _rms_norm_kernel[grid](x, res, weight, out, res_out, n_rows, inner, n_cols, float(eps), *strides,
                                  HAS_RES=residual is not None, **meta, **pdl.launch_options(x))
    return out if residual is None else (out, residual_out)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               residual_out: torch.Tensor | None = None):
    """LayerNorm over the last dim of x (OPT), with rms_norm's residual and out= conventions."""
    _check_param(weight, x, "weight")
    _check_param(bias, x, "bias")
    out, residual_out = _prepare(x, residual, out, residual_out)
    grid, res, res_out, n_rows, inner, n_cols, strides, meta = _launch_args(x, residual, out, residual_out)
    if n_rows > 0 and n_cols > 0:
        _layer_norm_kernel[grid](x, res, x if weight is None else weight, x if bias is None else bias,
                                 out, res_out, n_rows, inner, n_cols, float(eps), *strides,
                                 HAS_RES=residual is not None, HAS_W=weight is not None,
                                 HAS_B=bias is not None, **meta)
    return out if residual is None else (out, residual_out)


# --------------------------------------------------------------------------------- references

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 *, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """strata.layers.norm.RMSNorm's math, with rms_norm's signature."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * x32.to(x.dtype)
    return _ref_outputs(y, x if residual is not None else None, out, residual_out)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                   residual_out: torch.Tensor | None = None):
    """strata.layers.norm.LayerNorm's math, with layer_norm's signature."""
    if residual is not None:
        x = x + residual
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _ref_outputs(y, x if residual is not None else None, out, residual_out)


def _ref_outputs(y, new_residual, out, residual_out):
    if new_residual is not None and residual_out is not None:
        residual_out.copy_(new_residual)
        new_residual = residual_out
    if out is not None:
        out.copy_(y)
        y = out
    return y if new_residual is None else (y, new_residual)
