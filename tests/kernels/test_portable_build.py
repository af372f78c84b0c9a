"""The CPU kernels' plain-C paths: what runs on a CPU without AVX2 (ARM, older x86).

Every test here runs elsewhere against the library built with -march=native, which on an AVX2
machine (CI's) takes the vector paths only. So the same tests run again in a child process with
STRATA_CPU_KERNELS_PORTABLE=1 (built without -march=native: no AVX2 code at all) and a cache
directory of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from strata.kernels import cpu_quant

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(cpu_quant.library() is None, reason="strata's CPU kernels could not be built")
def test_kernels_built_without_avx2_pass_their_tests(tmp_path):
    env = dict(os.environ, STRATA_CPU_KERNELS_PORTABLE="1", STRATA_CACHE_DIR=str(tmp_path))
    tests = ["tests/kernels/test_cpu_ops.py", "tests/e2e/test_cpu_fast_path.py",
             "tests/quant/test_gguf_packed.py::test_w4_layout_and_kernels_on_odd_group_counts",
             "tests/quant/test_gguf_packed.py::test_w8_kernels_on_every_path"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                          *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    built = list((tmp_path / "kernels").glob("cpu_quant-*.so"))
    assert len(built) == 1
    if shutil.which("objdump"):   # no 256-bit registers: the AVX2 paths really were left out
        assert b"ymm" not in subprocess.run(["objdump", "-d", str(built[0])], capture_output=True).stdout
