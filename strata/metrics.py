"""Prometheus metrics in the text exposition format, with no dependency: counters, gauges and
histograms, and the set strata's server exports (named like vLLM's, under ``strata:``)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import astuple, dataclass
from typing import Callable


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.doc = doc
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str):
        super().__init__(name, doc)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}_total {self.value:g}"]


class Gauge(_Metric):
    """A value read when scraped."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, read: Callable[[], float]):
        super().__init__(name, doc)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {float(self.read()):g}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: list[float]):
        super().__init__(name, doc)
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = self.header()
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {self.count}"]
        return lines


_LATENCY = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0]


@dataclass(frozen=True)
class EngineStats:
    """An engine's gauges at one moment (summed over data-parallel replicas)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks: int = 0
    prefix_hits: int = 0       # blocks
    prefix_queries: int = 0    # blocks
    num_preemptions: int = 0

    @staticmethod
    def of(scheduler) -> "EngineStats":
        pool = scheduler.kv.pool
        return EngineStats(len(scheduler.running), len(scheduler.waiting),
                           pool.num_blocks - pool.num_free_blocks, pool.num_blocks, pool.num_hits,
                           pool.num_queries, scheduler.num_preemptions)

    def __add__(self, other: "EngineStats") -> "EngineStats":
        return EngineStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks if self.kv_blocks else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class EngineMetrics:
    """What the server exports. Request-level values are recorded when a request finishes;
    engine-level gauges are read through `stats` (an engine's ``stats`` method) at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.ttft = Histogram("strata:time_to_first_token_seconds", "Time to first token.", _LATENCY)
        self.tpot = Histogram("strata:time_per_output_token_seconds", "Time per output token after the first.", _LATENCY)
        self.e2e = Histogram("strata:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY)
        self.queue = Histogram("strata:request_queue_time_seconds", "Time from arrival to first scheduling.", _LATENCY)
        self.prompt_tokens = Counter("strata:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = Counter("strata:generation_tokens", "Tokens generated.")
        self.requests = Counter("strata:request_success", "Requests finished (any reason).")
        self.metrics: list[_Metric] = [
            self.ttft, self.tpot, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens,
            self.requests,
            Gauge("strata:num_requests_running", "Sequences running on the engine.", lambda: stats().num_running),
            Gauge("strata:num_requests_waiting", "Sequences waiting to be scheduled.", lambda: stats().num_waiting),
            Gauge("strata:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).", lambda: stats().kv_usage),
            Gauge("strata:prefix_cache_hit_rate", "Prefix-cache hits over lookups, in blocks (0-1).",
                  lambda: stats().prefix_hit_rate),
            Gauge("strata:num_preemptions", "Preemptions since start.", lambda: stats().num_preemptions),
        ]

    def record_finished(self, out) -> None:
        m = out.metrics
        if m is None:
            return
        self.requests.inc()
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(m.num_generation_tokens)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.last_token_time is not None and m.num_generation_tokens > 1:
                self.tpot.observe((m.last_token_time - m.first_token_time) / (m.num_generation_tokens - 1))
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"

