"""The GGML tensor types, described once (the way llama.cpp's ggml-common.h does).

Each type is a block of `block_size` elements stored in `type_size` bytes. For the types strata
can dequantize, `fields` spells out the block struct in file order so the dequantizers slice
columns by name instead of by magic offsets; the byte sizes are checked at import time the way
ggml-common.h uses static_assert. Plain scalar types are blocks of one element.
"""

from dataclasses import dataclass

QK_K = 256  # elements per super-block of the k-quants
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K


@dataclass(frozen=True)
class GGMLType:
    name: str
    type_id: int  # the enum value stored in GGUF tensor infos
    block_size: int  # elements per block
    type_size: int  # bytes per block
    # (field name, bytes) in struct order; empty where strata does not read the block itself
    fields: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.fields and sum(size for _, size in self.fields) != self.type_size:
            raise AssertionError(f"{self.name}: fields add up to the wrong block size")

    def field_range(self, field: str) -> tuple[int, int]:
        """Byte range [start, end) of one field inside a block."""
        start = 0
        for name, size in self.fields:
            if name == field:
                return start, start + size
            start += size
        raise KeyError(f"{self.name} has no field {field!r}")

    def nbytes(self, num_elements: int) -> int:
        """Bytes taken by `num_elements` values; callers check divisibility first."""
        return num_elements // self.block_size * self.type_size

    def __str__(self) -> str:
        return self.name


def _scalar(name: str, type_id: int, nbytes: int) -> GGMLType:
    return GGMLType(name, type_id, 1, nbytes, (("value", nbytes),))


F32 = _scalar("F32", 0, 4)
F16 = _scalar("F16", 1, 2)
Q4_0 = GGMLType("Q4_0", 2, 32, 18, (("d", 2), ("qs", 16)))
Q4_1 = GGMLType("Q4_1", 3, 32, 20, (("d", 2), ("m", 2), ("qs", 16)))
# ids 4 and 5 were Q4_2 / Q4_3, removed from ggml before GGUF existed
Q5_0 = GGMLType("Q5_0", 6, 32, 22, (("d", 2), ("qh", 4), ("qs", 16)))
Q5_1 = GGMLType("Q5_1", 7, 32, 24, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)))
Q8_0 = GGMLType("Q8_0", 8, 32, 34, (("d", 2), ("qs", 32)))
# ggml-common.h's block_q8_1 is two halves + 32 int8 = 36 bytes (gguf-py still says 40); it is an
# activation type for dot products and never appears in model files
Q8_1 = GGMLType("Q8_1", 9, 32, 36, (("d", 2), ("s", 2), ("qs", 32)))
Q2_K = GGMLType("Q2_K", 10, QK_K, 84, (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)))
Q3_K = GGMLType("Q3_K", 11, QK_K, 110, (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)))
Q4_K = GGMLType(
    "Q4_K", 12, QK_K, 144, (("d", 2), ("dmin", 2), ("scales", K_SCALE_SIZE), ("qs", 128))
)
Q5_K = GGMLType(
    "Q5_K",
    13,
    QK_K,
    176,
    (("d", 2), ("dmin", 2), ("scales", K_SCALE_SIZE), ("qh", 32), ("qs", 128)),
)
Q6_K = GGMLType("Q6_K", 14, QK_K, 210, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)))
Q8_K = GGMLType("Q8_K", 15, QK_K, 292, (("d", 4), ("qs", 256), ("bsums", 32)))
IQ2_XXS = GGMLType("IQ2_XXS", 16, QK_K, 2 + QK_K // 4)
IQ2_XS = GGMLType("IQ2_XS", 17, QK_K, 2 + QK_K // 4 + QK_K // 32)
IQ3_XXS = GGMLType("IQ3_XXS", 18, QK_K, 2 + QK_K // 4 + QK_K // 8)
IQ1_S = GGMLType("IQ1_S", 19, QK_K, 2 + QK_K // 8 + QK_K // 16)
IQ4_NL = GGMLType("IQ4_NL", 20, 32, 2 + 16)
IQ3_S = GGMLType("IQ3_S", 21, QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4)
IQ2_S = GGMLType("IQ2_S", 22, QK_K, 2 + QK_K // 4 + QK_K // 16)
IQ4_XS = GGMLType("IQ4_XS", 23, QK_K, 2 + 2 + QK_K // 2 + QK_K // 64)
I8 = _scalar("I8", 24, 1)
I16 = _scalar("I16", 25, 2)
I32 = _scalar("I32", 26, 4)
I64 = _scalar("I64", 27, 8)
F64 = _scalar("F64", 28, 8)
IQ1_M = GGMLType("IQ1_M", 29, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32)
BF16 = _scalar("BF16", 30, 2)
# ids 31-33 (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) and 36-38 (IQ4_NL_4_4 ...) were repacked layouts,
# removed from the file format
TQ1_0 = GGMLType("TQ1_0", 34, QK_K, 2 + 4 * 13)
TQ2_0 = GGMLType("TQ2_0", 35, QK_K, 2 + 64)
MXFP4 = GGMLType("MXFP4", 39, 32, 1 + 16)
NVFP4 = GGMLType("NVFP4", 40, 64, 4 + 32)
Q1_0 = GGMLType("Q1_0", 41, 128, 2 + 16)

ALL_TYPES: tuple[GGMLType, ...] = (
    F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
    IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS,
    I8, I16, I32, I64, F64, IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0,
)  # fmt: skip
BY_ID: dict[int, GGMLType] = {t.type_id: t for t in ALL_TYPES}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in ALL_TYPES}

# The types strata's dequantizers (quant/ggml_dequant.py) read.
SUPPORTED: frozenset[GGMLType] = frozenset({F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K})

# Sizes from ggml-common.h, checked like its static_asserts.
assert len(BY_ID) == len(ALL_TYPES) and len(BY_NAME) == len(ALL_TYPES)
assert (Q4_0.type_size, Q4_1.type_size, Q5_0.type_size, Q5_1.type_size) == (18, 20, 22, 24)
assert Q8_0.type_size == 34 and Q8_1.type_size == 36 and Q8_K.type_size == 292
assert (Q2_K.type_size, Q3_K.type_size, Q4_K.type_size) == (84, 110, 144)
assert (Q5_K.type_size, Q6_K.type_size) == (176, 210)


def type_by_id(type_id: int) -> GGMLType:
    """The GGMLType for a GGUF type id; KeyError names the id when it is not a GGML type."""
    try:
        return BY_ID[type_id]
    except KeyError:
        raise KeyError(f"unknown GGML tensor type id {type_id}") from None


def supported_names() -> str:
    """Comma-separated names of SUPPORTED, in id order, for error messages."""
    return ", ".join(t.name for t in sorted(SUPPORTED, key=lambda t: t.type_id))
