"""EngineArgs: every engine option in one place, with vLLM's names, shared by LLM(...), the CLI
and the server. Each field's help text is what ``--help`` prints."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

HELP = {
    "model": "model directory (config.json + safetensors), .gguf file, or nothing for the embedded "
             "default (SmolLM2-135M-Instruct Q4_1)",
    "tokenizer": "tokenizer directory if it is not the model's own",
    "skip_tokenizer_init": "run without a tokenizer: prompts must be token ids, outputs carry no text",
    "dtype": "weights and activations: auto (float32 on CPU, bfloat16/float16 on GPU), float32, "
             "bfloat16, float16",
    "device": "auto, cpu or cuda[:N]",
    "max_model_len": "context length in tokens (prompt + output); default: the model's own",
    "block_size": "tokens per KV-cache block",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes across requests",
    "max_num_batched_tokens": "token budget of one engine step (prompt chunks + decodes); default "
                              "2048 on CPU, 8192 on GPU",
    "max_num_seqs": "most sequences running at once",
    "enable_chunked_prefill": "split long prompts over several steps, mixed with decodes",
    "kv_cache_memory": "bytes for the KV cache, e.g. 2GiB (default on CPU: 4GiB, capped to what "
                       "max_num_seqs full contexts need)",
    "kv_cache_dtype": "KV cache storage: auto (the model dtype), int8, or fp8 (= fp8_e4m3; CUDA compute "
                      "capability >= 8.9). int8/fp8 store each token's K and V per head as 8-bit codes "
                      "plus a float32 scale: about half the bytes of bf16 (a quarter of fp32), so about "
                      "twice the tokens fit in the same kv_cache_memory (offloading's KV cache in host "
                      "RAM too: int8 there, fp8 stays on the GPU)",
    "gpu_memory_utilization": "share of GPU memory strata may use (weights + activations + KV)",
    "num_gpu_blocks_override": "force the number of KV blocks (testing)",
    "load_format": "auto, safetensors, gguf, or dummy (random weights of the model's shape)",
    "seed": "seed for dummy weights and for unseeded sampling",
    "quantization": "quantize the weights at load: int8 (per output channel) or int4 (groups of "
                    "quantization_group_size along the input, asymmetric); round to nearest, from "
                    "any float checkpoint. Default: none (checkpoints that are already quantized, "
                    "like GGUF files, keep their own format)",
    "quantization_group_size": "int4 group size: 32, 64 or 128 (default 128)",
    "tensor_parallel_size": "processes (one GPU each on CUDA) to split every layer across: attention "
                            "heads, MLP columns and the vocabulary, with one all-reduce after "
                            "attention and one after the MLP (torch.distributed: NCCL on GPUs, gloo "
                            "on the CPU). Under torchrun the ranks come from its environment",
    "all_reduce": "how tensor-parallel ranks sum their partial results: auto (PyTorch symmetric memory "
                  "for messages up to 8 MiB on NVLink GPUs of one host - one kernel reads the peers' "
                  "buffers, no multicast - and NCCL above that or wherever it is unavailable) or nccl "
                  "(always NCCL; STRATA_ALL_REDUCE=nccl does the same)",
    "pipeline_parallel_size": "stages to split the layers across (one process per stage and tensor "
                              "rank); each step is cut into micro-batches so the stages overlap",
    "data_parallel_size": "copies of the whole engine (model, scheduler, KV cache; each with its own "
                          "tensor/pipeline ranks), each in a process of its own on its own GPUs (a "
                          "share of the cores on the CPU); each request goes to the copy with the "
                          "fewest unfinished requests. For throughput when the model fits on fewer "
                          "GPUs than the machine has: no all-reduce between copies",
    "parallel": "auto: choose tensor_parallel_size, pipeline_parallel_size and data_parallel_size from the "
                "model's size, the GPUs present and --goal, and print the choice and why (the sizes "
                "must then be left at 1)",
    "goal": "what parallel=auto optimises: latency (the widest tensor-parallel group: each GPU reads "
            "less of the weights per token) or throughput (the fewest GPUs per copy of the model, "
            "the rest as data-parallel replicas)",
    "worker_timeout": "seconds a worker process may stop responding (no heartbeat) before the engine "
                      "stops every rank with an error naming it (tensor/pipeline ranks and data-parallel replicas)",
    "startup_timeout": "seconds the worker processes may take to load the model, plan the KV cache and "
                       "capture CUDA graphs (tensor/pipeline ranks and data-parallel replicas)",
    "step_timeout": "seconds one step may take across the ranks before the engine gives up on it "
                    "(tensor/pipeline ranks and data-parallel replicas)",
    "enforce_eager": "run every step eagerly: no CUDA graphs for decode steps (GPU only; slower "
                     "decode, faster start)",
    "max_waiting": "most requests allowed to wait (server admission control); default unbounded",
    "async_scheduling": "schedule and prepare step N+1 while the device computes step N, and process "
                        "step N's tokens while it computes N+1 (host work overlaps device work; "
                        "outputs arrive one step later). Same tokens either way. Default: on for "
                        "GPUs (tensor parallel too; pipeline parallel runs synchronously), off on the "
                        "CPU, where there is nothing to overlap",
    "gpu_memory_budget": "offloading: bytes of GPU memory for weights, staging buffers, KV cache and "
                         "activations, e.g. 4GiB; layers that do not fit stream from the CPU or disk "
                         "tier, layer i+1 copied while layer i computes (CUDA only)",
    "cpu_memory_budget": "offloading: bytes of host RAM for weights, e.g. 24GiB: the CPU tier (pinned) "
                         "plus the staging buffers the disk tier reads into, and the KV cache of the "
                         "layers the policy keeps in host RAM (GPU; default there: 85% of the RAM "
                         "available at startup, the model's weights included); on a CPU-only machine, "
                         "every weight held in RAM (the rest streams from --offload-dir)",
    "offload_dir": "offloading: folder of the disk tier (a file per layer, read through mmap); "
                   "default: a temporary folder removed at exit",
    "offload_policy": "offloading: 'auto' (a cost model fed by measured bandwidths and CPU attention "
                      "speed picks the placement, KV tier and batch) or fractions "
                      "'w_gpu=F,w_cpu=F,w_disk=F[,kv_cpu=F][,micro_batch_tokens=N][,prefetch_depth=N]"
                      "[,prefill_waves=N]': shares of the decoder layers' weights per tier, share of the "
                      "layers whose KV cache stays in host RAM (their decode attention runs on the CPU), "
                      "tokens per micro-batch of the block schedule, layers fetched ahead, steps the "
                      "batch's prompts are prefilled over",
}


# Switches whose default (None) depends on the device.
_AUTO_BOOLS = {"async_scheduling"}


@dataclass
class EngineArgs:
    model: Any = None
    tokenizer: Any = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    kv_cache_memory: str | int | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    load_format: str = "auto"
    seed: int = 0
    quantization: str | None = None
    quantization_group_size: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    all_reduce: str = "auto"
    parallel: str | None = None          # None (the sizes as given) | "auto"
    goal: str = "latency"
    worker_timeout: float = 60.0
    step_timeout: float = 600.0
    startup_timeout: float = 1800.0
    enforce_eager: bool = False
    max_waiting: int | None = None
    async_scheduling: bool | None = None   # None: on for CUDA devices
    gpu_memory_budget: str | int | None = None
    cpu_memory_budget: str | int | None = None
    offload_dir: str | None = None
    offload_policy: str | dict = "auto"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(names - {'extra'})}")
        return cls(**kwargs)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(EngineArgs):
            # --seed on the command line is the sampling seed; the engine seed stays API-only.
            if f.name in ("extra", "tokenizer", "model", "seed"):
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            if isinstance(default, bool) or f.name in _AUTO_BOOLS:
                group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                   help=HELP[f.name])
            else:
                kind = type(default) if default is not None else (
                    int if f.name in ("max_model_len", "num_gpu_blocks_override", "max_waiting",
                                      "max_num_batched_tokens", "quantization_group_size") else str)
                group.add_argument(flag, type=kind, default=default,
                                   help=f"{HELP[f.name]} (default: {default})")
        group.add_argument("--model", "-m", default=None, help=HELP["model"])
        group.add_argument("--tokenizer", default=None, help=HELP["tokenizer"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                      if f.name != "extra" and hasattr(args, f.name)})
