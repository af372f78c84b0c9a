"""Architecture name (as in config.json's ``architectures``) -> model class."""

from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("strata.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("strata.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("strata.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("strata.models.llama", "Qwen3ForCausalLM"),
    "OPTForCausalLM": ("strata.models.opt", "OPTForCausalLM"),
}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str):
    try:
        module, name = _MODELS[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}") from None
    return getattr(importlib.import_module(module), name)
