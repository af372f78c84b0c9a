"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") for one weight matrix, onto strata's own int4 / int8 grids.

Given W [N, K] and the Hessian of the layer's reconstruction error, H = X^T X / n over
calibration inputs X [n, K], it quantizes W one input column at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian, so
that X W^T rather than W itself stays close (the Optimal Brain Surgeon update). As in the paper:

* The inverse Hessian is used through its upper Cholesky factor U (H^-1 = U^T U): row j of U,
  divided by U[j, j], is the update column j's error makes to the columns after it.
* Damping: ``damp`` times the mean of diag(H) is added to the diagonal before inverting (the
  paper's 1%); inputs that were never active (zero diagonal) get a diagonal of 1.
* Lazy batches: the update is applied within a block of ``block_size`` columns at once, and to
  the columns after the block once per block (one matmul), which keeps it memory-bound-free.
* Act-order (``act_order=True``): columns are quantized in order of decreasing diag(H), the
  inputs with the most energy first while there is most freedom left to compensate them.

Grids (strata.quant.formats): int4 groups of G inputs, asymmetric, w = q * scale + min with
q in 0..15 and scale = (max - min) / 15 of the group (the same rule as round to nearest); each
group's range is taken from its weights as updated so far when its first column comes up. With
act-order a group's columns are scattered over the order, and strata's checkpoint has no
per-column group index (GPTQ's ``g_idx``), so the groups stay the contiguous input ranges and
their ranges are fixed from the original weights before the pass ("static groups"). int8 is
per output channel, symmetric, scale = max|w| / 127 fixed from the original row.

``range_search=True`` (int4; what ``strata quantize --calibrate`` uses) moves each end of a
group's min..max in by up to 15% of the range, per output row, to the candidate that rounds the
group's weights with the least squared error weighted by the Hessian's diagonal: a few outlying
weights get clipped so that the 16 levels sit closer together for the rest. On SmolLM2 it took
GPTQ int4 groups of 128 from +10.4% to +5.6% perplexity over the built-in text
(docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.quant.int4 import dequantize_int4_codes, padded_size
from strata.quant.int8 import dequantize_int8
from strata.threads import one_thread

TINY = torch.finfo(torch.float32).tiny


@dataclass
class QuantizedWeight:
    codes: torch.Tensor        # int4: [N, Kp] uint8 0..15 (Kp: K in whole groups); int8: [N, K] int8
    scales: torch.Tensor       # int4: [N, Kp / G] float32; int8: [N] float32
    mins: torch.Tensor | None  # int4: [N, Kp / G] float32; int8: None
    dequantized: torch.Tensor | None  # [N, K] float32: what the packed checkpoint computes with


class _Grid:
    """Quantization parameters per group, and codes for one column against them."""

    def __init__(self, fmt: str, group_size: int | None, num_inputs: int, range_search: bool = False):
        if fmt not in ("int4", "int8"):
            raise ValueError(f"GPTQ quantizes to int4 or int8, got {fmt!r}")
        self.fmt, self.num_inputs, self.range_search = fmt, num_inputs, range_search
        self.group_size = group_size if fmt == "int4" else num_inputs
        self.num_groups = -(-num_inputs // self.group_size)
        self.qmax = 15 if fmt == "int4" else 127

    def group_params(self, cols: torch.Tensor, col_weights: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """cols [N, <=G] -> (scale [N], min [N] or None). col_weights [<=G]: how much each
        input counts in the range search (the Hessian's diagonal), or None: equally."""
        if self.fmt == "int8":
            return (cols.abs().amax(dim=1) / 127).clamp(min=TINY), None
        lo, hi = cols.amin(dim=1), cols.amax(dim=1)
        if self.range_search:
            return self._searched_range(cols, lo, hi, col_weights)
        return ((hi - lo) / 15).clamp(min=TINY), lo

    def _searched_range(self, cols, lo, hi, col_weights):
        """min..max with each end moved in by 0-15% of the range on its own (36 candidates, the
        first min..max itself), the one with the least rounding error weighted by each input's
        Hessian diagonal, per row: clipping a few outliers puts the 16 levels closer together
        for the rest, and the inputs that carry the most energy decide."""
        weights = torch.ones(cols.shape[1]) if col_weights is None else col_weights.float()
        span = hi - lo
        best_scale, best_lo, best_err = None, None, None
        steps = torch.linspace(0, 0.15, 6).tolist()
        for a in steps:
            for b in steps:
                low = lo + a * span
                scale = (span * (1 - a - b) / 15).clamp(min=TINY)
                codes = torch.round((cols - low[:, None]) / scale[:, None]).clamp_(0, 15)
                err = ((codes * scale[:, None] + low[:, None] - cols).square() * weights).sum(dim=1)
                if best_err is None:
                    best_scale, best_lo, best_err = scale, low, err
                    continue
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_lo = torch.where(better, low, best_lo)
        return best_scale, best_lo

    def round(self, col: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None):
        """col [N] -> (codes [N] as float, their values [N]) with the dequantizers' arithmetic."""
        if lo is None:
            codes = torch.round(col / scale).clamp_(-127, 127)
            return codes, codes * scale
        codes = torch.round((col - lo) / scale).clamp_(0, 15)
        return codes, codes * scale + lo


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: str, group_size: int | None,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  range_search: bool = False) -> QuantizedWeight:
    """weight [N, K], hessian [K, K] (X^T X / n, symmetric positive semi-definite) -> the GPTQ
    codes in strata's layout (strata.quant.packed)."""
    # One thread: the column loop is thousands of small ops on vectors and the factorisations
    # are small, where OpenMP threads mostly wait on each other (10-25x slower with 2 threads
    # on a busy 2-core machine).
    with one_thread():
        return _gptq(weight, hessian, fmt, group_size, block_size, damp, act_order, range_search)


def _gptq(weight, hessian, fmt, group_size, block_size, damp, act_order, range_search) -> QuantizedWeight:
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({k}, {k}) for a weight of "
                         f"{k} inputs")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1) (a fraction of the mean Hessian diagonal), got {damp}")
    grid = _Grid(fmt, group_size, k, range_search)
    if block_size < 1 or block_size % grid.group_size and fmt == "int4":
        raise ValueError(f"block_size ({block_size}) must be a positive multiple of the group size "
                         f"({grid.group_size}) so that groups start inside one block")
    w = weight.detach().float().clone()
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else None
    scales_t = torch.zeros(grid.num_groups, n)                        # [groups, N], as the loop reads
    mins_t = torch.zeros(grid.num_groups, n) if fmt == "int4" else None
    static = act_order or fmt == "int8"
    if static:   # every group's range from the original weights (see the module docstring)
        for g in range(grid.num_groups):
            cols = slice(g * grid.group_size, (g + 1) * grid.group_size)
            scale, lo = grid.group_params(w[:, cols], torch.diagonal(hessian)[cols])
            scales_t[g] = scale
            if lo is not None:
                mins_t[g] = lo
    u = _inverse_hessian_factor(hessian, damp, order)
    # Transposed, so that a column of W is a contiguous row.
    w_t = (w[:, order] if order is not None else w).T.contiguous()      # [K, N]
    columns = order.tolist() if order is not None else list(range(k))
    codes_t = torch.empty(k, n)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        errors_t = _quantize_block(w_t[b0:b1], u[b0:b1, b0:b1], codes_t[b0:b1], columns[b0:b1],
                                   grid, scales_t, mins_t, static, torch.diagonal(hessian))
        w_t[b1:].addmm_(u[b0:b1, b1:].T, errors_t, alpha=-1)   # the lazy batch update
    codes = codes_t.T
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    mins = mins_t.T.contiguous() if mins_t is not None else None
    return _result(codes, scales_t.T.contiguous(), mins, fmt, grid.group_size, k)


def _quantize_block(block: torch.Tensor, u_block: torch.Tensor, codes: torch.Tensor, columns: list[int],
                    grid: _Grid, scales_t: torch.Tensor, mins_t: torch.Tensor | None,
                    static: bool, hessian_diag: torch.Tensor) -> torch.Tensor:
    """Quantize the rows of block [B, N] (columns of W) in order, updating the rows after each
    one within the block; fills codes [B, N] (and, unless static, each group's scale and min
    [groups, N] as it starts) and returns the scaled errors [B, N]."""
    errors = torch.empty_like(block)
    for i, col in enumerate(columns):
        g = col // grid.group_size
        if not static and col % grid.group_size == 0:
            scale, lo = grid.group_params(block[i:i + grid.group_size].T,
                                          hessian_diag[col:col + grid.group_size])
            scales_t[g] = scale
            if lo is not None:
                mins_t[g] = lo
        code, value = grid.round(block[i], scales_t[g], None if mins_t is None else mins_t[g])
        codes[i] = code
        torch.div(block[i] - value, u_block[i, i], out=errors[i])
        block[i + 1:].addr_(u_block[i, i + 1:], errors[i], alpha=-1)
    return errors


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float, order: torch.Tensor | None) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (in the quantization order), float32."""
    h = hessian.detach().float().clone()   # float32 as the paper: damping keeps it stable
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1                 # an input never seen: its column is rounded, not compensated
    if order is not None:
        h = h[order][:, order]
    diag_mean = torch.diagonal(h).mean()
    for attempt in range(4):          # a Hessian from few tokens may need more damping
        damped = h + torch.eye(h.shape[0], dtype=h.dtype) * (damp * 10**attempt * diag_mean)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inverse, upper=True)
    raise ValueError(f"the Hessian is not positive definite even with damp={damp * 1000}: "
                     "calibrate on more tokens")


def _result(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, fmt: str,
            group_size: int, k: int) -> QuantizedWeight:
    if fmt == "int8":
        codes8 = codes.to(torch.int8)
        return QuantizedWeight(codes8, scales[:, 0].contiguous(), None,
                               dequantize_int8(codes8, scales[:, 0], torch.float32))
    pad = padded_size(k, group_size) - k
    codes4 = torch.nn.functional.pad(codes, (0, pad)).to(torch.uint8)   # padded inputs meet x = 0
    dense = dequantize_int4_codes(codes4, scales, mins, group_size, torch.float32)[:, :k]
    return QuantizedWeight(codes4, scales, mins, dense.contiguous())
