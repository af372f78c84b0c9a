"""Runs SchedulerOutputs on the model. One process for now; the multi-process executor for
tensor and pipeline parallelism keeps this interface."""

from __future__ import annotations

from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.runner.model_runner import ModelRunner, StepHandle


class UniprocExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)

    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Queue the step on the device; its results come from `finish`."""
        return self.runner.launch(sched)

    def finish(self, handle: StepHandle) -> RunnerOutput:
        return self.runner.finish(handle)

    def shutdown(self) -> None:
        pass
