"""The CPU kernels' other builds: the plain-C paths of a CPU without AVX2 (ARM, older x86), and the
AVX2 paths of one without AVX-512.

Every test here runs elsewhere against the library built with -march=native, which takes the
machine's widest paths only. So the same tests run again in a child process with
STRATA_CPU_KERNELS_PORTABLE=1 (built without -march=native: no AVX2 code at all) or, on an AVX-512
machine, STRATA_CPU_KERNELS_NO_AVX512=1 (-march=native -mno-avx512f), each with a cache directory
of its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from strata.kernels import cpu_quant

ROOT = Path(__file__).resolve().parents[2]


TESTS = ["tests/kernels/test_cpu_ops.py", "tests/e2e/test_cpu_fast_path.py",
         "tests/quant/test_gguf_packed.py::test_w4_layout_and_kernels_on_odd_group_counts",
         "tests/quant/test_gguf_packed.py::test_w4_batches_equal_the_blocked_kernel_bit_for_bit",
         "tests/quant/test_gguf_packed.py::test_w8_kernels_on_every_path"]


def _run_tests_with(tmp_path, **env_vars) -> Path:
    """TESTS in a child process whose library is built with env_vars; returns that library."""
    env = dict(os.environ, STRATA_CACHE_DIR=str(tmp_path), **env_vars)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                          *TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    built = list((tmp_path / "kernels").glob("cpu_quant-*.so"))
    assert len(built) == 1
    return built[0]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@pytest.mark.skipif(cpu_quant.library() is None, reason="strata's CPU kernels could not be built")
@pytest.mark.skipif("avx512vl" not in _cpu_flags(), reason="no AVX-512: the native build is the AVX2 one")
def test_kernels_built_without_avx512_pass_their_tests(tmp_path):
    built = _run_tests_with(tmp_path, STRATA_CPU_KERNELS_NO_AVX512="1")
    if shutil.which("objdump"):   # neither 512-bit registers nor the 16 extra 256-bit ones
        code = subprocess.run(["objdump", "-d", str(built)], capture_output=True).stdout
        assert b"zmm" not in code and re.search(rb"ymm(1[6-9]|2[0-9]|3[01])", code) is None


@pytest.mark.skipif(cpu_quant.library() is None, reason="strata's CPU kernels could not be built")
def test_kernels_built_without_avx2_pass_their_tests(tmp_path):
    built = _run_tests_with(tmp_path, STRATA_CPU_KERNELS_PORTABLE="1")
    if shutil.which("objdump"):   # no 256-bit registers: the AVX2 paths really were left out
        assert b"ymm" not in subprocess.run(["objdump", "-d", str(built)], capture_output=True).stdout


@pytest.mark.skipif(cpu_quant.library() is None, reason="strata's CPU kernels could not be built")
def test_startup_line_says_whether_the_avx512_paths_are_in():
    line = cpu_quant.describe()
    assert "AVX2 + FMA with GEMM tiles" in line or "plain C" in line
    if "plain C" not in line:   # -march=native gives AVX-512VL exactly where the CPU has it
        assert ("AVX-512VL" in line) == ("avx512vl" in _cpu_flags()), line
