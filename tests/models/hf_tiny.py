"""Tiny random-weight transformers models saved as checkpoints, for comparing strata with the
reference implementation."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    "llama3_scaled_tied": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        bos_token_id=1, eos_token_id=2),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "opt": dict(
        architectures=["OPTForCausalLM"], model_type="opt", vocab_size=512, hidden_size=64, ffn_dim=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, do_layer_norm_before=True,
        word_embed_proj_dim=64, activation_function="relu", enable_bias=True, bos_token_id=2,
        eos_token_id=2, pad_token_id=1, tie_word_embeddings=True, init_std=0.2),
    # opt-350m's shape: post-LN (no final norm) and a narrower word embedding projected in and out
    "opt_post_ln_proj": dict(
        architectures=["OPTForCausalLM"], model_type="opt", vocab_size=512, hidden_size=64, ffn_dim=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, do_layer_norm_before=False,
        word_embed_proj_dim=32, activation_function="relu", enable_bias=True, bos_token_id=2,
        eos_token_id=2, pad_token_id=1, tie_word_embeddings=True, init_std=0.2),
}


def make_tiny_model(name: str, out_dir: Path, seed: int = 0, **overrides):
    """Build the HF model with random weights, save it as safetensors, return it (fp32, eval).
    ``overrides`` change entries of the named config (e.g. num_key_value_heads=1)."""
    import transformers
    cfg_dict = dict(TINY_CONFIGS[name], **overrides)
    arch = cfg_dict["architectures"][0]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval().to(torch.float32)
    with torch.no_grad():   # default init leaves norms at 1 and biases at 0: perturb them so they count
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outs = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
        outs.append(gen[0, len(ids):].tolist())
    return outs


def make_tiny_model_with_default_tokenizer(out_dir: Path):
    """A tiny random Llama saved with the default model's real tokenizer (SmolLM2's, read from
    its GGUF by transformers), for tests that need text: returns (tokenizer, model)."""
    import transformers
    from strata.loader.model_loader import default_model_path
    gguf = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out_dir)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return tok, model
