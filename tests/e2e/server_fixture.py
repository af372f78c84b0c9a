"""A live strata server on loopback, in a background thread of the test process."""

from __future__ import annotations

import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, llm, model_name="smollm2", api_key=None):
        import uvicorn

        from strata.engine.async_engine import AsyncEngine
        from strata.entrypoints.openai.server import build_app
        self.llm = llm
        self.engine = AsyncEngine(llm.llm_engine)
        self.app = build_app(self.engine, model_name, api_key)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()

    def wait_idle(self, timeout=10.0) -> bool:
        """True once no request is left and every KV block is free."""
        sched = self.llm.llm_engine.scheduler
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not sched.requests and sched.kv.num_free_blocks == sched.kv.num_blocks:
                return True
            time.sleep(0.05)
        return False
