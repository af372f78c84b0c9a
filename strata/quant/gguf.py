"""GGUF weights kept quantized: the linear layers of a model loaded from a .gguf file receive
their rows as raw GGML blocks and repack them, exactly, into a form a kernel computes on.

Packed forms (values as in ggml_codes.py; nothing is rounded again):

* 4-bit codes in groups of 32 with a scale and a min (Q4_0, Q4_1, Q4_K): on the CPU strata's
  C matmul (kernels/cpu_quant.py), on CUDA the Triton W4A16 kernel (kernels/quant_matmul.py).
* int8 codes with a scale per group of 16 or 32 (Q8_0, Q6_K): the C matmul on the CPU, the
  grouped W8A16 Triton kernel on CUDA.

Any other type (Q5_K, and float weights) is dequantized at load, with one log line per type, and
so is everything on a CPU where the C kernels could not be built. A fused layer (q/k/v, gate/up)
may get rows of different types: consecutive rows of one packed form make one segment, and the
layer concatenates its segments' outputs. ``keep_vocab_packed`` does the same for the token
embedding and the LM head once the model is loaded.

The reference path (``STRATA_QUANT_REFERENCE=1``) does not use this method: the loader then
dequantizes every tensor, which is what the packed path is tested against.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import nn

from strata.kernels import cpu_quant, use_triton
from strata.quant.base import QuantMethod, UnquantizedLinearMethod
from strata.quant.ggml_codes import GroupedCodes, unpack_codes
from strata.quant.ggml_dequant import dequantize
from strata.quant.ggml_formats import GGMLType

logger = logging.getLogger("strata")

_INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
_INT8_TYPES = frozenset({"Q8_0", "Q6_K"})


@dataclass(frozen=True)
class GGMLRows:
    """Rows of a GGUF weight still in GGML blocks, as the loader hands them to a linear layer.
    ``narrow`` takes logical rows and columns, so the layers' tensor-parallel sharding applies
    unchanged (columns only on block boundaries)."""

    blocks: torch.Tensor        # [rows, row_bytes] uint8, possibly a view of the memory map
    ggml_type: GGMLType
    shape: tuple[int, int]      # [rows, columns] of the weight it encodes

    def narrow(self, dim: int, start: int, length: int) -> GGMLRows:
        if dim == 0:
            return replace(self, blocks=self.blocks.narrow(0, start, length), shape=(length, self.shape[1]))
        size, nbytes = self.ggml_type.block_size, self.ggml_type.type_size
        if dim != 1 or start % size or length % size:
            raise ValueError(f"cannot take columns {start}..{start + length} of {self.ggml_type.name} rows: "
                             f"GGUF blocks hold {size} columns each, so a split must fall on a multiple of "
                             f"{size} (e.g. a tensor-parallel split of {self.shape[1]} inputs)")
        return replace(self, blocks=self.blocks.narrow(1, start // size * nbytes, length // size * nbytes),
                       shape=(self.shape[0], length))


class GGUFLinearMethod(QuantMethod):
    """One instance per model: it also counts what it kept packed, for the startup line."""

    name = "gguf"

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()   # (type, "packed" | "dequantized")
        self._noticed: set[str] = set()

    def create_weights(self, layer, in_features, out_features, dtype):
        # A placeholder of the weight's shape on the meta device: no memory, but the layers'
        # weight loaders narrow it as they would a float weight, and hand the view with the rows
        # to load_rows (linear._copy_checked), whose storage offset says where they go.
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.uint8, device="meta"),
                              requires_grad=False)
        layer.register_parameter("weight", weight)
        layer.gguf_pieces = []           # [(first row, GGMLRows | float tensor)]
        layer.gguf_dtype = dtype
        layer.gguf_device = torch.get_default_device()   # where the model is being built

    def load_rows(self, layer: nn.Module, dst: torch.Tensor, rows) -> None:
        """Keep ``rows`` (GGMLRows, or a float tensor for float GGUF types) for the rows of the
        placeholder that ``dst`` views."""
        k = layer.in_features
        first_row, column = divmod(dst.storage_offset(), k)
        if tuple(rows.shape) != tuple(dst.shape) or column or dst.shape[1] != k:
            raise ValueError(f"checkpoint rows of shape {tuple(rows.shape)} do not fit rows {first_row}.."
                             f"{first_row + dst.shape[0]} of {type(layer).__name__}'s "
                             f"{layer.out_features} x {k} weight")
        layer.gguf_pieces.append((first_row, rows))

    def process_after_loading(self, layer: nn.Module) -> None:
        pieces = sorted(layer.gguf_pieces, key=lambda p: p[0])
        _check_rows_covered(layer, pieces)
        device = layer.gguf_device
        on_triton = use_triton(torch.empty(0, device=device))   # CUDA, or forced for the tests
        runs: list[tuple[str, list]] = []            # consecutive pieces of one packed form
        for _, rows in pieces:
            form = self._form(rows, device, on_triton)
            if runs and runs[-1][0] == form:
                runs[-1][1].append(rows)
            else:
                runs.append((form, [rows]))
        del layer.weight, layer.gguf_pieces
        layer.gguf_segments = nn.ModuleList(_segment(form, rows, layer.gguf_dtype, device, on_triton)
                                            for form, rows in runs)

    def apply(self, layer, x, bias):
        segments = layer.gguf_segments
        y = segments[0](x) if len(segments) == 1 else torch.cat([s(x) for s in segments], dim=-1)
        return y + bias if bias is not None else y

    def summary(self) -> str:
        """For the startup line, e.g. 'gguf Q4_1 x210 kept packed' (counts of checkpoint tensors)."""
        parts = []
        for state in ("packed", "dequantized"):
            types = sorted(t for t, s in self.counts if s == state)
            if types:
                listed = ", ".join(f"{t} x{self.counts[t, state]}" for t in types)
                parts.append(f"{listed} {'kept packed' if state == 'packed' else 'dequantized at load'}")
        return "gguf " + "; ".join(parts) if parts else "gguf: no quantized linear weights"

    def _form(self, rows, device: torch.device, on_triton: bool) -> str:
        if isinstance(rows, torch.Tensor):           # a float GGUF tensor, dequantized by the loader
            return "dense"
        name = rows.ggml_type.name
        form = packed_form(name, device, on_triton) or "dense"
        if form == "dense" and name not in self._noticed:
            self._noticed.add(name)
            logger.info(f"strata: GGUF {name} linear weights are dequantized at load "
                        f"({_why_dense(name, device)})")
        self.counts[name, "dequantized" if form == "dense" else "packed"] += 1
        return form



class DenseSegment(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)        # [n, K]

    def forward(self, x):
        return UnquantizedLinearMethod().apply(self, x, None)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


class Int4Segment(nn.Module):
    """4-bit codes, groups of 32: w = q * scale + min."""

    def __init__(self, gc: GroupedCodes, device: torch.device, on_triton: bool):
        super().__init__()
        self.on_triton = on_triton
        if on_triton:
            from strata.kernels.quant_matmul import pack_int4
            self.qweight = nn.Parameter(pack_int4(gc.codes).to(device), requires_grad=False)   # [n, K/2]
            self.scales = nn.Parameter(gc.scales.to(device), requires_grad=False)            # [n, K/32]
            self.mins = nn.Parameter(gc.mins.to(device), requires_grad=False)
            return
        self.lib = cpu_quant.library()
        self.qweight = nn.Parameter(cpu_quant.pack_w4(gc.codes), requires_grad=False)          # [n, K/2]
        self.scale_min = nn.Parameter(torch.stack([gc.scales, gc.mins], dim=-1).contiguous(),
                                      requires_grad=False)                                     # [n, K/32, 2]
        cpu_quant.check_w4(self.qweight, self.scale_min)   # once: forward skips the checks

    def forward(self, x):
        if self.on_triton:
            from strata.kernels.quant_matmul import w4a16_matmul
            return w4a16_matmul(x, self.qweight, self.scales, self.mins, 32)
        return cpu_quant.w4_matmul(x, self.qweight, self.scale_min, self.lib, check=False)

    def dequantize(self) -> torch.Tensor:
        return self.rows(slice(None))

    def rows(self, ids) -> torch.Tensor:
        """Rows ``ids`` of W in float32 (an embedding lookup)."""
        if self.on_triton:
            from strata.kernels.quant_matmul import dequantize_int4
            return dequantize_int4(self.qweight[ids], self.scales[ids], self.mins[ids], 32)
        return cpu_quant.w4_dequantize(self.qweight[ids], self.scale_min[ids], self.lib)


class Int8Segment(nn.Module):
    """int8 codes, a scale per group of 16 or 32: w = q * scale. On CUDA the grouped W8A16 Triton
    kernel (strata.kernels.w8_grouped_matmul), on the CPU strata's C matmul."""

    def __init__(self, gc: GroupedCodes, device: torch.device | None = None, on_triton: bool = False):
        super().__init__()
        self.on_triton = on_triton
        self.group = gc.group
        if on_triton:
            self.qweight = nn.Parameter(gc.codes.to(device).contiguous(), requires_grad=False)        # [n, K] int8
            self.scales = nn.Parameter(gc.scales.to(device, torch.float32).contiguous(), requires_grad=False)
            return
        self.lib = cpu_quant.library()
        self.qweight = nn.Parameter(gc.codes.contiguous(), requires_grad=False)    # [n, K] int8
        self.scales = nn.Parameter(gc.scales.contiguous(), requires_grad=False)    # [n, K/group]
        cpu_quant.check_w8(self.qweight, self.scales)

    def forward(self, x):
        if self.on_triton:
            from strata.kernels.w8_grouped_matmul import w8g_matmul
            return w8g_matmul(x, self.qweight, self.scales, None, self.group)
        return cpu_quant.w8_matmul(x, self.qweight, self.scales, self.lib, check=False)

    def dequantize(self) -> torch.Tensor:
        return self.rows(slice(None))

    def rows(self, ids) -> torch.Tensor:
        if self.on_triton:
            from strata.kernels.w8_grouped_matmul import dequantize_w8g
            return dequantize_w8g(self.qweight[ids], self.scales[ids], None, self.group)
        return cpu_quant.w8_dequantize(self.qweight[ids], self.scales[ids], self.lib)


def _check_rows_covered(layer: nn.Module, pieces: list) -> None:
    expected = 0
    for first, rows in pieces:
        if first != expected:
            raise ValueError(f"{type(layer).__name__}: checkpoint rows {expected}..{first} of "
                             f"{layer.out_features} are {'missing' if first > expected else 'loaded twice'}")
        expected = first + rows.shape[0]
    if expected != layer.out_features:
        raise ValueError(f"{type(layer).__name__}: checkpoint rows {expected}..{layer.out_features} are missing")


def packed_form(type_name: str, device: torch.device, on_triton: bool) -> str | None:
    """'int4' or 'int8' where a kernel computes the type on this device, else None. Without
    strata's C kernels the CPU keeps float weights: torch's tiled stand-in for them is ~15x
    slower than F.linear at decode."""
    cpu = device.type == "cpu" and cpu_quant.library() is not None
    if type_name in _INT4_TYPES and (cpu or on_triton):
        return "int4"
    if type_name in _INT8_TYPES and (cpu or on_triton):
        return "int8"
    return None


def _why_dense(type_name: str, device: torch.device) -> str:
    if type_name not in _INT4_TYPES | _INT8_TYPES:
        return f"no packed kernel for this type on {device.type}"
    if device.type == "cpu":
        return "strata's CPU kernels could not be built: is there a C compiler?"
    return f"Triton, which runs the packed kernels, is not available on {device.type}"


def keep_vocab_packed(model: nn.Module, gguf_file) -> str:
    """Swap the float token embedding (and LM head) of a model loaded from ``gguf_file`` for
    their GGUF rows kept packed, where the type has a packed form here: a lookup dequantizes only
    the rows it reads, and a tied LM head multiplies by the same codes. Returns what was done,
    for the startup line."""
    embedding, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    if embedding is None or head is None or embedding.tp_size != 1:
        return "token embedding dequantized"
    tied = head.weight is embedding.weight
    done = [_keep_table_packed(embedding, gguf_file, "token_embd.weight", "token embedding")]
    if tied:
        if embedding.packed is not None:
            head.use_packed(embedding.packed)
        done.append("the LM head tied to it")
    elif "output.weight" in gguf_file.tensors:
        done.append(_keep_table_packed(head, gguf_file, "output.weight", "LM head"))
    return ", ".join(done)


def _keep_table_packed(module: nn.Module, gguf_file, name: str, what: str) -> str:
    rows = gguf_file.raw_rows(name)
    device, dtype = module.weight.device, module.weight.dtype
    on_triton = use_triton(torch.empty(0, device=device))   # CUDA, or forced for the tests
    form = packed_form(rows.ggml_type.name, device, on_triton)
    if form is None or tuple(rows.shape) != tuple(module.weight.shape):
        return f"{what} {rows.ggml_type.name} dequantized"
    module.use_packed(_segment(form, [rows], dtype, device, on_triton))
    return f"{what} {rows.ggml_type.name} kept packed"


def _segment(form: str, pieces: list, dtype: torch.dtype, device: torch.device, on_triton: bool
             ) -> nn.Module:
    if form == "dense":
        weight = torch.cat([p if isinstance(p, torch.Tensor) else _dequantize_rows(p) for p in pieces])
        return DenseSegment(weight.to(device, dtype))
    codes = _concat([unpack_codes(p.blocks, p.ggml_type) for p in pieces])
    if form == "int4":
        return Int4Segment(codes, device, on_triton)
    return Int8Segment(codes, device, on_triton)


def _dequantize_rows(rows: GGMLRows) -> torch.Tensor:
    n, k = rows.shape
    return dequantize(rows.blocks.contiguous(), rows.ggml_type, n * k).view(n, k)


def _concat(parts: list[GroupedCodes]) -> GroupedCodes:
    """Stack the rows of several tensors' codes. int8 groups of 32 and 16 mix exactly: a scale per
    32 is the same scale for both halves."""
    if len(parts) == 1:
        return parts[0]
    group = min(p.group for p in parts)
    scales = [p.scales.repeat_interleave(p.group // group, dim=1) for p in parts]
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return GroupedCodes(torch.cat([p.codes for p in parts]), torch.cat(scales), mins, group, parts[0].bits)
