"""The engine: admits requests and runs the schedule -> execute -> update loop."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from strata.config import (CacheConfig, DeviceConfig, LoadConfig, ModelConfig, OffloadConfig, QuantConfig,
                           SchedulerConfig, parse_bytes)
from strata.core.request import Request
from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.core.scheduler import Scheduler
from strata.engine.arg_utils import EngineArgs
from strata.engine.output_processor import OutputProcessor
from strata.executor.executor import UniprocExecutor
from strata.loader import model_loader
from strata.outputs import RequestOutput
from strata.quant.kv import resolve_kv_format
from strata.runner.model_runner import ModelRunner, StepHandle
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")

DEFAULT_CPU_KV_BYTES = 4 * 2**30
DEFAULT_CPU_BATCHED_TOKENS = 2048
DEFAULT_GPU_BATCHED_TOKENS = 8192


class LLMEngine:
    def __init__(self, args: EngineArgs, hf_tokenizer=None, use_tqdm: bool = True):
        t0 = time.perf_counter()
        self.args = args
        self.device = DeviceConfig.resolve(args.device).device
        # Before the load, so a bad cache option fails fast.
        cache_config = CacheConfig(
            block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
            kv_cache_memory_bytes=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_gpu_blocks_override=args.num_gpu_blocks_override, kv_cache_dtype=args.kv_cache_dtype)
        self.kv_format = resolve_kv_format(cache_config.kv_cache_dtype, self.device)
        load_config = LoadConfig(args.load_format, args.seed)
        source = model_loader.resolve_model(args.model, load_config)
        dtype = model_loader.resolve_dtype(args.dtype, source, self.device)
        model_config = model_loader.model_config_for(source, dtype)
        self.tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(args, source, hf_tokenizer)
        self.quant_config = QuantConfig(args.quantization, args.quantization_group_size)
        self.offload_config = OffloadConfig.from_args(args.gpu_memory_budget, args.cpu_memory_budget,
                                                      args.offload_dir, args.offload_policy)
        offload = self.offload_config.enabled
        if offload and args.tensor_parallel_size > 1:
            raise ValueError("offloading (gpu_memory_budget / cpu_memory_budget / offload_dir / "
                             f"offload_policy) runs on one device; got tensor_parallel_size "
                             f"{args.tensor_parallel_size}")
        # An offloaded model is built in host memory; the mover then places each part.
        model = model_loader.build_model(source, model_config, load_config,
                                         torch.device("cpu") if offload else self.device, progress=use_tqdm,
                                         quant_config=self.quant_config, keep_gguf_packed=not offload,
                                         init_device=self.device if offload else None)
        self.model_config = model_config
        self.eos_token_ids = frozenset(model_config.eos_token_ids) | (
            frozenset(self.tokenizer.eos_token_ids) if self.tokenizer is not None else frozenset())
        max_num_batched_tokens = args.max_num_batched_tokens or (
            DEFAULT_GPU_BATCHED_TOKENS if self.device.type == "cuda" else DEFAULT_CPU_BATCHED_TOKENS)
        self.offload_plan = self.offload_mover = None
        if offload:
            cache_config, max_num_batched_tokens = self._offload(model, model_config, cache_config,
                                                                 max_num_batched_tokens)
        runner = ModelRunner(model, model_config, args.block_size, self.device, self.eos_token_ids,
                             self.kv_format)
        self.memory_plan: dict[str, float] = {}
        num_blocks, max_model_len = self._plan_kv_cache(runner, cache_config, model_config,
                                                        max_num_batched_tokens)
        runner.allocate_kv_cache(num_blocks)
        self.graphs = None
        if self.device.type == "cuda" and not args.enforce_eager and not offload:
            self.graphs = runner.capture_cuda_graphs(args.max_num_seqs, max_model_len)
            self.memory_plan["graphs"] = self.graphs.pool_bytes
        self.scheduler_config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            max_model_len=max_model_len, enable_chunked_prefill=args.enable_chunked_prefill,
            max_waiting=args.max_waiting)
        self.scheduler = Scheduler(self.scheduler_config, cache_config, num_blocks)
        self.executor = UniprocExecutor(runner)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self.source = source
        self.num_blocks = num_blocks
        self.kv_block_bytes = runner.kv_cache_block_bytes()
        self.load_seconds = time.perf_counter() - t0
        self._ids = itertools.count()
        self.async_scheduling = (self.device.type == "cuda" if args.async_scheduling is None
                                 else args.async_scheduling)
        # Async scheduling: the step launched last, whose results the next step() takes.
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        logger.info(self.describe())

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        params = (params or SamplingParams()).clone()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self.scheduler.check_request(len(token_ids))
        room = self.scheduler_config.max_model_len - len(token_ids)
        params.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        params.min_tokens = min(params.min_tokens, params.max_tokens)
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        params.check_token_ids(vocab)
        siblings = [Request(request_id if params.n == 1 else f"{request_id}#{i}", token_ids, params,
                            self.eos_token_ids, parent_id=request_id, sequence_index=i,
                            arrival_time=arrival_time) for i in range(params.n)]
        self.scheduler.add_request(siblings)
        self.output_processor.add(request_id, text, siblings)
        return request_id

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string, a list of token ids or {{'prompt_token_ids': [...]}}; "
                            f"got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("this engine runs without a tokenizer (skip_tokenizer_init=True): "
                             "pass prompts as {'prompt_token_ids': [...]}")
        return prompt, self.tokenizer.encode(prompt)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its KV blocks go back to the pool at once."""
        return self.output_processor.abort(str(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.states)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if not self.async_scheduling:
            sched = self.scheduler.schedule()
            result = self.executor.execute(sched)
            return self._process(sched, result)
        # Launch step N+1 first (its placeholders are step N's tokens, still on the device), then
        # take step N's tokens: the host updates and detokenizes while the device computes N+1.
        sched = self.scheduler.schedule()
        launched = (sched, self.executor.launch(sched))
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return []
        return self._process(previous[0], self.executor.finish(previous[1]))

    def _process(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        updates = self.scheduler.update(sched, result)
        return self.output_processor.process(updates, result)

    def _offload(self, model, cfg: ModelConfig, cache: CacheConfig, max_num_batched_tokens: int):
        """Search the offload policy and carry it out (runner/offload_loop.py). On a GPU the plan's
        KV allotment becomes the KV cache, and (unless given) a step's token budget holds the
        plan's whole batch of prompts, so each layer's weights cross PCIe once for all of them."""
        from strata.core.offload_policy import Workload
        from strata.runner.offload_loop import offload_model
        args = self.args
        workload = Workload.from_max_model_len(args.max_model_len or cfg.max_position_embeddings,
                                               args.max_num_seqs)
        self.offload_plan, self.offload_mover, self.offload_hardware, self.offload_spec = offload_model(
            model, cfg, self.offload_config, self.device, workload, cache.gpu_memory_utilization)
        plan = self.offload_plan
        if self.device.type == "cuda":
            if cache.kv_cache_memory_bytes is None and cache.num_gpu_blocks_override is None:
                cache = dataclasses.replace(cache, kv_cache_memory_bytes=plan.kv_bytes)
            if args.max_num_batched_tokens is None:
                max_num_batched_tokens = max(256, plan.batch_size * workload.max_model_len)
        return cache, max_num_batched_tokens

    # ---- reporting ---------------------------------------------------------------------------
    def _plan_kv_cache(self, runner: ModelRunner, cache: CacheConfig, cfg: ModelConfig,
                       max_num_batched_tokens: int) -> tuple[int, int]:
        block_bytes = runner.kv_cache_block_bytes()
        want_len = self.args.max_model_len or cfg.max_position_embeddings
        if cache.num_gpu_blocks_override:
            num_blocks = cache.num_gpu_blocks_override
        else:
            budget = cache.kv_cache_memory_bytes
            if budget is None and self.device.type == "cuda":
                budget = self._gpu_kv_budget(runner, cache, max_num_batched_tokens)
            elif budget is None:
                need = self.args.max_num_seqs * want_len * block_bytes // cache.block_size
                budget = min(DEFAULT_CPU_KV_BYTES, need)
            num_blocks = max(budget // block_bytes, 0)
        capacity = num_blocks * cache.block_size
        if num_blocks < 1:
            raise ValueError(f"no memory is left for the KV cache (one block needs {block_bytes} bytes); "
                             "lower max_num_batched_tokens or raise kv_cache_memory / gpu_memory_utilization")
        if capacity < want_len:
            if self.args.max_model_len:
                raise ValueError(f"max_model_len ({want_len}) is more than the KV cache holds "
                                 f"({capacity} tokens in {num_blocks} blocks); raise kv_cache_memory "
                                 "or lower max_model_len")
            want_len = capacity
        return num_blocks, want_len

    def _gpu_kv_budget(self, runner: ModelRunner, cache: CacheConfig, max_num_batched_tokens: int) -> int:
        """gpu_memory_utilization of the card, minus the weights, the measured peak of the largest
        step, memory outside torch (CUDA context, library workspaces) and room for the decode
        graphs: what is left holds KV blocks. Every step after this fits by construction."""
        activations = runner.profile_activation_bytes(max_num_batched_tokens, self.args.max_num_seqs)
        free, total = torch.cuda.mem_get_info(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(self.device))
        graphs = 0
        if not self.args.enforce_eager:
            # The graphs' shared pool holds one step's activations at the largest captured batch.
            graphs = activations * min(1.0, self.args.max_num_seqs / max_num_batched_tokens) + 256 * 2**20
        budget = int(total * cache.gpu_memory_utilization - weights - activations - outside_torch - graphs)
        self.memory_plan = {"total": total, "weights": weights, "activations": activations,
                            "outside_torch": outside_torch, "graph_reserve": graphs,
                            "profiled_tokens": max_num_batched_tokens}
        return budget

    def describe(self) -> str:
        cfg = self.model_config
        model = self.executor.runner.model
        num_params = getattr(model, "num_parameters", None) or sum(p.numel() for p in model.parameters())
        weight_gib = sum(p.numel() * p.element_size() for p in self.executor.runner.model.parameters()) / 2**30
        kv_gib = self.num_blocks * self.kv_block_bytes / 2**30
        return (f"strata: {cfg.architecture} from {self.source.name} | {num_params / 1e6:.1f}M params, "
                f"{str(cfg.dtype).removeprefix('torch.')} on {self.device} "
                f"(checkpoint quantization: {self.source.quantization or 'none'}"
                f"{self._describe_quant()}) | "
                f"weights {weight_gib:.2f} GiB, KV cache {self.describe_kv_dtype()} {kv_gib:.2f} GiB = "
                f"{self.num_blocks} blocks x "
                f"{self.args.block_size} tokens "
                f"({self.num_blocks * self.args.block_size} tokens at most in flight) | "
                f"max_model_len {self.scheduler_config.max_model_len} | "
                f"{'async' if self.async_scheduling else 'sync'} scheduling | "
                f"loaded in {self.load_seconds:.1f}s"
                + self._describe_gpu()
                + (f" | {self.offload_plan.describe()}" if self.offload_plan is not None else ""))

    def describe_kv_dtype(self) -> str:
        """What the KV cache stores: the model dtype, or the quantized format (kv_cache_dtype)."""
        if self.kv_format is None:
            return str(self.model_config.dtype).removeprefix("torch.")
        return f"{self.kv_format.name} (scale per token and head)"

    def _describe_quant(self) -> str:
        q = self.quant_config
        if q.method is None:
            summary = getattr(self.executor.runner.model, "quant_summary", None)   # GGUF kept packed
            return f"; {summary}" if summary else ""
        group = f", groups of {q.group_size}" if q.group_size else ", per channel"
        head = getattr(self.executor.runner.model, "lm_head_quantized", False)
        return f"; quantized at load: {q.method}{group}, LM head {'quantized' if head else 'float'}"

    def _describe_gpu(self) -> str:
        if self.device.type != "cuda":
            return ""
        plan, gib = self.memory_plan, 2**30
        text = ""
        if "total" in plan:
            text += (f" | GPU memory plan ({self.args.gpu_memory_utilization:.0%} of "
                     f"{plan['total'] / gib:.1f} GiB): weights {plan['weights'] / gib:.2f}, activations "
                     f"{plan['activations'] / gib:.2f} (profiled at {plan['profiled_tokens']} tokens), "
                     f"outside torch {plan['outside_torch'] / gib:.2f}, KV "
                     f"{self.num_blocks * self.kv_block_bytes / gib:.2f} GiB")
        if self.graphs is not None:
            text += (f" | CUDA graphs: {len(self.graphs.sizes)} decode batch sizes up to "
                     f"{self.graphs.max_batch}, captured in {self.graphs.capture_seconds:.1f}s, "
                     f"{self.graphs.pool_bytes / gib:.2f} GiB")
        else:
            text += " | eager (no CUDA graphs)"
        return text


def _load_tokenizer(args: EngineArgs, source, hf_tokenizer):
    from strata.tokenizer import Tokenizer
    if hf_tokenizer is not None:
        return Tokenizer.from_hf(hf_tokenizer)
    if args.tokenizer is not None:
        return Tokenizer.from_dir(args.tokenizer)
    if source.kind == "gguf":
        return Tokenizer.from_gguf_metadata(source.gguf.metadata)
    if source.kind == "hf_dir":
        return Tokenizer.from_dir(source.path)
    raise ValueError("an in-memory model needs its tokenizer: LLM(model=hf_model, tokenizer=hf_tokenizer), "
                     "or skip_tokenizer_init=True")
