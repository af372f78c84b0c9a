"""A Llama-style decoder layer as one C call on the CPU (strata/kernels/cpu_decoder.c), for steps
of up to MAX_FUSED_TOKENS tokens (decodes, small prompt chunks).

At decode the eager layer is a dozen module calls, each a few ops with their allocations and
parallel regions, around a few tens of microseconds of arithmetic per op; the fused layer runs
the same C pieces in one parallel region (threads meet at a barrier between stages), so its
output is bit-identical to the module path with strata's CPU kernels. It takes a layer when every
part has a form it knows: RMSNorms, q/k/v/o and gate/up/down linears held as GGUF segments (4-bit,
grouped int8, float32) or float32 weights, tensor parallel size 1, rotate-half RoPE (or none),
SiLU-and-multiply, no q/k norms; and a step when the hidden states are float32 on the CPU and the
KV cache is float32. Anything else runs the module path unchanged.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from strata.forward_context import get_attn_metadata
from strata.kernels import cpu_ops, use_triton

MAX_FUSED_TOKENS = 64     # decode batches; longer prompt chunks do better on the GEMM path
_MAX_SEGMENTS = 4         # as STRATA_MAX_SEGMENTS in cpu_decoder.c
_W4, _W8, _F32 = 1, 2, 3
_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Segment(ctypes.Structure):
    _fields_ = [("kind", _i64), ("n", _i64), ("group", _i64), ("q", _ptr), ("s", _ptr)]


class _Linear(ctypes.Structure):
    _fields_ = [("n", _i64), ("k", _i64), ("num_segments", _i64), ("seg", _Segment * _MAX_SEGMENTS),
                ("bias", _ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("intermediate", _i64), ("rot_dim", _i64), ("max_position", _i64), ("eps1", _f32),
                ("eps2", _f32), ("scale", _f32), ("norm1", _ptr), ("norm2", _ptr), ("cos_table", _ptr),
                ("sin_table", _ptr), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


class _Ends(ctypes.Structure):
    _fields_ = [("table", _Segment), ("input_ids", _ptr), ("final_norm", _ptr), ("final_eps", _f32)]


class _Step(ctypes.Structure):
    _fields_ = [("m", _i64), ("num_seqs", _i64), ("plane_stride", _i64), ("block_size", _i64),
                ("bt_stride", _i64), ("positions", _ptr), ("slot_mapping", _ptr), ("kv_cache", _ptr),
                ("block_tables", _ptr), ("seq_lens", _ptr), ("query_start_loc", _ptr)]


def fused_cpu_layer(layer, hidden: torch.Tensor) -> FusedDecoderLayer | None:
    """The fused form of ``layer`` (a LlamaDecoderLayer) if it takes this step, else None. Built
    on first use, once the weights are final; a layer it cannot take is remembered as such."""
    if hidden.dtype != torch.float32 or not _takes_step(hidden):
        return None
    fused = layer.__dict__.get("_cpu_fused")
    if fused is None:
        fused = layer.__dict__["_cpu_fused"] = FusedDecoderLayer.build(layer) or False
    if fused is False or not fused.takes_cache() or fused.hooked():
        return None
    return fused


class FusedDecoderLayer:
    def __init__(self, lib: ctypes.CDLL, desc: _Layer, keep: list[torch.Tensor], attn, modules: list):
        self.lib, self.desc, self.attn = lib, desc, attn
        self._hook_dicts = _hook_dicts(modules)   # of the layer and its submodules: their hooks must still run
        self._keep = keep        # the tensors desc points into
        self.hidden = desc.hidden
        self._workspace_floats: dict[tuple[int, int], int] = {}   # (tokens, threads) -> floats

    @classmethod
    def build(cls, layer) -> FusedDecoderLayer | None:
        lib = cpu_ops.library()
        if lib is None:
            return None
        try:
            return cls._describe(lib, layer)
        except _Unsupported:
            return None

    @classmethod
    def _describe(cls, lib, layer) -> FusedDecoderLayer:
        from strata.layers.activation import SiluAndMul
        from strata.layers.norm import RMSNorm
        from strata.layers.rotary import RotaryEmbedding
        sa, mlp = layer.self_attn, layer.mlp
        attn, rope = sa.attn, sa.attn.rotary_emb
        _require(getattr(sa, "q_norm", None) is None and isinstance(mlp.act, SiluAndMul))
        _require(all(type(n) is RMSNorm and n.weight.dtype == torch.float32 and n.weight.is_contiguous()
                     for n in (layer.input_layernorm, layer.post_attention_layernorm)))
        _require(rope is None or (type(rope) is RotaryEmbedding and rope.cos_cached.dtype == torch.float32))
        _require(attn.num_heads % attn.num_kv_heads == 0)
        keep: list[torch.Tensor] = []
        desc = _Layer(hidden=layer.input_layernorm.weight.shape[0], heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                      head_dim=attn.head_dim, intermediate=mlp.down_proj.in_features,
                      rot_dim=rope.rot_dim if rope else 0, max_position=rope.cos_cached.shape[0] if rope else 0,
                      eps1=layer.input_layernorm.eps, eps2=layer.post_attention_layernorm.eps, scale=attn.scale,
                      norm1=_ptr_of(layer.input_layernorm.weight, keep),
                      norm2=_ptr_of(layer.post_attention_layernorm.weight, keep),
                      cos_table=_ptr_of(rope.cos_cached, keep) if rope else None,
                      sin_table=_ptr_of(rope.sin_cached, keep) if rope else None)
        H, I = desc.hidden, desc.intermediate
        q_size, kv_size = desc.heads * desc.head_dim, desc.kv_heads * desc.head_dim
        for name, module, n, k in (("qkv", sa.qkv_proj, q_size + 2 * kv_size, H), ("o", sa.o_proj, H, q_size),
                                   ("gate_up", mlp.gate_up_proj, 2 * I, H), ("down", mlp.down_proj, H, I)):
            setattr(desc, name, _linear(module, n, k, keep))
        return cls(lib, desc, keep, attn, list(layer.modules()))

    def hooked(self) -> bool:
        """Whether a forward hook waits on one of the layer's modules (GPTQ calibration's input
        capture, say): the fused call would skip it, so the module path runs instead."""
        return _hooked(self._hook_dicts)

    def takes_cache(self) -> bool:
        cache = self.attn.kv_cache
        return (cache is not None and self.attn.kv_scales is None and cache.dtype == torch.float32
                and cache.is_contiguous() and not getattr(self.attn, "kv_on_host", False))

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        """(mlp output, new residual), as LlamaDecoderLayer.forward returns them."""
        meta = get_attn_metadata()
        step = _step_state(meta, positions, hidden.shape[0], self, self.lib)
        cache = self.attn.kv_cache
        step.desc.kv_cache, step.desc.plane_stride, step.desc.block_size = cache.data_ptr(), cache.stride(0), cache.shape[2]
        hidden = hidden if hidden.is_contiguous() else hidden.contiguous()
        out, new_residual = torch.empty_like(hidden), torch.empty_like(hidden)
        if residual is not None and not residual.is_contiguous():
            residual = residual.contiguous()
        # A workspace per call, freed with it: held for the step (or per micro-batch of an
        # offloaded step) it would add to the activations the offload policy counts.
        work = torch.empty(self._workspace_size(hidden.shape[0], step.threads))
        status = self.lib.strata_decoder_layer(
            ctypes.byref(self.desc), ctypes.byref(step.desc), hidden.data_ptr(),
            None if residual is None else residual.data_ptr(), new_residual.data_ptr(), out.data_ptr(),
            work.data_ptr(), step.threads)
        if status == 1:
            raise IndexError(f"a position is outside the rotary tables' {self.desc.max_position} positions")
        if status:
            raise MemoryError("fused decoder layer: no memory for the attention buffers")
        return out, new_residual

    def _workspace_size(self, m: int, threads: int) -> int:
        size = self._workspace_floats.get((m, threads))
        if size is None:
            size = self._workspace_floats[m, threads] = self.lib.strata_decoder_workspace(
                ctypes.byref(self.desc), m, threads)
        return size


class FusedDecoderStack:
    """Consecutive fused layers of one shape as one C call per step (strata_decoder_stack): one
    parallel region for the whole stack instead of a Python call and a parallel region per layer,
    during which the other threads of the region would wait."""

    def __init__(self, layers: list[FusedDecoderLayer]):
        self.layers, self.lib = layers, layers[0].lib
        self._hook_dicts = [d for f in layers for d in f._hook_dicts]
        self._descs = (ctypes.c_void_p * len(layers))(*[ctypes.addressof(f.desc) for f in layers])
        self._caches = (ctypes.c_void_p * len(layers))()
        self._checked_caches: list = []   # weak references to the caches _caches points into

    @classmethod
    def build(cls, layers: list) -> FusedDecoderStack | None:
        fused = []
        for layer in layers:
            f = layer.__dict__.get("_cpu_fused")
            if f is None:
                f = layer.__dict__["_cpu_fused"] = FusedDecoderLayer.build(layer) or False
            if f is False:
                return None
            fused.append(f)
        shape = [_shape(f.desc) for f in fused]
        return cls(fused) if fused and shape.count(shape[0]) == len(shape) else None

    def hooked(self) -> bool:
        return _hooked(self._hook_dicts)

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        """(hidden, residual) after every layer of the stack, or None where a layer's cache does
        not fit the stack (the caller then runs the layers one by one)."""
        step = self._step(positions, hidden.shape[0])
        if step is None:
            return None
        hidden = hidden.contiguous().clone()     # the stack writes its output over its input
        residual_out = torch.empty_like(hidden) if residual is None else residual.contiguous().clone()
        self._run(step, hidden, residual_out, residual is not None, None)
        return hidden, residual_out

    def run_model(self, ends: ModelEnds, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """A whole model's step, ids to final norm (see ModelEnds), or None as __call__."""
        m = input_ids.shape[0]
        step = self._step(positions, m)
        if step is None:
            return None
        ids = input_ids if input_ids.dtype == torch.int64 and input_ids.is_contiguous() else \
            input_ids.to(torch.int64).contiguous()
        ends.desc.input_ids = ids.data_ptr()
        hidden, residual = torch.empty(m, self.layers[0].hidden), torch.empty(m, self.layers[0].hidden)
        if self._run(step, hidden, residual, False, ends.desc) == 3:
            raise IndexError(f"a token id is outside the embedding's {ends.desc.table.n} rows")
        return hidden

    def _step(self, positions: torch.Tensor, m: int) -> _StepState | None:
        """The step descriptor with this stack's caches in it, or None where one does not fit."""
        caches = [f.attn.kv_cache for f in self.layers]
        checked = self._checked_caches
        if not (len(caches) == len(checked) and all(r() is c for r, c in zip(checked, caches))):
            # The caches change only when the runner allocates them: checked once per allocation.
            first = caches[0]
            if not all(f.takes_cache() for f in self.layers) or any(
                    c.stride(0) != first.stride(0) or c.shape[2] != first.shape[2] for c in caches):
                return None
            for i, c in enumerate(caches):
                self._caches[i] = c.data_ptr()
            self._checked_caches = [weakref.ref(c) for c in caches]
        step = _step_state(get_attn_metadata(), positions, m, self.layers[0], self.lib)
        first = caches[0]
        step.desc.kv_cache, step.desc.plane_stride, step.desc.block_size = None, first.stride(0), first.shape[2]
        return step

    def _run(self, step: _StepState, hidden: torch.Tensor, residual: torch.Tensor, has_residual: bool, ends) -> int:
        first = self.layers[0]
        work = torch.empty(first._workspace_size(hidden.shape[0], step.threads))
        status = self.lib.strata_decoder_stack(
            self._descs, len(self.layers), ctypes.byref(step.desc), self._caches, hidden.data_ptr(),
            residual.data_ptr(), has_residual, work.data_ptr(), step.threads,
            None if ends is None else ctypes.byref(ends))
        if status == 1:
            raise IndexError(f"a position is outside the rotary tables' {first.desc.max_position} positions")
        if status == 2:
            raise MemoryError("fused decoder stack: no memory for the attention buffers")
        return status


class ModelEnds:
    """What a whole-model step adds around the stack (strata_decoder_stack's ends): the token
    table the first hidden states are looked up in, and the final RMSNorm. Built once per model
    where the embedding and the norm have forms the C code knows (a float32, 4-bit or grouped
    int8 table at tensor parallel size 1; a float32 RMSNorm), so that a decode step runs no
    Python between the ids and the final hidden states: in a CPU step whose weights have pushed
    the interpreter's data out of the caches, the embedding lookup and the final norm cost ~130
    and ~150 us of Python each."""

    def __init__(self, desc: _Ends, keep: list, modules: list):
        self.desc, self._keep, self._hook_dicts = desc, keep, _hook_dicts(modules)

    @classmethod
    def build(cls, embedding, norm) -> ModelEnds | None:
        from strata.layers.embedding import VocabParallelEmbedding
        from strata.layers.norm import RMSNorm
        keep: list[torch.Tensor] = []
        try:
            _require(type(norm) is RMSNorm and norm.weight.dtype == torch.float32)
            _require(type(embedding) is VocabParallelEmbedding and embedding.tp_size == 1
                     and embedding.dtype == torch.float32)
            table = embedding.packed
            desc = _Ends(table=_segment(table or embedding, norm.weight.shape[0], keep, dense=table is None),
                         final_norm=_ptr_of(norm.weight, keep), final_eps=norm.eps)
        except _Unsupported:
            return None
        return cls(desc, keep, [*embedding.modules(), *norm.modules()])


def fused_cpu_stack(model, layers, positions: torch.Tensor, carry) -> tuple | None:
    """The carry after ``layers`` (a model's consecutive LlamaDecoderLayers) as one C call, or None
    where the step or a layer does not take the fused path (the layers then run one by one)."""
    hidden, residual = carry
    if not layers or hidden.dtype != torch.float32 or not _takes_step(hidden):
        return None
    stack = _stack(model, layers)
    return None if stack is None else stack(positions, hidden, residual)


def fused_cpu_model(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The final hidden states of a step through the whole model (``model.embed_tokens``, every
    layer of ``model.layers``, ``model.norm``) as one C call, or None where the step, a layer, the
    embedding or the norm does not take it (the model then runs its parts one by one)."""
    layers = model.layers
    if not layers or not _takes_step(input_ids):
        return None
    ends = model.__dict__.get("_cpu_model_ends")
    if ends is None:
        ends = model.__dict__["_cpu_model_ends"] = ModelEnds.build(model.embed_tokens, model.norm) or False
    stack = _stack(model, layers) if ends is not False else None
    if stack is None or _hooked(ends._hook_dicts):
        return None
    return stack.run_model(ends, input_ids, positions)


def _takes_step(x: torch.Tensor) -> bool:
    """Whether a step of these tokens (x: its ids or hidden states) runs in C: on the CPU, up to
    MAX_FUSED_TOKENS of them, and not on the Triton kernels (STRATA_FORCE_TRITON runs those under
    the interpreter)."""
    return x.device.type == "cpu" and x.shape[0] <= MAX_FUSED_TOKENS and not use_triton(x)


def _stack(model, layers) -> FusedDecoderStack | None:
    """The model's stack for these layers (built once), or None where it has none or a hook waits."""
    key = (id(layers[0]), len(layers))
    stacks = model.__dict__.setdefault("_cpu_fused_stacks", {})
    stack = stacks.get(key)
    if stack is None:
        stack = stacks[key] = FusedDecoderStack.build(list(layers)) or False
    return None if stack is False or stack.hooked() else stack


def _hook_dicts(modules) -> list:
    """The modules' forward (pre-)hook dicts. Registering a hook adds to them in place, so the
    list is made once: any() over it is one C loop per step, where a Python loop over ~400
    modules' attributes cost ~3% of a decode step."""
    return [d for m in modules for d in (m._forward_pre_hooks, m._forward_hooks)]


def _hooked(hook_dicts: list) -> bool:
    """Whether a forward hook waits, globally or in one of ``hook_dicts`` (_hook_dicts)."""
    from torch.nn.modules import module as nn_module
    return bool(nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks or any(hook_dicts))


def _shape(desc: _Layer) -> tuple:
    return (desc.hidden, desc.heads, desc.kv_heads, desc.head_dim, desc.intermediate, desc.rot_dim,
            desc.max_position, desc.qkv.n, desc.gate_up.n)


class _StepState:
    """What every fused layer of one step shares: the step descriptor."""

    def __init__(self, meta, positions: torch.Tensor, m: int, lib):
        self.lib = lib
        tables = meta.block_tables if meta.block_tables.is_contiguous() else meta.block_tables.contiguous()
        self.keep = [positions.contiguous(), meta.slot_mapping.contiguous(), tables, meta.seq_lens,
                     meta.query_start_loc]
        for t, dtype in zip(self.keep, (torch.int64, torch.int64, torch.int32, torch.int32, torch.int32)):
            if t.dtype != dtype:
                raise ValueError(f"fused decoder layer: step metadata must be {dtype}, got {t.dtype}")
        self.desc = _Step(m=m, num_seqs=meta.seq_lens.shape[0], bt_stride=tables.stride(0),
                          positions=self.keep[0].data_ptr(), slot_mapping=self.keep[1].data_ptr(),
                          block_tables=tables.data_ptr(), seq_lens=meta.seq_lens.data_ptr(),
                          query_start_loc=meta.query_start_loc.data_ptr())
        self.threads = torch.get_num_threads()


def _step_state(meta, positions, m: int, layer: FusedDecoderLayer, lib) -> _StepState:
    state = meta.__dict__.get("_cpu_fused_step")
    if state is None or state.desc.m != m:
        state = meta.__dict__["_cpu_fused_step"] = _StepState(meta, positions, m, lib)
    return state


class _Unsupported(Exception):
    pass


def _require(ok: bool) -> None:
    if not ok:
        raise _Unsupported


def _ptr_of(t: torch.Tensor, keep: list) -> int:
    _require(t.device.type == "cpu" and t.is_contiguous())
    keep.append(t)
    return t.data_ptr()


def _linear(module, n: int, k: int, keep: list) -> _Linear:
    """The segments of a linear layer's weight, rows stacked, as cpu_decoder.c reads them."""
    from strata.quant.base import UnquantizedLinearMethod
    from strata.quant.gguf import DenseSegment
    _require(getattr(module, "tp_size", 1) == 1 and module.out_features == n and module.in_features == k)
    bias = getattr(module, "bias", None)
    _require(bias is None or bias.dtype == torch.float32)
    if isinstance(module.quant_method, UnquantizedLinearMethod):
        segments = [module]
    else:
        segments = list(getattr(module, "gguf_segments", None) or [])
        _require(bool(segments))
    _require(len(segments) <= _MAX_SEGMENTS)
    desc = _Linear(n=n, k=k, num_segments=len(segments), bias=_ptr_of(bias, keep) if bias is not None else None)
    for i, seg in enumerate(segments):
        desc.seg[i] = _segment(seg, k, keep, dense=isinstance(seg, DenseSegment) or seg is module)
    _require(sum(desc.seg[i].n for i in range(len(segments))) == n)
    return desc


def _segment(seg, k: int, keep: list, dense: bool) -> _Segment:
    """Rows of W with k columns as cpu_decoder.c reads them: a packed 4-bit or grouped int8 segment
    on the CPU kernels, or (dense) a module whose float32 ``weight`` is W."""
    from strata.quant.gguf import Int4Segment, Int8Segment
    if isinstance(seg, Int4Segment) and not seg.on_triton:
        rows, q, s, group, kind = seg.qweight.shape[0], seg.qweight, seg.scale_min, 32, _W4
    elif isinstance(seg, Int8Segment) and not seg.on_triton:
        rows, q, s, kind = seg.qweight.shape[0], seg.qweight, seg.scales, _W8
        group = k // seg.scales.shape[1]
    elif dense:
        _require(seg.weight.dtype == torch.float32)
        rows, q, s, group, kind = seg.weight.shape[0], seg.weight, None, 0, _F32
    else:
        raise _Unsupported
    _require(q.shape[-1] * (2 if kind == _W4 else 1) == k)
    return _Segment(kind=kind, n=rows, group=group, q=_ptr_of(q, keep), s=_ptr_of(s, keep) if s is not None else None)
