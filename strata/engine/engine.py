"""The engine: admits requests and runs the schedule -> execute -> update loop."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

from strata.config import DeviceConfig, LoadConfig, OffloadConfig, ParallelConfig, QuantConfig, SchedulerConfig
from strata.core.request import Request
from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.core.scheduler import Scheduler
from strata.engine.arg_utils import EngineArgs
from strata.engine.output_processor import OutputProcessor
from strata.executor.executor import UniprocExecutor
from strata.executor.worker import Worker, batched_tokens_for, cache_config_for, check_parallel_fit
from strata.loader import model_loader
from strata.metrics import EngineStats
from strata.outputs import RequestOutput
from strata.quant.kv import resolve_kv_format
from strata.runner.model_runner import StepHandle
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")


class LLMEngine:
    def __init__(self, args: EngineArgs, hf_tokenizer=None, use_tqdm: bool = True, layout=None, source=None):
        t0 = time.perf_counter()
        if args.data_parallel_size != 1:
            raise ValueError(f"one LLMEngine is one replica; data_parallel_size={args.data_parallel_size} "
                             "runs through create_engine (as LLM(...) and `strata serve` do)")
        self.args = args
        self.device = DeviceConfig.resolve(args.device).device
        # Before the load, so a bad cache option fails fast.
        cache_config = cache_config_for(args)
        self.kv_format = resolve_kv_format(cache_config.kv_cache_dtype, self.device)
        load_config = LoadConfig(args.load_format, args.seed)
        source = source or model_loader.resolve_model(args.model, load_config)
        dtype = model_loader.resolve_dtype(args.dtype, source, self.device)
        model_config = model_loader.model_config_for(source, dtype)
        if args.parallel is not None:
            raise ValueError("parallel='auto' is resolved by create_engine (as LLM(...) and `strata serve` "
                             "do), which may choose several replicas")
        self.layout = layout    # parallel="auto"'s choice, made by create_engine
        self.parallel_config = parallel_config_for(args)
        self.tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(args, source, hf_tokenizer)
        self.quant_config = QuantConfig(args.quantization, args.quantization_group_size)
        self.offload_config = OffloadConfig.from_args(args.gpu_memory_budget, args.cpu_memory_budget,
                                                      args.offload_dir, args.offload_policy)
        if self.offload_config.enabled and self.parallel_config.world_size > 1:
            raise ValueError("offloading (gpu_memory_budget / cpu_memory_budget / offload_dir / "
                             "offload_policy) runs on one device; got tensor_parallel_size "
                             f"{args.tensor_parallel_size}, pipeline_parallel_size {args.pipeline_parallel_size}")
        self.model_config = model_config
        self.eos_token_ids = frozenset(model_config.eos_token_ids) | (
            frozenset(self.tokenizer.eos_token_ids) if self.tokenizer is not None else frozenset())
        self.graphs = None
        self.offload_plan = self.offload_mover = None
        max_num_batched_tokens = batched_tokens_for(args, self.device)
        chunked_prefill = args.enable_chunked_prefill
        if self.parallel_config.world_size == 1:
            worker = Worker(args, self.device, self.eos_token_ids, progress=use_tqdm, source=source,
                            offload_config=self.offload_config)
            plan = worker.plan()
            worker.allocate(plan.num_blocks, plan.max_model_len)
            self.graphs = worker.graphs
            self.executor = UniprocExecutor(worker.runner, worker.facts())
            # Offloading sets its own KV allotment and token budget (a batch or a prefill wave of
            # whole prompts: with waves, chunked prefill off).
            cache_config, max_num_batched_tokens = worker.cache_config, worker.max_num_batched_tokens
            chunked_prefill = worker.enable_chunked_prefill
            if worker.offload_plan is not None:
                self.offload_plan, self.offload_mover = worker.offload_plan, worker.offload_mover
                self.offload_hardware, self.offload_spec = worker.offload_hardware, worker.offload_spec
        else:
            from strata.executor.multiproc import MultiprocExecutor
            if source.kind == "hf_object":
                raise ValueError("tensor/pipeline parallelism needs a model path (each rank loads its "
                                 "own shard); an in-memory transformers model runs on one process")
            check_parallel_fit(model_config, self.parallel_config.tensor_parallel_size,
                               self.parallel_config.pipeline_parallel_size)
            from strata.executor.torchrun import TorchrunExecutor, run_follower, torchrun_rank
            rank = torchrun_rank()
            if args.async_scheduling and (self.parallel_config.pipeline_parallel_size > 1 or rank is not None):
                raise ValueError("async_scheduling needs pipeline_parallel_size = 1 and ranks started by "
                                 "strata, not torchrun (the other stages learn each step's tokens from "
                                 "the next step's message)")
            if rank is None:
                self.executor = MultiprocExecutor(args, self.parallel_config, self.device, self.eos_token_ids)
            elif rank == 0:
                self.executor = TorchrunExecutor(args, self.parallel_config, self.device, self.eos_token_ids)
            else:   # serves rank 0's steps; the process ends there
                run_follower(args, self.parallel_config, self.device, self.eos_token_ids)
            plan = self.executor.plan
        self.memory_plan: dict[str, float] = dict(plan.memory_plan)
        if self.graphs is not None:
            self.memory_plan["graphs"] = self.graphs.pool_bytes
        num_blocks, max_model_len = plan.num_blocks, plan.max_model_len
        self.scheduler_config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            max_model_len=max_model_len, enable_chunked_prefill=chunked_prefill,
            max_waiting=args.max_waiting)
        self.scheduler = Scheduler(self.scheduler_config, cache_config, num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self.source = source
        self.num_blocks = num_blocks
        self.kv_block_bytes = self.executor.facts.kv_block_bytes
        self.load_seconds = time.perf_counter() - t0
        self._ids = itertools.count()
        # Async scheduling: one process, or tensor-parallel ranks that each sample their own
        # tokens (pipeline stages learn them from the next step's message, sent before they exist).
        supported = getattr(self.executor, "supports_async", True)
        self.async_scheduling = (self.device.type == "cuda" and supported
                                 if args.async_scheduling is None else args.async_scheduling)
        # Async scheduling: the step launched last, whose results the next step() takes.
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        logger.info(self.describe())

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids, params = prepare_request(self.tokenizer, prompt, params,
                                                  self.scheduler_config.max_model_len,
                                                  self.model_config.vocab_size, self.scheduler.check_request)
        siblings = [Request(request_id if params.n == 1 else f"{request_id}#{i}", token_ids, params,
                            self.eos_token_ids, parent_id=request_id, sequence_index=i,
                            arrival_time=arrival_time) for i in range(params.n)]
        self.scheduler.add_request(siblings)
        self.output_processor.add(request_id, text, siblings)
        return request_id

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

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV blocks in use, prefix-cache hits, preemptions."""
        return EngineStats.of(self.scheduler)

    @property
    def facts(self):
        """The model as loaded: parameters, weight bytes, KV block bytes, quantization."""
        return self.executor.facts

    def shutdown(self) -> None:
        """Stop the worker processes (tensor/pipeline parallel); the engine runs no more steps."""
        self.executor.shutdown()

    # ---- reporting ---------------------------------------------------------------------------
    def describe(self) -> str:
        cfg = self.model_config
        facts = self.executor.facts
        num_params, weight_gib = facts.num_parameters, facts.weight_bytes / 2**30
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
                + self.describe_parallel() + self._describe_gpu() + self._describe_cpu()
                + (f" | {self.offload_plan.describe()}{self._describe_offload_host()}"
                   if self.offload_plan is not None else ""))

    def _describe_offload_host(self) -> str:
        """What the tiers hold in host RAM once placed, beside the plan's count (pinned: page-locked
        through runner/host_memory, exactly the sizes asked)."""
        from strata.runner.host_memory import pinned_bytes
        mover = self.offload_mover
        if mover is None:
            return ""
        return (f" | placed: host tiers {mover.host_weight_bytes() / 2**30:.3f} GiB"
                f" (pinned {pinned_bytes() / 2**30:.3f} GiB)")

    def describe_parallel(self) -> str:
        p = self.parallel_config
        auto = f" chosen by parallel=auto, goal {self.args.goal}" if self.layout is not None else ""
        if p.world_size == 1:
            return f" | one process{auto}" if auto else ""
        samplers = ("every rank samples, rank 0 answers" if p.pipeline_parallel_size == 1
                    else "rank 0 of the last stage samples")
        return (f" | {p.world_size} processes: tensor parallel {p.tensor_parallel_size} x pipeline "
                f"parallel {p.pipeline_parallel_size}{auto} ({self.executor.backend}; weights and KV "
                f"cache per rank; {samplers}; {self.executor.facts.all_reduce})")

    def describe_kv_dtype(self) -> str:
        """What the KV cache stores: the model dtype, or the quantized format (kv_cache_dtype)."""
        if self.kv_format is None:
            return str(self.model_config.dtype).removeprefix("torch.")
        return f"{self.kv_format.name} (scale per token and head)"

    def _describe_quant(self) -> str:
        q = self.quant_config
        if q.method is None:
            summary = self.executor.facts.quant_summary   # GGUF kept packed
            return f"; {summary}" if summary else ""
        group = f", groups of {q.group_size}" if q.group_size else ", per channel"
        head = self.executor.facts.lm_head_quantized
        return f"; quantized at load: {q.method}{group}, LM head {'quantized' if head else 'float'}"

    def _describe_cpu(self) -> str:
        if self.device.type != "cpu" or self.parallel_config.world_size > 1:
            return ""
        import torch

        from strata.kernels import cpu_quant
        return f" | {cpu_quant.describe()}, {torch.get_num_threads()} threads"

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


def prepare_request(tokenizer, prompt, params: SamplingParams | None, max_model_len: int, vocab_size: int,
                    check_prompt) -> tuple[str | None, list[int], SamplingParams]:
    """Tokenize a prompt and check it and its parameters as an engine admits them: (text, token
    ids, a private copy of the parameters with max_tokens fitted to the context). Raises the
    user's error; `check_prompt(num_tokens)` adds the cache's own limits."""
    params = (params or SamplingParams()).clone()
    text, token_ids = _tokenize(tokenizer, prompt)
    check_prompt(len(token_ids))
    room = max_model_len - len(token_ids)
    params.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    params.min_tokens = min(params.min_tokens, params.max_tokens)
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
    params.check_token_ids(vocab_size)
    return text, token_ids, params


def _tokenize(tokenizer, prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        prompt = prompt.get("prompt")
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a string, a list of token ids or {{'prompt_token_ids': [...]}}; "
                        f"got {type(prompt).__name__}")
    if tokenizer is None:
        raise ValueError("this engine runs without a tokenizer (skip_tokenizer_init=True): "
                         "pass prompts as {'prompt_token_ids': [...]}")
    return prompt, tokenizer.encode(prompt)


def create_engine(args: EngineArgs, hf_tokenizer=None, use_tqdm: bool = True):
    """The engine for these options: an LLMEngine, or a DataParallelEngine over several when
    data_parallel_size > 1 (given, or chosen by parallel="auto" for the goal throughput)."""
    layout = source = None   # source: resolved here for parallel="auto", then not again
    if args.parallel is not None:
        device = DeviceConfig.resolve(args.device).device
        source = model_loader.resolve_model(args.model, LoadConfig(args.load_format, args.seed))
        cfg = model_loader.model_config_for(source, model_loader.resolve_dtype(args.dtype, source, device))
        layout = auto_layout(args, source, cfg, device)
        args = dataclasses.replace(args, parallel=None, tensor_parallel_size=layout.tensor_parallel_size,
                                   pipeline_parallel_size=layout.pipeline_parallel_size,
                                   data_parallel_size=layout.data_parallel_replicas)
        logger.info(f"parallel=auto: tensor parallel {layout.tensor_parallel_size} x pipeline parallel "
                    f"{layout.pipeline_parallel_size} x {layout.data_parallel_replicas} data-parallel "
                    f"replica(s), because {layout.reason}")
    if args.data_parallel_size != 1:
        from strata.engine.data_parallel import DataParallelEngine
        return DataParallelEngine(args, layout, hf_tokenizer, use_tqdm, source=source)
    return LLMEngine(args, hf_tokenizer, use_tqdm, layout=layout, source=source)


def parallel_config_for(args: EngineArgs) -> ParallelConfig:
    return ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size,
                          worker_timeout_s=args.worker_timeout, step_timeout_s=args.step_timeout,
                          startup_timeout_s=args.startup_timeout, all_reduce=args.all_reduce)


def auto_layout(args: EngineArgs, source, cfg, device):
    """parallel="auto": the layout for this model on the GPUs present (distributed/auto.py)."""
    import torch

    from strata.distributed.auto import choose_layout, estimate_weight_bytes
    if args.parallel != "auto":
        raise ValueError(f"parallel must be 'auto' (or None), got {args.parallel!r}")
    if args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1 or args.data_parallel_size != 1:
        raise ValueError("parallel='auto' chooses tensor_parallel_size, pipeline_parallel_size and "
                         "data_parallel_size: leave them at 1, or drop parallel='auto'")
    bytes_per_weight = torch.empty((), dtype=cfg.dtype).element_size()
    if args.quantization is not None:
        bytes_per_weight = {"int8": 1.0, "int4": 0.5625}[args.quantization]   # codes + scales
    elif source.kind == "gguf":   # the file's own quantization: its size over the weights
        bytes_per_weight = source.path.stat().st_size / estimate_weight_bytes(cfg, 1.0)
    num_gpus, gpu_bytes = 0, 0
    if device.type == "cuda":
        num_gpus = torch.cuda.device_count()
        gpu_bytes = int(torch.cuda.get_device_properties(0).total_memory * args.gpu_memory_utilization)
    return choose_layout(cfg, bytes_per_weight, num_gpus, gpu_bytes, args.goal)


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
