"""Runs SchedulerOutputs on the model, in this process. The multi-process executor for tensor
and pipeline parallelism (multiproc.py) has the same interface."""

from __future__ import annotations

from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.executor.worker import ModelFacts
from strata.profiling import StepProfiler
from strata.runner.model_runner import ModelRunner, StepHandle


class WorkerFailure(RuntimeError):
    """A rank of a tensor/pipeline-parallel engine died, hung or failed: no further step can run."""


class UniprocExecutor:
    backend = "one process"
    supports_async = True

    def __init__(self, runner: ModelRunner, facts: ModelFacts):
        self.runner = runner
        self.facts = facts
        self.profiler = StepProfiler()

    def start_profile(self) -> None:
        self.profiler.start()

    def stop_profile(self, trace_dir: str | None = None) -> dict[int, str]:
        """The profiled kernels' table, by rank (this process is rank 0)."""
        return {0: self.profiler.stop(0, trace_dir)}

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)

    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Queue the step on the device; its results come from `finish`."""
        return self.runner.launch(sched)

    def finish(self, handle: StepHandle) -> RunnerOutput:
        return self.runner.finish(handle)

    def shutdown(self) -> None:
        pass
