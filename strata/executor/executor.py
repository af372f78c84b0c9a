"""Runs SchedulerOutputs on the model. One process for now; the multi-process executor for
tensor and pipeline parallelism keeps this interface."""

from __future__ import annotations

from strata.core.sched_output import RunnerOutput, SchedulerOutput
from strata.runner.model_runner import ModelRunner


class UniprocExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)

    def shutdown(self) -> None:
        pass
