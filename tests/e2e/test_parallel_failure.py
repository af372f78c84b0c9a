"""A rank that dies or hangs mid-run ends the engine with an error naming it, within the timeout:
never a silent hang. Every worker process is gone afterwards and the requests' KV blocks are
free; the engine refuses further work with the same error."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hf_tiny import make_tiny_model

from strata import LLM, SamplingParams
from strata.executor.multiproc import HEARTBEAT_S, WorkerFailure

PROMPTS = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302]]
WORKER_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


def sabotage_at_step(llm, step: int, rank: int, sig: signal.Signals):
    """Send sig to a rank's process just before the engine's step number `step`."""
    executor = llm.llm_engine.executor
    launch = executor._launch   # under launch() (async scheduling) and execute() (sync)
    count = {"n": 0, "at": None}

    def launch_and_maybe_sabotage(sched, defer):
        count["n"] += 1
        if count["n"] == step:
            os.kill(executor.procs[rank].pid, sig)
            count["at"] = time.monotonic()
        return launch(sched, defer)

    executor._launch = launch_and_maybe_sabotage
    return count


def generate_until_failure(llm, count):
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    with pytest.raises(WorkerFailure) as failure:
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return failure.value, time.monotonic() - count["at"]


def check_stopped_cleanly(llm):
    engine = llm.llm_engine
    assert all(p.exitcode is not None for p in engine.executor.procs)   # no process left behind
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    assert not engine.has_unfinished_requests()
    with pytest.raises(WorkerFailure):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_killed_worker_is_named_and_the_engine_stops(llama, async_scheduling):
    llm = LLM(str(llama), skip_tokenizer_init=True, use_tqdm_on_load=False, tensor_parallel_size=2,
              worker_timeout=WORKER_TIMEOUT_S, async_scheduling=async_scheduling)
    count = sabotage_at_step(llm, step=4, rank=1, sig=signal.SIGKILL)
    error, seconds = generate_until_failure(llm, count)
    assert "rank 1 (pid" in str(error) and "died: killed by signal SIGKILL" in str(error)
    assert "during step" in str(error)
    assert seconds < WORKER_TIMEOUT_S + 5
    check_stopped_cleanly(llm)


def test_hung_worker_is_named_within_the_timeout(llama):
    # Async scheduling (the GPU default): the engine waits on step N while N+1 is already sent.
    llm = LLM(str(llama), skip_tokenizer_init=True, use_tqdm_on_load=False, tensor_parallel_size=2,
              worker_timeout=WORKER_TIMEOUT_S, async_scheduling=True)
    count = sabotage_at_step(llm, step=4, rank=1, sig=signal.SIGSTOP)   # alive, but frozen
    error, seconds = generate_until_failure(llm, count)
    assert f"rank 1 (pid {llm.llm_engine.executor.procs[1].pid}) has not responded" in str(error)
    assert WORKER_TIMEOUT_S - HEARTBEAT_S <= seconds < WORKER_TIMEOUT_S + 5
    check_stopped_cleanly(llm)


def test_ranks_that_see_different_models_are_refused():
    """The startup check, without processes: rank 1 reports another fingerprint."""
    from strata.config import ParallelConfig
    from strata.executor.multiproc import MultiprocExecutor
    from strata.executor.worker import KVPlan, ModelFacts

    executor = MultiprocExecutor.__new__(MultiprocExecutor)
    executor.parallel = ParallelConfig(tensor_parallel_size=2)
    executor.world_size = 2
    facts = ModelFacts(1, 1, None, 1)
    reports = {0: {"fingerprint": "aaaa", "plan": KVPlan(10, 160), "facts": facts},
               1: {"fingerprint": "bbbb", "plan": KVPlan(10, 160), "facts": facts}}
    executor._gather = lambda what, timeout: reports
    messages = []

    def fail(what, first_error=None):
        messages.append(what)
        raise WorkerFailure(what)

    executor._fail = fail
    with pytest.raises(WorkerFailure, match="do not see the same model and configuration"):
        executor._start(10.0)
    assert "{0: 'aaaa', 1: 'bbbb'}" in messages[0]
