"""parallel="auto": the layout chosen for the model, the GPUs and the goal, with its reason."""

from __future__ import annotations

import pytest
import torch

from strata.config import ModelConfig
from strata.distributed.auto import choose_layout, estimate_weight_bytes

GIB = 2**30
LLAMA_8B = ModelConfig("LlamaForCausalLM", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=8192,
                       dtype=torch.bfloat16)
LLAMA_70B = LLAMA_8B.replace(hidden_size=8192, num_layers=80, num_heads=64, intermediate_size=28672)


def test_weight_estimate_matches_llama_8b():
    assert estimate_weight_bytes(LLAMA_8B, 2) / 1e9 == pytest.approx(16.06, rel=0.01)   # 8.03B params


def test_latency_takes_the_widest_tensor_parallel_group():
    layout = choose_layout(LLAMA_8B, 2, num_gpus=4, gpu_bytes=70 * GIB, goal="latency")
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (4, 1)
    assert "goal latency" in layout.reason and "1/4 of the weights" in layout.reason


def test_throughput_takes_the_fewest_gpus_and_names_replicas():
    layout = choose_layout(LLAMA_8B, 2, num_gpus=4, gpu_bytes=70 * GIB, goal="throughput")
    assert (layout.tensor_parallel_size, layout.data_parallel_replicas) == (1, 4)
    assert "4 data-parallel replicas" in layout.reason
    # 70B in bf16 (141 GB) on 80 GB cards: half of each card for weights needs 4 GPUs.
    layout = choose_layout(LLAMA_70B, 2, num_gpus=8, gpu_bytes=72 * GIB, goal="throughput")
    assert (layout.tensor_parallel_size, layout.data_parallel_replicas) == (4, 2)


def test_too_large_for_tensor_parallel_adds_pipeline_stages_or_says_it_cannot_fit():
    # 12 heads allow tensor parallel 4 at most; 122 GB of weights need 2 stages on 20 GiB cards.
    wide = LLAMA_70B.replace(num_heads=12, num_kv_heads=4)
    layout = choose_layout(wide, 2, num_gpus=8, gpu_bytes=20 * GIB, goal="latency")
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (4, 2)
    assert "2 pipeline stages" in layout.reason
    with pytest.raises(ValueError, match="does not fit these GPUs"):
        choose_layout(LLAMA_70B, 2, num_gpus=2, gpu_bytes=20 * GIB, goal="latency")


def test_heads_limit_the_tensor_parallel_size():
    odd = LLAMA_8B.replace(num_heads=12, num_kv_heads=4)       # 8 does not divide 12
    assert choose_layout(odd, 2, num_gpus=8, gpu_bytes=70 * GIB, goal="latency").tensor_parallel_size == 4


def test_bad_goal_and_cpu():
    with pytest.raises(ValueError, match="goal must be one of latency, throughput"):
        choose_layout(LLAMA_8B, 2, 2, 70 * GIB, "speed")
    assert choose_layout(LLAMA_8B, 4, 0, 0, "latency").tensor_parallel_size == 1


def test_engine_prints_the_choice(tmp_path, capsys):
    from hf_tiny import make_tiny_model

    from strata import LLM
    make_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, parallel="auto", goal="throughput",
              use_tqdm_on_load=False)
    assert llm.llm_engine.parallel_config.world_size == 1
    assert "one process chosen by parallel=auto, goal throughput" in llm.llm_engine.describe()
    assert "parallel=auto: tensor parallel 1 x pipeline parallel 1 x 1 data-parallel replica(s), because one " \
        "process on the CPU" \
        in capsys.readouterr().err
    with pytest.raises(ValueError, match="leave them at 1"):
        LLM(str(tmp_path), skip_tokenizer_init=True, parallel="auto", tensor_parallel_size=2)


def test_serve_help_documents_the_parallel_flags():
    from strata.entrypoints.cli import build_parser
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    helps = {opt: action.help for action in serve._actions for opt in action.option_strings}
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--parallel", "--goal",
                 "--worker-timeout", "--step-timeout"):
        assert helps.get(flag), flag
    assert "NCCL on GPUs, gloo on the CPU" in helps["--tensor-parallel-size"]
