"""GPTQ checkpoints in the Hugging Face layout (AutoGPTQ, GPTQModel, optimum), 4 and 8 bits,
read into strata's own int4 / int8 forms exactly.

Layout of one linear of K inputs and N outputs, groups of G inputs (G = K when group_size is -1):

* ``qweight`` [K * bits / 32, N] int32: codes packed along the input, code k of column n in word
  k // (32 / bits), bits (k % (32 / bits)) * bits and up. The output is dim 1, not 0.
* ``qzeros`` [K / G, N * bits / 32] int32: zero points packed the same way along the output.
* ``scales`` [K / G, N] float16.
* ``g_idx`` [K] int32: the group of each input feature (act-order puts them out of order).

Value of a code: ``(q - zero) * scale`` with ``zero = stored + 1`` for ``checkpoint_format``
"gptq" (AutoGPTQ's packer subtracts 1 from every zero point before packing and its kernels add it
back; a symmetric 4-bit checkpoint stores 7 = 0x77777777 per word and means 8), ``zero = stored``
for "gptq_v2" (GPTQModel's internal format).

At load: 4-bit becomes strata's int4 (scale = s, min = -zero * s, exact in float32 since both are
small integers times a float16) in groups of 128/64/32 that tile GPTQ's groups; 8-bit becomes
int8 codes q - 128 with scale s (per channel and symmetric: strata's int8 kernel as is) or, with
groups or zero points, int8.Int8GroupedLinearMethod with offsets (128 - zero) * s.

Act-order (g_idx not sorted): the input features are permuted at load by argsort(g_idx), which
makes every group contiguous, and x is permuted the same way at run time (``x[..., perm]``): one
gather of the activations per linear, M x K elements read and written, next to the N x K / 2
bytes of weights the matmul streams (for decode, M = 1: about 2 / N of the weight traffic).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from strata.layers.linear import set_weight_attrs
from strata.quant.base import QuantMethod
from strata.quant.int4 import Int4LinearMethod, padded_size
from strata.quant.int8 import Int8GroupedLinearMethod, Int8LinearMethod

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_INT4_GROUPS = (128, 64, 32)   # strata's int4 groups, largest first


def _field(name: str) -> str:
    return f"quantization_config.{name}"


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int            # -1: one group per output channel
    desc_act: bool             # act-order; g_idx says what it did, this is for the startup line
    zero_offset: int           # added to stored zero points: 1 for "gptq", 0 for "gptq_v2"

    @staticmethod
    def from_dict(spec: dict) -> "GPTQConfig":
        bits = spec.get("bits")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{_field('bits')} = {bits!r} is not supported for GPTQ checkpoints; "
                             f"supported: {', '.join(map(str, SUPPORTED_BITS))}")
        group = spec.get("group_size", -1)
        if not isinstance(group, int) or not (group == -1 or (group > 0 and group % 32 == 0)):
            raise ValueError(f"{_field('group_size')} = {group!r} is not supported; supported: -1 "
                             "(per channel) or a positive multiple of 32")
        fmt = spec.get("checkpoint_format", spec.get("format", "gptq"))
        if spec.get("is_marlin_format"):
            fmt = "marlin"
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"{_field('checkpoint_format')} = {fmt!r} is not supported; "
                             f"supported: {', '.join(CHECKPOINT_FORMATS)}")
        if spec.get("lm_head"):
            raise ValueError(f"{_field('lm_head')} = true (a quantized output head) is not supported; "
                             "supported: false")
        if spec.get("dynamic"):
            raise ValueError(f"{_field('dynamic')} (per-module bits and groups) is not supported; "
                             "supported: one setting for every layer")
        return GPTQConfig(bits, group, bool(spec.get("desc_act", False)), 1 if fmt == "gptq" else 0)

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"groups of {self.group_size}"
        return f"gptq {self.bits}-bit, {group}{', act-order' if self.desc_act else ''}"


def read_checkpoint_spec(model_dir: Path, hf_config: dict) -> dict | None:
    """The checkpoint's quantization settings: config.json's quantization_config, else the older
    quantize_config.json beside it (AutoGPTQ wrote only that file, without a quant_method)."""
    spec = hf_config.get("quantization_config")
    if spec:
        return dict(spec)
    path = model_dir / "quantize_config.json"
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return {"quant_method": "gptq", **spec}


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words of 32 / bits codes each (first code in the lowest bits), packed along dim 0
    or 1 -> the codes as int32, that dim 32 / bits times longer."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:
        codes = (packed[:, None, :] >> shifts[None, :, None]) & mask     # [rows, pack, cols]
        return codes.reshape(-1, packed.shape[1])
    codes = (packed[:, :, None] >> shifts) & mask                          # [rows, cols, pack]
    return codes.reshape(packed.shape[0], -1)


def act_order_permutation(g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """None when g_idx is already in order; else the permutation of the inputs that makes each
    group's features contiguous. Raises unless that leaves exactly ``group`` features per group."""
    k = g_idx.numel()
    in_order = torch.arange(k, device=g_idx.device) // group
    if torch.equal(g_idx.long(), in_order):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], in_order):
        raise ValueError(f"GPTQ g_idx does not give each group {group} input features (K = {k}); "
                         "strata needs act-order groups of equal size")
    return perm


class GPTQLinearMethod(QuantMethod):
    name = "gptq"

    def __init__(self, config: GPTQConfig, reference: bool = False):
        self.config = config
        self.reference = reference
        self.pack = 32 // config.bits

    def group_for(self, in_features: int) -> int:
        return in_features if self.config.group_size == -1 else self.config.group_size

    def create_weights(self, layer, in_features, out_features, dtype):
        for what, size in (("input", in_features), ("output", out_features)):
            if size % self.pack:
                raise ValueError(f"GPTQ {self.config.bits}-bit packs {self.pack} codes per int32: "
                                 f"{what} size {size} of {type(layer).__name__} is not a multiple")
        group = self.group_for(in_features)
        groups = -(-in_features // group)
        per_channel = self.config.group_size == -1   # one row of scales, shared by input shards
        empty = lambda *shape, dtype=torch.int32: nn.Parameter(torch.empty(*shape, dtype=dtype),
                                                               requires_grad=False)
        layer.qweight = set_weight_attrs(empty(in_features // self.pack, out_features),
                                         output_dim=1, input_dim=0)
        layer.qzeros = set_weight_attrs(empty(groups, out_features // self.pack), output_dim=1,
                                        output_pack=self.pack, input_dim=None if per_channel else 0)
        # float32 holds float16 and bfloat16 scales exactly; freed after loading.
        layer.scales = set_weight_attrs(empty(groups, out_features, dtype=torch.float32),
                                        output_dim=1, input_dim=None if per_channel else 0)
        g_idx = nn.Parameter(torch.arange(in_features, dtype=torch.int32) // group, requires_grad=False)
        layer.g_idx = set_weight_attrs(g_idx, output_dim=None, input_dim=0, optional_in_checkpoint=True)
        layer.params_dtype = dtype

    def process_after_loading(self, layer: nn.Module) -> None:
        bits, k = self.config.bits, layer.in_features
        group = self.group_for(k)
        codes = unpack_int32(layer.qweight.data, bits, dim=0)                      # [K, N]
        zeros = unpack_int32(layer.qzeros.data, bits, dim=1) + self.config.zero_offset   # [groups, N]
        scales = layer.scales.data.float()                                          # [groups, N]
        g_idx = layer.g_idx.data
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
            raise ValueError(f"GPTQ g_idx of {type(layer).__name__} names groups outside 0..{scales.shape[0] - 1} "
                             "(act-order checkpoints cannot be split across tensor-parallel ranks)")
        perm = act_order_permutation(g_idx, group)
        if perm is not None:
            codes = codes[perm]
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)
        layer.register_buffer("input_perm", perm)
        codes = codes.t()                                                           # [N, K]
        if bits == 4:
            layer.packed_method = self._store_int4(layer, codes, zeros, scales, group)
        else:
            layer.packed_method = self._store_int8(layer, codes, zeros, scales, group)

    def _store_int4(self, layer, codes, zeros, scales, group) -> QuantMethod:
        k = layer.in_features
        sub = 128 if group == k else next(g for g in _INT4_GROUPS if group % g == 0)
        padded = padded_size(k, sub)
        # GPTQ group of each strata group: strata groups tile GPTQ's (sub divides G, or G = K).
        owner = (torch.arange(padded // sub, device=codes.device) * sub) // group
        s, z = scales[owner].t().contiguous(), zeros[owner].t().float()             # [N, Kp/sub]
        codes = nn.functional.pad(codes, (0, padded - k)).to(torch.uint8)
        method = Int4LinearMethod(sub, reference=self.reference)
        method.store(layer, codes, s, -z * s, layer.params_dtype)
        return method

    def _store_int8(self, layer, codes, zeros, scales, group) -> QuantMethod:
        k = layer.in_features
        signed = (codes - 128).to(torch.int8)
        offsets = ((128 - zeros).float() * scales).t().contiguous()                # [N, groups]
        if scales.shape[0] == 1 and not offsets.any():
            method = Int8LinearMethod(reference=self.reference)
            method.store(layer, signed.contiguous(), scales[0].contiguous(), layer.params_dtype)
            return method
        padded = padded_size(k, group)
        signed = nn.functional.pad(signed, (0, padded - k))
        method = Int8GroupedLinearMethod(group, reference=self.reference)
        method.store(layer, signed, scales.t().contiguous(), offsets if offsets.any() else None,
                     layer.params_dtype)
        return method

    def apply(self, layer, x, bias):
        if layer.input_perm is not None:
            x = x[..., layer.input_perm]
        return layer.packed_method.apply(layer, x, bias)
