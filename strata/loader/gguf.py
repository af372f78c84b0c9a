"""Read GGUF files (llama.cpp's model format), written from the spec in ggml/docs/gguf.md.

Layout (little-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count,
the metadata key/values, the tensor infos, padding to `general.alignment`, then the tensor data.
The file is memory-mapped: opening reads only the header, and tensors are dequantized on demand.

`gguf_to_hf_config` and `gguf_weights` translate llama.cpp's names into Hugging Face ones so the
model files load GGUF exactly like a safetensors checkpoint.
"""

import math
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from strata.quant import ggml_formats as fmt
from strata.quant.ggml_dequant import dequantize
from strata.quant.ggml_formats import GGMLType
from strata.quant.gguf import GGMLRows

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF metadata value types (gguf_type in gguf.h)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_SCALAR_FORMATS = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}  # fmt: skip
# smallest possible encodings, to reject counts that cannot fit in the file before looping
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, metadata count


class GGUFError(ValueError):
    """A GGUF file that strata cannot read; the message names the file and the problem."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists dims fastest-first, so reversed
    ggml_type: GGMLType
    offset: int  # absolute byte offset in the file (GGUF stores it relative to the data section)
    nbytes: int

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Sequential little-endian reads over the mapped header, each bounds-checked."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def take(self, nbytes: int, what: str) -> int:
        start = self.pos
        if nbytes > self.size - start:
            raise GGUFError(
                f"{self.path}: truncated file: {what} at offset {start} needs {nbytes} bytes "
                f"but the file is {self.size} bytes"
            )
        self.pos = start + nbytes
        return start

    def scalar(self, value_type: int, what: str):
        layout = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(layout, self.buf, self.take(struct.calcsize(layout), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(_UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_UINT64, what)

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        if length > self.size - self.pos:
            raise GGUFError(
                f"{self.path}: corrupt or truncated file: {what} at offset {self.pos} claims "
                f"{length} bytes but the file is {self.size} bytes"
            )
        start = self.take(length, what)
        return str(self.buf[start : start + length], "utf-8", "replace")

    def value(self, value_type: int, what: str):
        if value_type in _SCALAR_FORMATS:
            return self.scalar(value_type, what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            return self.array(what)
        raise GGUFError(f"{self.path}: corrupt file: {what} has unknown value type {value_type}")

    def array(self, what: str) -> list:
        item_type = self.u32(f"{what} item type")
        count = self.u64(f"{what} length")
        item_bytes = (
            struct.calcsize(_SCALAR_FORMATS[item_type]) if item_type in _SCALAR_FORMATS else 8
        )
        if count > (self.size - self.pos) // item_bytes:
            raise GGUFError(
                f"{self.path}: corrupt or truncated file: {what} claims {count} items at offset "
                f"{self.pos} but the file is {self.size} bytes"
            )
        if item_type in _SCALAR_FORMATS:
            # numeric arrays (token scores, types) are long: read them in one go
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            start = self.take(count * item_bytes, what)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start)
            return (values != 0).tolist() if item_type == _BOOL else values.tolist()
        return [self.value(item_type, f"{what}[{i}]") for i in range(count)]


class GGUFFile:
    """A memory-mapped GGUF file: metadata and tensor infos parsed eagerly, tensor data lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mmap = _map_file(self.path)  # [file_size] uint8, read-only
        cursor = _Cursor(memoryview(self._mmap), self.path)
        self.version = self._read_header(cursor)
        tensor_count, kv_count = self._read_counts(cursor)
        self.metadata: dict[str, object] = {}
        for i in range(kv_count):
            key = cursor.string(f"metadata key #{i}")
            value_type = cursor.u32(f"type of metadata {key!r}")
            self.metadata[key] = cursor.value(value_type, f"metadata {key!r}")
        self.alignment = self._alignment()
        infos = [self._read_tensor_info(cursor, i) for i in range(tensor_count)]
        self.data_offset = _align(cursor.pos, self.alignment)  # start of the data section
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, rel_offset in infos:
            self.tensors[name] = self._layout_tensor(name, shape, ggml_type, rel_offset)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the memory map (no copy)."""
        info = self._info(name)
        return self._mmap[info.offset : info.offset + info.nbytes]

    def raw_rows(self, name: str) -> GGMLRows:
        """A 2-D tensor's GGML blocks as [rows, row_bytes] uint8, a view of the map (no copy)."""
        info = self._info(name)
        rows = info.shape[0]
        with warnings.catch_warnings():   # the map is read-only; nothing writes to these views
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            blocks = torch.from_numpy(self.raw(name)).view(rows, info.nbytes // rows)
        return GGMLRows(blocks, info.ggml_type, info.shape)

    def load_tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32 in torch shape: a new tensor, not a view of the map."""
        info = self._info(name)
        self.check_dequantizable(info)
        return dequantize(self.raw(name), info.ggml_type, info.num_elements).reshape(info.shape)

    def check_dequantizable(self, info: GGUFTensorInfo) -> None:
        if info.ggml_type not in fmt.SUPPORTED:
            raise GGUFError(
                f"{self.path}: tensor {info.name!r} has GGML type {info.ggml_type.name}, which "
                f"strata cannot dequantize; supported types: {fmt.supported_names()}"
            )

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def _read_header(self, cursor: _Cursor) -> int:
        cursor.take(len(GGUF_MAGIC), "magic")  # checked by _map_file
        version = cursor.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            detail = (
                " (a big-endian file, which strata does not read)"
                if swapped in SUPPORTED_VERSIONS
                else ""
            )
            raise GGUFError(
                f"{self.path}: unsupported GGUF version {version}{detail}; supported versions: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        return version

    def _read_counts(self, cursor: _Cursor) -> tuple[int, int]:
        tensor_count = cursor.u64("tensor count")
        kv_count = cursor.u64("metadata count")
        room = cursor.size - cursor.pos
        if tensor_count > room // _MIN_TENSOR_INFO_BYTES or kv_count > room // _MIN_KV_BYTES:
            raise GGUFError(
                f"{self.path}: corrupt or truncated header: {tensor_count} tensors and "
                f"{kv_count} metadata entries cannot fit in a file of {cursor.size} bytes"
            )
        return tensor_count, kv_count

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(
                f"{self.path}: general.alignment must be a power of two, got {alignment!r}"
            )
        return alignment

    def _read_tensor_info(
        self, cursor: _Cursor, index: int
    ) -> tuple[str, tuple[int, ...], GGMLType, int]:
        name = cursor.string(f"name of tensor #{index}")
        n_dims = cursor.u32(f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise GGUFError(
                f"{self.path}: corrupt tensor info: {name!r} has {n_dims} dims (max {MAX_DIMS})"
            )
        dims = [cursor.u64(f"dims of tensor {name!r}") for _ in range(n_dims)]  # fastest first
        type_id = cursor.u32(f"type of tensor {name!r}")
        rel_offset = cursor.u64(f"offset of tensor {name!r}")
        if type_id not in fmt.BY_ID:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has unknown GGML type id {type_id}; supported "
                f"types: {fmt.supported_names()}"
            )
        ggml_type = fmt.BY_ID[type_id]
        if dims and dims[0] % ggml_type.block_size:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has rows of {dims[0]} elements, not a multiple of "
                f"the {ggml_type.name} block size {ggml_type.block_size}"
            )
        return name, tuple(reversed(dims)), ggml_type, rel_offset

    def _layout_tensor(
        self, name: str, shape: tuple, ggml_type: GGMLType, rel_offset: int
    ) -> GGUFTensorInfo:
        if name in self.tensors:
            raise GGUFError(f"{self.path}: corrupt file: tensor {name!r} appears twice")
        if rel_offset % self.alignment:
            raise GGUFError(
                f"{self.path}: corrupt tensor info: {name!r} has offset {rel_offset}, not a "
                f"multiple of the alignment {self.alignment}"
            )
        nbytes = ggml_type.nbytes(math.prod(shape))
        offset = self.data_offset + rel_offset
        if offset + nbytes > self._mmap.size:
            raise GGUFError(
                f"{self.path}: truncated file: tensor {name!r} ({ggml_type.name}, shape "
                f"{list(shape)}) needs bytes {offset} to {offset + nbytes} but the file is "
                f"{self._mmap.size} bytes"
            )
        return GGUFTensorInfo(name, shape, ggml_type, offset, nbytes)


def _map_file(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise GGUFError(f"GGUF file {path} does not exist")
    if os.path.isdir(path):
        raise GGUFError(f"{path} is a directory, not a GGUF file")
    if not os.path.isfile(path):
        raise GGUFError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        size = os.path.getsize(path)
        if size < _HEADER_BYTES:
            raise GGUFError(f"{path}: truncated file: {size} bytes is shorter than the GGUF header")
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise GGUFError(f"cannot read GGUF file {path}: {e.strerror or e}") from e


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


# --- llama.cpp -> Hugging Face ----------------------------------------------------------------

# general.architecture -> (HF architectures entry, HF model_type)
_HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),  # llama.cpp also writes Mistral models as "llama"
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# Only "llama" Q/K rows are permuted by llama.cpp's converter (see _unpermute_rope_rows).
_ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Weights of linear layers: what gguf_weights(packed=True) hands over as GGML blocks.
_LINEAR_WEIGHT = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
# tensors with no HF parameter: llama3's rope factors are folded into config["rope_scaling"]
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of a llama.cpp tensor name, or None if there is none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_NAMES:
        return None
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"


def _architecture(gguf: GGUFFile) -> str:
    arch = gguf.architecture
    if arch not in _HF_ARCHITECTURES:
        raise GGUFError(
            f"{gguf.path}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(sorted(_HF_ARCHITECTURES))}"
        )
    return arch


def _required(gguf: GGUFFile, key: str):
    if key not in gguf.metadata:
        raise GGUFError(f"{gguf.path}: missing metadata key {key!r}")
    return gguf.metadata[key]


def _decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32: 1e-05 rather than 9.99999974e-06."""
    return float(str(np.float32(value)))


def gguf_to_hf_config(gguf: GGUFFile) -> dict:
    """An HF config.json-style dict for a llama / qwen2 / qwen3 GGUF file."""
    arch = _architecture(gguf)
    meta = gguf.metadata
    hidden_size = _required(gguf, f"{arch}.embedding_length")
    num_heads = _required(gguf, f"{arch}.attention.head_count")
    num_kv_heads = meta.get(f"{arch}.attention.head_count_kv", num_heads)
    vocab_size = meta.get(f"{arch}.vocab_size")
    if vocab_size is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab_size = (
            len(tokens) if tokens is not None else gguf.tensors["token_embd.weight"].shape[0]
        )
    hf_architecture, model_type = _HF_ARCHITECTURES[arch]
    has_bias = "blk.0.attn_q.bias" in gguf.tensors
    return {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": _required(gguf, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _required(gguf, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": meta.get(f"{arch}.attention.key_length", hidden_size // num_heads),
        "hidden_act": "silu",
        "rms_norm_eps": _decimal(_required(gguf, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(gguf, arch),
        "max_position_embeddings": _required(gguf, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": arch == "qwen2" or has_bias,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict | None:
    meta = gguf.metadata
    if "rope_freqs.weight" in gguf.tensors:
        return _llama3_rope_scaling(gguf, arch)
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"  # old files wrote only rope.scale_linear
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn") or factor is None:
        raise GGUFError(f"{gguf.path}: unsupported rope scaling {kind!r} (factor {factor!r})")
    scaling = {"rope_type": kind, "factor": _decimal(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if f"{arch}.rope.scaling.{gguf_key}" in meta:
            scaling[hf_key] = _decimal(meta[f"{arch}.rope.scaling.{gguf_key}"])
    return scaling


def _llama3_rope_scaling(gguf: GGUFFile, arch: str) -> dict:
    """Recover HF's llama3 rope_scaling from the per-frequency factors llama.cpp stores instead.

    llama.cpp's converter writes rope_freqs = 1 for wavelengths below L / high_freq_factor,
    `factor` above L / low_freq_factor and 1 / ((1 - s) / factor + s) in between, with s linear in
    the frequency: s = (L * freq / 2pi - low) / (high - low). The smooth entries give that line
    exactly, which fixes high and L once low_freq_factor is known; every Llama 3.x release uses
    low_freq_factor = 1, and the fit is checked against every stored factor.
    """
    factors = gguf.load_tensor("rope_freqs.weight").double()  # [head_dim / 2]
    theta = gguf.metadata.get(f"{arch}.rope.freq_base", 10000.0)
    rotary_dim = 2 * factors.numel()
    freqs = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    factor = factors.max().item()
    smooth = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if factor <= 1 or smooth.sum() < 2:
        raise GGUFError(f"{gguf.path}: cannot recover llama3 rope scaling from rope_freqs.weight")
    s = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
    x = freqs[smooth] / (2 * math.pi)
    slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)  # s = slope * x + intercept
    low = 1.0
    high = low - low / intercept
    original = slope * (high - low)
    scaling = {
        "rope_type": "llama3",
        "factor": _decimal(factor),
        "low_freq_factor": low,
        "high_freq_factor": _decimal(round(high, 3)),
        "original_max_position_embeddings": int(round(original)),
    }
    if not torch.allclose(llama3_rope_factors(scaling, freqs), factors, rtol=1e-3):
        raise GGUFError(f"{gguf.path}: rope_freqs.weight does not follow llama3 rope scaling")
    return scaling


def llama3_rope_factors(scaling: dict, freqs: torch.Tensor) -> torch.Tensor:
    """Per-frequency divisors of llama3 rope scaling, as llama.cpp's converter computes them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < original / high, torch.ones_like(freqs), factors)
    return torch.where(wavelen > original / low, torch.full_like(freqs, factor), factors)


def gguf_weights(gguf: GGUFFile, packed: bool = False) -> Iterator[tuple[str, torch.Tensor | GGMLRows]]:
    """Yield (HF checkpoint name, float32 tensor) for every weight, in file order.

    Q/K rows of "llama" files are put back into HF's rotate-half order. Every tensor's name and
    type are checked before the first one is dequantized, so a bad file fails fast. With
    ``packed``, the quantized weights of linear layers come as GGMLRows, their blocks untouched
    (whole block rows permuted likewise), for strata.quant.gguf to keep packed.
    """
    arch = _architecture(gguf)
    for info in gguf.tensors.values():
        if info.name in _SKIPPED_TENSORS:
            continue
        if hf_tensor_name(info.name) is None:
            raise GGUFError(f"{gguf.path}: tensor {info.name!r} has no Hugging Face equivalent")
        gguf.check_dequantizable(info)
    config = gguf_to_hf_config(gguf)
    for info in gguf.tensors.values():
        if info.name in _SKIPPED_TENSORS:
            continue
        if packed and info.ggml_type.block_size > 1 and _LINEAR_WEIGHT.fullmatch(info.name):
            tensor = gguf.raw_rows(info.name)
        else:
            tensor = gguf.load_tensor(info.name)
        if arch in _ROPE_PERMUTED_ARCHITECTURES:
            if ".attn_q." in info.name:
                tensor = _unpermute_rope_rows(tensor, config["num_attention_heads"])
            elif ".attn_k." in info.name:
                tensor = _unpermute_rope_rows(tensor, config["num_key_value_heads"])
        yield hf_tensor_name(info.name), tensor


def _unpermute_rope_rows(tensor: torch.Tensor | GGMLRows, num_heads: int) -> torch.Tensor | GGMLRows:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py LlamaModel.permute).

    HF's llama rotates halves: within a head, row i pairs with row i + head_dim/2. GGML's rope
    rotates adjacent rows 2i, 2i+1, so the converter reorders each head's rows as
    [0, hd/2, 1, hd/2+1, ...]. Reading them back as [head, hd/2, 2] and swapping the last two
    axes restores [0, 1, ..., hd/2-1, hd/2, ...]. Biases (1-D) are permuted the same way, and
    GGML blocks as whole rows (the permutation is over output rows, a block lies within one).
    """
    if isinstance(tensor, GGMLRows):
        return replace(tensor, blocks=_unpermute_rope_rows(tensor.blocks, num_heads))
    rows = tensor.shape[0]  # [num_heads * head_dim, (hidden)]
    if rows % (2 * num_heads):
        raise GGUFError(f"cannot split {rows} Q/K rows into {num_heads} rotary heads")
    pairs = tensor.reshape(
        num_heads, rows // num_heads // 2, 2, *tensor.shape[1:]
    )  # [head, hd/2, 2, ...]
    return pairs.transpose(1, 2).reshape(tensor.shape).contiguous()
