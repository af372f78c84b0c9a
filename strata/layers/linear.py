"""Linear layers that know their tensor-parallel shard.

Column-parallel layers split output features across ranks, row-parallel ones split input
features and all-reduce the partial sums. Each parameter carries a ``weight_loader`` that takes
the full checkpoint tensor and copies in this rank's slice (into the right rows for fused
q/k/v and gate/up matrices). The matmul itself is delegated to a QuantMethod.

A quant method's parameters need not be [out, in] matrices: GPTQ stores its codes as
[in / 8, out] and its zero points as [groups, out / 8]. Such a parameter says where its features
lie through attributes (``set_weight_attrs``), read here when slicing shards:

* ``output_dim``: the dim along output features (default 0); None for a tensor every output
  shares (GPTQ's g_idx), which each part of a fused layer must then carry identically.
* ``output_pack``: output features per stored entry along it (default 1; 8 for packed 4-bit
  zero points), so fused offsets in features become offsets in entries.
* ``input_dim``: the dim along input features (default 1 for matrices, None for vectors).
"""

from __future__ import annotations

import torch
from torch import nn

from strata.distributed import parallel_state as ps
from strata.quant.base import QuantMethod, UnquantizedLinearMethod


def set_weight_attrs(param: nn.Parameter, **attrs) -> nn.Parameter:
    for key, value in attrs.items():
        setattr(param, key, value)
    return param


def _output_dim(param: nn.Parameter) -> int | None:
    return getattr(param, "output_dim", 0)


def _input_dim(param: nn.Parameter) -> int | None:
    return getattr(param, "input_dim", 1 if param.dim() >= 2 else None)


def _entries(features: int, param: nn.Parameter, layer: nn.Module) -> int:
    """Output features -> stored entries along the param's output dim."""
    pack = getattr(param, "output_pack", 1)
    if features % pack:
        raise ValueError(f"{type(layer).__name__}: a shard of {features} output features does not "
                         f"fill whole packed entries of {pack} features")
    return features // pack


def _check_divisible(value: int, tp_size: int, what: str) -> int:
    if value % tp_size:
        raise ValueError(f"{what} ({value}) is not divisible by tensor_parallel_size ({tp_size})")
    return value // tp_size


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant_method: QuantMethod | None):
        super().__init__()
        self.in_features = in_features     # this rank's share
        self.out_features = out_features
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features, dtype)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_checked(param.data, loaded, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, quant={self.quant_method.name}"


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, layer: nn.Module) -> None:
    if dst.is_meta:   # storage sized by the checkpoint (GGUF blocks): the method keeps the rows
        return layer.quant_method.load_rows(layer, dst, src)
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit "
                         f"{type(layer).__name__} parameter of shape {tuple(dst.shape)}")
    dst.copy_(src)


def _copy_shared(param: nn.Parameter, loaded: torch.Tensor, layer: nn.Module, shard_id) -> None:
    """A tensor without an output dim, given once per part of a fused layer: the parts must agree
    (GPTQ's q/k/v see the same inputs, so their act-order permutations are the same)."""
    seen = getattr(param, "loaded_parts", None)
    if seen and not torch.equal(param.data, loaded.to(param.dtype)):
        raise ValueError(f"{type(layer).__name__}: part {shard_id!r} of the fused layer carries a "
                         f"different {tuple(loaded.shape)} tensor than parts {sorted(map(str, seen))}; "
                         "strata needs them equal (one input permutation per fused matmul)")
    _copy_checked(param.data, loaded, layer)
    param.loaded_parts = (seen or set()) | {shard_id}


class ReplicatedLinear(LinearBase):
    """The same full matrix on every rank."""


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None,
                 gather_output: bool = False):
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.gather_output = gather_output
        super().__init__(in_features, _check_divisible(out_features, self.tp_size, "output size"),
                         bias, dtype, quant_method)

    def weight_loader(self, param, loaded, shard_id=None):
        dim = _output_dim(param)
        if dim is None:
            return _copy_shared(param, loaded, self, shard_id)
        shard = param.data.shape[dim]
        _copy_checked(param.data, loaded.narrow(dim, self.tp_rank * shard, shard), self)

    def forward(self, x):
        y = super().forward(x)
        return ps.tensor_model_parallel_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stored as one (gate and up: one matmul instead of two)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant_method)

    def weight_loader(self, param, loaded, shard_id=None):
        dim = _output_dim(param)
        if shard_id is None or dim is None:
            return super().weight_loader(param, loaded, shard_id)
        shard = _entries(self.output_sizes[shard_id] // self.tp_size, param, self)
        offset = _entries(sum(self.output_sizes[:shard_id]) // self.tp_size, param, self)
        _copy_checked(param.data.narrow(dim, offset, shard),
                      loaded.narrow(dim, self.tp_rank * shard, shard), self)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix. With fewer KV heads than ranks each KV head is
    replicated on the ranks that share it."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 quant_method: QuantMethod | None = None):
        tp_size = ps.get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _check_divisible(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _check_divisible(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _check_divisible(tp_size, num_kv_heads, "tensor_parallel_size vs KV heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, dtype, quant_method)

    def weight_loader(self, param, loaded, shard_id=None):
        dim = _output_dim(param)
        if shard_id is None or dim is None:
            return super().weight_loader(param, loaded, shard_id)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        offset, size = _entries(offset, param, self), _entries(size, param, self)
        shard_rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.kv_replicas
        _copy_checked(param.data.narrow(dim, offset, size), loaded.narrow(dim, shard_rank * size, size), self)


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_method: QuantMethod | None = None,
                 reduce_results: bool = True):
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.reduce_results = reduce_results
        # Without its own all-reduce, whether the result goes straight into the fused all-reduce +
        # RMSNorm (the model says; not, say, a pipeline stage's last layer): the GEMV may then
        # send its share to the peers as it computes it.
        self.feeds_fused_norm = not reduce_results
        self.shards_input = self.tp_size > 1   # quantizers read whole rows through a collective
        super().__init__(_check_divisible(in_features, self.tp_size, "input size"), out_features,
                         bias, dtype, quant_method)

    def weight_loader(self, param, loaded, shard_id=None):
        dim = _input_dim(param)
        if dim is None:   # the bias is added once, after the reduction
            return _copy_checked(param.data, loaded, self)
        shard = param.data.shape[dim]
        _copy_checked(param.data, loaded.narrow(dim, self.tp_rank * shard, shard), self)

    def forward(self, x):
        if self.feeds_fused_norm and self.bias is None:
            push = ps.share_push_target(x, self.out_features)
            y = self.quant_method.apply_pushing(self, x, push) if push is not None else None
            if y is not None:
                return ps.share_sent(y)
        y = self.quant_method.apply(self, x, None)
        y = ps.tensor_model_parallel_all_reduce(y) if self.reduce_results else y
        return y + self.bias if self.bias is not None else y
