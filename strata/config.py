"""Frozen configuration dataclasses, one per area; each component receives only its own.

Every user-facing value is validated in ``__post_init__`` with a message that names the
parameter, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}") from None


def parse_bytes(value: int | float | str) -> int:
    """Accept 123, "512MiB", "24GiB", "1.5GB" (GB counts as GiB, as most users mean it)."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "kb": 2**10, "k": 2**10, "mib": 2**20, "mb": 2**20, "m": 2**20,
             "gib": 2**30, "gb": 2**30, "g": 2**30, "tib": 2**40, "tb": 2**40, "b": 1}
    for suffix, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * scale)
            except ValueError:
                break
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"cannot parse memory size {value!r}; use e.g. 4GiB or 512MiB") from None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, normalised from an HF config.json or GGUF metadata."""

    architecture: str                 # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v projections carry a bias (Qwen2)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    # Architecture-specific leftovers (OPT's word_embed_proj_dim, ...), read by the model file.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            _require(int(getattr(self, name)) > 0, f"model config {name} must be > 0, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_attention_heads ({self.num_heads}) must be a multiple of "
                 f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers at the model dtype."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Formats in strata.quant.kv.KV_FORMATS; "auto" is the model dtype.
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}   # vLLM's spelling


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    # Memory for the KV cache: an explicit byte budget, or (None) a share of free memory.
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None   # tests force a tiny cache with this
    # "auto" (the model dtype), or 8-bit codes with a scale per token and head (strata.quant.kv).
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        name = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        _require(name in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (fp8 = fp8_e4m3), "
                 f"got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "kv_cache_dtype", name)
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
                 f"block_size must be a power of two in [1, 128], got {self.block_size}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None:
            _require(self.kv_cache_memory_bytes > 0,
                     f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.num_gpu_blocks_override is not None:
            _require(self.num_gpu_blocks_override >= 1,
                     f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting: int | None = None   # admission limit for the server (None = unbounded)

    def __post_init__(self):
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
        if not self.enable_chunked_prefill:
            _require(self.max_num_batched_tokens >= self.max_model_len,
                     f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                     f"must be >= max_model_len ({self.max_model_len})")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # A rank whose heartbeat (every 0.5 s, also while it waits in a collective) stops for this
    # long is hung: the engine stops every rank and says which one.
    worker_timeout_s: float = 60.0
    # Longest a step may take on any rank (a deadlock with every rank alive); startup may take
    # longer (weights, Triton compiles, CUDA graphs).
    step_timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0
    all_reduce: str = "auto"          # auto (symmetric memory where it works) | nccl

    def __post_init__(self):
        _require(self.all_reduce in ("auto", "nccl"),
                 f"all_reduce must be 'auto' or 'nccl', got {self.all_reduce!r}")
        _require(self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _require(self.pipeline_parallel_size >= 1,
                 f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        for name in ("worker_timeout_s", "step_timeout_s", "startup_timeout_s"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def driver_rank(self) -> int:
        """The rank that samples: tensor rank 0 of the last pipeline stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


QUANTIZATION_METHODS = ("int8", "int4")


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization applied at load. ``reference=True`` keeps the same quantized values
    but stores them dequantized and computes with plain matmuls: the path the packed kernels are
    tested against."""

    method: str | None = None         # None | int8 | int4
    group_size: int | None = None     # int4: 32, 64 or 128 (default 128)
    reference: bool = False

    def __post_init__(self):
        _require(self.method is None or self.method in QUANTIZATION_METHODS,
                 f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), got {self.method!r}")
        if self.method == "int4":
            group = 128 if self.group_size is None else self.group_size
            _require(group in (32, 64, 128),
                     f"quantization_group_size must be 32, 64 or 128 for int4, got {self.group_size!r}")
            object.__setattr__(self, "group_size", group)
        else:
            _require(self.group_size is None, f"quantization_group_size applies to int4 only "
                     f"(quantization={self.method!r}, group size {self.group_size!r})")


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"        # auto | safetensors | gguf | dummy
    seed: int = 0                    # for dummy weights

    def __post_init__(self):
        _require(self.load_format in ("auto", "safetensors", "gguf", "dummy"),
                 f"load_format must be one of auto, safetensors, gguf, dummy; got {self.load_format!r}")


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device = torch.device("cpu")

    @staticmethod
    def resolve(device: str | torch.device | None) -> "DeviceConfig":
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is available")
        return DeviceConfig(dev)


# Keys of an explicit offload_policy: fractions of the decoder layers' weights per tier, of the
# KV cache per tier, and the block schedule's micro-batches (FlexGen's "percent" vector).
OFFLOAD_POLICY_KEYS = ("w_gpu", "w_cpu", "w_disk", "kv_gpu", "kv_cpu", "micro_batch_tokens", "prefetch_depth",
                       "prefill_waves")
_INT_POLICY_KEYS = ("micro_batch_tokens", "prefetch_depth", "prefill_waves")


def parse_offload_policy(policy: str | dict | None) -> dict | None:
    """"auto" / None -> None (the policy search decides); "w_gpu=0.25,w_cpu=0.5,w_disk=0.25" or a
    dict -> the fractions, checked. Missing weight fractions: w_disk takes what w_gpu and w_cpu
    leave; missing KV fractions: all on the GPU."""
    if policy is None or (isinstance(policy, str) and policy.strip().lower() == "auto"):
        return None
    if isinstance(policy, str):
        items = {}
        for part in filter(None, (p.strip() for p in policy.split(","))):
            key, sep, value = part.partition("=")
            _require(bool(sep), f"offload_policy must be 'auto' or key=value pairs like "
                                f"'w_gpu=0.25,w_cpu=0.75', got {policy!r}")
            items[key.strip()] = value.strip()
        policy = items
    _require(isinstance(policy, dict), f"offload_policy must be 'auto', a dict or a string, got {policy!r}")
    unknown = sorted(set(policy) - set(OFFLOAD_POLICY_KEYS))
    _require(not unknown, f"offload_policy has unknown key(s) {unknown}; known: {', '.join(OFFLOAD_POLICY_KEYS)}")
    out: dict = {}
    for key, value in policy.items():
        try:
            out[key] = int(value) if key in _INT_POLICY_KEYS else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"offload_policy {key} must be a number, got {value!r}") from None
    for key in ("w_gpu", "w_cpu", "w_disk", "kv_gpu", "kv_cpu"):
        if key in out:
            _require(0.0 <= out[key] <= 1.0, f"offload_policy {key} must be in [0, 1], got {out[key]}")
    missing = [k for k in ("w_disk", "w_cpu", "w_gpu") if k not in out]
    if len(missing) == 3:   # only KV or schedule keys: every layer streams from the CPU
        out.update(w_gpu=0.0, w_cpu=1.0, w_disk=0.0)
    elif missing:   # the first missing of w_disk, w_cpu, w_gpu takes what the others leave
        for key in missing[1:]:
            out[key] = 0.0
        out[missing[0]] = max(0.0, 1.0 - sum(out[k] for k in ("w_gpu", "w_cpu", "w_disk") if k in out))
    total = out["w_gpu"] + out["w_cpu"] + out["w_disk"]
    _require(abs(total - 1.0) < 1e-6, f"offload_policy weight fractions w_gpu + w_cpu + w_disk must sum to 1, "
                                      f"got {out['w_gpu']} + {out['w_cpu']} + {out['w_disk']} = {total}")
    kv_gpu = out.setdefault("kv_gpu", 1.0 - out.get("kv_cpu", 0.0))
    kv_cpu = out.setdefault("kv_cpu", 1.0 - kv_gpu)
    _require(abs(kv_gpu + kv_cpu - 1.0) < 1e-6,
             f"offload_policy kv_gpu + kv_cpu must sum to 1, got {kv_gpu} + {kv_cpu}")
    if "micro_batch_tokens" in out:
        _require(out["micro_batch_tokens"] >= 1,
                 f"offload_policy micro_batch_tokens must be >= 1, got {out['micro_batch_tokens']}")
    if "prefill_waves" in out:
        _require(1 <= out["prefill_waves"] <= 64,
                 f"offload_policy prefill_waves must be in [1, 64], got {out['prefill_waves']}")
    if "prefetch_depth" in out:
        _require(1 <= out["prefetch_depth"] <= 8,
                 f"offload_policy prefetch_depth must be in [1, 8], got {out['prefetch_depth']}")
    return out


@dataclass(frozen=True)
class OffloadConfig:
    """Weights and the KV cache spread over GPU, CPU and disk (FlexGen). Offloading is on when
    any budget, a disk folder or explicit fractions are given.

    gpu_memory_budget: bytes of GPU memory strata may use for weights, staging buffers, KV cache
    and activations (CUDA only). cpu_memory_budget: bytes of host RAM for weights: the CPU tier
    plus the staging buffers the disk tier reads into, and on a GPU the KV cache of the layers
    kept in host RAM (on a CPU-only machine: every resident weight; on a GPU, None means 85% of
    the RAM available at startup, runner/offload_loop.host_memory_room). offload_dir: the disk tier's folder (default: a temporary folder, removed at exit).
    policy: None (search) or the checked fractions of parse_offload_policy."""

    gpu_memory_budget: int | None = None
    cpu_memory_budget: int | None = None
    offload_dir: str | None = None
    policy: dict | None = None

    @staticmethod
    def from_args(gpu_memory_budget=None, cpu_memory_budget=None, offload_dir=None,
                  offload_policy="auto") -> "OffloadConfig":
        def budget(name, value):
            if value is None:
                return None
            try:
                parsed = parse_bytes(value)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            _require(parsed > 0, f"{name} must be > 0 bytes, got {value!r}")
            return parsed
        return OffloadConfig(budget("gpu_memory_budget", gpu_memory_budget),
                             budget("cpu_memory_budget", cpu_memory_budget),
                             None if offload_dir in (None, "") else str(offload_dir),
                             parse_offload_policy(offload_policy))

    @property
    def enabled(self) -> bool:
        return (self.gpu_memory_budget is not None or self.cpu_memory_budget is not None
                or self.offload_dir is not None or self.policy is not None)
