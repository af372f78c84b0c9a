"""CPU matmuls on packed 4-bit and grouped 8-bit weights (the layouts are in cpu_quant.c).

torch's own packed CPU matmuls (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) are
fast on AVX-512 but fall back to scalar code on AVX2 machines (measured on a 2-core EPYC: 14x
slower than an fp32 F.linear of the same shape), and have no grouped int8 at all. So strata
carries its own: a small C file built on first use with the system's C compiler (``$CC``, else
``cc``) into ~/.cache/strata (``$STRATA_CACHE_DIR``), loaded with ctypes. Without a compiler,
or with ``STRATA_DISABLE_CPU_KERNELS=1``, the same layouts are computed by torch in row tiles.

Every size of x goes to the C matmuls (cpu_quant.c). Up to a few rows (decode) they read each
packed weight once into registers; from 40 rows (4-bit) or 48 (int8) on (prefill, large decode
batches) they dequantize W 16 rows at a time straight into the panel layout of strata's GEMM
tile (cpu_gemm.c), which every row of x then multiplies: 18% less time at 512 rows than a
float32 copy of W handed to torch's SGEMM, on SmolLM2's shapes. A build without AVX2 has no
GEMM tiles, and there more than ``MAX_GEMV_ROWS`` rows go to torch's GEMM on dequantized tiles
of W.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger("strata")

MAX_GEMV_ROWS = 64   # measured on SmolLM2's shapes (docs/cpu_speed.md): the blocked C kernels beat dequantized tiles + SGEMM up to ~64 rows
_TILE_BYTES = 1 << 20          # float32 weight tile of the prefill path: about an L2
# W up to this size is dequantized whole into a buffer kept per thread, and one GEMM writes y in
# its own layout: the tiles' y^T had to be transposed after (9% of a 512-token prefill).
_WHOLE_BYTES = 32 << 20
# One library: the matmuls here, the step's other kernels (cpu_ops.c, wrapped by cpu_ops.py) and
# the fused decoder layer built from the same pieces (cpu_decoder.c, wrapped by cpu_decoder.py) and
# attention over a 16-bit host KV cache (cpu_host_attention.c, for offloading's host tier) and the
# GEMM tile of long steps (cpu_gemm.c).
_SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_quant.c", "cpu_ops.c", "cpu_decoder.c", "cpu_host_attention.c",
                                                       "cpu_gemm.c"))
_HEADER = Path(__file__).with_name("cpu_kernels.h")
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
# STRATA_CPU_KERNELS_PORTABLE=1: no -march=native, so no AVX2 paths: the plain C every kernel falls
# back to on other CPUs (ARM, old x86), which the tests run this way (tests/kernels/test_portable_build.py).
_PORTABLE_FLAG_SETS = _FLAG_SETS[1:]
# STRATA_CPU_KERNELS_NO_AVX512=1: -march=native without AVX-512, so an AVX-512 machine builds the
# AVX2 paths a CPU without it runs (tests/kernels/test_portable_build.py runs the tests that way).
_NO_AVX512_FLAG_SETS = (["-O3", "-march=native", "-mno-avx512f", "-fopenmp"], *_FLAG_SETS[1:])
_COMMON_FLAGS = ["-std=c11", "-shared", "-fPIC", "-ffp-contract=off"]
_LIBS = ["-lm"]


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, or no working compiler: said once in the log)."""
    if os.environ.get("STRATA_DISABLE_CPU_KERNELS") == "1":
        return None
    return _load()


def describe() -> str:
    """Which CPU kernels a step runs, for the startup line."""
    if os.environ.get("STRATA_DISABLE_CPU_KERNELS") == "1":
        return "CPU kernels off (STRATA_DISABLE_CPU_KERNELS=1): torch ops"
    lib = library()
    if lib is None:
        return "CPU kernels not built (no working C compiler): torch ops, slower"
    if not lib.strata_has_gemm_tiles():
        return "strata's C kernels, plain C (built without AVX2)"
    wide = " and AVX-512VL registers" if lib.strata_has_avx512_paths() else ""
    return f"strata's C kernels, AVX2 + FMA with GEMM tiles{wide}"


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as e:
        logger.info(f"strata: CPU quantized matmuls not built ({e}); packed weights are computed "
                    "by torch in tiles, more slowly")
        return None
    ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.strata_w4_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, cint]
    lib.strata_has_gemm_tiles.argtypes = []
    lib.strata_has_gemm_tiles.restype = cint
    lib.strata_has_avx512_paths.argtypes = []
    lib.strata_has_avx512_paths.restype = cint
    lib.strata_w8_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, cint]
    lib.strata_w4_dequantize.argtypes = [ptr, ptr, i64, i64, ptr, cint]
    lib.strata_w8_dequantize.argtypes = [ptr, ptr, i64, i64, i64, ptr, cint]
    return lib


def _build() -> Path:
    """Compile the C sources once per source, compiler, flags and CPU; reuse the cached library after.

    Flag sets go from best to most portable (-march=native or OpenMP may be missing: clang on
    macOS, old gcc), each cached under its own name, so a build that failed once for a passing
    reason (a busy machine out of processes) is tried again by the next process."""
    cc = os.environ.get("CC", "cc")
    cache = Path(os.environ.get("STRATA_CACHE_DIR") or Path.home() / ".cache" / "strata") / "kernels"
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    if os.environ.get("STRATA_CPU_KERNELS_PORTABLE") == "1":
        flag_sets = _PORTABLE_FLAG_SETS
    elif os.environ.get("STRATA_CPU_KERNELS_NO_AVX512") == "1":
        flag_sets = _NO_AVX512_FLAG_SETS
    else:
        flag_sets = _FLAG_SETS
    for flags in flag_sets:
        sources = [src.read_bytes() for src in (*_SOURCES, _HEADER)]
        key = hashlib.sha256(b" ".join([*sources, cc.encode(), *map(str.encode, flags),
                                        _cpu_signature()])).hexdigest()[:16]
        target = cache / f"cpu_quant-{key}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [cc, *flags, *_COMMON_FLAGS, *map(str, _SOURCES), "-o", tmp, *_LIBS]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)   # atomic: processes building at once each write their own
            return target
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(cmd[:1 + len(flags)])}: {getattr(e, 'stderr', b'') or e}")
            Path(tmp).unlink(missing_ok=True)
    raise subprocess.SubprocessError("; ".join(str(e)[:200] for e in errors))


def _cpu_signature() -> bytes:
    """What -march=native depends on, so a shared home directory never hands one CPU's build
    to another."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        import platform
        return platform.processor().encode()


# --- matmuls ------------------------------------------------------------------------------------

def w4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale_min: torch.Tensor,
              lib: ctypes.CDLL | None, check: bool = True) -> torch.Tensor:
    """x [..., K] float -> [..., N]: W = q * scale + min, groups of 32 (see cpu_quant.c).
    ``check=False`` is for callers that validated the weights once (a layer, per call)."""
    n, k = check_w4(qweight, scale_min) if check else (qweight.shape[0], 2 * qweight.shape[1])
    x2 = _rows(x, k)
    if _c_matmul_takes(lib, x2.shape[0]):
        y = torch.empty(x2.shape[0], n)                 # [M, N]
        status = lib.strata_w4_matmul(x2.data_ptr(), x2.shape[0], k, qweight.data_ptr(), scale_min.data_ptr(),
                                      y.data_ptr(), n, torch.get_num_threads())
        if status:
            raise MemoryError(f"w4 matmul: no memory for the buffers of {x2.shape[0]} rows")
    else:
        y = _tiled(x2, n, k, lambda rows, out: w4_dequantize(qweight[rows], scale_min[rows], lib, out))
    return _like(y, x)


def w8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              lib: ctypes.CDLL | None, check: bool = True) -> torch.Tensor:
    """x [..., K] float -> [..., N]: W = q * scale, groups of K / scales.shape[1]."""
    if check:
        n, k, group = check_w8(qweight, scales)
    else:
        (n, k), group = qweight.shape, qweight.shape[1] // scales.shape[1]
    x2 = _rows(x, k)
    if _c_matmul_takes(lib, x2.shape[0]):
        y = torch.empty(x2.shape[0], n)
        lib.strata_w8_matmul(x2.data_ptr(), x2.shape[0], k, qweight.data_ptr(), scales.data_ptr(),
                             group, y.data_ptr(), n, torch.get_num_threads())
    else:
        y = _tiled(x2, n, k, lambda rows, out: w8_dequantize(qweight[rows], scales[rows], lib, out))
    return _like(y, x)


def _c_matmul_takes(lib: ctypes.CDLL | None, m: int) -> bool:
    """Whether the C matmuls take m rows of x: decode-sized ones always; more where the build has
    the GEMM tiles (AVX2), else W goes to torch's GEMM in dequantized tiles."""
    return lib is not None and (m <= MAX_GEMV_ROWS or lib.strata_has_gemm_tiles() == 1)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as a contiguous float32 [M, K] (itself when it already is: the decode step's case)."""
    if x.shape[-1] != k:
        raise ValueError(f"packed matmul: x has {x.shape[-1]} features, the weight {k}")
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.reshape(-1, k).float().contiguous()


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.dtype == torch.float32:
        return y
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


_scratch = threading.local()


def _whole_weight_buffer(n: int, k: int) -> torch.Tensor:
    """A [n, k] float32 buffer, reused by every call of this thread (grown as needed)."""
    buf = getattr(_scratch, "weight", None)
    if buf is None or buf.numel() < n * k:
        buf = _scratch.weight = torch.empty(n * k)
    return buf[: n * k].view(n, k)


def _tiled(x2: torch.Tensor, n: int, k: int, dequantize_into) -> torch.Tensor:
    """x2 @ W^T for many rows of x: W dequantized whole when it is at most _WHOLE_BYTES, else a
    tile of rows at a time (about _TILE_BYTES, one buffer reused) multiplied into rows of y^T."""
    if 4 * n * k <= _WHOLE_BYTES:
        return torch.mm(x2, dequantize_into(slice(0, n), _whole_weight_buffer(n, k)).t())
    tile = max(1, min(n, _TILE_BYTES // (4 * k)))
    buffer = torch.empty(tile, k)
    y_t = torch.empty(n, x2.shape[0])                   # [N, M]
    for start in range(0, n, tile):
        rows = slice(start, min(start + tile, n))
        w = dequantize_into(rows, buffer[: rows.stop - start])
        torch.mm(w, x2.t(), out=y_t[rows])
    return y_t.t().contiguous()


# --- dequantizers (the tiled path, and the references the tests compare with) -------------------

def w4_dequantize(qweight: torch.Tensor, scale_min: torch.Tensor, lib: ctypes.CDLL | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """W in float32 [N, K] (into ``out`` when given, with the C library)."""
    n, k = check_w4(qweight, scale_min)
    if lib is not None:
        out = torch.empty(n, k) if out is None else out
        lib.strata_w4_dequantize(qweight.data_ptr(), scale_min.data_ptr(), n, k, out.data_ptr(),
                                 torch.get_num_threads())
        return out
    return (_w4_codes(qweight, k).float().view(n, k // 32, 32) * scale_min[..., 0:1] + scale_min[..., 1:2]).view(n, k)


def w8_dequantize(qweight: torch.Tensor, scales: torch.Tensor, lib: ctypes.CDLL | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    n, k, group = check_w8(qweight, scales)
    if lib is not None:
        out = torch.empty(n, k) if out is None else out
        lib.strata_w8_dequantize(qweight.data_ptr(), scales.data_ptr(), group, n, k, out.data_ptr(),
                                 torch.get_num_threads())
        return out
    return (qweight.float().view(n, k // group, group) * scales[..., None]).view(n, k)


def pack_w4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] uint8 0..15 -> [N, K/2] in cpu_quant.c's layout: each block of 64 codes as 8
    little-endian 32-bit words, nibble s of word L holding code 8s + L; a last odd group of 32 as 4
    words, nibble s of word L holding code 4s + L. Byte 4L + s // 2 of a block holds nibble s of
    word L, in its low half for even s."""
    n, k = codes.shape
    if codes.dtype != torch.uint8 or k % 32:
        raise ValueError(f"pack_w4: codes must be uint8 with K a multiple of 32, got {codes.dtype} "
                         f"[{n}, {k}]")
    full = k - k % 64
    parts = []
    for start, stop, lanes in ((0, full, 8), (full, k, 4)):
        if stop > start:
            c = codes[:, start:stop].reshape(n, -1, 4, 2, lanes)        # [n, block, s // 2, s % 2, L]
            parts.append((c[:, :, :, 0] | (c[:, :, :, 1] << 4)).transpose(2, 3).reshape(n, -1))
    return torch.cat(parts, dim=1).contiguous()


def _w4_codes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """pack_w4's inverse: [N, K/2] -> codes [N, K] uint8."""
    n, full = qweight.shape[0], k - k % 64
    parts = []
    for start, stop, lanes in ((0, full, 8), (full, k, 4)):
        if stop > start:
            b = qweight[:, start // 2:stop // 2].reshape(n, -1, lanes, 4)   # [n, block, L, s // 2]
            c = torch.stack((b & 0x0F, b >> 4), dim=-1)                    # [n, block, L, s // 2, s % 2]
            parts.append(c.permute(0, 1, 3, 4, 2).reshape(n, -1))
    return torch.cat(parts, dim=1)


def check_w4(qweight, scale_min) -> tuple[int, int]:
    n, half_k = qweight.shape
    k = 2 * half_k
    _check("w4", qweight, torch.uint8, k % 32 == 0, f"[N, K/2] with K a multiple of 32, got {tuple(qweight.shape)}")
    _check("w4", scale_min, torch.float32, scale_min.shape == (n, k // 32, 2),
           f"[{n}, {k // 32}, 2], got {tuple(scale_min.shape)}")
    return n, k


def check_w8(qweight, scales) -> tuple[int, int, int]:
    n, k = qweight.shape
    groups = scales.shape[-1] if scales.dim() == 2 else 0
    ok = scales.dim() == 2 and scales.shape[0] == n and groups > 0 and k % groups == 0 and (k // groups) % 8 == 0
    _check("w8", qweight, torch.int8, True, "")
    _check("w8", scales, torch.float32, ok, f"[{n}, K/group] with group a multiple of 8 (K = {k}), "
           f"got {tuple(scales.shape)}")
    return n, k, k // groups


def _check(op, t, dtype, ok, what):
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" or not ok:
        raise ValueError(f"{op}: expected a contiguous CPU {dtype} tensor {what} "
                         f"(got {t.dtype} on {t.device}, contiguous={t.is_contiguous()})")
