"""strata.kernels.all_reduce_norm: the tensor-parallel sum, residual add and RMSNorm in one kernel.

Without GPUs the ranks are processes running the kernel in Triton's interpreter, their
"symmetric buffers" files in shared memory that every process maps (all_reduce_norm_rank.py):
the kernel's stores into its peers' buffers and its polls of its own are real, only slower. Each rank's outputs must equal
the sum of the partials put through strata.kernels.norm.rms_norm (the separate kernels the fused
one replaces), bit for bit, on every rank.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from all_reduce_norm_rank import EPS, calls  # noqa: E402
from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import norm  # noqa: E402
from strata.kernels.all_reduce_norm import EMPTY_FILL, all_reduce_rms_norm, buffer_numel  # noqa: E402

RANK_SCRIPT = Path(__file__).with_name("all_reduce_norm_rank.py")


def _run_ranks(tmp_path, world, dtype, n_cols, max_rows, slow, push=False):
    empty = torch.full((buffer_numel(max_rows, world, n_cols),), EMPTY_FILL, dtype=dtype)
    for r in range(world):
        (tmp_path / f"buf{r}").write_bytes(empty.view(torch.uint8).numpy().tobytes())
    env = dict(os.environ, TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(r), str(world), str(tmp_path),
                               str(dtype).removeprefix("torch."), str(n_cols), str(max_rows), str(slow),
                               str(int(push))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, f"rank {r} failed:\n{out}"
    finally:
        for p in procs:
            p.kill()
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"),
                    reason="the interpreter's check; on GPUs the engine's startup self-test and "
                           "bench/parallel_check.py run the kernel for real")
@pytest.mark.parametrize("world,dtype,n_cols,slow,push", [
    (2, torch.float32, 40, 1, False),       # a ragged row: masked columns, rank 1 late to every call
    (2, torch.bfloat16, 64, 0, False),      # rank 0 late
    (4, torch.float32, 16, 3, False),
    (2, torch.bfloat16, 40, 1, True),       # the shares sent by the GEMVs that compute them
    (4, torch.float32, 16, 0, True),
])
def test_every_rank_gets_the_separate_kernels_result(tmp_path, world, dtype, n_cols, slow, push):
    max_rows = 3
    results = _run_ranks(tmp_path, world, dtype, n_cols, max_rows, slow, push)
    expected = list(calls(world, n_cols, max_rows, dtype))
    for r, result in enumerate(results):
        assert len(result["outs"]) == len(expected)
        for (rows, parts, residual, weight), (out, new_residual) in zip(expected, result["outs"]):
            total = torch.stack([p.float() + 0.0 for p in parts]).sum(0).to(dtype)   # exact: see calls()
            want = norm.rms_norm(total, weight, EPS, residual)
            want_out, want_residual = (want, total) if residual is None else want
            assert torch.equal(out, want_out), f"rank {r}, {rows} rows: norm differs"
            assert torch.equal(new_residual, want_residual), f"rank {r}, {rows} rows: residual differs"
        # Every row slot was used once per call that reached it; every slot was emptied again.
        uses = [sum(rows > i for rows, *_ in expected) for i in range(max_rows)]
        assert result["uses"].tolist() == uses
        assert torch.equal(result["buffer"].view(torch.uint8), torch.full_like(result["buffer"], EMPTY_FILL).view(torch.uint8))


def test_rejects_more_rows_than_the_buffer_holds():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="up to 2 rows"):
        all_reduce_rms_norm(x, None, torch.ones(8), EPS, bases=torch.zeros(1, dtype=torch.int64),
                            uses=torch.zeros(2, dtype=torch.int32), max_rows=2, rank=0, world=1)


_SM90_SCRIPT = r"""
import strata.kernels.all_reduce_norm as arn
types = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_out_ptr="*bf16",
             bases_ptr="*i64", uses_ptr="*i32", eps="fp32")
meta = dict(RANK=1, WORLD=2, HAS_RES=True, BLOCK=4096, EMPTY=-2**15, WIDE=False, num_warps=16)
ptx = build(arn._all_reduce_rms_norm_kernel, meta, types, ptx=True)
# Rows in float32 too, and the kernel that only receives (its GEMV sent the share).
f32 = {name: t.replace("bf16", "fp32") for name, t in types.items()}
build(arn._all_reduce_rms_norm_kernel, dict(meta, EMPTY=-2**31, WIDE=True), f32)
build(arn._all_reduce_rms_norm_kernel, dict(meta, PUSHED=True), types)
print(json.dumps({"v4_loads": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
                  "v4_stores": len(re.findall(r"st\.global[.\w]*\.v4", ptx)),
                  "volatile_v4_loads": len(re.findall(r"ld\.volatile\.global[.\w]*\.v4", ptx))}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs compile the kernel for real")
def test_kernel_compiles_for_hopper_with_16_byte_rows():
    """An 8B model's row (4096 bf16) at TP=2: x, the residual and the weight come in as 16-byte
    vectors, the row goes to the peer as 16-byte stores, and the poll reads past the caches.
    float32 rows and the receive-only build compile too."""
    stats = run_without_interpreter(V4_LOADS_BUILD + _SM90_SCRIPT)
    assert stats["v4_loads"] >= 3 and stats["v4_stores"] >= 4, stats   # + the slot emptied again
    assert stats["volatile_v4_loads"] >= 1, stats
