"""One rank of test_all_reduce_norm's multi-process run, as a script:
``python all_reduce_norm_rank.py RANK WORLD FOLDER DTYPE N_COLS MAX_ROWS SLOW_RANK PUSH``.

Every rank maps every rank's "symmetric buffer" (a file in FOLDER, shared memory) and runs
the kernel in Triton's interpreter on the calls of ``calls()``; the partials meet through the
buffers alone. SLOW_RANK sleeps before each call, so the others wait in the kernel's poll.
With PUSH=1 each rank's partial comes out of a skinny_matmul (by the identity) that sends it
to the peers itself, and the kernel only receives. The outputs go to FOLDER/out{RANK}.pt.
"""

import os
import sys
import time
from pathlib import Path

import torch

EPS = 1e-5


def calls(world: int, n_cols: int, max_rows: int, dtype: torch.dtype):
    """(rows, every rank's partial x, residual or None, weight) of each call, the same in every
    process. Values are multiples of 1/8 below 32, so the sums are exact in every dtype; one
    partial is all -0.0 (the empty slot's value: it must still arrive, as +0.0)."""
    g = torch.Generator().manual_seed(0)

    def small(*shape):
        return (torch.randint(-96, 96, shape, generator=g) / 8).to(dtype)

    weight = small(n_cols)
    for i, rows in enumerate([1, max_rows, 1, 2, max_rows, 1, 2, 1]):
        parts = [small(rows, n_cols) for _ in range(world)]
        if i == 4:
            parts[1] = torch.full((rows, n_cols), -0.0, dtype=dtype)
        residual = None if i == 3 else small(rows, n_cols)
        yield rows, parts, residual, weight


def main():
    # Only as a script: imported by the test for calls(), this module changes nothing (a kernel
    # module first imported under TRITON_INTERPRET would stay interpreted for the whole session).
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import conftest  # noqa: F401  (the interpreter fixes)

    from strata.kernels.all_reduce_norm import PushTarget, all_reduce_rms_norm, buffer_numel
    from strata.kernels.skinny_matmul import skinny_matmul

    rank, world, folder, dtype_name, n_cols, max_rows, slow, push = sys.argv[1:]
    rank, world, n_cols, max_rows, slow, push = (int(rank), int(world), int(n_cols), int(max_rows), int(slow),
                                                 push == "1")
    dtype = getattr(torch, dtype_name)
    size = buffer_numel(max_rows, world, n_cols)
    buffers = [torch.from_file(f"{folder}/buf{r}", shared=True, size=size, dtype=dtype) for r in range(world)]
    bases = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    uses = torch.zeros(max_rows, dtype=torch.int32)
    target = PushTarget(bases, uses, max_rows, rank, world, n_cols, dtype)
    identity = torch.eye(n_cols, dtype=dtype)
    outs = []
    for rows, parts, residual, weight in calls(world, n_cols, max_rows, dtype):
        if rank == slow:
            time.sleep(0.3)
        share = skinny_matmul(parts[rank], identity, push=target) if push else parts[rank]
        out, new_residual = all_reduce_rms_norm(share, residual, weight, EPS, bases=bases, uses=uses,
                                                max_rows=max_rows, rank=rank, world=world, pushed=push)
        outs.append((out, new_residual))
    torch.save({"outs": outs, "uses": uses, "buffer": buffers[rank].clone()}, f"{folder}/out{rank}.pt")


if __name__ == "__main__":
    main()
