"""torch.profiler around engine steps, on every rank: ``LLM.start_profile()`` and
``LLM.stop_profile()`` (vLLM's names). Each rank profiles its own process; stopping returns a
table of the kernels that took the most device time (CUDA graphs' kernels are listed one by
one), and with a folder writes each rank's Chrome trace there (``rank{N}.json``, for Perfetto
or chrome://tracing)."""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self):
        self._prof = None

    def start(self) -> None:
        if self._prof is not None:
            raise RuntimeError("the profiler is already running: stop_profile() first")
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def stop(self, rank: int = 0, trace_dir: str | None = None, rows: int = 30) -> str:
        if self._prof is None:
            raise RuntimeError("the profiler is not running: start_profile() first")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(trace_dir) / f"rank{rank}.json"))
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
