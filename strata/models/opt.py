"""OPT (facebook/opt-125m ... 66b, and opt-350m's post-LN variant). Composed from shared layers;
no kernels, no quantization and no parallel logic here.

What sets OPT apart from Llama: learned absolute position embeddings (stored with an offset of 2),
LayerNorm with biases, a ReLU MLP without a gate, biases on every projection, and an optional
projection between a narrower word-embedding width and the hidden size (opt-350m).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from strata.config import ModelConfig
from strata.layers.activation import get_act_fn
from strata.layers.attention import Attention
from strata.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from strata.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                  RowParallelLinear)
from strata.layers.norm import LayerNorm
from strata.models.layer_loop import Carry, LayerLoop
from strata.models.weights import checkpoint_target, load_named_weights
from strata.quant.base import QuantMethod

# HF's OPTLearnedPositionalEmbedding keeps two extra rows in front (a fairseq padding legacy):
# position p is row p + 2.
POSITION_OFFSET = 2
# OPT's nn.LayerNorm is built with the default eps; config.json does not carry it.
LAYER_NORM_EPS = 1e-5


def _layer_norm(cfg: ModelConfig) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, LAYER_NORM_EPS, cfg.dtype,
                     elementwise_affine=cfg.extra.get("layer_norm_elementwise_affine", True))


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: QuantMethod | None):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_heads,
                                          bias=cfg.attention_bias, dtype=cfg.dtype, quant_method=quant)
        self.num_heads = self.qkv_proj.num_heads   # this rank's share
        self.q_size = self.num_heads * cfg.head_dim
        self.out_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias,
                                          dtype=cfg.dtype, quant_method=quant)
        # HF multiplies q by head_dim**-0.5 before q @ k^T; the same factor applied to the scores.
        self.attn = Attention(self.num_heads, cfg.head_dim, self.num_heads, cfg.head_dim ** -0.5, layer_idx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:   # [n, hidden] -> [n, hidden]
        return self.out_proj(self.attn(*self.qkv(hidden)))

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.qkv_proj(hidden).split([self.q_size] * 3, dim=-1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: QuantMethod | None):
        super().__init__()
        self.pre_norm = cfg.extra.get("do_layer_norm_before", True)
        self.self_attn = OPTAttention(cfg, layer_idx, quant)
        self.self_attn_layer_norm = _layer_norm(cfg)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.attention_bias,
                                        dtype=cfg.dtype, quant_method=quant)
        self.act = get_act_fn(cfg.hidden_act)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.attention_bias,
                                     dtype=cfg.dtype, quant_method=quant)
        self.final_layer_norm = _layer_norm(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:   # [n, hidden] -> [n, hidden]
        return self.after_attention(self.self_attn(self.self_attn_layer_norm(hidden) if self.pre_norm else hidden),
                                    hidden)

    def before_attention(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v) of forward's attention (the offload loop's split around it)."""
        return self.self_attn.qkv(self.self_attn_layer_norm(hidden) if self.pre_norm else hidden)

    def after_attention(self, attn: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """forward from the attention's projected output on; hidden: the layer's input."""
        if self.pre_norm:   # opt-125m, 1.3b ... 66b
            hidden = hidden + attn
            return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden))))
        # opt-350m normalises after each residual add
        hidden, _ = self.self_attn_layer_norm(attn, hidden)
        hidden, _ = self.final_layer_norm(self.fc2(self.act(self.fc1(hidden))), hidden)
        return hidden


class OPTForCausalLM(nn.Module):
    # Checkpoint names folded into strata's fused parameters: (fused, checkpoint, shard id).
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
    ]

    def __init__(self, cfg: ModelConfig, quant: QuantMethod | None = None):
        super().__init__()
        if cfg.num_kv_heads != cfg.num_heads:
            raise ValueError(f"OPT has one KV head per query head, got {cfg.num_kv_heads} KV heads "
                             f"for {cfg.num_heads} heads")
        self.config = cfg
        embed_dim = cfg.extra.get("word_embed_proj_dim", cfg.hidden_size)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, embed_dim, cfg.dtype)
        self.embed_positions = VocabParallelEmbedding(cfg.max_position_embeddings + POSITION_OFFSET,
                                                      cfg.hidden_size, cfg.dtype)
        self.project_in = self.project_out = None
        if embed_dim != cfg.hidden_size:   # opt-350m embeds in 512 and computes in 1024
            self.project_in = ReplicatedLinear(embed_dim, cfg.hidden_size, False, cfg.dtype, None)
            self.project_out = ReplicatedLinear(cfg.hidden_size, embed_dim, False, cfg.dtype, None)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i, quant) for i in range(cfg.num_layers))
        self.final_layer_norm = None
        if cfg.extra.get("do_layer_norm_before", True) and not cfg.extra.get("remove_final_layer_norm"):
            self.final_layer_norm = _layer_norm(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, embed_dim, cfg.dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.tie(self.embed_tokens)
        self.layer_loop = LayerLoop()   # the runner's hook (offloading swaps in its own loop)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> hidden states [num_tokens, word_embed_proj_dim]."""
        return self.layer_loop.run(self, input_ids, positions)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Carry:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        return (hidden + self.embed_positions(positions + POSITION_OFFSET),)

    def layer_forward(self, layer: nn.Module, positions: torch.Tensor, carry: Carry) -> Carry:
        return (layer(carry[0]),)

    def split_layer_forward(self, layer: nn.Module, positions: torch.Tensor, carry: Carry):
        """layer_forward in two halves around attention: (attention module, (q, k, v), resume)."""
        hidden = carry[0]
        return layer.self_attn.attn, layer.before_attention(hidden), \
            lambda out: (layer.after_attention(layer.self_attn.out_proj(out), hidden),)

    def finish(self, carry: Carry) -> torch.Tensor:
        hidden = carry[0]
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], on_loaded=None) -> set[str]:
        return load_named_weights(self, weights, self.stacked_params_mapping, self._checkpoint_name, on_loaded)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        return checkpoint_target(name, self.stacked_params_mapping, self._checkpoint_name)

    def _checkpoint_name(self, name: str) -> str | None:
        """Checkpoint name -> strata parameter name (None: skip).

        HF checkpoints say ``model.decoder.layers.0...``; older ones saved from OPTModel drop the
        ``model.`` prefix. Some post-LN checkpoints carry a final norm the model never applies.
        """
        name = name.removeprefix("model.").removeprefix("decoder.")
        if name.startswith("final_layer_norm.") and self.final_layer_norm is None:
            return None
        return name
