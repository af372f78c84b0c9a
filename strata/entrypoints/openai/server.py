"""The OpenAI-compatible HTTP server: FastAPI routes, errors in OpenAI's body, API keys,
Server-Sent Events for streams, Prometheus metrics and the web chat page."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import strata
from strata.engine.async_engine import AsyncEngine
from strata.entrypoints.openai import protocol as P
from strata.entrypoints.openai.serving import APIError, OpenAIServing
from strata.metrics import EngineMetrics

STATIC = Path(__file__).parent / "static"


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    err = APIError(status, message, param, kind)
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=err.kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="strata", version=strata.__version__,
                  description="OpenAI-compatible API served by strata")
    metrics = EngineMetrics(engine.engine.scheduler)
    serving = OpenAIServing(engine, model_name, metrics)
    app.state.engine = engine
    app.state.serving = serving

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                      kind="AuthenticationError")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg', '')}")
        param = ".".join(loc) or None
        return error_response(400, f"invalid request: {param or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return error_response(503, f"engine stopped: {engine.error}")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version():
        return {"version": strata.__version__}

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=model_name, max_model_len=serving.max_model_len)])

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=P.CompletionResponse)
    async def completions(body: P.CompletionRequest, request: Request):
        return await _respond(request, serving.completions(body), body.stream)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat(body: P.ChatCompletionRequest, request: Request):
        return await _respond(request, serving.chat(body), body.stream)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


async def _respond(request: Request, work, stream: bool):
    """Run one API call; a client that goes away cancels it, which aborts its requests."""
    if stream:
        events = await work
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return error_response(499, "client closed the request")
    return task.result()


def run_server(args) -> None:
    """`strata serve`: build the engine, then serve until interrupted."""
    import logging

    import uvicorn

    from strata import LLM
    from strata.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items() if k != "extra"})
    async_engine = AsyncEngine(llm.llm_engine)
    name = args.served_model_name or _default_name(llm.llm_engine.source.name)
    api_key = args.api_key or os.environ.get("STRATA_API_KEY")
    app = build_app(async_engine, name, api_key)
    logging.getLogger("strata").info(f"serving {name} on http://{args.host}:{args.port} "
                                     f"(OpenAI API under /v1, chat page at /)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    finally:
        async_engine.shutdown()


def _default_name(source: str) -> str:
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else (path.name or source)
