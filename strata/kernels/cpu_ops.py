"""The CPU kernels of cpu_ops.c: fused residual add + RMSNorm, SiLU-and-multiply, rotary embedding
with the KV-cache write, and attention over the paged cache, all float32.

At decode a step is mostly small tensors, where eager torch spends more on dispatch, allocation
and the ops in between (a norm is six of them, the rotation five, the paged attention a gather,
masks and SDPA per step) than on arithmetic; one C call each, with OpenMP over rows or (token, KV
head) pairs, removes that. They are built with the packed matmuls (cpu_quant.library: a C
compiler on first use) and used where ``available(x)``: a float32 CPU tensor and the library
built. ``STRATA_DISABLE_CPU_KERNELS=1`` turns them off, with the matmuls: the layers' torch code
is then the whole path, and it is the reference the tests compare these kernels with.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from strata.kernels import cpu_quant


@functools.cache
def _configured(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64, cint, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.strata_rms_norm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, cint]
    lib.strata_silu_and_mul.argtypes = [ptr, ptr, i64, i64, cint]
    lib.strata_rope_write_kv.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                         i64, ptr, i64, ptr, cint]
    lib.strata_paged_attention.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr,
                                           i64, f32, cint]
    lib.strata_tiled_attention.argtypes = [*lib.strata_paged_attention.argtypes, i64]
    # The fused decoder layer (cpu_decoder.c; descriptors built by strata/layers/cpu_decoder.py).
    lib.strata_decoder_layer.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, cint]
    lib.strata_decoder_stack.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, cint, ptr, cint, ptr]
    lib.strata_decoder_workspace.argtypes = [ptr, i64, cint]
    lib.strata_decoder_workspace.restype = i64
    lib.strata_paged_attention_half.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr,
                                                i64, f32, cint, i64, i64, cint]
    lib.strata_paged_attention_int8.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr,
                                                i64, f32, ptr, i64, i64, i64, i64, i64, cint]
    lib.strata_scatter_rows.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, i64, cint]
    lib.strata_argmax_rows.argtypes = [ptr, i64, i64, ptr]
    return lib


def library() -> ctypes.CDLL | None:
    lib = cpu_quant.library()
    return None if lib is None else _configured(lib)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels here take ``x``: float32 on the CPU, with the library built."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and library() is not None


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{what}: expected a float32 CPU tensor, got {x.dtype} on {x.device}")
    return x if x.is_contiguous() else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim; with ``residual``, (norm(x + residual), x + residual) as the
    layer's torch code returns them."""
    lib = library()
    x = _rows(x, "rms_norm x")
    d = x.shape[-1]
    if weight.shape != (d,) or weight.dtype != torch.float32:
        raise ValueError(f"rms_norm: weight must be float32 [{d}], got {weight.dtype} {tuple(weight.shape)}")
    out = torch.empty_like(x)
    n = x.numel() // d
    if residual is None:
        lib.strata_rms_norm(x.data_ptr(), None, None, weight.data_ptr(), out.data_ptr(), n, d, eps,
                            torch.get_num_threads())
        return out
    residual = _rows(residual, "rms_norm residual")
    if residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    new_residual = torch.empty_like(x)
    lib.strata_rms_norm(x.data_ptr(), residual.data_ptr(), new_residual.data_ptr(), weight.data_ptr(),
                        out.data_ptr(), n, d, eps, torch.get_num_threads())
    return out, new_residual


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n] float32 -> [rows] int64: torch.argmax(x, dim=-1), ties and NaNs included."""
    x = _rows(x, "argmax x")
    if x.dim() != 2:
        raise ValueError(f"argmax: expected [rows, n], got {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().strata_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] = [gate | up] -> silu(gate) * up [..., d]."""
    x = _rows(x, "silu_and_mul x")
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d)
    library().strata_silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * d), d, torch.get_num_threads())
    return out


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor | None, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotated q [n, heads, d] (contiguous, a new tensor); k rotated and v copied into the cache at
    ``slot_mapping``. ``cos``/``sin``: [max_position, rot_dim] tables (None: no rotation).
    q [n, heads, d], k/v [n, kv_heads, d]: rows may be strided (views of one fused qkv output),
    heads must be packed."""
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != d or t.shape[0] != n:
            raise ValueError(f"rope_write_kv: {name} must be float32 [{n}, heads, {d}] with packed heads, "
                             f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if kv_cache.dtype != torch.float32 or not kv_cache.is_contiguous() or kv_cache.shape[3:] != (kv_heads, d):
        raise ValueError(f"rope_write_kv: the cache must be contiguous float32 [2, blocks, block_size, "
                         f"{kv_heads}, {d}], got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    slot_mapping = _int64(slot_mapping, n, "slot_mapping")
    positions = None if cos is None else _int64(positions, n, "positions")   # unused without rotation
    rot_dim, max_position = (0, 0) if cos is None else (cos.shape[1], cos.shape[0])
    tables = (cos.data_ptr(), sin.data_ptr()) if cos is not None else (None, None)
    q_out = torch.empty(n, heads, d)
    status = library().strata_rope_write_kv(
        q.data_ptr(), q.stride(0), q_out.data_ptr(), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        None if positions is None else positions.data_ptr(),
        *tables, max_position, n, heads, kv_heads, d, rot_dim, kv_cache.data_ptr(), kv_cache.stride(0),
        slot_mapping.data_ptr(), torch.get_num_threads())
    if status:
        raise IndexError(f"rope_write_kv: a position is outside the rotary tables' {max_position} positions")
    return q_out


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, num_threads: int | None = None) -> torch.Tensor:
    """q [n, heads, d] (rows may be strided) -> out [n, heads, d]: each token attends causally to
    its sequence's context in the paged float32 cache (layout in strata/attention/torch_ref.py).
    num_threads: OpenMP threads (default torch's count)."""
    op = "paged_attention"
    _check_query(op, q, kv_cache)
    if kv_cache.dtype != torch.float32 or not kv_cache.is_contiguous():
        raise ValueError(f"paged_attention: the cache must be contiguous float32, got {kv_cache.dtype}")
    return _attend(op, library().strata_paged_attention, q, kv_cache, block_tables, seq_lens, query_start_loc,
                   scale, num_threads or torch.get_num_threads())


def tiled_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, num_threads: int | None = None,
                    max_gather_bytes: int = 128 << 20) -> torch.Tensor:
    """paged_attention for long query chunks (prefill): the same inputs and result, computed as
    GEMM tiles over keys and values gathered once per sequence and KV head (cpu_ops.c), a window
    of sequences at a time whose gathered keys and values fit max_gather_bytes (at least one
    sequence a window). head_dim must be a multiple of 16."""
    op = "tiled_attention"
    _check_query(op, q, kv_cache)
    if kv_cache.dtype != torch.float32 or not kv_cache.is_contiguous() or q.shape[2] % 16:
        raise ValueError(f"tiled_attention: the cache must be contiguous float32 with head_dim a multiple of 16, "
                         f"got {kv_cache.dtype} head_dim {q.shape[2]}")
    return _attend(op, library().strata_tiled_attention, q, kv_cache, block_tables, seq_lens, query_start_loc,
                   scale, num_threads or torch.get_num_threads(), max(1, max_gather_bytes // 4))


_HALF_KINDS = {torch.bfloat16: 1, torch.float16: 2}


def host_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                         num_threads: int | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over a paged cache in float32, bfloat16, float16 or int8 codes with kv_scales
    (offloading's host tier): q [n, heads, d] float32 -> out [n, heads, d] float32. A 16-bit or
    8-bit cache is read in place and converted in registers (cpu_host_attention.c); a float32 one
    goes to paged_attention, the kernel the resident CPU path uses. num_threads: OpenMP threads
    (default torch's count)."""
    threads = num_threads or torch.get_num_threads()
    op = "host_paged_attention"
    strides = block_strides(kv_cache)
    if kv_cache.device.type != "cpu" or strides is None:
        raise ValueError(f"{op}: the cache must be a CPU tensor [2, blocks, block_size, kv_heads, head_dim], "
                         f"contiguous or with head-major blocks, got {kv_cache.dtype} on {kv_cache.device} "
                         f"strides {kv_cache.stride()}")
    if kv_scales is not None:
        two, blocks, block_size, kv_heads, _ = kv_cache.shape
        scale_strides = scale_block_strides(kv_scales, kv_cache)
        if kv_cache.dtype != torch.int8 or kv_scales.dtype != torch.float32 or scale_strides is None \
                or kv_scales.shape != (two, blocks, block_size, kv_heads) or kv_scales.device.type != "cpu":
            raise ValueError(f"{op}: a quantized cache is int8 codes {tuple(kv_cache.shape)} with float32 scales "
                             f"{(two, blocks, block_size, kv_heads)} on the CPU, laid out as the codes, got "
                             f"{kv_cache.dtype} codes and {kv_scales.dtype} scales {tuple(kv_scales.shape)} "
                             f"strides {kv_scales.stride()} on {kv_scales.device}")
        _check_query(op, q, kv_cache)
        return _attend(op, library().strata_paged_attention_int8, q, kv_cache, block_tables, seq_lens,
                       query_start_loc, scale, kv_scales.data_ptr(), kv_scales.stride(0), *strides, *scale_strides,
                       threads)
    if kv_cache.dtype == torch.float32:
        if not kv_cache.is_contiguous():
            raise ValueError(f"{op}: a float32 cache must be contiguous, got strides {kv_cache.stride()}")
        return paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, threads)
    kind = _HALF_KINDS.get(kv_cache.dtype)
    if kind is None:
        raise ValueError(f"{op}: the cache must hold float32, bfloat16 or float16 (or int8 codes with scales), "
                         f"got {kv_cache.dtype}")
    _check_query(op, q, kv_cache)
    return _attend(op, library().strata_paged_attention_half, q, kv_cache, block_tables, seq_lens,
                   query_start_loc, scale, kind, *strides, threads)


def block_strides(kv_cache: torch.Tensor) -> tuple[int, int] | None:
    """(elements between a head's consecutive keys, between a block's heads) of a cache
    [2, blocks, block_size, kv_heads, head_dim] whose blocks are token-major (contiguous: each
    key's heads side by side) or head-major (a transposed view of [2, blocks, kv_heads, block_size,
    head_dim]: each head's keys side by side); None for any other layout."""
    _, _, block_size, kv_heads, d = kv_cache.shape
    block = block_size * kv_heads * d
    if kv_cache.stride(4) != 1 or kv_cache.stride(1) != block or kv_cache.stride(0) % block:
        return None
    if kv_cache.stride(2) == kv_heads * d and kv_cache.stride(3) == d:
        return kv_heads * d, d
    if kv_cache.stride(2) == d and kv_cache.stride(3) == block_size * d:
        return d, block_size * d
    return None


def scale_block_strides(kv_scales: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int] | None:
    """block_strides for an int8 cache's scales [2, blocks, block_size, kv_heads], which must be
    laid out as its codes are (token- or head-major); None otherwise."""
    _, _, block_size, kv_heads = kv_scales.shape
    block = block_size * kv_heads
    if kv_scales.stride(1) != block or kv_scales.stride(0) % block:
        return None
    token_major = kv_cache.stride(3) == kv_cache.shape[4]
    want = (kv_heads, 1) if token_major else (1, block_size)
    return want if (kv_scales.stride(2), kv_scales.stride(3)) == want else None


def _check_query(op: str, q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    _, heads, d = q.shape
    _, _, _, kv_heads, _ = kv_cache.shape
    if q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != d or heads % kv_heads:
        raise ValueError(f"{op}: q must be float32 [n, heads, {d}] with packed heads and heads a "
                         f"multiple of {kv_heads} KV heads, got {q.dtype} {tuple(q.shape)} strides {q.stride()}")


def _attend(op: str, kernel, q, kv_cache, block_tables, seq_lens, query_start_loc, scale, *tail) -> torch.Tensor:
    """Checks the tables and runs a paged-attention kernel of the C library (strata_paged_attention
    or its 16-bit and 8-bit twins): their arguments are the same up to scale, then ``tail``."""
    n, heads, d = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    tables = block_tables if block_tables.is_contiguous() else block_tables.contiguous()
    if tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or query_start_loc.dtype != torch.int32:
        raise ValueError(f"{op}: block_tables, seq_lens and query_start_loc must be int32")
    out = torch.empty(n, heads, d)
    status = kernel(
        q.data_ptr(), q.stride(0), out.data_ptr(), kv_cache.data_ptr(), kv_cache.stride(0), block_size, heads,
        kv_heads, d, tables.data_ptr(), tables.stride(0), seq_lens.data_ptr(), query_start_loc.data_ptr(),
        seq_lens.shape[0], scale, *tail)
    if status:
        raise MemoryError(f"{op}: no memory for the score buffers")
    return out


def write_kv_rows(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                  num_threads: int | None = None) -> None:
    """torch_ref.write_kv for a CPU cache of any dtype, its blocks token- or head-major
    (block_strides): key/value [n, kv_heads, d] (rows may be strided, heads packed) into the
    cache's slots, as row copies over threads (a row per head into head-major blocks)."""
    n = key.shape[0]
    _, num_blocks, block_size, kv_heads, d = kv_cache.shape
    strides = block_strides(kv_cache)
    if strides is None or kv_cache.device.type != "cpu":
        raise ValueError(f"write_kv_rows: the cache must be a CPU tensor, contiguous or with head-major blocks, "
                         f"got strides {kv_cache.stride()} on {kv_cache.device}")
    for t, name in ((key, "key"), (value, "value")):
        if t.dtype != kv_cache.dtype or t.shape != (n, kv_heads, d) or t.stride(2) != 1 or t.stride(1) != d:
            raise ValueError(f"write_kv_rows: {name} must be {kv_cache.dtype} [{n}, {kv_heads}, {d}] with packed heads, "
                             f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    slots = _int64(slot_mapping, n, "slot_mapping")
    e = kv_cache.element_size()
    key_stride, head_stride = strides
    # token-major: each slot's heads are one row; head-major: a piece per head
    pieces, piece = (1, kv_heads * d) if key_stride == kv_heads * d else (kv_heads, d)
    threads = num_threads or torch.get_num_threads()
    for plane, t in enumerate((key, value)):
        status = library().strata_scatter_rows(
            kv_cache[plane].data_ptr(), t.data_ptr(), slots.data_ptr(), n, pieces, piece * e, t.stride(0) * e,
            block_size, kv_cache.stride(1) * e, key_stride * e, head_stride * e, num_blocks * block_size, threads)
        if status:
            raise IndexError(f"write_kv_rows: a slot is outside the cache's {num_blocks * block_size} slots")


def _int64(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if t.dtype != torch.int64 or t.shape != (n,):
        raise ValueError(f"{what} must be int64 [{n}], got {t.dtype} {tuple(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()
