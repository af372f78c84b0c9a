"""Llama and its close relatives (Mistral, SmolLM2; Qwen2's q/k/v bias and Qwen3's q/k norms
are switches on the same blocks). Composed from shared layers; no kernels, no quantization and
no parallel logic here beyond one switch: where the tensor-parallel sums are taken."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from strata.config import ModelConfig
from strata.distributed import parallel_state as ps
from strata.distributed.pipeline import make_layers, stage_holds_vocab
from strata.layers.activation import SiluAndMul
from strata.layers.attention import Attention
from strata.layers.cpu_decoder import fused_cpu_layer, fused_cpu_model, fused_cpu_stack
from strata.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from strata.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from strata.layers.norm import RMSNorm
from strata.layers.rotary import RotaryEmbedding
from strata.models.layer_loop import Carry, LayerLoop
from strata.models.weights import checkpoint_target, load_named_weights
from strata.quant.base import QuantMethod


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: QuantMethod | None, qk_norm: bool,
                 reduce_results: bool = True):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, dtype=cfg.dtype, quant_method=quant)
        self.num_heads = self.qkv_proj.num_heads        # this rank's share
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False,
                                        dtype=cfg.dtype, quant_method=quant, reduce_results=reduce_results)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                          cfg.rope_scaling)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.dtype) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.dtype) if qk_norm else None
        self.attn = Attention(self.num_heads, cfg.head_dim, self.num_kv_heads, cfg.head_dim ** -0.5, layer_idx,
                              rotary_emb=self.rotary_emb)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # The attention layer applies the rotary embedding as it writes the KV cache.
        return self.o_proj(self.attn(*self.qkv(hidden), positions))

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:   # Qwen3 normalises each head before the rotation
            q = self.q_norm(q.reshape(n * self.num_heads, self.head_dim)).view(n, -1)
            k = self.k_norm(k.reshape(n * self.num_kv_heads, self.head_dim)).view(n, -1)
        return q, k, v


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantMethod | None, reduce_results: bool = True):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Llama-style MLP expects hidden_act 'silu', got {cfg.hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       bias=False, dtype=cfg.dtype, quant_method=quant)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False,
                                           dtype=cfg.dtype, quant_method=quant, reduce_results=reduce_results)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: QuantMethod | None, qk_norm: bool):
        super().__init__()
        # At TP>1 the row-parallel projections leave their sums to the norm after them (the
        # carry's hidden is then this rank's share of the sum: parallel_state.sums_in_norms).
        self.partial = ps.sums_in_norms()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = LlamaAttention(cfg, layer_idx, quant, qk_norm, reduce_results=not self.partial)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = LlamaMLP(cfg, quant, reduce_results=not self.partial)

    def forward(self, positions, hidden, residual):
        fused = fused_cpu_layer(self, hidden)   # the same layer as one C call, where it applies
        if fused is not None:
            return fused(positions, hidden, residual)
        hidden, residual = self.norm_input(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        return self.after_attention(hidden, residual)

    def norm_input(self, hidden, residual):
        """The input norm of the carry: (normalised hidden, residual)."""
        if residual is None:
            return self.input_layernorm(hidden), hidden
        return self.input_layernorm(hidden, residual, partial=self.partial)

    def before_attention(self, hidden, residual):
        """The layer up to attention: (q, k, v, residual) (the offload loop's split, which lets
        a host-tier attention run while other micro-batches compute)."""
        hidden, residual = self.norm_input(hidden, residual)
        return (*self.self_attn.qkv(hidden), residual)

    def after_attention(self, hidden, residual):
        """From the attention's projected output [n, hidden] to the carry (hidden, residual)."""
        hidden, residual = self.post_attention_layernorm(hidden, residual, partial=self.partial)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    # Checkpoint names folded into strata's fused parameters: (fused, checkpoint, shard id).
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    ]
    qk_norm = False
    supports_pipeline_parallel = True

    def __init__(self, cfg: ModelConfig, quant: QuantMethod | None = None):
        super().__init__()
        self.config = cfg
        # With pipeline stages, the vocabulary parts live only where they run (None elsewhere).
        embedding, head = stage_holds_vocab(cfg.tie_word_embeddings)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype) if embedding else None
        # Only this pipeline stage's layers are built (all of them without pipeline parallelism).
        self.layers, self.start_layer, self.end_layer = make_layers(
            cfg.num_layers, lambda i: LlamaDecoderLayer(cfg, i, quant, self.qk_norm))
        if not head and self.end_layer > self.start_layer and ps.sums_in_norms():
            # The last layer's MLP share leaves for the next stage, whose first norm sums it.
            self.layers[self.end_layer - 1].mlp.down_proj.feeds_fused_norm = False
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype) if head else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype) if head else None
        if cfg.tie_word_embeddings and head:
            self.lm_head.tie(self.embed_tokens)
        self.layer_loop = LayerLoop()   # the runner's hook (offloading swaps in its own loop)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Carry | None = None):
        """input_ids, positions [num_tokens] -> hidden states [num_tokens, hidden]. A later
        pipeline stage starts from the stage before's carry (hidden, residual) instead of the
        ids; a stage before the last returns its carry."""
        return self.layer_loop.run(self, input_ids, positions, intermediate)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Carry:
        return self.embed_tokens(input_ids), None      # hidden, residual

    def fused_forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The whole forward as one C call on the CPU (embedding, layers, final norm), or None
        where that does not apply."""
        return fused_cpu_model(self, input_ids, positions)

    def fused_layers_forward(self, layers, positions: torch.Tensor, carry: Carry) -> Carry | None:
        """The carry after ``layers`` as one C call on the CPU, or None where that does not apply."""
        return fused_cpu_stack(self, layers, positions, carry)

    def layer_forward(self, layer: nn.Module, positions: torch.Tensor, carry: Carry) -> Carry:
        return layer(positions, *carry)

    def split_layer_forward(self, layer: nn.Module, positions: torch.Tensor, carry: Carry):
        """layer_forward in two halves around attention: (attention module, (q, k, v), resume),
        resume(attention output [n, heads * head_dim]) -> the carry layer_forward returns."""
        q, k, v, residual = layer.before_attention(*carry)
        return layer.self_attn.attn, (q, k, v), \
            lambda out: layer.after_attention(layer.self_attn.o_proj(out), residual)

    def finish(self, carry: Carry) -> torch.Tensor:
        hidden, _ = self.norm(*carry, partial=ps.sums_in_norms())
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], on_loaded=None) -> set[str]:
        return load_named_weights(self, weights, self.stacked_params_mapping, _llama_name, on_loaded)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        return checkpoint_target(name, self.stacked_params_mapping, _llama_name)


def _llama_name(name: str) -> str | None:
    """Checkpoint name -> strata parameter name (None: skip)."""
    if "rotary_emb.inv_freq" in name:
        return None
    return name.removeprefix("model.")


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on q, k and v (``attention_bias`` is set from the architecture)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
