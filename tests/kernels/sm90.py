"""Building kernels for Hopper (sm_90) on a machine without a GPU, from the kernel tests.

The interpreter never runs Triton's compiler, so errors only compilation finds (and unvectorised
loads) would otherwise wait for a GPU machine. The build runs in a subprocess without
TRITON_INTERPRET: under it, @triton.jit gives functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Prepended to a test's script: build(fn, meta, types) compiles one kernel and counts its 16-byte
# global loads (ld.global.v4) in the PTX, or returns the PTX.
V4_LOADS_BUILD = r"""
import json, re, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, meta, types, ptx=False):
    # Constexprs the caller leaves out keep their defaults (else they would build as i32 args).
    meta = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **meta)
    opts = dict(num_warps=meta.pop("num_warps"))
    if "num_stages" in meta:
        opts["num_stages"] = meta.pop("num_stages")
    sig = {n: types.get(n, "constexpr" if n in meta else "i32") for n in fn.arg_names}
    # As the launcher specialises model-sized tensors: 16-byte aligned, sizes and strides
    # multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] not in ("constexpr", "fp32")}
    k = triton.compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    return k.asm["ptx"] if ptx else len(re.findall(r"ld\.global[.\w]*\.v4", k.asm["ptx"]))
"""


# Prepended after V4_LOADS_BUILD: loop_sass(fn, meta, types) compiles one kernel to a cubin,
# disassembles it with the nvdisasm that Triton ships, and returns the instructions (opcode with
# modifiers, operands) of its longest loop: the span from a label to the furthest backward branch
# to it.
SASS_LOOP = r"""
import os, subprocess, tempfile

def loop_sass(fn, meta, types):
    meta = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **meta)
    opts = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages", 1))
    sig = {n: types.get(n, "constexpr" if n in meta else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] not in ("constexpr", "fp32")}
    k = triton.compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    instrs, labels, pending = [], {}, []
    for line in sass:
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
        ins = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            for name in pending:
                labels[name] = len(instrs)
            pending = []
            instrs.append(ins.group(2).strip())
    best = []
    for i, text in enumerate(instrs):
        br = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if br and labels.get(br.group(1), i + 1) <= i and i + 1 - labels[br.group(1)] > len(best):
            best = instrs[labels[br.group(1)]:i + 1]
    return best
"""


def run_without_interpreter(script: str) -> dict:
    """Run ``script`` in a fresh Python without TRITON_INTERPRET; its last stdout line is JSON."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
