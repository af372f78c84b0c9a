"""One rank's share of the engine: it builds the model (its shard of it), plans and allocates
its KV cache and runs steps. The single-process engine holds one in-process; the multi-process
executor starts one per rank (multiproc.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field

import torch

from strata.config import CacheConfig, LoadConfig, ModelConfig, OffloadConfig, QuantConfig, parse_bytes
from strata.distributed import parallel_state as ps
from strata.engine.arg_utils import EngineArgs
from strata.loader import model_loader
from strata.profiling import StepProfiler
from strata.quant.kv import resolve_kv_format
from strata.runner.model_runner import ModelRunner

logger = logging.getLogger("strata")

DEFAULT_CPU_KV_BYTES = 4 * 2**30
DEFAULT_CPU_BATCHED_TOKENS = 2048
DEFAULT_GPU_BATCHED_TOKENS = 8192


def cache_config_for(args: EngineArgs) -> CacheConfig:
    return CacheConfig(
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory_bytes=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override, kv_cache_dtype=args.kv_cache_dtype)


def batched_tokens_for(args: EngineArgs, device: torch.device) -> int:
    return args.max_num_batched_tokens or (
        DEFAULT_GPU_BATCHED_TOKENS if device.type == "cuda" else DEFAULT_CPU_BATCHED_TOKENS)


@dataclass
class KVPlan:
    num_blocks: int
    max_model_len: int
    memory_plan: dict = field(default_factory=dict)


@dataclass
class ModelFacts:
    """What the startup line and ``strata info`` say about the weights (of this rank)."""

    num_parameters: int
    weight_bytes: int
    quant_summary: str | None
    kv_block_bytes: int
    lm_head_quantized: bool = False
    all_reduce: str = ""   # how the tensor-parallel ranks sum (empty on one rank)


class Worker:
    def __init__(self, args: EngineArgs, device: torch.device, eos_token_ids: frozenset[int],
                 progress: bool = False, source: model_loader.ModelSource | None = None,
                 offload_config: OffloadConfig | None = None):
        self.args = args
        self.device = device
        self.cache_config = cache_config_for(args)
        kv_format = resolve_kv_format(self.cache_config.kv_cache_dtype, device)
        load_config = LoadConfig(args.load_format, args.seed)
        self.source = source or model_loader.resolve_model(args.model, load_config)
        dtype = model_loader.resolve_dtype(args.dtype, self.source, device)
        self.model_config: ModelConfig = model_loader.model_config_for(self.source, dtype)
        groups = ps.get_groups()
        check_parallel_fit(self.model_config, groups.tp_size, groups.pp_size)
        # Before the model is built: its buffers for the all-reduce exist before any graph capture.
        self.all_reduce = ps.init_all_reduce(device, self.model_config.dtype, args.all_reduce,
                                             self.model_config.hidden_size)
        self.profiler = StepProfiler()   # LLM.start_profile / stop_profile
        quant_config = QuantConfig(args.quantization, args.quantization_group_size)
        offload = offload_config is not None and offload_config.enabled
        self.max_num_batched_tokens = batched_tokens_for(args, device)
        self.enable_chunked_prefill = args.enable_chunked_prefill
        self.offload_plan = self.offload_mover = self.offload_hardware = self.offload_spec = None
        if offload and device.type == "cuda":
            _grow_in_place()
        placer = self._offload_placer(offload_config) if offload else None
        # An offloaded model is built in host memory, and each layer goes to its tier as soon as
        # it has loaded (the placer), so the whole model is never in RAM at once.
        model = model_loader.build_model(self.source, self.model_config, load_config,
                                         torch.device("cpu") if offload else device, progress=progress,
                                         quant_config=quant_config, keep_gguf_packed=not offload,
                                         init_device=device if offload else None, layer_sink=placer)
        if offload:
            self._offload(model, placer)
        runner_args = (model, self.model_config, args.block_size, device, eos_token_ids, kv_format)
        if groups.tp_size * groups.pp_size == 1:
            plan = self.offload_plan
            kv_host_layers = frozenset(i for i in range(self.model_config.num_layers)
                                       if plan is not None and plan.kv_on_host(i))
            self.runner = ModelRunner(*runner_args, kv_host_layers)
        else:
            from strata.runner.parallel_runner import ParallelModelRunner
            self.runner = ParallelModelRunner(*runner_args)
        self.graphs = None

    def _offload_placer(self, offload_config: OffloadConfig):
        """The loader's layer sink that searches the offload policy on the first finished layer
        and puts each layer on its tier (runner/offload_loop.LayerPlacer)."""
        from strata.core.offload_policy import Workload
        from strata.runner.offload_loop import LayerPlacer
        args, cfg = self.args, self.model_config
        workload = Workload.from_max_model_len(args.max_model_len or cfg.max_position_embeddings,
                                               args.max_num_seqs)
        return LayerPlacer(cfg, offload_config, self.device, workload, self.cache_config.gpu_memory_utilization,
                           resolve_kv_format(self.cache_config.kv_cache_dtype, self.device))

    def _offload(self, model, placer) -> None:
        """Finish carrying out the plan (the parts outside the layers, the offload loop). On a GPU
        the plan's KV allotment becomes the KV cache, and (unless given) a step's token budget
        holds the plan's whole batch of prompts, so each layer's weights cross PCIe once for all
        of them, or one prefill wave of them (whole prompts: chunked prefill off)."""
        args, cache = self.args, self.cache_config
        workload = placer.workload
        self.offload_plan, self.offload_mover, self.offload_hardware, self.offload_spec = placer.finish(model)
        plan = self.offload_plan
        if self.device.type == "cuda":
            if cache.kv_cache_memory_bytes is None and cache.num_gpu_blocks_override is None:
                # The plan's batch at max_model_len, in blocks: the same block ids address the
                # device's caches and the host's.
                blocks_per_seq = -(-workload.max_model_len // cache.block_size)
                self.cache_config = dataclasses.replace(cache, num_gpu_blocks_override=plan.batch_size * blocks_per_seq)
            if args.max_num_batched_tokens is None:
                self.max_num_batched_tokens = placer.step_tokens()
                if plan.prefill_waves > 1:
                    # Prompts whole, one wave a step: a chunk after a cached prefix would attend
                    # on the CPU over the host cache (torch's path past C_MAX_QUERY tokens: slow).
                    self.enable_chunked_prefill = False

    def facts(self) -> ModelFacts:
        model = self.runner.model
        return ModelFacts(
            num_parameters=getattr(model, "num_parameters", None) or sum(p.numel() for p in model.parameters()),
            weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            quant_summary=getattr(model, "quant_summary", None),
            kv_block_bytes=self.runner.kv_cache_block_bytes(),
            lm_head_quantized=getattr(model, "lm_head_quantized", False),
            all_reduce=self.all_reduce.describe() if ps.get_tp_size() > 1 else "")

    def fingerprint(self) -> str:
        """What every rank must agree on: the model, its configuration and the engine options
        that shape the computation (a rank that read another checkpoint would give garbage)."""
        skip = {"model", "tokenizer", "extra"}
        options = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(self.args) if f.name not in skip}
        text = repr((self.source.name, self.model_config, sorted(options.items(), key=lambda kv: kv[0])))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def plan(self) -> KVPlan:
        return plan_kv_cache(self.args, self.device, self.runner, self.cache_config, self.model_config,
                             self.max_num_batched_tokens)

    def allocate(self, num_blocks: int, max_model_len: int) -> dict:
        """Allocate the KV cache; capture CUDA graphs where they apply. Returns graph facts."""
        self.runner.allocate_kv_cache(num_blocks)
        if ps.get_tp_size() * ps.get_pp_size() > 1:
            # Every rank that samples starts its steps from the same random state, so rows
            # without a seed draw the same tokens on each (parallel_runner.py).
            torch.manual_seed(self.args.seed)
        if self.device.type == "cuda" and not self.args.enforce_eager and ps.get_pp_size() == 1 \
                and self.offload_plan is None and not self._graphs_break_torch_path():
            self.graphs = self.runner.capture_cuda_graphs(self.args.max_num_seqs, max_model_len)
            return {"sizes": len(self.graphs.sizes), "max_batch": self.graphs.max_batch,
                    "seconds": self.graphs.capture_seconds, "pool_bytes": self.graphs.pool_bytes}
        return {}

    def _graphs_break_torch_path(self) -> bool:
        """The torch attention path on CUDA (STRATA_DISABLE_TRITON=1, a debugging switch) gave
        wrong decode steps when they replayed CUDA graphs: NaN logprobs from the second step over
        an int8 cache, other greedy tokens over a float32 one (H100, tests/e2e/test_kv_cache_dtype.py;
        the cause is not found yet), and the right ones eagerly. The Triton path is unaffected.
        Such an engine runs eagerly."""
        from strata.kernels import use_triton
        if use_triton(torch.empty(0, device=self.device)):
            return False
        logger.warning("strata: the torch attention path (Triton off) runs without CUDA graphs")
        return True

    def start_profile(self) -> None:
        self.profiler.start()

    def stop_profile(self, trace_dir: str | None = None) -> str:
        import torch.distributed as dist
        return self.profiler.stop(dist.get_rank() if dist.is_initialized() else 0, trace_dir)

    def time_all_reduce(self, token_counts: list[int]) -> dict:
        """The all-reduces of one step at each size (2 a layer + the embedding's), for benchmarks."""
        from strata.distributed.comm_timing import time_all_reduce_step
        cfg = self.model_config
        model = self.runner.model
        layers = getattr(model, "end_layer", cfg.num_layers) - getattr(model, "start_layer", 0)
        with torch.inference_mode():
            return {n: time_all_reduce_step(n, cfg.hidden_size, cfg.dtype, self.device, 2 * layers + 1)
                    for n in token_counts}


def check_parallel_fit(cfg: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Clear errors before building: what does not divide, what cannot be staged."""
    if cfg.num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size ({tp_size}) must divide the model's {cfg.num_heads} "
                         "attention heads")
    if cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp_size}) and the model's {cfg.num_kv_heads} KV heads: "
                         "one must divide the other (KV heads are split, or replicated when fewer)")
    if pp_size > 1:
        from strata.models.registry import get_model_class
        if not getattr(get_model_class(cfg.architecture), "supports_pipeline_parallel", False):
            raise ValueError(f"pipeline_parallel_size > 1 is not supported for {cfg.architecture} "
                             "(Llama, Mistral, Qwen2 and Qwen3 models support it)")
        if cfg.num_layers < pp_size:
            raise ValueError(f"pipeline_parallel_size ({pp_size}) is more than the model's "
                             f"{cfg.num_layers} layers")


def plan_kv_cache(args: EngineArgs, device: torch.device, runner: ModelRunner, cache: CacheConfig,
                  cfg: ModelConfig, max_num_batched_tokens: int) -> KVPlan:
    block_bytes = runner.kv_cache_block_bytes()
    want_len = args.max_model_len or cfg.max_position_embeddings
    memory_plan: dict = {}
    if cache.num_gpu_blocks_override:
        num_blocks = cache.num_gpu_blocks_override
    else:
        budget = cache.kv_cache_memory_bytes
        if budget is None and device.type == "cuda":
            budget, memory_plan = _gpu_kv_budget(args, device, runner, cache, max_num_batched_tokens)
        elif budget is None:
            need = args.max_num_seqs * want_len * block_bytes // cache.block_size
            budget = min(DEFAULT_CPU_KV_BYTES, need)
        num_blocks = max(budget // block_bytes, 0)
    capacity = num_blocks * cache.block_size
    if num_blocks < 1:
        raise ValueError(f"no memory is left for the KV cache (one block needs {block_bytes} bytes); "
                         "lower max_num_batched_tokens or raise kv_cache_memory / gpu_memory_utilization")
    if capacity < want_len:
        if args.max_model_len:
            raise ValueError(f"max_model_len ({want_len}) is more than the KV cache holds "
                             f"({capacity} tokens in {num_blocks} blocks); raise kv_cache_memory "
                             "or lower max_model_len")
        want_len = capacity
    return KVPlan(num_blocks, want_len, memory_plan)


def _gpu_kv_budget(args: EngineArgs, device: torch.device, runner: ModelRunner, cache: CacheConfig,
                   max_num_batched_tokens: int) -> tuple[int, dict]:
    """gpu_memory_utilization of the card, minus the weights, the measured peak of the largest
    step, memory outside torch (CUDA context, library workspaces) and room for the decode
    graphs: what is left holds KV blocks. Every step after this fits by construction."""
    activations = runner.profile_activation_bytes(max_num_batched_tokens, args.max_num_seqs)
    free, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)
    outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    graphs = 0
    if not args.enforce_eager:
        # The graphs' shared pool holds one step's activations at the largest captured batch.
        graphs = activations * min(1.0, args.max_num_seqs / max_num_batched_tokens) + 256 * 2**20
    budget = int(total * cache.gpu_memory_utilization - weights - activations - outside_torch - graphs)
    plan = {"total": total, "weights": weights, "activations": activations,
            "outside_torch": outside_torch, "graph_reserve": graphs,
            "profiled_tokens": max_num_batched_tokens}
    return budget, plan


def _grow_in_place() -> None:
    """Offloading under gpu_memory_budget: let torch's caching allocator grow and shrink its
    segments in place (expandable segments) unless PYTORCH_CUDA_ALLOC_CONF says otherwise. With
    fixed segments, the block schedule's tensors of many sizes left 4.05 GiB reserved for a 3.20
    GiB allocated peak under a 4 GiB budget (H100, 8B, batch 133): the budget holds what the
    process takes from the GPU, not only what its tensors hold."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    try:
        with warnings.catch_warnings():   # newer torch names the setting's public home; same effect
            warnings.simplefilter("ignore")
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:   # an older torch, or a platform without them
        logger.warning(f"offloading: torch's expandable segments are unavailable ({e}); reserved GPU "
                       "memory may exceed what the plan allocates")
