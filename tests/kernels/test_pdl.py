"""Programmatic dependent launch: off where it cannot work, and compiled in where it is on.

Whether outputs stay right with it on is what every GPU kernel test and the kernel-path e2e
tests check on a Hopper device (PDL is on there by default)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels.pdl import pdl_meta  # noqa: E402


def test_off_on_cpu_tensors():
    assert pdl_meta(torch.zeros(1)) == {"USE_PDL": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_follows_the_device_and_the_switch(monkeypatch):
    x = torch.zeros(1, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert pdl_meta(x)["USE_PDL"] is hopper
    monkeypatch.setenv("STRATA_DISABLE_PDL", "1")
    assert pdl_meta(x) == {"USE_PDL": False}


_SCRIPT = r"""
from strata.kernels import skinny_matmul as sk
types = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16")
meta = dict(sk.default_config(1, 6144, 4096), HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
            DOT_PRECISION="tf32")
found = {}
for on in (True, False):
    ptx = build(sk._skinny_kernel, dict(meta, USE_PDL=on), types, ptx=True)
    found[str(on)] = [ptx.count("griddepcontrol.wait"), ptx.count("griddepcontrol.launch_dependents")]
print(json.dumps(found))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
def test_wait_and_trigger_compiled_in_only_when_on():
    found = run_without_interpreter(V4_LOADS_BUILD + _SCRIPT)
    assert found == {"True": [1, 1], "False": [0, 0]}, found
