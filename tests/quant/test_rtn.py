"""int8 / int4 weights quantized at load (round to nearest): the codes are within half a step of
the weights, the packed matmuls (the GPU's Triton kernels, run by the interpreter here) equal
dequantize-then-matmul, and a whole model's greedy tokens on the packed path equal the same
quantized values run through plain matmuls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import make_tiny_model

from strata import LLM, SamplingParams
from strata.config import QuantConfig
from strata.layers.linear import ColumnParallelLinear
from strata.quant import finish_loading, make_quant_method
from strata.quant.int4 import dequantize_int4_codes, quantize_int4
from strata.quant.int8 import dequantize_int8, quantize_int8


def test_int8_codes_within_half_a_step():
    w = torch.randn(40, 96) * torch.logspace(-3, 1, 40)[:, None]      # rows of very different size
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127 and scales.shape == (40,)
    err = (dequantize_int8(codes, scales, torch.float32) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()
    assert (codes.abs().amax(dim=1) == 127).all()                     # the range is used


@pytest.mark.parametrize("group,k", [(32, 96), (64, 128), (128, 576)])
def test_int4_codes_within_half_a_step(group, k):
    w = torch.randn(24, k)
    codes, scales, mins = quantize_int4(w, group)
    kp = -(-k // group) * group
    assert codes.shape == (24, kp) and codes.max() <= 15 and scales.shape == (24, kp // group)
    deq = dequantize_int4_codes(codes, scales, mins, group, torch.float32)[:, :k]
    step = scales.repeat_interleave(group, dim=1)[:, :k]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_zero_weights_do_not_divide_by_zero():
    codes, scales = quantize_int8(torch.zeros(3, 8))
    assert torch.isfinite(scales).all() and (dequantize_int8(codes, scales, torch.float32) == 0).all()
    codes, scales, mins = quantize_int4(torch.zeros(3, 32), 32)
    assert (dequantize_int4_codes(codes, scales, mins, 32, torch.float32) == 0).all()


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _packed_kernels(monkeypatch) -> None:
    """Run the GPU's packed kernels: on the GPU itself, else through Triton's interpreter."""
    if not CUDA:
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")


def _layer(method: str, k: int, n: int, reference: bool, weight: torch.Tensor, bias: bool,
           device: str = "cpu"):
    cfg = QuantConfig(method, 64 if method == "int4" else None, reference=reference)
    with torch.device(device):
        layer = ColumnParallelLinear(k, n, bias=bias, quant_method=make_quant_method(cfg))
    layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.normal_()
    finish_loading(layer)
    return layer


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("k", [128, 96])
def test_packed_matmul_equals_dequantized(method, k, monkeypatch):
    _packed_kernels(monkeypatch)
    torch.manual_seed(0)
    weight = torch.randn(48, k) / k ** 0.5
    packed = _layer(method, k, 48, False, weight, bias=True, device=DEVICE)
    ref = _layer(method, k, 48, True, weight, bias=True, device=DEVICE)
    ref.bias.data.copy_(packed.bias.data)
    assert not hasattr(packed, "weight") or packed.weight is None
    for rows in (1, 5, 33):
        x = torch.randn(rows, k, device=DEVICE)
        torch.testing.assert_close(packed(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.skipif(CUDA, reason="what the CPU stores")
def test_cpu_keeps_the_quantized_values_dequantized(method):
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    cpu, ref = _layer(method, 96, 48, False, weight, False), _layer(method, 96, 48, True, weight, False)
    assert torch.equal(cpu.weight, ref.weight) and not torch.equal(cpu.weight, weight)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


PROMPTS = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302], [9] * 13 + [44, 45]]


def _greedy(path, **kw):
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory=1 << 26, **kw)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_packed_path_greedy_equals_reference_path(tiny, monkeypatch, method, group):
    _packed_kernels(monkeypatch)
    packed = _greedy(tiny, quantization=method, quantization_group_size=group)
    monkeypatch.setenv("STRATA_QUANT_REFERENCE", "1")
    assert _greedy(tiny, quantization=method, quantization_group_size=group) == packed


def test_quantization_arguments_are_checked(tiny):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(tiny), skip_tokenizer_init=True, quantization="int3")
    with pytest.raises(ValueError, match="quantization_group_size"):
        LLM(str(tiny), skip_tokenizer_init=True, quantization="int4", quantization_group_size=100)
    with pytest.raises(ValueError, match="quantization_group_size"):
        LLM(str(tiny), skip_tokenizer_init=True, quantization="int8", quantization_group_size=64)


def test_startup_line_names_the_quantization(tiny):
    llm = LLM(str(tiny), skip_tokenizer_init=True, quantization="int4", quantization_group_size=32,
              kv_cache_memory=1 << 26)
    assert "quantized at load: int4, groups of 32, LM head quantized" in llm.llm_engine.describe()


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 64)])
def test_untied_lm_head_is_quantized_tied_stays_float(tiny, tmp_path, method, group):
    """An untied head goes through the method (its logits are the quantized values' product); a
    head tied to the embedding keeps the float table the lookup needs."""
    llm = LLM(str(tiny), skip_tokenizer_init=True, quantization=method, quantization_group_size=group,
              kv_cache_memory=1 << 26,
              dtype="float32")
    model = llm.llm_engine.executor.runner.model
    head = model.lm_head
    assert head.packed is not None and not hasattr(head, "weight")
    weights = dict(model.named_parameters())
    assert ("lm_head.packed.qweight" if CUDA else "lm_head.packed.weight") in weights
    hidden = torch.randn(3, head.packed.in_features, device=DEVICE)
    ref = _layer(method, head.packed.in_features, head.packed.out_features, True,
                 _tiny_head_weight(tiny), False, device=DEVICE)
    torch.testing.assert_close(head(hidden), ref(hidden)[:, : head.vocab_size], rtol=1e-4, atol=1e-4)
    tied = tmp_path / "tied"
    make_tiny_model("llama3_scaled_tied", tied)
    llm = LLM(str(tied), skip_tokenizer_init=True, quantization=method, quantization_group_size=group,
              kv_cache_memory=1 << 26,
              dtype="float32")
    model = llm.llm_engine.executor.runner.model
    assert model.lm_head.packed is None and model.lm_head.weight is model.embed_tokens.weight
    assert "LM head float" in llm.llm_engine.describe()


def _tiny_head_weight(path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))["lm_head.weight"]
