"""The engine for servers: one background thread runs the step loop; asyncio callers submit
requests and receive their outputs as they come.

The LLMEngine is touched only by its own thread. Callers talk to it through a command queue
(add, abort) and get outputs through one asyncio queue per request, so many requests share every
step (continuous batching) while each caller awaits only its own stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from strata.engine.engine import LLMEngine
from strata.executor.executor import WorkerFailure
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._ids = 0
        self._id_lock = threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="strata-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any thread, usually the event loop) ------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        with self._id_lock:
            self._ids += 1
            return f"{prefix}-{self._ids}"

    async def add_request(self, request_id: str, prompt, params: SamplingParams,
                          on_finished: Callable[[RequestOutput], None] | None = None
                          ) -> AsyncIterator[RequestOutput]:
        """Admit a request and return its outputs as they come; the last has ``finished=True``
        and is passed to `on_finished` first.

        Raises the engine's validation error (prompt too long, ...) here. A caller cancelled while
        waiting, one that leaves the iteration early (a client that disconnected), and one that
        drops the stream without starting it all abort the request.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", request_id, prompt, params, stream, done))
        self._wakeup.set()
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            # The engine thread may have taken the add already; this abort is queued behind it.
            self.abort(request_id)
            raise
        ended = [False]
        outputs = self._outputs(request_id, stream.queue, ended, on_finished)
        # An async generator that never started never runs its `finally`: abort when it is collected.
        weakref.finalize(outputs, _abort_unless_ended, self, request_id, ended)
        return outputs

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; the last has ``finished=True``. Leaving the
        iteration early (a client that disconnected) aborts the request."""
        outputs = await self.add_request(request_id or self.new_request_id(), prompt, params)
        async with contextlib.aclosing(outputs):   # closing it aborts the request if unfinished
            async for out in outputs:
                yield out

    async def _outputs(self, request_id: str, items: asyncio.Queue, ended: list[bool],
                       on_finished: Callable[[RequestOutput], None] | None) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if finished and on_finished is not None:
                    on_finished(item)
                yield item
        finally:
            ended[0] = True
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()   # worker processes of a tensor/pipeline-parallel engine

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except WorkerFailure as e:   # a rank died or hung: no step can run any more
                    self._fail_all(e)
                    raise
                except Exception as e:   # a bug: fail the requests in flight, keep the server up
                    logger.exception("engine step failed")
                    self._fail_all(e)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:   # the loop itself broke: say so on /health
            logger.exception("the engine thread stopped")
            self.error = e
            raise

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    self._deliver(cmd[1], out)

    def _add(self, request_id, prompt, params, stream, done: concurrent.futures.Future) -> None:
        if not done.set_running_or_notify_cancel():
            return   # the caller gave up (client gone) before the request was admitted
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as e:
            done.set_exception(e)
            return
        self._streams[request_id] = stream
        done.set_result(None)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        finished = isinstance(item, BaseException) or item.finished
        if finished:
            del self._streams[request_id]
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:
            pass   # the caller's loop is gone

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
            self._deliver(request_id, RuntimeError(f"request failed inside the engine: {error}"))


def _abort_unless_ended(engine: AsyncEngine, request_id: str, ended: list[bool]) -> None:
    if not ended[0]:
        engine.abort(request_id)
