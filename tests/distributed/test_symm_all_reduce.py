"""How the tensor-parallel all-reduce is chosen (symmetric memory or NCCL), on the CPU: the
reasons for falling back, and that a group agrees on one path. The kernels themselves need
NVLink GPUs: bench/gpu_parallel.py checks them there (self-test against NCCL, greedy tokens)."""

from __future__ import annotations

import pytest
import torch

from strata.distributed import symm_all_reduce as sar

CUDA0 = torch.device("cuda", 0)   # only a name here: nothing runs on it


def test_nccl_is_forced_by_the_option_or_the_environment(monkeypatch):
    monkeypatch.delenv("STRATA_ALL_REDUCE", raising=False)
    assert sar.requested_mode("auto") == "auto"
    assert sar.requested_mode("nccl") == "nccl"
    monkeypatch.setenv("STRATA_ALL_REDUCE", "NCCL")
    assert sar.requested_mode("auto") == "nccl"
    assert "forced" in sar.local_obstacle(CUDA0, torch.bfloat16, 2, sar.requested_mode("auto"))
    monkeypatch.setenv("STRATA_ALL_REDUCE", "fast")
    with pytest.raises(ValueError, match="STRATA_ALL_REDUCE must be one of"):
        sar.requested_mode("auto")
    with pytest.raises(ValueError, match="all_reduce must be one of"):
        sar.requested_mode("custom")


@pytest.fixture(autouse=True)
def multicast_off(monkeypatch):
    """What every process strata starts on CUDA has (multiproc.py, torchrun.py)."""
    from strata.distributed.parallel_state import CUDA_SAFE_ENV
    for key, value in CUDA_SAFE_ENV.items():
        monkeypatch.setenv(key, value)


def test_symmetric_memory_needs_multicast_switched_off(monkeypatch):
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    assert sar.local_obstacle(CUDA0, torch.bfloat16, 2, "auto") == (
        "NVLink multicast is not switched off in this process (NCCL_NVLS_ENABLE, "
        "TORCH_SYMM_MEM_DISABLE_MULTICAST not as strata sets them)")


def test_local_obstacles_name_what_is_missing():
    assert sar.local_obstacle(torch.device("cpu"), torch.float32, 2, "auto") == "not a CUDA device"
    assert "float16" in sar.local_obstacle(CUDA0, torch.float16, 2, "auto")
    assert "not 3" in sar.local_obstacle(CUDA0, torch.bfloat16, 3, "auto")
    # This torch has the ops (torch 2.11+ on the GPU machines too): nothing local in the way.
    assert sar.local_obstacle(CUDA0, torch.bfloat16, 2, "auto") is None


def test_peers_on_another_host_or_without_p2p_fall_back(monkeypatch):
    assert "spans hosts" in sar.peer_obstacle(("a", 0), [("a", 0), ("b", 0)])
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: (i, j) != (0, 3))
    assert sar.peer_obstacle(("a", 0), [("a", 0), ("a", 1)]) is None
    assert sar.peer_obstacle(("a", 0), [("a", 0), ("a", 3)]) == "GPU 0 has no peer-to-peer access to GPU 3"


def test_cpu_ranks_use_gloo():
    choice = sar.select_all_reduce(None, None, torch.device("cpu"), torch.float32, 2)
    assert choice.kind == "gloo" and choice.impl is None
    assert choice.describe() == "all-reduce: GLOO (CPU ranks)"


class FakeGroup:
    """Rank 0 of a 2-rank group whose peer (rank 1) reports `peer_reason` at each agreement."""

    def __init__(self, monkeypatch, peer_reasons):
        self.peer_reasons = list(peer_reasons)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: True)
        monkeypatch.setattr(sar, "gather_group", self.gather)

    def gather(self, obj, group, world_group):
        if isinstance(obj, tuple):   # (host, GPU index)
            return {0: obj, 1: (obj[0], 1)}
        return {0: obj, 1: self.peer_reasons.pop(0)}


def test_a_peer_obstacle_sends_the_whole_group_to_nccl(monkeypatch):
    FakeGroup(monkeypatch, ["GPU 1 has no peer-to-peer access to GPU 0"])
    monkeypatch.setattr(sar, "SymmMemAllReduce", lambda *a, **k: pytest.fail("must not allocate"))
    monkeypatch.delenv("STRATA_ALL_REDUCE", raising=False)
    choice = sar.select_all_reduce(None, None, CUDA0, torch.bfloat16, 2)
    assert choice.kind == "nccl" and choice.impl is None
    assert choice.reason == "rank 1: GPU 1 has no peer-to-peer access to GPU 0"
    assert choice.describe() == "all-reduce: NCCL (rank 1: GPU 1 has no peer-to-peer access to GPU 0)"


def test_a_setup_error_falls_back_to_nccl(monkeypatch):
    FakeGroup(monkeypatch, [None, None])
    monkeypatch.delenv("STRATA_ALL_REDUCE", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA driver does not support IPC\nmore lines")

    monkeypatch.setattr(sar, "SymmMemAllReduce", broken)
    choice = sar.select_all_reduce(None, None, CUDA0, torch.bfloat16, 2)
    assert choice.kind == "nccl"
    assert choice.reason == "symmetric memory setup failed: RuntimeError: CUDA driver does not support IPC"


def test_a_failed_self_test_on_a_peer_falls_back_to_nccl(monkeypatch):
    FakeGroup(monkeypatch, [None, "self-test of a 1024-byte all-reduce disagreed with NCCL"])
    monkeypatch.delenv("STRATA_ALL_REDUCE", raising=False)
    monkeypatch.setattr(sar, "SymmMemAllReduce", lambda *a, **k: object())
    monkeypatch.setattr(sar, "self_test", lambda *a: None)
    choice = sar.select_all_reduce(None, None, CUDA0, torch.bfloat16, 2)
    assert choice.kind == "nccl" and choice.reason.startswith("rank 1: self-test")


def test_everything_in_place_chooses_symmetric_memory(monkeypatch):
    FakeGroup(monkeypatch, [None, None])
    monkeypatch.delenv("STRATA_ALL_REDUCE", raising=False)
    impl = sar.SymmMemAllReduce.__new__(sar.SymmMemAllReduce)
    impl.max_bytes, impl.one_shot_max_bytes = sar.MAX_BYTES, sar.ONE_SHOT_MAX_BYTES
    impl.norm = None
    built = []
    monkeypatch.setattr(sar, "SymmMemAllReduce", lambda *a, **k: built.append(k) or impl)
    monkeypatch.setattr(sar, "self_test", lambda *a: None)
    choice = sar.select_all_reduce(None, None, CUDA0, torch.bfloat16, 2, hidden_size=4096)
    assert built == [{"hidden_size": 4096}]
    assert choice.kind == "symm_mem" and choice.impl is impl
    assert choice.describe().endswith("one-shot up to 256 KiB, two-shot up to 8 MiB, NCCL above)")
    impl.norm = sar.SymmMemNorm.__new__(sar.SymmMemNorm)
    impl.norm.max_rows = 32
    assert choice.describe().endswith("NCCL above; fused with the next RMSNorm up to 32 rows)")


def test_which_messages_take_the_symmetric_buffer():
    impl = sar.SymmMemAllReduce.__new__(sar.SymmMemAllReduce)
    impl.device, impl.dtype, impl.max_bytes = torch.device("cpu"), torch.bfloat16, 1024
    assert impl.can_run(torch.zeros(2, 256, dtype=torch.bfloat16))        # 1 KiB: the limit
    assert not impl.can_run(torch.zeros(2, 257, dtype=torch.bfloat16))    # over it
    assert not impl.can_run(torch.zeros(3, dtype=torch.bfloat16))         # not 16-byte aligned
    assert not impl.can_run(torch.zeros(8, dtype=torch.float32))          # another dtype
    assert not impl.can_run(torch.zeros(16, 16, dtype=torch.bfloat16).t())  # not contiguous
    assert not impl.can_run(torch.zeros(2 * 256 + 1, dtype=torch.bfloat16)[1:])  # starts 2 bytes in


def test_which_sums_the_fused_norm_takes():
    fused = sar.SymmMemNorm.__new__(sar.SymmMemNorm)
    fused.device, fused.dtype, fused.hidden_size, fused.max_rows = torch.device("cpu"), torch.bfloat16, 64, 4
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert fused.can_run(x) and fused.can_run(x, torch.zeros_like(x))
    assert not fused.can_run(torch.zeros(5, 64, dtype=torch.bfloat16))            # more rows than slots
    assert not fused.can_run(torch.zeros(4, 32, dtype=torch.bfloat16))            # another hidden size
    assert not fused.can_run(x.float())                                            # another dtype
    assert not fused.can_run(torch.zeros(64, 4, dtype=torch.bfloat16).t())         # rows not contiguous
    assert not fused.can_run(x, torch.zeros(64, 4, dtype=torch.bfloat16).t())      # nor the residual's
    assert not fused.can_run(x, torch.zeros(4, 64))                                # a float32 residual


def _norm_without_buffers(monkeypatch, max_rows=2, hidden=8):
    """A SymmMemNorm's bookkeeping without its symmetric buffer (the CPU has none)."""
    monkeypatch.delenv("STRATA_GEMV_PUSH", raising=False)
    norm = object.__new__(sar.SymmMemNorm)
    norm.max_rows, norm.hidden_size, norm.dtype, norm.device = max_rows, hidden, torch.bfloat16, CUDA0
    norm._target, norm._sent = object(), None
    return norm


def test_a_gemv_may_send_only_rows_the_next_sum_takes(monkeypatch):
    norm = _norm_without_buffers(monkeypatch)
    assert norm.push_target(1, 8, torch.bfloat16, CUDA0) is norm._target
    assert norm.push_target(2, 8, torch.bfloat16, CUDA0) is norm._target
    for rows, cols, dtype in [(3, 8, torch.bfloat16), (0, 8, torch.bfloat16), (1, 16, torch.bfloat16),
                              (1, 8, torch.float32)]:
        assert norm.push_target(rows, cols, dtype, CUDA0) is None, (rows, cols, dtype)
    assert norm.push_target(1, 8, torch.bfloat16, torch.device("cuda", 1)) is None
    monkeypatch.setenv("STRATA_GEMV_PUSH", "0")
    assert norm.push_target(1, 8, torch.bfloat16, CUDA0) is None


def test_a_sent_share_must_be_what_the_next_sum_takes(monkeypatch):
    """A share sent to the peers fills their slots: if the next sum were not of it, the peers'
    later sums would take stale rows. Every way to get there is an error, not a wrong answer."""
    from strata.distributed import parallel_state as ps
    norm = _norm_without_buffers(monkeypatch)
    share, other = torch.zeros(1, 8), torch.zeros(1, 8)
    assert norm.sent(share) is share
    with pytest.raises(RuntimeError, match="never summed"):
        norm.sent(other)                                   # a second share before the sum
    with pytest.raises(RuntimeError, match="never summed"):
        norm(other, None, torch.ones(8), 1e-6)             # a sum of something else
    norm._sent = share

    class Fast:
        pass
    fast = Fast()
    fast.norm = norm
    norm.can_run = lambda x, residual=None: False
    monkeypatch.setattr(ps, "_groups", ps.ParallelGroups(tp_size=2, fast_all_reduce=fast))
    with pytest.raises(RuntimeError, match="never summed"):
        ps.all_reduce_rms_norm(share, None, torch.ones(8), 1e-6)   # the sum would go the other way


@pytest.mark.parametrize("pp_rank", [0, 1])
def test_only_projections_feeding_this_stage_s_norms_may_send(monkeypatch, pp_rank):
    """At TP>1 o_proj and down_proj leave their sums to the norm after them, and may send their
    shares as they compute them; but a pipeline stage's last MLP share goes to the next stage."""
    from strata.config import ModelConfig
    from strata.distributed import parallel_state as ps
    from strata.models.llama import LlamaForCausalLM
    monkeypatch.setattr(ps, "_groups", ps.ParallelGroups(tp_size=2, pp_size=2, pp_rank=pp_rank))
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=16, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=4, intermediate_size=32, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    layers = [model.layers[i] for i in range(model.start_layer, model.end_layer)]
    assert all(layer.self_attn.o_proj.feeds_fused_norm for layer in layers)
    assert [layer.mlp.down_proj.feeds_fused_norm for layer in layers] == [True, pp_rank == 1]
