"""Calibrated quantization: GPTQ over a whole model, layer by layer (``strata quantize
--calibrate``).

strata's own model runs the calibration text (strata.evaluation.calibration_text: stdlib
docstrings, disjoint from the perplexity text) through the same embed / layer_forward / finish
split the layer loop uses. For each decoder layer in turn:

1. its inputs (the outputs of the layers before it, *already quantized*: the paper's sequential
   rule, so each layer compensates the error of the ones before) run through it up to its first
   linear while a hook sums that linear's input Hessian X^T X;
2. that linear is quantized by GPTQ (strata.quant.gptq_solver) and its float weight replaced by
   the quantized values, exactly what the written checkpoint will compute; then the next
   linear's Hessian is summed the same way, with the ones before it quantized, and so on;
3. the inputs run through the quantized layer once more and become the next layer's inputs.

Fused linears (q/k/v, gate/up) share their input, hence their Hessian, and GPTQ treats output
rows independently, so quantizing the fused matrix equals quantizing each part on its own; the
export slices the rows back into the checkpoint's tensors.

Attention runs on the CPU reference path with a scratch KV cache per chunk of calibration
windows (one cache block per window), bound to the layer only while it computes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from strata.quant.gptq_solver import QuantizedWeight, gptq_quantize


@dataclass(frozen=True)
class CalibrationConfig:
    num_tokens: int = 2048      # calibration tokens (whole windows of seq_len): measured best
    seq_len: int = 512          # tokens per window, each an independent sequence
    act_order: bool = True      # quantize columns by decreasing Hessian diagonal
    damp: float = 0.01          # added to the Hessian diagonal, as a fraction of its mean
    range_search: bool = True   # int4: each group's range by least (Hessian-weighted) rounding error
    chunk_tokens: int = 4096    # tokens run through a layer at once (bounds activation memory)

    def __post_init__(self):
        for name in ("num_tokens", "seq_len", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"calibration {name} must be a positive int, got {value!r}")
        if self.seq_len < 16:
            raise ValueError(f"calibration seq_len must be at least 16 tokens, got {self.seq_len}")
        if self.num_tokens < self.seq_len:
            raise ValueError(f"calibration_tokens ({self.num_tokens}) must be at least one window of "
                             f"seq_len={self.seq_len} tokens")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1) (a fraction of the mean Hessian diagonal), "
                             f"got {self.damp}")

    @property
    def num_windows(self) -> int:
        return self.num_tokens // self.seq_len


@dataclass
class _Chunk:
    input_ids: torch.Tensor   # [num_tokens]
    positions: torch.Tensor   # [num_tokens]
    meta: object              # AttentionMetadata: one prefill sequence per window
    num_seqs: int


def gptq_model(model: nn.Module, windows: list[list[int]], linear_names: set[str], fmt: str,
               group_size: int | None, config: CalibrationConfig,
               progress: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize every linear of ``model`` whose weight is named in ``linear_names`` (strata
    parameter names, ``layers.0.self_attn.qkv_proj.weight``) with GPTQ on ``windows`` of token
    ids; the model's weights are replaced by their quantized values on the way. Returns the codes
    per parameter name."""
    names = {module: name for name, module in model.named_modules()}
    chunks = _chunks(windows, config.chunk_tokens)
    results: dict[str, QuantizedWeight] = {}
    layers = model.layers
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="GPTQ layers", leave=False)
    with torch.inference_mode():
        carries = [model.embed(c.input_ids, c.positions) for c in chunks]
        for layer in layers:
            targets = {names[m]: m for m in layer.modules()
                       if f"{names[m]}.weight" in linear_names}
            while targets:   # in the order the layer computes them
                name, hessian = _next_input_hessian(model, layer, targets, chunks, carries)
                module = targets.pop(name)
                result = gptq_quantize(module.weight.data, hessian, fmt, group_size,
                                       damp=config.damp, act_order=config.act_order,
                                       range_search=config.range_search)
                module.weight.data.copy_(result.dequantized.to(module.weight.dtype))
                result.dequantized = None   # the model holds it; the export needs the codes
                results[f"{name}.weight"] = result
            carries = [_run_layer(model, layer, c, carry) for c, carry in zip(chunks, carries)]
    missing = linear_names - set(results)
    if missing:
        raise ValueError(f"{len(missing)} linears to quantize are outside the decoder layers, "
                         f"e.g. {sorted(missing)[:3]}: GPTQ covers decoder layers only")
    return results


class _Captured(Exception):
    """Ends a layer's forward pass once the linear wanted has seen its input."""


def _next_input_hessian(model, layer, targets: dict[str, nn.Module], chunks,
                        carries) -> tuple[str, torch.Tensor]:
    """(name, X^T X / n over all chunks) of the first of ``targets`` the layer computes: its
    inputs already see every linear before it quantized (the paper's "true sequential" order
    within a layer). The pass stops at that linear, so the whole layer costs a little over
    two forward passes of it rather than one per linear."""
    first: list[str] = []
    total = {"xtx": None, "rows": 0}

    def hook_for(name):
        def hook(module, args):
            if not first:
                first.append(name)
            if name != first[0]:
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            xtx = (x.T @ x).double()   # summed in float64 over chunks
            total["xtx"] = xtx if total["xtx"] is None else total["xtx"] + xtx
            total["rows"] += x.shape[0]
            raise _Captured
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in targets.items()]
    try:
        for chunk, carry in zip(chunks, carries):
            try:
                _run_layer(model, layer, chunk, carry)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not first:
        raise ValueError(f"the layer never computed {sorted(targets)}: cannot calibrate them")
    return first[0], total["xtx"] / total["rows"]


def _run_layer(model, layer, chunk: _Chunk, carry):
    from strata.forward_context import set_forward_context
    with _scratch_kv_cache(layer, chunk, carry[0].dtype), set_forward_context(chunk.meta):
        return model.layer_forward(layer, chunk.positions, carry)


@contextlib.contextmanager
def _scratch_kv_cache(layer: nn.Module, chunk: _Chunk, dtype: torch.dtype):
    """A float cache of one block per window, in place of whatever the layer has bound."""
    from strata.layers.attention import Attention
    attentions = [m for m in layer.modules() if isinstance(m, Attention)]
    saved = [(attn.kv_cache, attn.kv_scales) for attn in attentions]
    seq_len = chunk.input_ids.shape[0] // chunk.num_seqs
    for attn in attentions:
        attn.kv_cache = torch.zeros(2, chunk.num_seqs, seq_len, attn.num_kv_heads, attn.head_dim,
                                    dtype=dtype)
        attn.kv_scales = None
    try:
        yield
    finally:
        for attn, (kv_cache, kv_scales) in zip(attentions, saved):
            attn.kv_cache, attn.kv_scales = kv_cache, kv_scales


def _chunks(windows: list[list[int]], chunk_tokens: int) -> list[_Chunk]:
    seq_len = len(windows[0])
    per_chunk = max(1, chunk_tokens // seq_len)
    return [_chunk(windows[i:i + per_chunk]) for i in range(0, len(windows), per_chunk)]


def _chunk(windows: list[list[int]]) -> _Chunk:
    """Windows of equal length as prefill sequences, window i on cache block i."""
    from strata.attention.backend import AttentionMetadata
    num_seqs, seq_len = len(windows), len(windows[0])
    total = num_seqs * seq_len
    starts = [i * seq_len for i in range(num_seqs + 1)]
    meta = AttentionMetadata(
        num_tokens=total, slot_mapping=torch.arange(total),
        block_tables=torch.arange(num_seqs, dtype=torch.int32)[:, None],
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens_cpu=[seq_len] * num_seqs, query_lens_cpu=[seq_len] * num_seqs,
        query_start_loc_cpu=starts, block_size=seq_len, decode_rows=[],
        prefill_rows=list(range(num_seqs)), max_query_len=seq_len)
    return _Chunk(torch.tensor([t for w in windows for t in w]),
                  torch.arange(seq_len).repeat(num_seqs), meta, num_seqs)


def calibration_windows(tokenizer, config: CalibrationConfig) -> list[list[int]]:
    """``config.num_windows`` windows of ``seq_len`` tokens of the calibration text, shaped like
    the perplexity windows (BOS first where the tokenizer adds one to prompts)."""
    from strata.evaluation.calibration_text import SOURCE_NAME, calibration_text
    from strata.evaluation.perplexity import _bos_if_added, make_windows
    bos = _bos_if_added(tokenizer)
    # ~4 characters a token in English; ask for more until the windows are there.
    max_chars = config.num_tokens * 6
    while True:
        text = calibration_text(max_chars)
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if len(token_ids) >= config.num_windows * config.seq_len or len(text) < max_chars:
            break   # enough, or all there is
        max_chars *= 2
    windows = make_windows(token_ids, config.seq_len, bos_token_id=bos)[:config.num_windows]
    if len(windows) < config.num_windows:
        limit = len(windows) * config.seq_len
        raise ValueError(f"calibration_tokens={config.num_tokens}: the calibration text "
                         f"({SOURCE_NAME}) gives {limit} tokens in windows of {config.seq_len}; "
                         f"ask for at most {limit}")
    return [w.token_ids for w in windows]


def describe(config: CalibrationConfig) -> dict:
    """For the checkpoint's quantization_config: how it was calibrated."""
    from strata.evaluation.calibration_text import SOURCE_NAME
    return {"method": "gptq", "calibration_text": SOURCE_NAME,
            "calibration_tokens": config.num_windows * config.seq_len, "seq_len": config.seq_len,
            "act_order": config.act_order, "damp": config.damp, "range_search": config.range_search}

