"""``strata quantize``: the checkpoint it writes loads back as packed codes (no float weights,
no quantization at load) and gives the tokens LLM(source, quantization=...) gives; sharded
output, GGUF input with its vocabulary exported, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_tiny_model

from strata import LLM, SamplingParams
from strata.entrypoints.cli import build_parser, main
from strata.layers.linear import LinearBase
from strata.quant.export import quantize_checkpoint

PROMPTS = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302], [9] * 13 + [44, 45]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


def _greedy(path, **kw):
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory=1 << 26, **kw)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def _linears(llm):
    return [m for m in llm.llm_engine.executor.runner.model.modules() if isinstance(m, LinearBase)]


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_quantized_checkpoint_loads_packed_and_matches_quantizing_at_load(tiny, tmp_path, monkeypatch,
                                                                          method, group):
    out = tmp_path / "q"
    summary = quantize_checkpoint(tiny, out, method, group)
    assert summary.num_quantized == 2 * 7 and (out / "model.safetensors").exists()
    spec = json.loads((out / "config.json").read_text())["quantization_config"]
    assert spec == {"quant_method": "strata", "format": method, "group_size": group}
    tokens, llm = _greedy(out)
    assert "checkpoint quantization: strata " + method in llm.llm_engine.describe()
    expected, _ = _greedy(tiny, quantization=method, quantization_group_size=group)
    assert tokens == expected
    # Naming what the checkpoint holds is accepted; anything else is refused.
    assert _greedy(out, quantization=method, quantization_group_size=group)[0] == expected
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(out), skip_tokenizer_init=True, quantization="int4" if method == "int8" else "int8")
    # The CPU keeps int8/int4 values dequantized (see strata/quant/int8.py); where the packed
    # kernels run (forced here, through the interpreter) the layers hold only the codes.
    if not torch.cuda.is_available():
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    packed = LLM(str(out), skip_tokenizer_init=True, kv_cache_memory=1 << 24)
    assert all(getattr(m, "weight", None) is None and m.qweight is not None for m in _linears(packed))


def test_reference_path_of_the_packed_checkpoint(tiny, tmp_path, monkeypatch):
    quantize_checkpoint(tiny, tmp_path / "q", "int4", 64)
    monkeypatch.setenv("STRATA_QUANT_REFERENCE", "1")
    expected, _ = _greedy(tiny, quantization="int4", quantization_group_size=64)
    assert _greedy(tmp_path / "q")[0] == expected


def test_large_checkpoints_are_sharded_with_an_index(tiny, tmp_path):
    summary = quantize_checkpoint(tiny, tmp_path / "q", "int8", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert summary.shards == len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list((tmp_path / "q").glob("*.tmp"))
    assert _greedy(tmp_path / "q")[0] == _greedy(tiny, quantization="int8")[0]


def test_bad_requests_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="quantization_group_size"):
        quantize_checkpoint(tiny, tmp_path / "a", "int8", 64)
    with pytest.raises(ValueError, match="the model itself"):
        quantize_checkpoint(tiny, tiny, "int8")
    quantize_checkpoint(tiny, tmp_path / "b", "int8")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        quantize_checkpoint(tiny, tmp_path / "b", "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "b", tmp_path / "c", "int4")


def test_gguf_source_and_its_vocabulary(tmp_path):
    from strata.loader.model_loader import default_model_path
    from strata.tokenizer import Tokenizer
    gguf = default_model_path()
    summary = quantize_checkpoint(gguf, tmp_path / "q", "int4", 64)
    assert summary.tokenizer.startswith("exported")
    ours = LLM(str(tmp_path / "q"), kv_cache_memory=1 << 26)
    theirs = LLM(str(gguf), quantization="int4", quantization_group_size=64, kv_cache_memory=1 << 26)
    text = "The capital of France is"
    params = SamplingParams(temperature=0, max_tokens=16)
    assert ours.generate(text, params)[0].outputs[0].text == theirs.generate(text, params)[0].outputs[0].text
    exported, original = ours.llm_engine.tokenizer, theirs.llm_engine.tokenizer
    assert isinstance(exported, Tokenizer) and exported.chat_template == original.chat_template
    sample = "Hello   world!\n\tÜber 123456 <|im_start|>user"
    assert exported.encode(sample) == original.encode(sample)
    assert exported.eos_token_ids == original.eos_token_ids


def test_command_line(tiny, tmp_path, capsys):
    sub = build_parser()._subparsers._group_actions[0].choices["quantize"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"quantize {action.option_strings} has no help text"
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), str(out), "--method", "int4", "--group-size", "32"]) == 0
    assert "14 quantized" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "hello", "--max-tokens", "2"]) == 2   # no tokenizer
    assert "tokenizer" in capsys.readouterr().err
    assert main(["quantize", str(tiny), str(tmp_path / "r"), "--method", "int8", "--group-size", "64"]) == 2
    assert "quantization_group_size" in capsys.readouterr().err


def test_stored_int4_layout_is_the_gpu_kernels():
    import torch
    pytest.importorskip("triton")
    from strata.kernels.quant_matmul import pack_int4
    from strata.quant.int4 import pack_nibbles, unpack_nibbles
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(pack_nibbles(codes), pack_int4(codes))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
