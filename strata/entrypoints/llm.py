"""The offline API, named as vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from strata.engine.arg_utils import EngineArgs
from strata.engine.engine import create_engine
from strata.outputs import RequestOutput
from strata.sampling_params import RequestOutputKind, SamplingParams


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (it may be redirected after the handler is made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("strata")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class LLM:
    def __init__(self, model: Any = None, tokenizer: Any = None, **kwargs):
        _setup_logging()
        hf_tokenizer = None
        if tokenizer is not None and not isinstance(tokenizer, str):
            hf_tokenizer, tokenizer = tokenizer, None   # an in-memory transformers tokenizer
        use_tqdm = kwargs.pop("use_tqdm_on_load", True)
        kwargs.pop("trust_remote_code", None)   # accepted for vLLM compatibility; strata runs no remote code
        args = EngineArgs.from_kwargs(model=model, tokenizer=tokenizer, **kwargs)
        self.llm_engine = create_engine(args, hf_tokenizer=hf_tokenizer, use_tqdm=use_tqdm)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def start_profile(self) -> None:
        """Start torch.profiler on every rank (strata.profiling); the steps that follow are
        recorded until stop_profile()."""
        self._executor("start_profile").start_profile()

    def stop_profile(self, trace_dir: str | None = None) -> dict[int, str]:
        """Stop the profiler: each rank's table of the kernels that took the most time, by
        rank; with ``trace_dir``, each rank's Chrome trace is written there too."""
        return self._executor("stop_profile").stop_profile(trace_dir)

    def _executor(self, what: str):
        executor = getattr(self.llm_engine, "executor", None)
        if executor is None or not hasattr(executor, "start_profile"):
            raise NotImplementedError(f"{what} profiles one engine's ranks; this engine "
                                      f"({type(self.llm_engine).__name__}) has several: profile a replica")
        return executor

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        return self._run(prompts, params_list, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations."""
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (this LLM was made with skip_tokenizer_init=True)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            ids = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": ids,
                            "prompt": tokenizer.apply_chat_template(
                                conv, add_generation_prompt=add_generation_prompt, tokenize=False,
                                **(chat_template_kwargs or {}))})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, prompts, params_list, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                # Only finished requests are read here: spare the engine building an output
                # for every request after every step.
                params = (params or SamplingParams()).clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                ids.append(engine.add_request(None, prompt, params))
        except Exception:
            for rid in ids:   # admit all or none: a bad prompt must not leave the others running
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]
