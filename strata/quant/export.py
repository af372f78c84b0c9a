"""``strata quantize``: write a float checkpoint (HF directory or GGUF file) as one of strata's
quantized checkpoints (layout in strata.quant.packed), like llama.cpp's quantize tool.

The linears quantized are the ones ``LLM(model, quantization=...)`` would quantize (the model is
built on the meta device with that method to find them), with the same round-to-nearest
functions, so loading the result gives the same codes without the float weights. Tensors stream
through one at a time: memory stays near one output shard.

With a ``CalibrationConfig`` the codes come from GPTQ instead (strata.quant.calibrate): the
float model is loaded whole and run on the calibration text first, then the same stream writes
each linear's GPTQ codes (rows sliced out of fused q/k/v and gate/up) in the same layout, so
the result loads with the same method as a round-to-nearest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from strata.config import LoadConfig, QuantConfig
from strata.quant import make_quant_method
from strata.quant.calibrate import CalibrationConfig
from strata.quant.calibrate import describe as describe_calibration
from strata.quant.int4 import pack_nibbles, quantize_int4
from strata.quant.int8 import quantize_int8
from strata.quant.packed import checkpoint_spec

# What a tokenizer (and generation settings) may consist of in an HF directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass
class ExportSummary:
    out_dir: Path
    num_quantized: int         # checkpoint tensors written as codes + scales
    num_kept: int              # written as they were
    bytes_in: int              # float bytes of the tensors read
    bytes_out: int
    shards: int
    tokenizer: str             # what was done about the tokenizer
    seconds: float


def quantize_checkpoint(model: str | Path, out_dir: str | Path, method: str,
                        group_size: int | None = None, max_shard_bytes: int = 4 * 2**30,
                        progress: bool = False,
                        calibration: CalibrationConfig | None = None) -> ExportSummary:
    """calibration: quantize with GPTQ on the built-in calibration text (None: round to nearest)."""
    from strata.loader import model_loader
    t0 = time.perf_counter()
    quant = QuantConfig(method, group_size)   # validates the pair
    source = model_loader.resolve_model(model, LoadConfig())
    if source.quant_spec:
        raise ValueError(f"{source.name} is already quantized ({source.quantization}); "
                         "strata quantize reads float checkpoints or GGUF files")
    out_dir = _prepare_out_dir(Path(out_dir), source.path)
    quantized, target, params = _quantized_linears(source, quant)
    pack = lambda hit, tensor: _pack(tensor, quant)
    if calibration is not None:
        gptq = _calibrate(source, quant, quantized, calibration, progress)
        pack = lambda hit, tensor: _pack_calibrated(gptq[hit[0]], params[hit[0]], tensor, hit[1])
    writer = _ShardWriter(out_dir, max_shard_bytes)
    counts = [0, 0, 0]   # quantized, kept, bytes in
    for name, tensor in _float_tensors(source, progress):
        counts[2] += tensor.numel() * tensor.element_size()
        hit = target(name)
        if hit is not None and hit[0] in quantized and name.endswith(".weight"):
            prefix = name.removesuffix(".weight")
            for suffix, packed in pack(hit, tensor).items():
                writer.add(f"{prefix}.{suffix}", packed)
            counts[0] += 1
        else:
            writer.add(name, tensor.clone())   # a view of the source's mapping
            counts[1] += 1
    shards = writer.close()
    config = dict(source.hf_config)
    config["quantization_config"] = checkpoint_spec(quant.method, quant.group_size)
    if calibration is not None:
        config["quantization_config"]["calibration"] = describe_calibration(calibration)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer = _write_tokenizer(source, out_dir)
    return ExportSummary(out_dir, counts[0], counts[1], counts[2], writer.bytes_written, shards,
                         tokenizer, time.perf_counter() - t0)


def _prepare_out_dir(out_dir: Path, source_path: Path | None) -> Path:
    if source_path is not None and out_dir.resolve() == source_path.resolve():
        raise ValueError(f"OUT_DIR {out_dir} is the model itself: write to another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} exists and is not a directory")
    if out_dir.is_dir() and (any(out_dir.glob("*.safetensors")) or (out_dir / "config.json").exists()):
        raise ValueError(f"OUT_DIR {out_dir} already holds a checkpoint: choose an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _quantized_linears(source, quant: QuantConfig):
    """(strata parameter names of the linears LLM(..., quantization=quant) quantizes, the
    model's checkpoint name -> (parameter name, shard id) map, its parameters by name), from a
    model on the meta device."""
    from strata.loader.model_loader import model_config_for
    from strata.models.registry import get_model_class
    cfg = model_config_for(source, torch.float32)
    method = make_quant_method(quant)
    with torch.device("meta"):
        model = get_model_class(cfg.architecture)(cfg, quant=method)
    names = {f"{name}.weight" for name, module in model.named_modules()
             if getattr(module, "quant_method", None) is method}
    return names, model.checkpoint_target, dict(model.named_parameters())


def _float_tensors(source, progress: bool):
    if source.kind == "gguf":
        from strata.loader.gguf import gguf_weights
        return gguf_weights(source.gguf)    # dequantized to float32, HF names
    from strata.loader.safetensors import iter_safetensors, safetensors_files
    return iter_safetensors(safetensors_files(source.path), progress)


def _pack(weight: torch.Tensor, quant: QuantConfig) -> dict[str, torch.Tensor]:
    """A float [N, K] weight in the stored layout (strata.quant.packed), quantized from float32:
    what LLM quantizes on the CPU, and on a GPU for bf16/fp16 checkpoints in their own dtype."""
    if quant.method == "int8":
        codes, scales = quantize_int8(weight.float())
        return {"qweight": codes, "scales": scales}
    codes, scales, mins = quantize_int4(weight.float(), quant.group_size)
    return {"qweight": pack_nibbles(codes), "scales": scales, "mins": mins}


def _calibrate(source, quant: QuantConfig, linear_names: set[str], calibration: CalibrationConfig,
               progress: bool) -> dict:
    """GPTQ codes of every linear to quantize, from the float model on the CPU (float32)."""
    from strata.loader.model_loader import build_model, model_config_for
    from strata.quant.calibrate import calibration_windows, gptq_model
    windows = calibration_windows(_source_tokenizer(source), calibration)
    model = build_model(source, model_config_for(source, torch.float32), LoadConfig(),
                        torch.device("cpu"), keep_gguf_packed=False)
    return gptq_model(model, windows, linear_names, quant.method, quant.group_size, calibration,
                      progress)


def _source_tokenizer(source):
    from strata.tokenizer import Tokenizer
    if source.kind == "gguf":
        if "tokenizer.ggml.tokens" not in source.gguf.metadata:
            raise ValueError(f"{source.name} embeds no vocabulary: calibration needs the tokenizer")
        return Tokenizer.from_gguf_metadata(source.gguf.metadata)
    if not (source.path / "tokenizer.json").is_file():
        raise ValueError(f"{source.path} has no tokenizer.json: calibration needs the tokenizer")
    return Tokenizer.from_dir(source.path)


def _pack_calibrated(result, param, tensor: torch.Tensor, shard_id) -> dict[str, torch.Tensor]:
    """The rows of a fused linear's GPTQ codes that are this checkpoint tensor, stored as _pack
    stores them."""
    from strata.loader.hf_model import rows_of_shard
    rows = slice(None)
    if shard_id is not None:
        rows = rows_of_shard(param.weight_loader, param, tensor, shard_id)
        if rows is None:
            raise ValueError(f"cannot locate part {shard_id!r} of a fused linear in its parameter")
    if result.mins is None:
        return {"qweight": result.codes[rows].contiguous(), "scales": result.scales[rows].contiguous()}
    return {"qweight": pack_nibbles(result.codes[rows]), "scales": result.scales[rows].contiguous(),
            "mins": result.mins[rows].contiguous()}


class _ShardWriter:
    """Collects tensors into safetensors files of at most max_bytes (a larger tensor gets a file
    of its own); one file is model.safetensors, several get HF's names and an index."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.bytes_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"strata-part-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.bytes_written += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out_dir / "model.safetensors")
            return 1
        count, weight_map = len(self.files), {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return count


def _write_tokenizer(source, out_dir: Path) -> str:
    if source.kind == "gguf":
        return _export_gguf_tokenizer(source.gguf.metadata, out_dir)
    copied = [name for name in TOKENIZER_FILES if (source.path / name).is_file()]
    for name in copied:
        shutil.copy2(source.path / name, out_dir / name)
    return f"copied {', '.join(copied)}" if copied else "none in the source directory"


def _export_gguf_tokenizer(metadata: dict, out_dir: Path) -> str:
    """The GGUF's embedded vocabulary as HF files, rebuilt by strata's own GGUF tokenizer: what
    Tokenizer.from_dir reads back into the same tokenizer (BOS/EOS rules in tokenizer.json's
    post-processor, specials and chat template in tokenizer_config.json, end-of-turn ids in
    generation_config.json)."""
    from strata.tokenizer import Tokenizer
    if "tokenizer.ggml.tokens" not in metadata:
        return "none (the GGUF file embeds no vocabulary)"
    tok = Tokenizer.from_gguf_metadata(metadata)
    tok.backend.save(str(out_dir / "tokenizer.json"))
    config = {k: v for k, v in tok.special_tokens.items() if v is not None}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    extra = sorted(tok.eos_token_ids - {tok.eos_token_id})
    if extra:
        eos = ([tok.eos_token_id] if tok.eos_token_id is not None else []) + extra
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
    return "exported from the GGUF vocabulary (tokenizer.json, tokenizer_config.json)"
