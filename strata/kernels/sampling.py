"""Token sampling as one Triton kernel: temperature, top-k, top-p, min-p and the random draw.

``sample_tokens(logits, temperature, top_k, top_p, min_p, seeds)`` returns one token id per row,
on the device, without reading anything back to the host. One program handles one row.

How a row is sampled, without sorting it:

* Pass 1 reads the row once for its max (and argmax: greedy rows stop here, ties go to the
  lowest index as in ``torch.argmax``), its smallest finite value, the number of finite values
  and the softmax normaliser ``Z = sum exp((x - max) / T)``.
* top-k, top-p and min-p each keep the tokens whose logit is at or above a threshold, so the kept
  set is ``x >= max(t_k, t_p, t_min)``:
    - ``t_min = max + T * log(min_p)`` in closed form (``p >= min_p * p_max`` in logit space);
    - ``t_k`` is the largest logit ``v`` with ``count(x >= v) >= k`` (ties with the k-th value
      are kept, as the CPU sampler does);
    - ``t_p`` is the largest logit ``v`` with ``mass(x >= v) >= top_p * Z_k``, where ``Z_k`` is the
      mass left after top-k (top-p renormalises after top-k, as vLLM and HF do). The kept tokens
      are then the smallest prefix, in descending order, whose mass reaches top_p.
  ``t_k`` and ``t_p`` are found by a search over the logit range: each pass over the row tests
  ``_NUM_PIVOTS`` evenly spaced pivots at once (count and mass above each, and the nearest logits
  on either side of each), keeps the bracket where the predicate flips, and snaps the bracket ends
  to logits that occur in the row. When both ends meet, the threshold is exact; that takes about
  log(range / gap) / log(_NUM_PIVOTS + 1) passes. A search that has not met after ``_MAX_PASSES``
  passes (only rows whose logits differ in their last bits over a huge range) keeps its lower end,
  a superset of the exact set by a few near-tied tokens.
* The draw is the exponential race ``argmax(p / q)``, q ~ Exp(1), written as the Gumbel-max
  ``argmax(x / T - log(-log u))`` over the kept tokens, with ``u = tl.rand(seed, column)``
  (Philox, 31-bit uniforms). A row's draw depends only on its seed and its logits, never on the
  batch: seeded requests are reproducible on the GPU. The stream differs from the CPU sampler's
  (torch.Generator.exponential_), so a seeded request gives different tokens on CPU and GPU.

``sampling_reference`` computes, with sorts in torch, the kept set and the probabilities the
kernel draws from; the tests compare the kernel's draws with it.

Speed (H200, V = 128256, LM-like logits; microseconds per call, passes = reads of each row; the
torch column is the CPU path's sort-based sampler run on the GPU):

    rows  setting                    kernel  passes  torch sort
    256   temperature only              218       2        518
    256   top_k=50                      749     7.2       3613
    256   top_p=0.9                     927     6.2       4008
    256   top_k+top_p+min_p            1173     8.8       4583
    256   top_p=0.95, flat logits      1154    10.3       4012
      1   temperature only              115       2         85
      1   top_p=0.9                     413       8        227

A program is bound by memory latency rather than bandwidth (one row per program, at most a few
programs per SM): the search runs near 1 TB/s at 256 rows, the single-row case far below. So a
search slice is 1024 wide with two slices loaded per iteration (_SEARCH_UNROLL), the 1-D passes
take 4096 at a time, 8 warps: the best of a sweep over slice width, unroll, warps and pivots
(2 and 8 pivots were slower than 4). Greedy rows cost one pass (46 us for 256 rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SAMPLING_EPS = 1e-5  # below this temperature a row is greedy (strata.sampling_params.SAMPLING_EPS)
_NUM_PIVOTS = 4      # pivots tested per pass of the threshold search (a power of two)
_MAX_PASSES = 48     # cap on the passes of one threshold search
_MAX_BLOCK = 4096    # row slice per loop iteration of the first pass and the draw
_SEARCH_BLOCK = 1024  # row slice per loop iteration of the search ([slice, pivots] accumulators)
_SEARCH_UNROLL = 2    # search slices loaded together
_NUM_WARPS = 8
_ARGMAX_CHUNK = 4096  # vocab words a program of greedy_tokens reads


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _row_stats(row_ptr, V: tl.constexpr, inv_t, BLOCK: tl.constexpr):
    """max, index of the first max, smallest finite value, finite count, sum exp((x - max) * inv_t).

    Each lane keeps its own running max and online-softmax sum; lanes merge once at the end.
    """
    cols = tl.arange(0, BLOCK)
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_arg = tl.zeros([BLOCK], tl.int32)
    lane_min = tl.full([BLOCK], float("inf"), tl.float32)
    lane_z = tl.zeros([BLOCK], tl.float32)
    lane_fin = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        finite = x > float("-inf")
        up = x > lane_max
        # One exp per element: exp(-|x - max|) rescales the old sum when x is the new max.
        e = tl.where(finite, tl.exp(-tl.abs(x - lane_max) * inv_t), 0.0)
        lane_z = tl.where(up, lane_z * e + 1.0, lane_z + e)
        lane_arg = tl.where(up, offs, lane_arg)
        lane_max = tl.where(up, x, lane_max)
        lane_min = tl.minimum(lane_min, tl.where(finite, x, float("inf")))
        lane_fin += finite.to(tl.int32)
    row_max = tl.max(lane_max, axis=0)
    # Lowest index among the lanes holding the max; a row of -inf gives 0 like torch.argmax.
    arg = tl.min(tl.where(lane_max == row_max, lane_arg, V), axis=0)
    scale = tl.where(lane_max > float("-inf"), tl.exp((lane_max - row_max) * inv_t), 0.0)
    z = tl.sum(lane_z * scale, axis=0)
    return row_max, arg, tl.min(lane_min, axis=0), tl.sum(lane_fin, axis=0), z


@triton.jit
def _search(row_ptr, V: tl.constexpr, row_max, inv_t, lo, hi, mass_lo, floor, target,
            BY_COUNT: tl.constexpr, TRACK_MASS: tl.constexpr, BLOCK: tl.constexpr,
            UNROLL: tl.constexpr, NP: tl.constexpr, MAX_PASSES: tl.constexpr):
    """The largest logit v with F(v) >= target, F(v) = count (BY_COUNT) or mass of {x >= v}.

    Invariants: lo and hi are logits of the row, F(lo) >= target (or lo is the smallest finite
    logit), the answer is <= hi, and mass_lo = mass(x >= lo). Values below `floor` need no
    resolution (min-p cuts there anyway), so the search stops once hi <= max(lo, floor).
    Returns (lo, hi, mass_lo, passes); lo is the answer when the search met.
    """
    cols = tl.arange(0, BLOCK)
    pidx = tl.arange(0, NP)
    base = tl.maximum(lo, floor)
    passes = 0
    while (hi > base) & (passes < MAX_PASSES):
        step = (hi - base) / (NP + 1)
        # Once the bracket is a few ulps wide the low pivots round onto base: test hi instead,
        # which either ends the search (F(hi) >= target) or moves hi down.
        piv = tl.where(base + step > base, base + step * (pidx + 1).to(tl.float32), hi)  # [NP]
        stat = tl.zeros([BLOCK, NP], tl.float32)
        mass = tl.zeros([BLOCK, NP], tl.float32)
        above = tl.full([BLOCK, NP], float("inf"), tl.float32)
        below = tl.full([BLOCK, NP], float("-inf"), tl.float32)
        # UNROLL slices per iteration: their loads are independent, so they are in flight
        # together (one program per row is bound by memory latency, not bandwidth).
        for start in range(0, V, BLOCK * UNROLL):
            for u in tl.static_range(UNROLL):
                offs = start + u * BLOCK + cols
                x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
                xb = x[:, None]
                ge = xb >= piv[None, :]  # [BLOCK, NP]
                if BY_COUNT:
                    stat += ge.to(tl.float32)
                if TRACK_MASS:
                    e = tl.exp((x - row_max) * inv_t)
                    mass += tl.where(ge, e[:, None], 0.0)
                above = tl.minimum(above, tl.where(ge, xb, float("inf")))
                below = tl.maximum(below, tl.where(ge, float("-inf"), xb))
        if BY_COUNT:
            f = tl.sum(stat, axis=0)
        else:
            f = tl.sum(mass, axis=0)
        m_piv = tl.sum(mass, axis=0)
        a = tl.min(above, axis=0)  # smallest logit >= each pivot
        b = tl.max(below, axis=0)  # largest logit < each pivot
        # F falls as the pivot rises, so the pivots that pass form a prefix.
        n_ok = tl.sum((f >= target).to(tl.int32), axis=0)
        new_lo = tl.max(tl.where(pidx == n_ok - 1, a, float("-inf")), axis=0)
        new_mass = tl.max(tl.where(pidx == n_ok - 1, m_piv, -1.0), axis=0)
        new_hi = tl.max(tl.where(pidx == n_ok, b, float("-inf")), axis=0)
        lo = tl.where(n_ok > 0, new_lo, lo)
        mass_lo = tl.where(n_ok > 0, new_mass, mass_lo)
        hi = tl.where(n_ok < NP, new_hi, hi)
        base = tl.maximum(lo, floor)
        passes += 1
    return lo, hi, mass_lo, passes


@triton.jit
def _draw(row_ptr, V: tl.constexpr, inv_t, threshold, seed, BLOCK: tl.constexpr):
    """argmax over x >= threshold of x * inv_t + Gumbel noise: a draw from softmax(x / T) there."""
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        u = tl.rand(seed, offs)  # [0, 1); u = 0 gives q = inf, a score of -inf
        score = x * inv_t - tl.log(-tl.log(u))
        score = tl.where(x >= threshold, score, float("-inf"))
        up = score > best
        best = tl.where(up, score, best)
        best_idx = tl.where(up, offs, best_idx)
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_idx, V), axis=0)


@triton.jit
def _sample_kernel(logits_ptr, stride_row, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,
                   out_ptr, passes_ptr, V: tl.constexpr, EPS: tl.constexpr,
                   HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
                   BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                   NP: tl.constexpr, MAX_PASSES: tl.constexpr, COUNT_PASSES: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temp = tl.load(temp_ptr + row)
    greedy = temp < EPS
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    row_max, arg, lo, num_finite, z = _row_stats(row_ptr, V, inv_t, BLOCK)
    token = arg
    num_passes = 1
    if temp >= EPS:
        mass_lo = z
        floor = float("-inf")
        if HAS_MIN_P:
            min_p = tl.load(min_p_ptr + row)
            floor = tl.where(min_p > 0.0, row_max + tl.log(min_p) / inv_t, float("-inf"))
        if HAS_TOP_K:
            k = tl.load(top_k_ptr + row).to(tl.int32)
            if (k > 0) & (k < num_finite):
                # With top-p on, t_p needs the exact Z_k, so min-p may not stop this search early.
                k_floor = floor
                if HAS_TOP_P:
                    k_floor = float("-inf")
                lo, _, mass_lo, n = _search(row_ptr, V, row_max, inv_t, lo, row_max, mass_lo,
                                            k_floor, k.to(tl.float32), True, HAS_TOP_P,
                                            SEARCH_BLOCK, UNROLL, NP, MAX_PASSES)
                num_passes += n
        if HAS_TOP_P:
            top_p = tl.load(top_p_ptr + row)
            if top_p < 1.0:
                lo, _, mass_lo, n = _search(row_ptr, V, row_max, inv_t, lo, row_max, mass_lo,
                                            floor, top_p * mass_lo, False, True,
                                            SEARCH_BLOCK, UNROLL, NP, MAX_PASSES)
                num_passes += n
        seed = tl.load(seed_ptr + row)
        token = _draw(row_ptr, V, inv_t, tl.maximum(lo, floor), seed, BLOCK)
        num_passes += 1
    tl.store(out_ptr + row, token.to(tl.int64))
    if COUNT_PASSES:
        tl.store(passes_ptr + row, num_passes)


@triton.jit
def _argmax_chunk_kernel(logits_ptr, stride_row, val_ptr, idx_ptr, nan_ptr, V, NUM_CHUNKS,
                         CHUNK: tl.constexpr):
    """Max, first index of it and first NaN index (V if none) of one CHUNK of one row."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * stride_row + offs, mask=offs < V, other=float("-inf"))
    is_nan = x != x
    x = tl.where(is_nan, float("-inf"), x)
    best = tl.max(x, axis=0)
    slot = row * NUM_CHUNKS + chunk
    tl.store(val_ptr + slot, best)
    tl.store(idx_ptr + slot, tl.min(tl.where(x == best, offs, V), axis=0))
    tl.store(nan_ptr + slot, tl.min(tl.where(is_nan, offs, V), axis=0))


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, nan_ptr, out_ptr, V, NUM_CHUNKS,
                         BLOCK_CHUNKS: tl.constexpr):
    """The row's argmax from its chunks' (lowest index among equal maxima; a NaN wins, as in
    torch.argmax; a row of -inf gives 0)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_CHUNKS)
    ok = c < NUM_CHUNKS
    val = tl.load(val_ptr + row * NUM_CHUNKS + c, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + row * NUM_CHUNKS + c, mask=ok, other=V)
    first_nan = tl.min(tl.load(nan_ptr + row * NUM_CHUNKS + c, mask=ok, other=V), axis=0)
    best = tl.max(val, axis=0)
    arg = tl.min(tl.where(val == best, idx, V), axis=0)
    arg = tl.where(first_nan < V, first_nan, arg)
    tl.store(out_ptr + row, tl.where(arg < V, arg, 0).to(tl.int64))


# ----------------------------------------------------------------------------------- wrapper

def sample_tokens(
    logits: torch.Tensor,  # [num_rows, vocab] float32, last dim contiguous
    temperature: torch.Tensor,  # [num_rows] float32, < SAMPLING_EPS = greedy
    top_k: torch.Tensor | None = None,  # [num_rows] int32/int64, <= 0 or >= vocab = off
    top_p: torch.Tensor | None = None,  # [num_rows] float32 in (0, 1], 1 = off
    min_p: torch.Tensor | None = None,  # [num_rows] float32 in [0, 1], 0 = off
    seeds: torch.Tensor | None = None,  # [num_rows] int64 Philox seed; needed for random rows
    passes_out: torch.Tensor | None = None,  # [num_rows] int32: passes over each row (profiling)
) -> torch.Tensor:  # [num_rows] int64
    """One token per row; nothing is read back to the host, so the call is CUDA-graph safe."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be 2-D float32, got {tuple(logits.shape)} {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the vocab, got strides {logits.stride()}")
    num_rows, vocab = logits.shape
    if seeds is None:
        seeds = torch.zeros(num_rows, dtype=torch.int64, device=logits.device)
    named = {"temperature": (temperature, (torch.float32,)),
             "top_k": (top_k, (torch.int32, torch.int64)),
             "top_p": (top_p, (torch.float32,)),
             "min_p": (min_p, (torch.float32,)),
             "seeds": (seeds, (torch.int64,))}
    for name, (t, dtypes) in named.items():
        if t is None:
            continue
        if t.shape != (num_rows,) or t.dtype not in dtypes or t.device != logits.device:
            raise ValueError(f"{name} must be [{num_rows}] {dtypes} on {logits.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
        if t.stride(0) != 1 and num_rows > 1:
            raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    search_block = min(_SEARCH_BLOCK, block)
    _sample_kernel[(num_rows,)](
        logits, logits.stride(0), temperature,
        top_k if top_k is not None else temperature,  # unused pointers when the flag is off
        top_p if top_p is not None else temperature,
        min_p if min_p is not None else temperature,
        seeds, out, passes_out if passes_out is not None else out, vocab, EPS=SAMPLING_EPS,
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        BLOCK=block, SEARCH_BLOCK=search_block, NP=_NUM_PIVOTS,
        UNROLL=_SEARCH_UNROLL if search_block * _SEARCH_UNROLL <= vocab else 1, MAX_PASSES=_MAX_PASSES, COUNT_PASSES=passes_out is not None,
        num_warps=_NUM_WARPS if block >= 1024 else 4,
    )
    return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:  # [num_rows] int64
    """``logits.argmax(dim=-1)`` for [num_rows, vocab] float32 logits, the same ids (ties to the
    lowest index, NaN wins, a row of -inf gives 0), read by many programs at once: torch's
    reduction gives a row one block, 28 us for a 128256-word vocab on an H100 (of a 2.6 ms int4
    decode step); here each 4096-word chunk has its own program and a second launch merges."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D float32, contiguous along the vocab, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0 or vocab == 0:
        return out.zero_()
    chunk = min(_ARGMAX_CHUNK, triton.next_power_of_2(vocab))
    num_chunks = triton.cdiv(vocab, chunk)
    val = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    nan = torch.empty_like(idx)
    _argmax_chunk_kernel[(num_rows, num_chunks)](logits, logits.stride(0), val, idx, nan, vocab,
                                                 num_chunks, CHUNK=chunk, num_warps=4)
    _argmax_merge_kernel[(num_rows,)](val, idx, nan, out, vocab, num_chunks,
                                      BLOCK_CHUNKS=triton.next_power_of_2(num_chunks), num_warps=1)
    return out


# ----------------------------------------------------------------------------------- reference

def sampling_reference(
    logits: torch.Tensor,  # [num_rows, vocab]
    temperature: torch.Tensor,  # [num_rows]
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # allowed [num_rows, vocab] bool, probs [num_rows, vocab]
    """The tokens each row may draw and their probabilities, by the kernel's rules, with sorts.

    Greedy rows allow only their argmax (probability 1). Tokens at -inf are never allowed.
    """
    x = logits.float()
    vocab = x.shape[1]
    temperature = temperature.float().to(x.device)
    greedy = temperature < SAMPLING_EPS
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature)
    row_max = x.amax(dim=1, keepdim=True)
    keep = x > float("-inf")
    weights = torch.exp((x - row_max) * inv_t[:, None]) * keep  # unnormalised probabilities
    if top_k is not None:
        k = top_k.to(device=x.device, dtype=torch.int64)
        on = (k > 0) & (k < vocab)
        kth = x.sort(dim=1, descending=True).values.gather(
            1, (k.clamp(1, vocab) - 1)[:, None])  # [num_rows, 1]
        keep &= ~on[:, None] | (x >= kth)
    if top_p is not None:
        p = top_p.float().to(x.device)
        kept_w = weights * keep
        mass_above = _mass_strictly_above(x, kept_w)  # [num_rows, vocab]
        z_k = kept_w.sum(dim=1, keepdim=True)
        keep &= ~(p < 1.0)[:, None] | (mass_above < p[:, None] * z_k)
    if min_p is not None:
        mp = min_p.float().to(x.device)
        floor = row_max[:, 0] + torch.log(mp) / inv_t
        keep &= ~(mp > 0)[:, None] | (x >= floor[:, None])
    probs = weights * keep
    probs = probs / probs.sum(dim=1, keepdim=True)
    one_hot = torch.zeros_like(keep).scatter_(1, x.argmax(dim=1, keepdim=True), True)
    allowed = torch.where(greedy[:, None], one_hot, keep)
    probs = torch.where(greedy[:, None], one_hot.float(), probs)
    return allowed, probs


def _mass_strictly_above(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """For each element, the sum of w over the elements of its row with a larger x."""
    x_asc, order = x.sort(dim=1)
    w_asc = w.gather(1, order)
    # suffix[i] = sum of w_asc[i:]; the first index with a value > x is searchsorted(right=True).
    suffix = torch.cat([w_asc.flip(1).cumsum(1).flip(1), torch.zeros_like(w_asc[:, :1])], dim=1)
    first_above = torch.searchsorted(x_asc.contiguous(), x.contiguous(), right=True)
    return suffix.gather(1, first_above)
