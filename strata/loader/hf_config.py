"""An HF-style config dict (config.json, or one derived from GGUF metadata) -> ModelConfig."""

from __future__ import annotations

import torch

from strata.config import ModelConfig
from strata.models.registry import UnsupportedArchitecture, get_model_class


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def model_config_from_hf(hf: dict, dtype: torch.dtype) -> ModelConfig:
    archs = hf.get("architectures") or []
    if not archs:
        raise UnsupportedArchitecture("config.json names no architecture ('architectures' is missing)")
    arch = archs[0]
    get_model_class(arch)   # raises with the supported list
    if arch == "OPTForCausalLM":
        return _opt_config(hf, dtype)
    hidden = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    return ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
        hidden_act=hf.get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        dtype=dtype,
    )


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling)


def _opt_config(hf: dict, dtype: torch.dtype) -> ModelConfig:
    hidden = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"OPT hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    return ModelConfig(
        architecture="OPTForCausalLM",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf["ffn_dim"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("enable_bias", True)),
        hidden_act=hf.get("activation_function", "relu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        dtype=dtype,
        extra={
            "word_embed_proj_dim": hf.get("word_embed_proj_dim") or hidden,   # null means hidden_size
            "do_layer_norm_before": hf.get("do_layer_norm_before", True),
            "layer_norm_elementwise_affine": hf.get("layer_norm_elementwise_affine", True),
            # set on checkpoints fine-tuned before transformers 4.20 that have no final norm
            "remove_final_layer_norm": hf.get("_remove_final_layer_norm", False),
        },
    )
